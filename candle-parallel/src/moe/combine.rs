//! Combining the experts' outputs: each routed copy's output, times its routing weight, added
//! into its token's row. [`combine_outputs`] is differentiable; [`combine_into`] is the
//! inference pass that adds one expert's rows into an output in place, so that no copy of
//! all the experts' outputs is made.

use crate::ops;
use candle_core::{bail, CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Weights `y` (rows in `assignment` order) by the routing weights and adds them into a
/// `[t, h]` output at their tokens.
pub fn combine_outputs(
    y: &Tensor,
    weights: &Tensor,
    assignment: &[u32],
    token: &[u32],
    t: usize,
) -> Result<Tensor> {
    if let Some(out) = combine_fused(y, weights, assignment, token, t)? {
        return Ok(out);
    }
    if ops::selective_recompute() && !assignment.is_empty() && (y.track_op() || weights.track_op())
    {
        // The weighted rows (`[k·t, h]`) and the zeros they are added into are not kept: the
        // backward redoes the multiply and the scatter (selective recomputation of the
        // unpermutation).
        let (assignment, token) = (assignment.to_vec(), token.to_vec());
        return ops::checkpoint("moe_combine", &[y, weights], move |x| {
            combine(&x[0], &x[1], &assignment, &token, t)
        });
    }
    combine(y, weights, assignment, token, t)
}

/// [`combine_outputs`] on the CPU in f32 or f64 (weights and rows of one dtype): the forward is
/// [`combine_into`]'s pass into zeros (the same bits as the composite ops), and the backward one
/// pass over the rows that gives each row's gradient `w[j] · g[token[j]]` and its routing
/// weight's `g[token[j]] · y[j]`. Candle's composite (a gather of the weights, a broadcast
/// multiply, an `index_add` into zeros) keeps the `[k·t, h]` weighted rows and takes some ten
/// passes over them in its backward; this keeps nothing but its inputs. `None` elsewhere.
fn combine_fused(
    y: &Tensor,
    weights: &Tensor,
    assignment: &[u32],
    token: &[u32],
    t: usize,
) -> Result<Option<Tensor>> {
    let fits = y.device().is_cpu()
        && matches!(y.dtype(), DType::F32 | DType::F64)
        && weights.dtype() == y.dtype()
        && !assignment.is_empty()
        && (y.track_op() || weights.track_op());
    if !fits {
        return Ok(None);
    }
    let (n, h) = y.dims2()?;
    if h == 0 {
        return Ok(None);
    }
    if assignment.len() != n || token.len() != n {
        bail!(
            "moe combine: {n} rows with {} routing assignments and {} tokens",
            assignment.len(),
            token.len()
        )
    }
    let flat: Vec<f64> = weights.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    if let Some(&bad) = assignment.iter().find(|&&k| k as usize >= flat.len()) {
        bail!(
            "moe combine: routing assignment {bad} is outside the {} routing weights",
            flat.len()
        )
    }
    let wj: Vec<f64> = assignment.iter().map(|&k| flat[k as usize]).collect();
    let out = zeros_for_combine(t, h, y.dtype())?;
    let y_in = y.detach().contiguous()?;
    combine_into(&out, &y_in, &wj, token)?;
    let (assignment, token) = (assignment.to_vec(), token.to_vec());
    let wdims = weights.dims().to_vec();
    let out = ops::attach_backward("moe_combine", &out, &[y, weights], move |ins, _, g| {
        let vjp = CombineVjp {
            weights: &wj,
            token: &token,
            dots: Mutex::new(Vec::new()),
        };
        let dy = g
            .contiguous()?
            .apply_op2_no_bwd(&ins[0].contiguous()?, &vjp)?;
        let dots = std::mem::take(&mut *vjp.dots.lock().unwrap_or_else(|e| e.into_inner()));
        let mut dw = vec![0f64; wdims.iter().product()];
        // Rows sharing a routing weight add up, as the composite's gather does.
        for (&k, d) in assignment.iter().zip(dots) {
            dw[k as usize] += d;
        }
        let dw =
            Tensor::from_vec(dw, wdims.as_slice(), ins[1].device())?.to_dtype(ins[1].dtype())?;
        Ok(vec![Some(dy), Some(dw)])
    })?;
    Ok(Some(out))
}

/// [`combine_fused`]'s backward over `(g, y)`: the rows' gradient `[n, h]`, and each row's dot
/// product with its token's gradient (the routing weight's gradient) left in `dots`.
struct CombineVjp<'a> {
    weights: &'a [f64],
    token: &'a [u32],
    dots: Mutex<Vec<f64>>,
}

