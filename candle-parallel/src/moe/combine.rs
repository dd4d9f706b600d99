//! Combining the experts' outputs: each routed copy's output, times its routing weight, added
//! into its token's row. [`combine_outputs`] is differentiable; [`combine_into`] is the
//! inference pass that adds one expert's rows into an output in place, so that no copy of
//! all the experts' outputs is made.

use crate::ops;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Weights `y` (rows in `assignment` order) by the routing weights and adds them into a
/// `[t, h]` output at their tokens.
pub fn combine_outputs(
    y: &Tensor,
    weights: &Tensor,
    assignment: &[u32],
    token: &[u32],
    t: usize,
) -> Result<Tensor> {
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
