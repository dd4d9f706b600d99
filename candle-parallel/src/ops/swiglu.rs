//! SwiGLU, `silu(a) · b`, fused on the CPU: one pass forward and one backward (candle's
//! composite takes five passes forward and backward), split over the cores. The MoE experts
//! and the Llama / Mixtral MLPs spend most of their non-matmul time here.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// SwiGLU, `silu(a) · b` (the gate of Llama and Mixtral MLPs), with a backward. Fused on the
/// CPU for f32 and f64 tensors of the same shape; candle's composite elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_parallel::ops;
///
/// let a = Tensor::new(&[0f32, 1.0, -2.0], &Device::Cpu)?;
/// let b = Tensor::new(&[3f32, 2.0, 1.0], &Device::Cpu)?;
/// let want = (a.silu()? * &b)?.to_vec1::<f32>()?;
/// let got = ops::swiglu(&a, &b)?.to_vec1::<f32>()?;
/// assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = a.device().is_cpu()
        && a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64);
    if !fused {
        return a.silu()? * b;
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SwiGlu)
}

/// The gradients `(d a, d b)` of [`swiglu`] for the output gradient `g`: fused on the CPU for
/// f32 and f64, Candle's element-wise ops elsewhere.
pub(crate) fn swiglu_vjp(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let fused = a.device().is_cpu()
        && a.dims() == b.dims()
        && a.dims() == g.dims()
        && a.dtype() == b.dtype()
        && a.dtype() == g.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64);
    if fused {
        let both = a.detach().contiguous()?.apply_op3_no_bwd(
            &b.detach().contiguous()?,
            &g.contiguous()?,
            &SwiGluBwd,
        )?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    // s = σ(a): d a = g · b · s · (1 + a (1 − s)), d b = g · a · s.
    let s = candle_nn::ops::sigmoid(a)?;
    let silu = (a * &s)?;
    let da = ((g * b)? * (&s * ((a * (1.0 - &s)?)? + 1.0)?)?)?;
    Ok((da, (g * silu)?))
}

/// SwiGLU for inference, written over `a`: `a ← silu(a) · b`, in one pass without a new
/// buffer (a MoE layer's expert activations are megabytes each: a fresh buffer per expert
/// costs page faults as well as the pass). CPU, f32 or f64, same shapes, `a` contiguous.
///
/// Every tensor sharing `a`'s storage sees the change, and there is no backward: it refuses
/// tensors that track gradients (use [`swiglu`] there).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_parallel::ops;
///
/// let a = Tensor::new(&[0f32, 1.0, -2.0], &Device::Cpu)?;
/// let b = Tensor::new(&[3f32, 2.0, 1.0], &Device::Cpu)?;
/// let want = ops::swiglu(&a, &b)?.to_vec1::<f32>()?;
/// ops::swiglu_in_place(&a, &b)?;
/// assert_eq!(a.to_vec1::<f32>()?, want);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn swiglu_in_place(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.track_op() || b.track_op() {
        candle_core::bail!(
            "swiglu_in_place: {} tracks gradients and an in-place pass has no backward: use \
             ops::swiglu",
            if a.track_op() { "a" } else { "b" }
        )
    }
    if !a.device().is_cpu() || a.dims() != b.dims() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "swiglu_in_place: a ({:?} {:?} on {:?}) and b ({:?} {:?}) must be CPU tensors of one \
             shape and dtype",
            a.dims(),
            a.dtype(),
            a.device().location(),
            b.dims(),
            b.dtype()
        )
    }
    if !a.is_contiguous() {
        candle_core::bail!("swiglu_in_place: a ({:?}) must be contiguous", a.dims())
    }
    a.inplace_op2(&b.contiguous()?, &SwiGluInPlace)
}

/// Elements per parallel task: large enough that scheduling costs nothing next to the pass.
const CHUNK_MIN: usize = 1 << 15;

/// How many elements each of the pool's threads takes (one chunk per thread).
fn chunk_len(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1))
        .max(CHUNK_MIN)
}

/// The element types the fused passes run on.
trait Real: Copy + Send + Sync + 'static {
    /// The logistic sigmoid.
    fn sigmoid(x: Self) -> Self;
    fn fwd(a: Self, b: Self) -> Self;
    /// `(d a, d b)` of `silu(a) · b` for the output gradient `g`.
    fn bwd(a: Self, b: Self, g: Self) -> (Self, Self);
}

macro_rules! swiglu_formulas {
    () => {
        #[inline(always)]
        fn fwd(a: Self, b: Self) -> Self {
            a * Self::sigmoid(a) * b
        }

        #[inline(always)]
        fn bwd(a: Self, b: Self, g: Self) -> (Self, Self) {
            let s = Self::sigmoid(a);
            (g * b * s * (1.0 + a * (1.0 - s)), g * a * s)
        }
    };
}

impl Real for f32 {
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + exp_f32(-x))
    }

    swiglu_formulas!();
}

impl Real for f64 {
    #[inline(always)]
    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    swiglu_formulas!();
}

/// `exp(x)` in f32 without a library call, so that loops over it vectorise: `2^n · e^r` with
/// `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and Cephes' degree-6 polynomial for `e^r`
/// (relative error about 1e-7). The input is clamped to [-87, 88], where `2^n` is a normal
/// float; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    let n_bits = t.to_bits().wrapping_sub(SHIFT.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s[start..end]),
        None => candle_core::bail!("swiglu: the fused pass needs contiguous inputs"),
    }
}

