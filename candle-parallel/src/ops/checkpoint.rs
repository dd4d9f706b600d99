//! [`checkpoint`]: a part of the forward whose intermediates are not kept but recomputed in the
//! backward (activation checkpointing of one function), and the per-thread switch
//! ([`with_selective_recompute`]) under which layers checkpoint their cheap, memory-heavy parts
//! (Megatron's selective recomputation).

use super::{copy_view, OnceValue};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, Var,
};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

thread_local! {
    /// Whether layers running on this thread checkpoint their selective parts.
    static SELECTIVE: Cell<bool> = const { Cell::new(false) };
    /// Whether layers take their training paths although nothing tracks gradients.
    static TRAINING_PATHS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with layers on their training paths even where nothing tracks gradients: a forward
/// whose result a recomputation will reproduce in the backward (ZeRO 3's recomputed modules)
/// must round as the training path does, and the inference paths (the MoE layer's combine
/// before the tp reduction) round differently.
pub fn with_training_paths<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_flag(&TRAINING_PATHS, on, f)
}

/// Runs `f` with this thread's `flag` set to `on`, and restores it after, even if `f` panics.
fn with_flag<R>(
    flag: &'static std::thread::LocalKey<Cell<bool>>,
    on: bool,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(&'static std::thread::LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|s| s.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|s| s.replace(on)));
    f()
}

/// Whether layers must take their training paths although nothing tracks gradients (see
/// [`with_training_paths`]).
pub fn training_paths() -> bool {
    TRAINING_PATHS.with(Cell::get)
}

/// Runs `f` with selective recomputation switched `on` on this thread (a rank's thread): the
/// layers that support it ([`selective_recompute`]) then checkpoint the parts that are cheap to
/// compute and heavy to keep — the attention's scores and probabilities, the experts' SwiGLU
/// activations, the MoE layer's weighted expert outputs — so that their backward recomputes
/// them. Restores the previous setting after,
/// even if `f` panics. The gradients are the same, bit for bit.
///
/// ```
/// use candle_parallel::ops;
///
/// assert!(!ops::selective_recompute());
/// let inside = ops::with_selective_recompute(true, ops::selective_recompute);
/// assert!(inside && !ops::selective_recompute());
/// ```
pub fn with_selective_recompute<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_flag(&SELECTIVE, on, f)
}

/// Whether layers on this thread checkpoint their selective parts now (see
/// [`with_selective_recompute`]).
pub fn selective_recompute() -> bool {
    SELECTIVE.with(Cell::get)
}

/// `f(inputs)`, whose intermediates are not kept: the forward runs `f` on the inputs detached
/// (nothing of its inside joins the graph); the backward runs it again on them, with a graph,
/// and back-propagates the output's gradient through it. Only the inputs and the output stay
/// alive between forward and backward. The inputs' gradients are those of `f` itself, bit for
/// bit (the same operations, on the same values); `f` must be deterministic, and every tensor
/// whose gradient it needs must be among `inputs` (a tracked tensor it captures is refused).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::ops;
///
/// let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
/// let w = Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?;
/// let f = |t: &[Tensor]| (t[0].exp()? * &t[1])?.tanh();
/// let kept = f(&[x.as_tensor().clone(), w.as_tensor().clone()])?;
/// let recomputed = ops::checkpoint("exp_tanh", &[x.as_tensor(), w.as_tensor()], f)?;
/// assert_eq!(kept.to_vec1::<f32>()?, recomputed.to_vec1::<f32>()?);
/// let (a, b) = (kept.sum_all()?.backward()?, recomputed.sum_all()?.backward()?);
/// for v in [&x, &w] {
///     let (ga, gb) = (a.get(v.as_tensor()).unwrap(), b.get(v.as_tensor()).unwrap());
///     assert_eq!(ga.to_vec1::<f32>()?, gb.to_vec1::<f32>()?);
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn checkpoint(
    name: &'static str,
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if inputs.is_empty() {
        bail!("checkpoint({name}): takes at least one input")
    }
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    if !inputs.iter().any(|t| t.track_op()) {
        return f(&detached);
    }
    let value = f(&detached)?;
    if value.track_op() {
        bail!(
            "checkpoint({name}): the function uses a tracked tensor that is not among its inputs; pass every tensor whose gradient it needs as an input"
        )
    }
    let f = Arc::new(f);
    // Parameters a ZeRO 3 module released after its forward are not the graph's inputs (it
    // would hold them): the recomputation takes them from their scope and hands their
    // gradients back to it; the scope's anchor keeps the op on the gradient path.
    let released = super::released::lookup_all(inputs);
    let mut linked: Vec<&Tensor> = inputs
        .iter()
        .zip(&released)
        .filter(|(_, r)| r.is_none())
        .map(|(t, _)| *t)
        .collect();
    let anchor = released.iter().flatten().next().map(|(r, _)| r.clone());
    if let Some(r) = &anchor {
        linked.push(super::released::anchor(r));
    }
    // Under a zero-bubble split backward, the recomputation's deferred weight gradients
    // belong to these (not to the stand-in variables below); a released one's is computed
    // at once (an empty placeholder that is no variable: the weight itself must not be held).
    let placeholder = Tensor::zeros(0, DType::F32, inputs[0].device())?;
    let originals: Vec<Tensor> = inputs
        .iter()
        .zip(&released)
        .map(|(t, r)| match r {
            None => (*t).clone(),
            Some(_) => placeholder.clone(),
        })
        .collect();
    let with_anchor = anchor.is_some();
    attach_many(name, value, &linked, move |ins, g| {
        // Every input again: the linked ones as given, the released ones from their scope.
        let mut linked = ins.iter();
        let all: Vec<Tensor> = released
            .iter()
            .map(|r| match r {
                Some((r, i)) => r.weight(*i),
                None => match linked.next() {
                    Some(t) => Ok(t.clone()),
                    None => bail!(
                        "checkpoint({name}): fewer inputs in the backward than in the forward"
                    ),
                },
            })
            .collect::<Result<_>>()?;
        // Variables of the inputs (copies: a detached tensor is no leaf of a graph), the
        // function again with its graph, and the output's gradient through it.
        let vars: Vec<Var> = all.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let since = super::linear::deferred_len();
        let y = f(&xs)?;
        // Its own collection of direct weight gradients: the stand-ins' gradients land here.
        let mut store = super::backward(&(y * g)?.sum_all()?)?;
        let mut grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| store.remove(v.as_tensor()).map(|g| g.detach()))
            .collect();
        if let Some(since) = since {
            for (i, dw) in super::linear::redirect_deferred(since, &xs, &originals)? {
                grads[i] = Some(match grads[i].take() {
                    Some(g) => (g + dw)?,
                    None => dw,
                });
            }
        }
        let mut out = Vec::with_capacity(grads.len() + 1);
        for (g, r) in grads.into_iter().zip(&released) {
            match (r, g) {
                (Some((r, i)), Some(g)) => r.add_grad(*i, g)?,
                (Some(_), None) => {}
                (None, g) => out.push(g),
            }
        }
        if with_anchor {
            out.push(None);
        }
        Ok(out)
    })
}

