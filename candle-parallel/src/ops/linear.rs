//! [`linear`]: `x · wᵀ` as candle-nn's `Linear` computes it, with a backward that produces the
//! weight's gradient directly in the weight's layout. Candle's composite (`x.matmul(&w.t())`)
//! records a transpose: its weight gradient arrives transposed and is accumulated with a
//! strided add, a third slower than a contiguous one on the expert and projection shapes.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};
use std::cell::RefCell;

thread_local! {
    /// While [`defer_weight_grads`] runs on this thread: what the weight gradients need.
    static DEFERRED: RefCell<Option<Vec<Deferred>>> = const { RefCell::new(None) };
    /// While [`backward`] runs on this thread: the weight gradients it writes into the store
    /// itself.
    static DIRECT: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the weight gradients of [`linear`] (every trainable matmul) and of
/// the grouped experts put into the store as they are, instead of through Candle's
/// accumulation, which adds each gradient into a fresh zero tensor: a zero fill and an add over
/// every weight (with a hundred experts a layer, gigabytes of passes per step). A weight with
/// several gradients gets their sum. The same values as `loss.backward()`.
///
/// A backward run inside an op's backward while this one runs (a recomputation) must call
/// this function too, so that its weights' gradients land in its own store, not this one's.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::ops;
///
/// let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Var::new(&[[1f32, 0.0], [0.0, 3.0]], &Device::Cpu)?;
/// let loss = ops::linear(&x, w.as_tensor())?.sum_all()?;
/// let grads = ops::backward(&loss)?;
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec2::<f32>()?, [[1.0, 2.0], [1.0, 2.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn backward(loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
    /// Restores the enclosing collection even if the backward panics.
    struct Restore(Option<Option<Vec<(Tensor, Tensor)>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                DIRECT.with(|d| *d.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(DIRECT.with(|d| d.borrow_mut().replace(Vec::new()))));
    let out = loss.backward();
    let outer = restore.0.take().expect("restored once");
    let direct = DIRECT.with(|d| std::mem::replace(&mut *d.borrow_mut(), outer));
    let mut store = out?;
    for (w, dw) in direct.unwrap_or_default() {
        let g = match store.get(&w) {
            Some(g) => (g + dw)?,
            None => dw,
        };
        store.insert(&w, g);
    }
    Ok(store)
}

/// The gradient `dw` of weight `w`: kept for the store by a [`backward`] that collects them
/// (`w` a variable), else returned for Candle's accumulation.
fn hand_over(w: &Tensor, dw: Tensor) -> Option<Tensor> {
    if !w.is_variable() {
        return Some(dw);
    }
    DIRECT.with(|d| match d.borrow_mut().as_mut() {
        Some(list) => {
            list.push((w.clone(), dw));
            None
        }
        None => Some(dw),
    })
}

/// One weight gradient left for later: the weight, and its input and output gradient as
/// `[m, in]` and `[m, out]`.
struct Deferred {
    weight: Tensor,
    x: Tensor,
    g: Tensor,
}

/// The weight gradients of [`linear`] that a backward under [`defer_weight_grads`] left for
/// later: what zero-bubble pipeline schedules run in their weight-gradient step.
#[derive(Default)]
pub struct DeferredWeightGrads(Vec<Deferred>);

impl DeferredWeightGrads {
    /// Computes the gradients (`dw = gᵀ · x`), as (weight, gradient) pairs; a weight used
    /// several times gets several pairs (add them).
    pub fn compute(self) -> Result<Vec<(Tensor, Tensor)>> {
        self.0
            .into_iter()
            .map(|d| Ok((d.weight, d.g.t()?.matmul(&d.x)?)))
            .collect()
    }

    /// How many weight gradients wait.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Runs `f` (typically a `backward()`) with the weight gradients of every [`linear`] deferred:
/// its backward computes the input gradient only and records what the weight gradient needs,
/// returned here to [`DeferredWeightGrads::compute`] later. Other gradients are unchanged.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::ops;
///
/// let x = Var::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Var::new(&[[1f32, 0.0], [0.0, 3.0]], &Device::Cpu)?;
/// let y = ops::linear(x.as_tensor(), w.as_tensor())?;
/// let (grads, deferred) = ops::defer_weight_grads(|| y.sum_all()?.backward())?;
/// assert!(grads.get(w.as_tensor()).is_none()); // not yet...
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec2::<f32>()?, [[1.0, 3.0]]);
/// let (weight, dw) = deferred.compute()?.remove(0); // ...now
/// assert_eq!(weight.id(), w.as_tensor().id());
/// assert_eq!(dw.to_vec2::<f32>()?, [[1.0, 2.0], [1.0, 2.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn defer_weight_grads<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, DeferredWeightGrads)> {
    /// Restores the enclosing state even if `f` panics: a deferral left switched on would
    /// drop every later weight gradient of this thread.
    struct Restore(Option<Option<Vec<Deferred>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                DEFERRED.with(|d| *d.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(DEFERRED.with(|d| d.borrow_mut().replace(Vec::new()))));
    let out = f();
    let outer = restore.0.take().expect("restored once");
    let deferred = DEFERRED.with(|d| std::mem::replace(&mut *d.borrow_mut(), outer));
    Ok((out?, DeferredWeightGrads(deferred.unwrap_or_default())))
}

/// Runs `f` with no weight gradient deferred on this thread (a backward nested in another,
/// whose weights do not outlive it), whatever the enclosing backward defers.
pub(crate) fn without_deferral<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Option<Vec<Deferred>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                DEFERRED.with(|d| *d.borrow_mut() = outer);
            }
        }
    }
    let _restore = Restore(Some(DEFERRED.with(|d| d.borrow_mut().take())));
    f()
}

