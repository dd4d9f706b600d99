//! Mixture of Experts with expert parallelism.
//!
//! - [`Router`]: a replicated linear gate, top-k on the device, differentiable into the gate.
//!   Mixtral-exact by default (softmax over all experts, top-k, renormalise); options for top-k
//!   on the logits then softmax (Megatron), sigmoid scores, no renormalisation, a capacity
//!   factor with token dropping (by lowest probability or by position), input jitter.
//! - Auxiliary losses: [`hf_load_balancing_loss`] (Hugging Face Mixtral's, one loss over all
//!   layers), [`MoeOutput::switch_aux_loss`] (Switch / Megatron, per layer), router z-loss.
//! - [`MoeLayer`]: SwiGLU experts (`w2(silu(w1 x) · w3 x)`), each rank holding its experts
//!   (w1/w3 column-split and w2 row-split over tp), with a [`Dispatch`]:
//!   - `AllToAll`: token copies permuted so that each expert's are contiguous, per-expert counts
//!     exchanged, tokens sent to the ranks owning their experts, each local expert one matmul
//!     over its contiguous tokens, sent back, un-permuted and combined with the routing weights;
//!   - `AllReduce`: the ep group shares its tokens; each rank runs its own experts on the tokens
//!     routed to them and the partial outputs are summed over the ep group;
//!   - local when ep = 1.
//!
//!   Everything is differentiable end to end.

use crate::checkpoint::{Shard, ShardedVarBuilder};
use crate::comm::Comm;
use crate::ops;
use candle_core::{bail, DType, Result, Tensor, D};
use std::sync::atomic::{AtomicU64, Ordering};

/// How router scores are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts, then top-k (Mixtral).
    SoftmaxThenTopK,
    /// Top-k on the logits, then softmax over the k (Megatron's default).
    TopKThenSoftmax,
    /// Independent sigmoid scores, then top-k.
    Sigmoid,
}

/// Which routed token copies an over-full expert drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPolicy {
    /// Keep the copies with the highest routing weight (ties: earlier token first).
    Probability,
    /// Keep the earliest tokens.
    Position,
}

/// Router settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    /// Divide the k weights by their sum (ignored by `TopKThenSoftmax`, already normalised).
    pub renormalize: bool,
    /// `None`: dropless. `Some(f)`: each expert takes at most `ceil(T·k / E · f)` of this rank's
    /// `T` tokens' `T·k` routed copies (for top-1, `ceil(T / E · f)`).
    pub capacity_factor: Option<f64>,
    pub drop_policy: DropPolicy,
    /// Training only: multiply the router input by uniform noise in `[1 − j, 1 + j]`.
    pub jitter: f64,
}

impl RouterConfig {
    /// Mixtral's router: softmax, top-k, renormalised, dropless.
    pub fn mixtral(num_experts: usize, top_k: usize) -> Self {
        Self {
            num_experts,
            top_k,
            scoring: Scoring::SoftmaxThenTopK,
            renormalize: true,
            capacity_factor: None,
            drop_policy: DropPolicy::Probability,
            jitter: 0.0,
        }
    }
}

/// A router's decision for `T` tokens.
pub struct Routing {
    /// `[T, E]` gate logits (f32).
    pub logits: Tensor,
    /// `[T, E]` scores over all experts (softmax or sigmoid, f32), for auxiliary losses.
    pub scores: Tensor,
    /// `[T, k]` chosen experts.
    pub experts: Tensor,
    /// `[T, k]` their weights (f32, differentiable into the gate and the input).
    pub weights: Tensor,
}

/// The linear gate, replicated on every rank.
pub struct Router {
    weight: Tensor,
    cfg: RouterConfig,
    calls: AtomicU64,
    seed: u64,
}

