//! Trainable versions of candle-nn's fast kernels.
//!
//! candle-nn 0.11's `softmax_last_dim`, `rms_norm` and `rope` are fast but have no backward.
//! These run the same fast kernels forward and attach an analytic backward: the fast result is
//! joined to the graph by a custom op whose backward is the vector-Jacobian product (one extra
//! copy of the output, on CPU or CUDA alike). When the input does not take part in a graph, the
//! fast result is returned as is.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_parallel::ops;
//!
//! let x = Var::new(&[[1f32, 2.0, 3.0]], &Device::Cpu)?;
//! let y = ops::softmax_last_dim(x.as_tensor())?;
//! let grads = (y.narrow(1, 0, 1)?.sum_all()?).backward()?; // d y0 / d x
//! let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>()?;
//! let p = y.to_vec2::<f32>()?[0].clone();
//! assert!((g[0][0] - p[0] * (1.0 - p[0])).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::attach_backward;
use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension, with a backward: candle-nn's fast kernel forward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    // dx = y ⊙ (g − Σ(g ⊙ y))
    attach_backward("softmax_last_dim", &y, &[x], |_, y, g| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(vec![Some((y * g.broadcast_sub(&dot)?)?)])
    })
}

/// Rotary embedding in the non-interleaved (`rotate_half`, HF Llama) layout, with a backward.
/// `x` is `[batch, heads, seq, head_dim]`, `cos`/`sin` are `[seq, head_dim / 2]`; they are
/// treated as constants.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::rotary_emb::rope(&x.detach(), cos, sin)?;
    let (cos, sin) = (cos.detach(), sin.detach());
    // rope is a rotation by θ; its transpose is the rotation by −θ.
    attach_backward("rope", &y, &[&x], move |_, _, g| {
        let dx = candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &sin.neg()?)?;
        Ok(vec![Some(dx)])
    })
}

/// The RMSNorm backward for `x` and `w`.
fn rms_norm_vjp(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Vec<Option<Tensor>>> {
    // With r = 1/sqrt(mean(x²) + eps) per row and y = x·r·w:
    //   dw = Σ_rows g·x·r,  dx = r·(g·w) − x·r³·mean(g·w·x).
    let dtype = x.dtype();
    let acc = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (x32, w32, g32) = (x.to_dtype(acc)?, w.to_dtype(acc)?, g.to_dtype(acc)?);
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let gw = g32.broadcast_mul(&w32)?;
    let m = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
    let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * m)?)?)?;
    let hidden = x.dim(D::Minus1)?;
    let dw = (g32 * x32.broadcast_mul(&r)?)?
        .reshape(((), hidden))?
        .sum(0)?;
    Ok(vec![
        Some(dx.to_dtype(dtype)?),
        Some(dw.to_dtype(w.dtype())?),
    ])
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) · w`, with a backward for `x`
/// and `w`: candle-nn's fast kernel forward (its composite for f64, which has no kernel).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (xd, wd) = (x.detach(), w.detach());
    let y = if x.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(&xd, &wd, eps as f32)?
    } else {
        candle_nn::ops::rms_norm(&xd.contiguous()?, &wd, eps as f32)?
    };
    attach_backward("rms_norm", &y, &[x, w], move |ins, _, g| {
        rms_norm_vjp(ins[0], ins[1], g, eps)
    })
}

/// Inverted dropout with a mask that is a pure function of `(key, element index)`: zeroes each
/// element with probability `p` and scales the rest by `1 / (1 − p)`. Differentiable (the
/// gradient is masked and scaled the same way).
///
/// Under tensor parallelism the key decides which ranks agree: activations replicated over the
/// tp group must drop the same elements on every rank (pass the same key, e.g. derived from the
/// step and layer), while sequence-parallel activations hold different tokens on each rank and
/// need their own masks (mix in the tp rank). candle-nn's `dropout` draws a fresh random mask on
/// every rank, which would silently make replicas diverge.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_parallel::ops;
///
/// let x = Tensor::ones(1000, candle_core::DType::F32, &Device::Cpu)?;
/// let a = ops::dropout(&x, 0.5, 7)?;
/// assert_eq!(a.to_vec1::<f32>()?, ops::dropout(&x, 0.5, 7)?.to_vec1::<f32>()?); // same key, same mask
/// let kept = a.to_vec1::<f32>()?.iter().filter(|v| **v > 0.0).count();
/// assert!((400..600).contains(&kept));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn dropout(x: &Tensor, p: f64, key: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout: probability {p} must be in [0, 1)")
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|i| {
            if crate::random::uniform01(key, i as u64) < p {
                0.0
            } else {
                scale as f32
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}
