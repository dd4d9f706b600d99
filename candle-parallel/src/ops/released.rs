//! Parameters that a graph refers to without holding them: what lets ZeRO 3 free a module's
//! gathered parameters after its forward yet keep the forward's activations for the backward
//! (FSDP2's `reshard_after_forward` without recomputation).
//!
//! Candle's graph keeps every argument of every op until the backward, and it has no hooks
//! that could free a tensor's storage and fill it again later (PyTorch FSDP's
//! `untyped_storage().resize_(0)`). So the ops that consume parameters ([`super::linear`],
//! [`embedding`], [`super::checkpoint`]) look the weight up in a per-thread scope set by the
//! module's forward: a weight found there is used in the forward and not recorded; the
//! op's backward asks the scope for it again (the module gathers its parameters anew before
//! its backward) and hands the weight's gradient to the scope instead of the graph. A scalar
//! variable, the anchor, is the op's graph input where it has no other tracked one, so that
//! the backward still visits it.

use super::linear::forward as linear_forward;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
    TensorId, Var,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

thread_local! {
    static SCOPE: RefCell<Option<Arc<Released>>> = const { RefCell::new(None) };
}

/// One forward's released parameters: which tensors they are, their values while the
/// module's backward runs, and the gradients its ops hand over.
pub(crate) struct Released {
    /// Who owns them, for errors.
    owner: String,
    index: HashMap<TensorId, usize>,
    /// The parameters during the backward (gathered again), `None` in between.
    weights: Mutex<Option<Vec<Tensor>>>,
    grads: Mutex<Vec<Option<Tensor>>>,
    anchor: Var,
}

impl Released {
    /// The scope of parameters `params` (the tensors the module's layers hold), owned by
    /// `owner`.
    pub(crate) fn new(owner: &str, params: &[&Tensor], device: &Device) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            owner: owner.to_string(),
            index: params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.id(), i))
                .collect(),
            weights: Mutex::new(None),
            grads: Mutex::new(vec![None; params.len()]),
            anchor: Var::zeros(1, DType::F32, device)?,
        }))
    }

    /// Runs `f` (the module's forward) with these parameters released.
    pub(crate) fn scope<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<Released>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPE.with(|s| *s.borrow_mut() = self.0.take());
            }
        }
        let _restore = Restore(SCOPE.with(|s| s.borrow_mut().replace(self.clone())));
        f()
    }

    /// Hands the parameters (in the order given to [`Released::new`]) to the backward.
    pub(crate) fn set_weights(&self, weights: Option<Vec<Tensor>>) {
        *self.weights.lock().unwrap_or_else(|e| e.into_inner()) = weights;
    }

    /// The gradient the ops handed over for parameter `i`, taken.
    pub(crate) fn take_grad(&self, i: usize) -> Option<Tensor> {
        self.grads.lock().unwrap_or_else(|e| e.into_inner())[i].take()
    }

    /// Parameter `i` as gathered again for the backward.
    pub(crate) fn weight(&self, i: usize) -> Result<Tensor> {
        match &*self.weights.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(w) => Ok(w[i].clone()),
            None => bail!(
                "{}: a backward reached a parameter released after the forward outside the module's own backward (run the backward through the module's output)",
                self.owner
            ),
        }
    }

    /// Adds `g` to parameter `i`'s gradient.
    pub(crate) fn add_grad(&self, i: usize, g: Tensor) -> Result<()> {
        let mut grads = self.grads.lock().unwrap_or_else(|e| e.into_inner());
        grads[i] = Some(match grads[i].take() {
            Some(sum) => (sum + g)?,
            None => g,
        });
        Ok(())
    }
}

/// The scope and index of `w`, if the current forward releases it.
pub(crate) fn lookup(w: &Tensor) -> Option<(Arc<Released>, usize)> {
    SCOPE.with(|s| {
        let s = s.borrow();
        let r = s.as_ref()?;
        let i = *r.index.get(&w.id())?;
        Some((r.clone(), i))
    })
}

/// The anchor of a scope: a tracked scalar for ops whose other inputs may not track.
pub(crate) fn anchor(r: &Released) -> &Tensor {
    r.anchor.as_tensor()
}

/// `x · wᵀ` for a released `w` (see [`super::linear`]): the graph holds `x` and the anchor.
pub(crate) fn linear(x: &Tensor, w: &Tensor, r: Arc<Released>, i: usize) -> Result<Tensor> {
    let op = ReleasedLinear {
        weight: Mutex::new(Some(w.contiguous()?)),
        released: r.clone(),
        index: i,
    };
    x.contiguous()?.apply_op2(anchor(&r), op)
}

struct ReleasedLinear {
    /// The weight for the forward (taken by it; the backward asks the scope).
    weight: Mutex<Option<Tensor>>,
    released: Arc<Released>,
    index: usize,
}

impl ReleasedLinear {
    fn take_weight(&self) -> Result<Tensor> {
        match self.weight.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(w) => Ok(w),
            None => bail!("released linear: the forward ran twice"),
        }
    }
}

impl CustomOp2 for ReleasedLinear {
    fn name(&self) -> &'static str {
        "released_linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = self.take_weight()?;
        let (s, wl) = w.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(ws) => linear_forward(x, xl, ws, wl),
            _ => bail!("released linear: the weight is not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let w = self.take_weight()?;
        let (s, wl) = w.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(ws) => linear_forward(x, xl, ws, wl),
            _ => bail!("released linear: the weight is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The same arithmetic as `linear`'s backward, on the weight gathered again.
        let w = self.released.weight(self.index)?;
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let g2 = g.detach().reshape((m, n))?;
        let dx = g2.matmul(&w)?.reshape(x.dims())?;
        let dw = g2.t()?.matmul(&x.detach().reshape((m, k))?)?;
        self.released.add_grad(self.index, dw)?;
        Ok((x.track_op().then_some(dx), None))
    }
}

/// `w.embedding(ids)` (rows of `w`), releasing `w` where the current forward releases it.
pub(crate) fn embedding(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let Some((r, i)) = lookup(w) else {
        return w.embedding(ids);
    };
    let rows = w.detach().embedding(ids)?;
    let (ids, dims) = (ids.detach(), w.dims().to_vec());
    let released = r.clone();
    super::attach_backward(
        "released_embedding",
        &rows,
        &[anchor(&r)],
        move |_, _, g| {
            // Candle's own embedding backward: the rows' gradients added into zeros.
            let w = released.weight(i)?;
            if w.dims() != dims.as_slice() {
                bail!("released embedding: the weight gathered again has shape {:?}, the forward's {dims:?}", w.dims())
            }
            let dw = w.zeros_like()?.index_add(&ids, &g.detach(), 0)?;
            released.add_grad(i, dw)?;
            Ok(vec![None])
        },
    )
}

/// For [`super::checkpoint`]: which of `inputs` the current forward releases.
pub(crate) fn lookup_all(inputs: &[&Tensor]) -> Vec<Option<(Arc<Released>, usize)>> {
    inputs.iter().map(|t| lookup(t)).collect()
}