impl CombineVjp<'_> {
    fn run<T>(&self, g: &[T], y: &[T], h: usize) -> Vec<T>
    where
        T: candle_core::WithDType + std::ops::Mul<Output = T> + std::ops::AddAssign,
    {
        let n = self.token.len();
        let mut dy = vec![T::zero(); n * h];
        let mut dots = vec![0f64; n];
        dy.par_chunks_mut(h)
            .zip(dots.par_iter_mut())
            .enumerate()
            .for_each(|(j, (row, dot))| {
                let gr = &g[self.token[j] as usize * h..][..h];
                let (yr, w) = (&y[j * h..][..h], T::from_f64(self.weights[j]));
                let mut acc = T::zero();
                for ((d, &gv), &yv) in row.iter_mut().zip(gr).zip(yr) {
                    *d = gv * w;
                    acc += gv * yv;
                }
                *dot = acc.to_f64();
            });
        *self.dots.lock().unwrap_or_else(|e| e.into_inner()) = dots;
        dy
    }
}

impl CustomOp2 for CombineVjp<'_> {
    fn name(&self) -> &'static str {
        "moe-combine-vjp"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((gs, ge)), Some((ys, ye))) = (lg.contiguous_offsets(), ly.contiguous_offsets())
        else {
            bail!("moe combine backward: the gradient and rows must be contiguous")
        };
        let (n, h) = ly.shape().dims2()?;
        if self.token.len() != n || self.token.iter().any(|&k| (k as usize + 1) * h > ge - gs) {
            bail!("moe combine backward: {n} rows whose tokens fall outside the gradient")
        }
        let out = match (g, y) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => {
                CpuStorage::F32(self.run(&g[gs..ge], &y[ys..ye], h))
            }
            (CpuStorage::F64(g), CpuStorage::F64(y)) => {
                CpuStorage::F64(self.run(&g[gs..ge], &y[ys..ye], h))
            }
            _ => bail!("moe combine backward: the pass runs on f32 or f64"),
        };
        Ok((out, Shape::from((n, h))))
    }
}

/// [`combine_outputs`], every intermediate kept.
fn combine(
    y: &Tensor,
    weights: &Tensor,
    assignment: &[u32],
    token: &[u32],
    t: usize,
) -> Result<Tensor> {
    let (_, h) = y.dims2()?;
    let out = Tensor::zeros((t, h), y.dtype(), y.device())?;
    if assignment.is_empty() {
        return ops::depend_on(&out, &[y, weights]);
    }
    let dev = y.device();
    let w = weights
        .flatten_all()?
        .index_select(&Tensor::new(assignment, dev)?, 0)?
        .to_dtype(y.dtype())?;
    out.index_add(
        &Tensor::new(token, dev)?,
        &y.broadcast_mul(&w.unsqueeze(1)?)?,
        0,
    )
}

/// Inference: adds `weights[j] · y[j]` into `out[token[j]]` for every row `j` of `y`, in
/// place (`out` is `[t, h]`, contiguous, on the CPU, f32 or f64 like `y`; start from
/// [`zeros_for_combine`]). Every tensor sharing `out`'s storage sees the change, and neither
/// tensor may track gradients. Rows landing on the same token add in order, so a sequence of
/// calls gives the same bits as [`combine_outputs`] over the concatenated rows.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_parallel::moe::combine_into;
///
/// let out = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let y = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// combine_into(&out, &y, &[0.5, 2.0], &[1, 1])?;
/// assert_eq!(out.to_vec2::<f32>()?, [[0.0, 0.0], [6.5, 9.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn combine_into(out: &Tensor, y: &Tensor, weights: &[f64], token: &[u32]) -> Result<()> {
    let (t, h) = out.dims2()?;
    let (n, hy) = y.dims2()?;
    if hy != h || n != token.len() || n != weights.len() {
        bail!(
            "moe combine_into: {n} rows of width {hy} with {} weights and {} tokens cannot be added \
             into an output of shape [{t}, {h}]",
            weights.len(),
            token.len()
        )
    }
    if let Some(&bad) = token.iter().find(|&&k| k as usize >= t) {
        bail!("moe combine_into: token {bad} is outside the output's {t} rows")
    }
    if out.track_op() || y.track_op() {
        bail!(
            "moe combine_into: the {} tracks gradients and an in-place pass has no backward: use \
             combine_outputs",
            if out.track_op() { "output" } else { "input" }
        )
    }
    if !out.device().is_cpu()
        || !out.is_contiguous()
        || out.dtype() != y.dtype()
        || !matches!(out.dtype(), DType::F32 | DType::F64)
    {
        bail!(
            "moe combine_into: the output ({:?} on {:?}, contiguous: {}) and rows ({:?}) must be \
             contiguous CPU tensors of one dtype, f32 or f64",
            out.dtype(),
            out.device().location(),
            out.is_contiguous(),
            y.dtype()
        )
    }
    if n == 0 || h == 0 {
        return Ok(());
    }
    // Rows in token order (stable: a token's rows keep their order), so that each parallel
    // block of output rows takes a contiguous run of them.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&j| token[j]);
    out.inplace_op2(
        &y.contiguous()?,
        &CombineInto {
            weights,
            token,
            order,
        },
    )
}