impl Router {
    /// Wraps the gate weight `[E, hidden]`.
    pub fn new(weight: Tensor, cfg: RouterConfig) -> Result<Self> {
        let (e, _) = weight.dims2()?;
        if e != cfg.num_experts || cfg.top_k == 0 || cfg.top_k > e {
            bail!(
                "router: gate weight has {e} experts, config {} with top_k {}: top_k must be in 1..={e}",
                cfg.num_experts,
                cfg.top_k
            )
        }
        Ok(Self {
            weight,
            cfg,
            calls: AtomicU64::new(0),
            seed: 0x5EED,
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The gate weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Routes `x` (`[T, hidden]`). Jitter (training) is drawn from a counter, so every rank
    /// that routes the same tokens draws the same noise.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Routing> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let x = if train && self.cfg.jitter > 0.0 {
            let n = x.elem_count();
            let j = self.cfg.jitter;
            let noise: Vec<f32> = (0..n)
                .map(|i| {
                    (1.0 - j
                        + 2.0
                            * j
                            * crate::checkpoint::var_builder::uniform01(self.seed ^ call, i as u64))
                        as f32
                })
                .collect();
            (x * Tensor::from_vec(noise, x.dims(), x.device())?.to_dtype(x.dtype())?)?
        } else {
            x.clone()
        };
        let logits = x.matmul(&self.weight.t()?)?.to_dtype(DType::F32)?;
        let k = self.cfg.top_k;
        let (scores, experts, weights) = match self.cfg.scoring {
            Scoring::SoftmaxThenTopK | Scoring::Sigmoid => {
                let scores = if self.cfg.scoring == Scoring::Sigmoid {
                    candle_nn::ops::sigmoid(&logits)?
                } else {
                    ops::softmax_last_dim(&logits)?
                };
                let experts = scores
                    .detach()
                    .arg_sort_last_dim(false)?
                    .narrow(1, 0, k)?
                    .contiguous()?;
                let mut w = scores.gather(&experts, 1)?;
                if self.cfg.renormalize {
                    w = w.broadcast_div(&w.sum_keepdim(1)?)?;
                }
                (scores, experts, w)
            }
            Scoring::TopKThenSoftmax => {
                let experts = logits
                    .detach()
                    .arg_sort_last_dim(false)?
                    .narrow(1, 0, k)?
                    .contiguous()?;
                let w = ops::softmax_last_dim(&logits.gather(&experts, 1)?)?;
                (ops::softmax_last_dim(&logits)?, experts, w)
            }
        };
        Ok(Routing {
            logits,
            scores,
            experts,
            weights,
        })
    }
}

/// Hugging Face Mixtral's `load_balancing_loss_func`: over the router logits of all layers
/// (concatenated), `E · Σ_{k,e} f[k,e] · P[e]` with `f` the fraction of tokens whose k-th choice
/// is `e` and `P` the mean softmax probability. Unscaled (multiply by `router_aux_loss_coef`).
pub fn hf_load_balancing_loss(
    logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
) -> Result<Tensor> {
    if logits.is_empty() {
        bail!("hf_load_balancing_loss: no router logits")
    }
    let all = Tensor::cat(logits, 0)?.to_dtype(DType::F32)?;
    let probs = ops::softmax_last_dim(&all)?;
    let chosen = probs
        .detach()
        .arg_sort_last_dim(false)?
        .narrow(1, 0, top_k)?; // [N, k]
    let ids = Tensor::arange(0u32, num_experts as u32, all.device())?;
    let mask = chosen
        .unsqueeze(2)?
        .broadcast_eq(&ids.reshape((1, 1, num_experts))?)?
        .to_dtype(DType::F32)?;
    let tokens_per_expert = mask.mean(0)?; // [k, E]
    let prob_per_expert = probs.mean(0)?; // [E]
    tokens_per_expert
        .broadcast_mul(&prob_per_expert.unsqueeze(0)?)?
        .sum_all()?
        * num_experts as f64
}

/// Router z-loss: mean over tokens of `logsumexp(logits)²`.
pub fn router_z_loss(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    lse.sqr()?.mean_all()
}

/// How routed tokens reach their experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Tokens differ per ep rank; they travel to the experts' ranks and back (GShard/Megatron).
    AllToAll,
    /// The ep group shares its tokens; partial outputs are summed over it.
    AllReduce,
}

/// Per-layer routing statistics of one forward.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeStats {
    /// Routed token copies each expert processed (over the ep group for `AllToAll`).
    pub tokens_per_expert: Vec<usize>,
    /// Routed copies dropped by the capacity limit on this rank.
    pub dropped: usize,
}

impl MoeStats {
    /// max / mean tokens per expert (1 is perfect balance).
    pub fn max_over_mean(&self) -> f64 {
        let n = self.tokens_per_expert.len().max(1) as f64;
        let total: usize = self.tokens_per_expert.iter().sum();
        let max = self.tokens_per_expert.iter().copied().max().unwrap_or(0);
        if total == 0 {
            1.0
        } else {
            max as f64 / (total as f64 / n)
        }
    }
}

/// What a MoE layer returns besides its output.
pub struct MoeOutput {
    pub output: Tensor,
    pub routing: Routing,
    pub stats: MoeStats,
    /// Fraction of this rank's routed copies per expert (before dropping), for the Switch loss.
    fractions: Vec<f32>,
}