/// How many weight gradients this thread has deferred so far (`None`: it is not deferring).
pub(crate) fn deferred_len() -> Option<usize> {
    DEFERRED.with(|d| d.borrow().as_ref().map(Vec::len))
}

/// Of the weight gradients deferred from entry `since` on, those of weight `from[i]` (a
/// stand-in variable of a recomputation) belong to `to[i]`: re-attributed to it where it is a
/// variable, else computed now and returned as `(i, gradient)` for the caller to pass on.
pub(crate) fn redirect_deferred(
    since: usize,
    from: &[Tensor],
    to: &[Tensor],
) -> Result<Vec<(usize, Tensor)>> {
    let mut now = Vec::new();
    DEFERRED.with(|d| -> Result<()> {
        let mut d = d.borrow_mut();
        let Some(list) = d.as_mut() else {
            return Ok(());
        };
        let mut kept = Vec::with_capacity(list.len());
        for (k, entry) in std::mem::take(list).into_iter().enumerate() {
            let source = (k >= since)
                .then(|| from.iter().position(|f| f.id() == entry.weight.id()))
                .flatten();
            match source {
                Some(i) if to[i].is_variable() => kept.push(Deferred {
                    weight: to[i].clone(),
                    ..entry
                }),
                Some(i) => now.push((i, entry.g.t()?.matmul(&entry.x)?)),
                None => kept.push(entry),
            }
        }
        *list = kept;
        Ok(())
    })?;
    Ok(now)
}

/// `x · wᵀ` for `x` of shape `[..., in]` and `w` of shape `[out, in]`: `[..., out]`, with a
/// backward (`dx = g · w`, `dw = gᵀ · x`).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::ops;
///
/// let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Var::new(&[[1f32, 0.0], [0.0, 3.0], [1.0, 1.0]], &Device::Cpu)?;
/// let y = ops::linear(&x, w.as_tensor())?;
/// assert_eq!(y.to_vec2::<f32>()?, [[1.0, 6.0, 3.0]]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(w.as_tensor()).unwrap().to_vec2::<f32>()?, [[1.0, 2.0]; 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, k) = w.dims2()?;
    if x.rank() == 0 || x.dim(candle_core::D::Minus1)? != k {
        bail!(
            "linear: input of shape {:?} for a weight of shape {:?}: the input's last dim must be {k}",
            x.dims(),
            w.dims()
        )
    }
    if let Some((r, i)) = super::released::lookup(w) {
        return super::released::linear(x, w, r, i);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// The custom op behind [`linear`].
pub(super) struct Linear;

/// The gradient `gᵀ · x` of weight `w` (`x`: its input `[m, in]`, `g`: its output's gradient
/// `[m, out]`), or `None` where a backward under [`defer_weight_grads`] leaves it for later
/// (`w` a variable).
pub(super) fn weight_grad(w: &Tensor, x: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    // A weight nothing trains (a frozen base under LoRA) needs no gradient.
    if !w.track_op() {
        return Ok(None);
    }
    let deferred = DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(list) if w.is_variable() => {
            list.push(Deferred {
                weight: w.clone(),
                x: x.clone(),
                g: g.clone(),
            });
            true
        }
        _ => false,
    });
    match deferred {
        true => Ok(None),
        false => Ok(hand_over(w, g.t()?.matmul(x)?)),
    }
}