/// A `[t, h]` output of zeros for [`combine_into`] (CPU), written by all the cores: the first
/// touch of a fresh buffer of megabytes is mostly page faults, which `Tensor::zeros` (calloc)
/// leaves to one thread (measured for the benchmark's 8 MB output: 3.1 ms, 1.7 ms here).
pub fn zeros_for_combine(t: usize, h: usize, dtype: DType) -> Result<Tensor> {
    fn fill<T: candle_core::WithDType>(n: usize) -> Vec<T> {
        let mut v = Vec::with_capacity(n);
        v.spare_capacity_mut()
            .par_chunks_mut(BLOCK_ROWS * 1024)
            .for_each(|c| c.fill(std::mem::MaybeUninit::new(T::zero())));
        // SAFETY: the loop wrote every element of the n-element spare capacity.
        unsafe { v.set_len(n) };
        v
    }
    let dev = &candle_core::Device::Cpu;
    match dtype {
        DType::F32 => Tensor::from_vec(fill::<f32>(t * h), (t, h), dev),
        DType::F64 => Tensor::from_vec(fill::<f64>(t * h), (t, h), dev),
        _ => Tensor::zeros((t, h), dtype, dev),
    }
}

/// [`combine_into`]'s pass.
struct CombineInto<'a> {
    weights: &'a [f64],
    token: &'a [u32],
    order: Vec<usize>,
}

/// Output rows per parallel task.
const BLOCK_ROWS: usize = 64;

impl CombineInto<'_> {
    fn run<T>(&self, out: &mut [T], y: &[T], h: usize)
    where
        T: Copy + Send + Sync + std::ops::AddAssign + std::ops::Mul<Output = T>,
        T: candle_core::WithDType,
    {
        let (token, order) = (self.token, &self.order);
        out.par_chunks_mut(BLOCK_ROWS * h)
            .enumerate()
            .for_each(|(b, block)| {
                let lo = b * BLOCK_ROWS;
                let hi = lo + block.len() / h;
                let first = order.partition_point(|&j| (token[j] as usize) < lo);
                for &j in order[first..]
                    .iter()
                    .take_while(|&&j| (token[j] as usize) < hi)
                {
                    let w = T::from_f64(self.weights[j]);
                    let row = &mut block[(token[j] as usize - lo) * h..][..h];
                    // The product rounded, then the sum: the same bits as combine_outputs.
                    for (o, &v) in row.iter_mut().zip(&y[j * h..][..h]) {
                        *o += v * w;
                    }
                }
            });
    }
}

impl InplaceOp2 for CombineInto<'_> {
    fn name(&self) -> &'static str {
        "moe-combine-into"
    }

    fn cpu_fwd(&self, o: &mut CpuStorage, lo: &Layout, y: &CpuStorage, ly: &Layout) -> Result<()> {
        let (Some((os, oe)), Some((ys, ye))) = (lo.contiguous_offsets(), ly.contiguous_offsets())
        else {
            bail!("moe combine_into: the output and rows must be contiguous")
        };
        let h = lo.dims()[1];
        match (o, y) {
            (CpuStorage::F32(o), CpuStorage::F32(y)) => self.run(&mut o[os..oe], &y[ys..ye], h),
            (CpuStorage::F64(o), CpuStorage::F64(y)) => self.run(&mut o[os..oe], &y[ys..ye], h),
            _ => bail!("moe combine_into: the pass runs on f32 or f64"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused combine gives the composite's output bit for bit and its gradients (rows
    /// and routing weights) to float precision, tokens with several rows included.
    #[test]
    fn the_fused_combine_equals_the_composite() -> Result<()> {
        let dev = Device::Cpu;
        let (t, k, h) = (4, 2, 5);
        let y = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t * k, h), &dev)?)?;
        let w = Var::from_tensor(&Tensor::rand(0f32, 1.0, (t, k), &dev)?)?;
        let token: Vec<u32> = (0..t * k).map(|j| (j % t) as u32).collect();
        let mut assignment: Vec<u32> = (0..t * k).map(|j| ((j % t) * k + j / t) as u32).collect();
        // Two rows sharing a routing weight: its gradient is their sum.
        assignment[1] = assignment[0];
        let upstream = Tensor::randn(0f32, 1.0, (t, h), &dev)?;
        let fused = combine_fused(y.as_tensor(), w.as_tensor(), &assignment, &token, t)?
            .expect("CPU f32 with gradients takes the fused pass");
        let composite = combine(y.as_tensor(), w.as_tensor(), &assignment, &token, t)?;
        assert_eq!(fused.to_vec2::<f32>()?, composite.to_vec2::<f32>()?);
        let (a, b) = (
            (&fused * &upstream)?.sum_all()?.backward()?,
            (&composite * &upstream)?.sum_all()?.backward()?,
        );
        for v in [&y, &w] {
            let d = (a.get(v.as_tensor()).unwrap() - b.get(v.as_tensor()).unwrap())?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "{d}");
        }
        // Nothing to differentiate, or another dtype: the composite path.
        let plain = y.as_tensor().detach();
        assert!(combine_fused(&plain, &w.as_tensor().detach(), &assignment, &token, t)?.is_none());
        Ok(())
    }
}