type ManyVjp = dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// `value` joined to the graph with a backward into any number of `inputs`. Candle's custom
/// ops take three arguments, so the inputs past the first two hang on a chain of one-element
/// tokens: the op that outputs `value` takes the first two inputs and the chain's last token;
/// each link takes two more inputs and the previous token. The output's op computes every
/// gradient in its backward and leaves the links theirs.
pub(super) fn attach_many(
    name: &'static str,
    value: Tensor,
    inputs: &[&Tensor],
    vjp: impl Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let device = value.device().clone();
    let stash: Stash = Arc::new(Mutex::new(Vec::new()));
    let mut token = Tensor::zeros(1, DType::F32, &device)?;
    // An untracked stand-in for a missing second input of a link.
    let none = Tensor::zeros(1, DType::F32, &device)?;
    let rest = &inputs[2.min(inputs.len())..];
    for (j, pair) in rest.chunks(2).enumerate() {
        let b = pair.get(1).copied().unwrap_or(&none);
        token = pair[0].apply_op3(
            b,
            &token,
            Link {
                name,
                first: 2 + 2 * j,
                pair: pair.len(),
                stash: stash.clone(),
            },
        )?;
    }
    let (a, b) = (inputs[0], inputs.get(1).copied().unwrap_or(&none));
    a.apply_op3(
        b,
        &token,
        Output {
            name,
            value: OnceValue::new(name, value),
            inputs: inputs.len(),
            rest: rest.iter().map(|t| t.detach()).collect(),
            vjp: Box::new(vjp),
            stash,
        },
    )
}

/// The gradients the output's op computed for the links, by input index.
type Stash = Arc<Mutex<Vec<Option<Tensor>>>>;

/// The op that outputs the value: its arguments are inputs 0 and 1 and the chain's token.
struct Output {
    name: &'static str,
    value: OnceValue,
    inputs: usize,
    /// The inputs past the first two, detached (their storage is the inputs' own).
    rest: Vec<Tensor>,
    vjp: Box<ManyVjp>,
    stash: Stash,
}

impl CustomOp3 for Output {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.copy_cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.copy_cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        token: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut inputs = vec![a.detach(), b.detach()];
        inputs.truncate(self.inputs.min(2));
        inputs.extend(self.rest.iter().cloned());
        let mut got = (self.vjp)(&inputs, g)?;
        if got.len() != self.inputs {
            bail!(
                "checkpoint({}): the backward returned {} gradients for {} inputs",
                self.name,
                got.len(),
                self.inputs
            )
        }
        let rest = got.split_off(self.inputs.min(2));
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        *stash = rest;
        drop(stash);
        got.resize(2, None);
        let gb = got.pop().flatten();
        let ga = got.pop().flatten();
        // The links run their backward only if their token gets a gradient.
        let gt = (self.inputs > 2).then(|| token.zeros_like()).transpose()?;
        Ok((ga, gb, gt))
    }
}

/// One link of the chain: inputs `first` and `first + 1` (`pair` of them real) and the
/// previous token.
struct Link {
    name: &'static str,
    first: usize,
    pair: usize,
    stash: Stash,
}

impl CustomOp3 for Link {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        t: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_view(t, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        t: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_view(t, l)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        let mut take = |i: usize| stash.get_mut(i - 2).and_then(Option::take);
        let ga = take(self.first);
        let gb = if self.pair == 2 {
            take(self.first + 1)
        } else {
            None
        };
        Ok((ga, gb, Some(g.clone())))
    }
}
