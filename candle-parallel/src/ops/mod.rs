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
pub(crate) mod grouped;
mod linear;
pub(crate) use linear::without_deferral;
pub(crate) mod released;
mod swiglu;
pub mod train;

pub use attach::{attach_backward, depend_on};
pub use checkpoint::{
    checkpoint, selective_recompute, training_paths, with_selective_recompute, with_training_paths,
};

pub use collectives::{
    all_gather_to_group, all_to_all, copy_to_group, gather_from_group, reduce_from_group,
    reduce_scatter_to_group, scatter_to_group,
};
pub(crate) use linear::gathered_gate_up;
pub use linear::{backward, defer_weight_grads, linear, DeferredWeightGrads};
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

/// The value a custom op outputs, handed to its struct rather than as an argument (the graph
/// keeps an op's arguments until the backward; the value would live twice): the forward takes
/// it once, copies it out, and drops it.
pub(crate) struct OnceValue {
    name: &'static str,
    value: std::sync::Mutex<Option<candle_core::Tensor>>,
}

impl OnceValue {
    pub(crate) fn new(name: &'static str, value: candle_core::Tensor) -> Self {
        Self {
            name,
            value: std::sync::Mutex::new(Some(value)),
        }
    }

    fn take(&self) -> Result<candle_core::Tensor> {
        match self.value.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(v) => Ok(v),
            None => candle_core::bail!("{}: the forward ran twice", self.name),
        }
    }

    /// A copy of the value on the CPU (the op's forward there).
    pub(crate) fn copy_cpu(&self) -> Result<(candle_core::CpuStorage, Shape)> {
        let value = self.take()?;
        let (s, l) = value.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(s) => copy_view(s, l),
            _ => candle_core::bail!("{}: the value is not on the CPU", self.name),
        }
    }

    /// A copy of the value on the GPU (the op's forward there).
    pub(crate) fn copy_cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (s, l) = value.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(s) => copy_view(s, l),
            _ => candle_core::bail!("{}: the value is not on the GPU", self.name),
        }
    }
}