impl MoeOutput {
    /// Switch / Megatron auxiliary loss of this layer: `E · Σ_e f_e · P_e`, `f_e` the fraction of
    /// routed copies sent to expert `e`, `P_e` its mean router score.
    pub fn switch_aux_loss(&self) -> Result<Tensor> {
        let e = self.fractions.len();
        let f = Tensor::new(self.fractions.as_slice(), self.routing.scores.device())?;
        (self.routing.scores.mean(0)? * f)?.sum_all()? * e as f64
    }

    /// Router z-loss of this layer.
    pub fn z_loss(&self) -> Result<Tensor> {
        router_z_loss(&self.routing.logits)
    }
}

/// One SwiGLU expert's weights on this rank (its tp slices).
pub struct Expert {
    /// `[ffn / tp, hidden]`
    pub w1: Tensor,
    /// `[hidden, ffn / tp]`
    pub w2: Tensor,
    /// `[ffn / tp, hidden]`
    pub w3: Tensor,
}

impl Expert {
    /// This rank's (partial, before the tp reduction) output for `x` (`[n, hidden]`).
    fn forward_partial(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::swiglu(&x.matmul(&self.w1.t()?)?, &x.matmul(&self.w3.t()?)?)?;
        h.matmul(&self.w2.t()?)
    }
}

/// A MoE layer; see the [module docs](self).
pub struct MoeLayer {
    router: Router,
    experts: Vec<Expert>,
    first_expert: usize,
    ep: Comm,
    tp: Comm,
    dispatch: Dispatch,
}

/// The kept routed copies of this rank, sorted by (expert, token position).
struct Plan {
    /// Index into the flattened `[T·k]` assignments.
    assignment: Vec<u32>,
    token: Vec<u32>,
    counts: Vec<usize>,
    dropped: usize,
    fractions: Vec<f32>,
}

fn plan(experts: &Tensor, weights: &Tensor, cfg: &RouterConfig) -> Result<Plan> {
    let (t, k) = experts.dims2()?;
    let e = cfg.num_experts;
    let ids = experts.flatten_all()?.to_vec1::<u32>()?;
    let mut by_expert: Vec<Vec<u32>> = vec![Vec::new(); e];
    for (a, &x) in ids.iter().enumerate() {
        by_expert[x as usize].push(a as u32);
    }
    let fractions = by_expert
        .iter()
        .map(|v| v.len() as f32 / (t * k).max(1) as f32)
        .collect();
    let mut dropped = 0;
    if let Some(f) = cfg.capacity_factor {
        let cap = ((t * k) as f64 / e as f64 * f).ceil() as usize;
        let w = match cfg.drop_policy {
            DropPolicy::Probability => Some(
                weights
                    .detach()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            DropPolicy::Position => None,
        };
        for list in by_expert.iter_mut() {
            if list.len() > cap {
                if let Some(w) = &w {
                    // Highest weight first; the sort is stable, so ties keep token order.
                    list.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]));
                }
                dropped += list.len() - cap;
                list.truncate(cap);
                list.sort_unstable();
            }
        }
    }
    let counts = by_expert.iter().map(Vec::len).collect();
    let assignment: Vec<u32> = by_expert.into_iter().flatten().collect();
    let token = assignment.iter().map(|&a| a / k as u32).collect();
    Ok(Plan {
        assignment,
        token,
        counts,
        dropped,
        fractions,
    })
}