/// Defines `$name`, which runs the `#[inline(always)]` loop `$body` compiled for AVX-512 or
/// AVX2 + FMA where the CPU has them. The default build targets baseline x86-64 (SSE2), where
/// the passes' exp and division run four lanes wide; AVX-512 runs sixteen. Each lane does
/// the same IEEE operations in every version, so the results are the same bits.
macro_rules! widest_vectors {
    ($name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        fn $name<T: Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512<T: Real>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<T: Real>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: this CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: this CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[inline(always)]
fn forward_loop<T: Real>(y: &mut [MaybeUninit<T>], a: &[T], b: &[T]) {
    for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
        y.write(T::fwd(a, b));
    }
}

#[inline(always)]
fn in_place_loop<T: Real>(a: &mut [T], b: &[T]) {
    for (a, &b) in a.iter_mut().zip(b) {
        *a = T::fwd(*a, b);
    }
}

#[inline(always)]
fn backward_loop<T: Real>(
    da: &mut [MaybeUninit<T>],
    db: &mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    g: &[T],
) {
    for ((da, db), ((&a, &b), &g)) in da.iter_mut().zip(db).zip(a.iter().zip(b).zip(g)) {
        let (x, y) = T::bwd(a, b, g);
        da.write(x);
        db.write(y);
    }
}

widest_vectors!(forward_chunk(y: &mut [MaybeUninit<T>], a: &[T], b: &[T]) => forward_loop);
widest_vectors!(in_place_chunk(a: &mut [T], b: &[T]) => in_place_loop);
widest_vectors!(backward_chunk(
    da: &mut [MaybeUninit<T>],
    db: &mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    g: &[T]
) => backward_loop);

/// `silu(a) · b`; `a` and `b` have the same length.
fn forward<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
    let n = a.len().min(b.len());
    let c = chunk_len(n);
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(c)
        .zip(a[..n].par_chunks(c).zip(b[..n].par_chunks(c)))
        .for_each(|(y, (a, b))| forward_chunk(y, a, b));
    // SAFETY: the chunks of the n-element spare capacity, of `a[..n]` and of `b[..n]` have the
    // same lengths, so the loops above wrote every element of 0..n.
    unsafe { out.set_len(n) };
    out
}

/// `a ← silu(a) · b`; `a` and `b` have the same length.
fn forward_in_place<T: Real>(a: &mut [T], b: &[T]) {
    let c = chunk_len(a.len());
    a.par_chunks_mut(c)
        .zip(b.par_chunks(c))
        .for_each(|(a, b)| in_place_chunk(a, b));
}

/// `[d a; d b]`, the two gradients one after the other; `a`, `b` and `g` have the same length.
fn backward<T: Real>(a: &[T], b: &[T], g: &[T]) -> Vec<T> {
    let n = a.len().min(b.len()).min(g.len());
    let c = chunk_len(n);
    let mut out = Vec::with_capacity(2 * n);
    let (da, db) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    da.par_chunks_mut(c)
        .zip(db.par_chunks_mut(c))
        .zip(
            a[..n]
                .par_chunks(c)
                .zip(b[..n].par_chunks(c))
                .zip(g[..n].par_chunks(c)),
        )
        .for_each(|((da, db), ((a, b), g))| backward_chunk(da, db, a, b, g));
    // SAFETY: both halves and the three inputs are cut into chunks of the same lengths, so the
    // loops above wrote every element of 0..2n.
    unsafe { out.set_len(2 * n) };
    out
}

/// The two layouts must describe the same number of elements (the fused passes pair them).
fn same_len(what: &str, a: &Layout, b: &Layout) -> Result<()> {
    if a.shape().elem_count() != b.shape().elem_count() {
        candle_core::bail!(
            "swiglu {what}: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )
    }
    Ok(())
}

/// The fused forward, with the fused backward.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_len("forward", la, lb)?;
        let out = match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(forward(contiguous(a, la)?, contiguous(b, lb)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(forward(contiguous(a, la)?, contiguous(b, lb)?))
            }
            _ => candle_core::bail!("swiglu: the fused pass runs on f32 or f64 pairs"),
        };
        Ok((out, la.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a
            .detach()
            .apply_op3_no_bwd(&b.detach(), &g.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// [`swiglu_in_place`]'s pass.
struct SwiGluInPlace;

impl InplaceOp2 for SwiGluInPlace {
    fn name(&self) -> &'static str {
        "swiglu-in-place"
    }

    fn cpu_fwd(&self, a: &mut CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<()> {
        same_len("in place", la, lb)?;
        let Some((start, end)) = la.contiguous_offsets() else {
            candle_core::bail!("swiglu_in_place: a must be contiguous")
        };
        match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                forward_in_place(&mut a[start..end], contiguous(b, lb)?)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                forward_in_place(&mut a[start..end], contiguous(b, lb)?)
            }
            _ => candle_core::bail!("swiglu_in_place: the fused pass runs on f32 or f64 pairs"),
        }
        Ok(())
    }
}

/// `(a, b, g) -> [d a; d b]` stacked along a new first dim.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_len("backward", la, lb)?;
        same_len("backward", la, lg)?;
        let out = match (a, b, g) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(g)) => CpuStorage::F32(
                backward(contiguous(a, la)?, contiguous(b, lb)?, contiguous(g, lg)?),
            ),
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(g)) => CpuStorage::F64(
                backward(contiguous(a, la)?, contiguous(b, lb)?, contiguous(g, lg)?),
            ),
            _ => candle_core::bail!("swiglu backward: the fused pass runs on f32 or f64 triples"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(la.dims());
        Ok((out, Shape::from(dims)))
    }
}
