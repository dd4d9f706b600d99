//! candle-nn interoperability, both ways:
//!
//! - [`ParallelVarBuilder::to_candle_nn`]: a `candle_nn::VarBuilder` whose tensors come from a
//!   sharded builder, replicated (whole), so that `candle_nn::layer_norm(.., vb)` and the rest
//!   of candle-nn load from the same checkpoint, initialisation or distributed checkpoint as
//!   the sharded layers (and, on a trainable builder, are recorded with its parameters; asking
//!   twice for one name gives the same variable, as a `VarMap` does);
//! - [`ParallelVarBuilder::from_candle_nn`] / [`ParallelVarBuilder::from_varmap`]: sharded layers
//!   built from a `VarBuilder` or `VarMap` a user already has (each rank slices the full
//!   tensors).

use super::builder::ParallelVarBuilder;
use super::placement::Placement;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

/// A sharded builder seen as candle-nn's backend: every tensor replicated.
struct ReplicatedBackend(ParallelVarBuilder);

impl SimpleBackend for ReplicatedBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        // As with a VarMap, asking twice (tied weights) gives the same variable.
        let t = match self.0.recorded(name) {
            Some(p) if p.placement == Placement::Replicated => {
                if p.full_dims != s.dims() {
                    candle_core::bail!(
                        "tensor {name}: asked for with shape {:?} but created earlier with shape {:?}",
                        s.dims(),
                        p.full_dims
                    )
                }
                p.var.as_tensor().clone()
            }
            _ => self.0.get(s, name, Placement::Replicated, h)?,
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Some(dims) = self.0.stored_dims(name) else {
            candle_core::bail!(
                "tensor {name}: its shape is unknown to this builder (an initialisation, or a \
                 checkpoint without it); ask for it with a shape (`vb.get(shape, name)`)"
            )
        };
        self.get(dims.into(), name, Init::Const(0.), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

impl ParallelVarBuilder {
    /// A `candle_nn::VarBuilder` over this builder, at the same prefix: candle-nn layers built
    /// from it get whole (replicated) tensors from the same source, recorded as parameters
    /// when this builder is trainable. Sharded layers keep using this builder.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_parallel::checkpoint::ParallelVarBuilder;
    ///
    /// let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
    /// let norm = candle_nn::layer_norm(8, 1e-5, vb.pp("norm").to_candle_nn())?;
    /// let names: Vec<String> = vb.params().into_iter().map(|p| p.name).collect();
    /// assert_eq!(names, ["norm.bias", "norm.weight"]);
    /// # let _ = norm;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn to_candle_nn(&self) -> candle_nn::VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(ReplicatedBackend(self.root()));
        let vb = candle_nn::VarBuilder::from_backend(backend, self.dtype(), self.device().clone());
        let prefix = self.full_name("");
        match prefix.strip_suffix('.') {
            Some(p) if !p.is_empty() => vb.set_prefix(p),
            _ => vb,
        }
    }
}
