//! The optimizer step's element-wise work as single passes on the CPU: AdamW's moment and
//! weight updates written in place (candle's composite takes a dozen passes, each into a
//! fresh buffer) and the gradient's sum of squares without a squared copy, for [`super::AdamW`]
//! and [`crate::zero::ZeroOptimizer`].

use super::AdamWConfig;
use candle_core::{bail, CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout};
use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const TASK: usize = 1 << 15;

/// Whether the fused passes take these tensors: f32 on the CPU, contiguous.
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// One AdamW step's constants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    pub cfg: AdamWConfig,
    /// `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    pub bias1: f64,
    pub bias2: f64,
    /// What the gradient is multiplied by first (the mean over replicas, the clip factor).
    pub grad_scale: f64,
}

/// Elements per slice of a step: the later passes over a slice find the moments and gradient
/// it touches (about 20 MiB) in the last-level cache.
pub(crate) const SLICE: usize = 1 << 20;

/// [`adamw_in_place`] over 1-D tensors of one length, a [`SLICE`] at a time.
pub(crate) fn adamw_in_slices(
    m: &Tensor,
    v: &Tensor,
    w: &Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    let n = g.elem_count();
    for c0 in (0..n).step_by(SLICE) {
        let k = SLICE.min(n - c0);
        let slice = |t: &Tensor| t.narrow(0, c0, k);
        adamw_in_place(&slice(m)?, &slice(v)?, &slice(w)?, &slice(g)?, s)?;
    }
    Ok(())
}

/// AdamW on one slice, in place: `m` and `v` (the moments) from the gradient `g`, then `w`
/// (the f32 weights: a master copy, or the parameters themselves) from them. All f32 on the
/// CPU, contiguous, of one length ([`applies`]).
pub(crate) fn adamw_in_place(
    m: &Tensor,
    v: &Tensor,
    w: &Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    let n = g.elem_count();
    if [m, v, w].iter().any(|t| t.elem_count() != n) || !applies(&[m, v, w, g]) {
        bail!(
            "zero: the fused AdamW pass takes contiguous f32 CPU slices of one length (moments \
             {:?} {:?} and {:?} {:?}, weights {:?} {:?}, gradient {:?} {:?})",
            m.dims(),
            m.dtype(),
            v.dims(),
            v.dtype(),
            w.dims(),
            w.dtype(),
            g.dims(),
            g.dtype()
        )
    }
    m.inplace_op2(
        g,
        &Moment {
            step: *s,
            second: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            step: *s,
            second: true,
        },
    )?;
    w.inplace_op3(m, v, &Weights(*s))
}

/// The slice of `s` that `l` (contiguous) covers.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("zero: the fused AdamW pass needs a contiguous f32 {what}"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("zero: the fused AdamW pass needs a contiguous f32 {what}"),
    }
}

/// `m ← β₁·m + (1 − β₁)·ĝ`, or `v ← β₂·v + (1 − β₂)·ĝ²` (`second`), with `ĝ = scale · g`.
struct Moment {
    step: AdamWStep,
    second: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "zero-adamw-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, lm: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let (m, g) = (slice_mut(m, lm, "moment")?, slice(g, lg, "gradient")?);
        let scale = self.step.grad_scale as f32;
        let (beta, second) = if self.second {
            (self.step.cfg.beta2, true)
        } else {
            (self.step.cfg.beta1, false)
        };
        // The constants rounded from f64, as candle's scalar ops (and PyTorch) round them.
        let (rest, beta) = ((1.0 - beta) as f32, beta as f32);
        m.par_chunks_mut(TASK)
            .zip(g.par_chunks(TASK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * scale;
                    let x = if second { g * g } else { g };
                    *m = *m * beta + x * rest;
                }
            });
        Ok(())
    }
}

/// `w ← w·(1 − lr·λ) − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)`.
struct Weights(AdamWStep);

impl InplaceOp3 for Weights {
    fn name(&self) -> &'static str {
        "zero-adamw-weights"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        lw: &Layout,
        m: &CpuStorage,
        lm: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<()> {
        let w = slice_mut(w, lw, "weight")?;
        let (m, v) = (slice(m, lm, "moment")?, slice(v, lv, "moment")?);
        let c = self.0.cfg;
        let decay = (1.0 - c.lr * c.weight_decay) as f32;
        let (lr, eps) = (c.lr as f32, c.eps as f32);
        // Bias corrections as reciprocals, as candle's `t / x` computes `t · (1/x)`.
        let (inv1, inv2) = ((1.0 / self.0.bias1) as f32, (1.0 / self.0.bias2) as f32);
        w.par_chunks_mut(TASK)
            .zip(m.par_chunks(TASK).zip(v.par_chunks(TASK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    *w = *w * decay - lr * ((m * inv1) / ((v * inv2).sqrt() + eps));
                }
            });
        Ok(())
    }
}

/// `Σ x²` of an f32 CPU tensor, accumulated in f64 over fixed blocks added in order (the same
/// bits whatever the thread count); `None` where the pass does not apply.
pub(crate) fn sum_of_squares(x: &Tensor) -> Result<Option<f64>> {
    if !applies(&[x]) {
        return Ok(None);
    }
    let s = x.apply_op1_no_bwd(&SumOfSquares)?;
    Ok(Some(s.to_scalar::<f64>()?))
}

struct SumOfSquares;

impl CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "zero-sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gradient")?;
        let parts: Vec<f64> = x
            .par_chunks(TASK)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
            .collect();
        Ok((CpuStorage::F64(vec![parts.iter().sum()]), Shape::from(())))
    }
}