/// `x · wᵀ` on any backend's storage: `x` contiguous `[m, k]` (any leading dims flattened),
/// `w` `[n, k]` read transposed by the matmul itself.
pub(super) fn forward<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> Result<(S, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    if !xl.is_contiguous() {
        bail!("linear: the input must be contiguous")
    }
    let m = xl.shape().elem_count() / k.max(1);
    let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let wt = wl.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, n, k), &x2, &wt)?;
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((y, Shape::from(dims)))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let g2 = g.detach().reshape((m, n))?;
        let dx = g2.matmul(&w.detach())?.reshape(x.dims())?;
        let x2 = x.detach().reshape((m, k))?;
        // Only a variable's gradient can wait: a weight computed from others (a cast, a merged
        // adapter) must pass its gradient on now, or it would never reach them.
        Ok((Some(dx), weight_grad(w, &x2, &g2)?))
    }
}

/// An expert's gate and up projections of the rows `idx` of `src`, `[2, n, ffn]` (`w1`'s
/// then `w3`'s), recomputing the gathered rows in the backward instead of keeping them
/// (selective recomputation of the MoE dispatch's permutation): the graph holds `src` (which
/// the layer holds anyway), not the `[n, hidden]` gathered copy. The same values and
/// gradients bit for bit as `linear(src.index_select(idx), w1)` and `linear(.., w3)`
/// consumed together (the input gradients summed as Candle's backward sums them: the up
/// projection's first).
pub(crate) fn gathered_gate_up(
    src: &Tensor,
    idx: &Tensor,
    w1: &Tensor,
    w3: &Tensor,
) -> Result<Tensor> {
    let x = src.detach().index_select(idx, 0)?;
    let a = x
        .contiguous()?
        .apply_op2(&w1.detach().contiguous()?, Linear)?;
    let b = x
        .contiguous()?
        .apply_op2(&w3.detach().contiguous()?, Linear)?;
    drop(x);
    let value = Tensor::stack(&[a, b], 0)?;
    let idx = idx.detach();
    // The graph keeps `src` and the weights; the gathered rows are made again below.
    // The weights themselves (a contiguous copy would not be the variable a deferred
    // gradient belongs to).
    let originals = [w1.clone(), w3.clone()];
    let (w1, w3) = (w1.contiguous()?, w3.contiguous()?);
    super::checkpoint::attach_many(
        "gathered_gate_up",
        value,
        &[src, &w1, &w3],
        move |ins, g| {
            let (src, w1, w3) = (&ins[0], &ins[1], &ins[2]);
            let x = src.index_select(&idx, 0)?;
            let g = g.detach();
            let (ga, gb) = (g.get(0)?, g.get(1)?);
            // The gathered rows' gradient as Candle sums it over their two consumers: zeros, then
            // the up projection's (processed first), then the gate's.
            let dx = ((x.zeros_like()? + gb.matmul(w3)?)? + ga.matmul(w1)?)?;
            let dsrc = src.zeros_like()?.index_add(&idx, &dx, 0)?;
            // Weight gradients: deferred under a split backward, as `linear`'s (the up
            // projection's first, in Candle's order), for the weights themselves.
            let dw3 = weight_grad(&originals[1], &x, &gb)?;
            let dw1 = weight_grad(&originals[0], &x, &ga)?;
            Ok(vec![Some(dsrc), dw1, dw3])
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// `gathered_gate_up` gives the values and every gradient of the two linears over the
    /// gathered rows, bit for bit (its input gradient summed in the order Candle's backward
    /// sums the gathered rows' two consumers').
    #[test]
    fn gathered_gate_up_equals_the_two_linears_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let src = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev)?)?;
        let w1 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &dev)?)?;
        let w3 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &dev)?)?;
        let idx = Tensor::new(&[4u32, 0, 6, 2], &dev)?;
        let (ga, gb) = (
            Tensor::randn(0f32, 1.0, (4, 6), &dev)?,
            Tensor::randn(0f32, 1.0, (4, 6), &dev)?,
        );
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        let x = src.as_tensor().index_select(&idx, 0)?;
        let (a, b) = (linear(&x, w1.as_tensor())?, linear(&x, w3.as_tensor())?);
        let want = ((&a * &ga)?.sum_all()? + (&b * &gb)?.sum_all()?)?.backward()?;
        let gu = gathered_gate_up(src.as_tensor(), &idx, w1.as_tensor(), w3.as_tensor())?;
        assert_eq!(gu.dims(), [2, 4, 6]);
        assert_eq!(bits(&gu.get(0)?)?, bits(&a)?);
        assert_eq!(bits(&gu.get(1)?)?, bits(&b)?);
        let got =
            ((&gu.get(0)? * &ga)?.sum_all()? + (&gu.get(1)? * &gb)?.sum_all()?)?.backward()?;
        for v in [&src, &w1, &w3] {
            let (w, g) = (
                want.get(v.as_tensor()).unwrap(),
                got.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(bits(w)?, bits(g)?);
        }
        assert_eq!(got.get(src.as_tensor()).unwrap().dtype(), DType::F32);
        Ok(())
    }
}