impl MoeLayer {
    /// Builds the layer from its parts: the replicated router, this rank's experts (the
    /// contiguous range starting at `first_expert`), and the ep and tp groups.
    pub fn new(
        router: Router,
        experts: Vec<Expert>,
        first_expert: usize,
        ep: &Comm,
        tp: &Comm,
        dispatch: Dispatch,
    ) -> Result<Self> {
        let e = router.config().num_experts;
        if !e.is_multiple_of(ep.size()) || experts.len() != e / ep.size() {
            bail!(
                "moe: {e} experts cannot be split over expert-parallel size {} ({} local experts given): \
                 choose an ep that divides {e}",
                ep.size(),
                experts.len()
            )
        }
        Ok(Self {
            router,
            experts,
            first_expert,
            ep: ep.clone(),
            tp: tp.clone(),
            dispatch,
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Routes and runs `x` (`[..., hidden]`, flattened to tokens); the output has `x`'s shape.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<MoeOutput> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let x2 = x.reshape(((), hidden))?;
        let routing = self.router.forward(&x2, train)?;
        let p = plan(&routing.experts, &routing.weights, self.router.config())?;
        let (out, tokens_per_expert) = if self.ep.size() > 1 && self.dispatch == Dispatch::AllToAll
        {
            self.all_to_all(&x2, &routing, &p)?
        } else {
            self.all_reduce(&x2, &routing, &p)?
        };
        let stats = MoeStats {
            tokens_per_expert,
            dropped: p.dropped,
        };
        Ok(MoeOutput {
            output: out.reshape(dims)?,
            routing,
            stats,
            fractions: p.fractions,
        })
    }

    fn local_range(&self) -> std::ops::Range<usize> {
        self.first_expert..self.first_expert + self.experts.len()
    }

    /// Runs local expert `i` on consecutive segments of `x` of `counts[i]` rows each; the
    /// partial tp outputs of all segments are reduced over tp at once.
    fn run_experts(&self, x: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let x = ops::copy_to_group(x, &self.tp)?;
        let mut outs = Vec::with_capacity(counts.len());
        let mut at = 0;
        for (expert, &n) in self.experts.iter().zip(counts) {
            if n > 0 {
                outs.push(expert.forward_partial(&x.narrow(0, at, n)?)?);
            }
            at += n;
        }
        if outs.is_empty() {
            return x.zeros_like();
        }
        ops::reduce_from_group(&Tensor::cat(&outs, 0)?, &self.tp)
    }

    /// Weights `y` (rows in plan order) by the routing weights and adds them into a `[T, h]`
    /// output at their tokens.
    fn combine(
        &self,
        y: &Tensor,
        weights: &Tensor,
        assignment: &[u32],
        token: &[u32],
        t: usize,
    ) -> Result<Tensor> {
        let (_, h) = y.dims2()?;
        let out = Tensor::zeros((t, h), y.dtype(), y.device())?;
        if assignment.is_empty() {
            return keep_in_graph(&out, &[y, weights]);
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

    fn all_reduce(&self, x: &Tensor, r: &Routing, p: &Plan) -> Result<(Tensor, Vec<usize>)> {
        let (t, _) = x.dims2()?;
        let local = self.local_range();
        let start: usize = p.counts[..local.start].iter().sum();
        let n: usize = p.counts[local.clone()].iter().sum();
        let (assignment, token) = (&p.assignment[start..start + n], &p.token[start..start + n]);
        // The expert path's input gradient and the routing weights' gradient are partial on each
        // ep rank (its experts only): sum them over the ep group.
        let xe = ops::copy_to_group(x, &self.ep)?;
        let w = ops::copy_to_group(&r.weights, &self.ep)?;
        let y = if n > 0 {
            let rows = xe.index_select(&Tensor::new(token, x.device())?, 0)?;
            self.run_experts(&rows, &p.counts[local])?
        } else {
            keep_in_graph(
                &Tensor::zeros((0, x.dim(1)?), x.dtype(), x.device())?,
                &[&xe],
            )?
        };
        let partial = self.combine(&y, &w, assignment, token, t)?;
        Ok((
            ops::reduce_from_group(&partial, &self.ep)?,
            p.counts.clone(),
        ))
    }

    fn all_to_all(&self, x: &Tensor, r: &Routing, p: &Plan) -> Result<(Tensor, Vec<usize>)> {
        let (t, h) = x.dims2()?;
        let (n_ep, el) = (self.ep.size(), self.experts.len());
        let dev = x.device();
        // Everyone's per-expert counts: split sizes in both directions and the regrouping.
        let counts = Tensor::new(
            p.counts
                .iter()
                .map(|&c| c as i64)
                .collect::<Vec<_>>()
                .as_slice(),
            dev,
        )?;
        let all: Vec<i64> = self.ep.all_gather(&counts, 0)?.to_vec1::<i64>()?;
        let e = self.router.config().num_experts;
        let c = |src: usize, expert: usize| all[src * e + expert] as usize;
        let send: Vec<usize> = (0..n_ep)
            .map(|j| (j * el..(j + 1) * el).map(|x| p.counts[x]).sum())
            .collect();
        let recv: Vec<usize> = (0..n_ep)
            .map(|s| self.local_range().map(|x| c(s, x)).sum())
            .collect();
        let rows = x.index_select(&Tensor::new(p.token.as_slice(), dev)?, 0)?;
        let got = ops::all_to_all(&rows, &send, &recv, &self.ep)?;
        // Received: [from rank 0: its rows for local expert 0, 1, ...][from rank 1: ...].
        // Regroup by expert so that each expert's rows are contiguous.
        let mut offsets = vec![vec![0usize; el]; n_ep];
        let mut at = 0;
        for (s, row) in offsets.iter_mut().enumerate() {
            for (i, o) in row.iter_mut().enumerate() {
                *o = at;
                at += c(s, self.first_expert + i);
            }
        }
        let mut order: Vec<u32> = Vec::with_capacity(at);
        let mut per_expert = vec![0usize; el];
        for (i, pe) in per_expert.iter_mut().enumerate() {
            for (s, row) in offsets.iter().enumerate() {
                let n = c(s, self.first_expert + i);
                order.extend((row[i]..row[i] + n).map(|v| v as u32));
                *pe += n;
            }
        }
        let y = if at > 0 {
            let idx = Tensor::new(order.as_slice(), dev)?;
            let grouped = got.index_select(&idx, 0)?;
            let y = self.run_experts(&grouped, &per_expert)?;
            // Back to arrival order: y_arrival[order[j]] = y[j].
            let mut inverse = vec![0u32; at];
            for (j, &o) in order.iter().enumerate() {
                inverse[o as usize] = j as u32;
            }
            y.index_select(&Tensor::new(inverse.as_slice(), dev)?, 0)?
        } else {
            keep_in_graph(&Tensor::zeros((0, h), x.dtype(), dev)?, &[&got])?
        };
        let back = ops::all_to_all(&y, &recv, &send, &self.ep)?;
        let out = self.combine(&back, &r.weights, &p.assignment, &p.token, t)?;
        let tokens_per_expert = (0..e).map(|x| (0..n_ep).map(|s| c(s, x)).sum()).collect();
        Ok((out, tokens_per_expert))
    }
}

/// `t`, made to depend (with value zero) on `deps`. A rank whose experts get no tokens must
/// still run the same collectives in backward as its peers: this keeps the inputs of its empty
/// branches on the gradient path, so their collective backwards run everywhere. (Candle's
/// ordinary ops return an empty tensor untracked, so the link is a custom op.)
fn keep_in_graph(t: &Tensor, deps: &[&Tensor]) -> Result<Tensor> {
    let mut out = t.clone();
    for d in deps {
        out = out.apply_op2(d, Depend)?;
    }
    Ok(out)
}

/// `(t, dep) -> t`; backward: the gradient to `t`, zeros to `dep`.
struct Depend;

impl candle_core::CustomOp2 for Depend {
    fn name(&self) -> &'static str {
        "depend"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        ops::copy_view(s, l)
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        ops::copy_view(s, l)
    }

    fn bwd(
        &self,
        _t: &Tensor,
        dep: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(dep.zeros_like()?)))
    }
}

/// Builds a Mixtral-style MoE layer from `vb` (HF names: `gate.weight`,
/// `experts.J.w1/w2/w3.weight`): this rank reads the gate, and only its experts' tp slices.
#[allow(clippy::too_many_arguments)]
pub fn moe_layer(
    hidden: usize,
    ffn: usize,
    router_cfg: RouterConfig,
    dispatch: Dispatch,
    vb: ShardedVarBuilder,
    ep: &Comm,
    tp: &Comm,
) -> Result<MoeLayer> {
    let e = router_cfg.num_experts;
    if !e.is_multiple_of(ep.size()) {
        bail!("moe: {e} experts cannot be split over expert-parallel size {}: choose an ep that divides {e}", ep.size())
    }
    if !ffn.is_multiple_of(tp.size()) {
        bail!(
            "moe: expert width {ffn} is not divisible by the tensor-parallel size {}",
            tp.size()
        )
    }
    let gate = vb.pp("gate").get(
        (e, hidden),
        "weight",
        Shard::Replicated,
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let el = e / ep.size();
    let first = ep.rank() * el;
    let col = Shard::Split {
        dim: 0,
        rank: tp.rank(),
        parts: tp.size(),
    };
    let row = Shard::Split {
        dim: 1,
        rank: tp.rank(),
        parts: tp.size(),
    };
    let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let mut experts = Vec::with_capacity(el);
    for j in first..first + el {
        let v = vb.pp("experts").pp(j);
        experts.push(Expert {
            w1: v.pp("w1").get((ffn, hidden), "weight", col, init)?,
            w2: v.pp("w2").get((hidden, ffn), "weight", row, init)?,
            w3: v.pp("w3").get((ffn, hidden), "weight", col, init)?,
        });
    }
    MoeLayer::new(
        Router::new(gate, router_cfg)?,
        experts,
        first,
        ep,
        tp,
        dispatch,
    )
}
