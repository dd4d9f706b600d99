//! Operations for parallel models, re-exported here so that layers write
//! `ops::copy_to_group(&x, &tp)`:
//!
//! - [`attach_backward`]: a fast kernel's result joined to the graph with a backward you supply;
//!   [`depend_on`] keeps tensors on the gradient path;
//! - [`checkpoint`]: a function whose intermediates are recomputed in the backward instead of
//!   kept, and [`with_selective_recompute`], under which layers checkpoint their cheap,
//!   memory-heavy parts;
//! - [`linear`]: `x · wᵀ` whose weight gradient arrives in the weight's layout;
//! - [`swiglu`]: SwiGLU fused on the CPU (forward and backward one pass each);
//!   [`swiglu_in_place`] for inference, without a new buffer;
//! - [`collectives`]: collectives that take part in autograd (F/G conjugates, gather/scatter,
//!   reduce-scatter, all-to-all);
//! - [`train`]: trainable versions of candle-nn's fast kernels that lack a backward (softmax,
//!   RMSNorm, rotary embedding) and a dropout whose mask is chosen by a key (so that
//!   tensor-parallel replicas agree).
mod attach;
mod checkpoint;
pub mod collectives;
mod linear;
mod swiglu;
pub mod train;

pub use attach::{attach_backward, depend_on};
pub use checkpoint::{checkpoint, selective_recompute, with_selective_recompute};

pub use collectives::{
    all_gather_to_group, all_to_all, copy_to_group, gather_from_group, reduce_from_group,
    reduce_scatter_to_group, scatter_to_group,
};
pub use linear::{defer_weight_grads, linear, DeferredWeightGrads};
pub use swiglu::{swiglu, swiglu_in_place};
pub use train::{dropout, rms_norm, rope, softmax_last_dim};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{Layout, Result, Shape};

/// A contiguous copy of the view `l` of `s`, on whatever device `s` lives on.
pub(crate) fn copy_view<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S::Device: BackendDevice<Storage = S>,
{
    let shape = l.shape().clone();
    // SAFETY: copy_strided_src writes every element of the new buffer.
    let mut dst = unsafe { s.device().alloc_uninit(&shape, s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, shape))
}
