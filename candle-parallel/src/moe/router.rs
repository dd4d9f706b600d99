//! The router: a replicated linear gate that picks each token's top-k experts.

use crate::comm::{lock, Comm, ReduceOp};
use crate::ops;
use crate::random::uniform01;
use candle_core::{bail, DType, Module, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
    /// A per-expert bias added to the scores for choosing the experts only (the weights stay
    /// the scores): DeepSeek-V3's auxiliary-loss-free balancing (`e_score_correction_bias`).
    pub expert_bias: bool,
    /// γ of the bias update after each step ([`Router::update_bias`]):
    /// `bias += γ · sign(mean load − expert load)`. 0: the bias stays as loaded.
    pub bias_update_rate: f64,
    /// Group-limited routing: the experts in `n_group` equal groups, each token choosing among
    /// the `topk_group` groups whose two best (biased) scores sum highest (DeepSeek-V3). 1: off.
    pub n_group: usize,
    pub topk_group: usize,
    /// A group's score: the sum of its this many best members (2: DeepSeek-V3's `noaux_tc`;
    /// 1, the best member alone: DeepSeek-V2's `group_limited_greedy`).
    pub group_score_members: usize,
    /// The chosen experts' weights are multiplied by this (after renormalising).
    pub routed_scaling_factor: f64,
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
            expert_bias: false,
            bias_update_rate: 0.0,
            n_group: 1,
            topk_group: 1,
            group_score_members: 2,
            routed_scaling_factor: 1.0,
        }
    }

    /// DeepSeek-V3's router: sigmoid scores, a selection bias updated by γ = 0.001 after each
    /// step (no auxiliary loss needed), `n_group` groups of which each token uses
    /// `topk_group`, the k weights renormalised and scaled by `routed_scaling_factor`.
    pub fn deepseek_v3(
        num_experts: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        routed_scaling_factor: f64,
    ) -> Self {
        Self {
            scoring: Scoring::Sigmoid,
            expert_bias: true,
            bias_update_rate: 1e-3,
            n_group,
            topk_group,
            routed_scaling_factor,
            ..Self::mixtral(num_experts, top_k)
        }
    }

    /// Checks that the settings fit together (every field named with its value).
    pub fn check(&self) -> Result<()> {
        let (e, k, g, tg) = (self.num_experts, self.top_k, self.n_group, self.topk_group);
        if k == 0 || k > e {
            bail!("router: top_k {k} must be in 1..={e} (num_experts)")
        }
        if g == 0 || !e.is_multiple_of(g) {
            bail!("router: n_group {g} must divide num_experts {e}")
        }
        if tg == 0 || tg > g || tg * (e / g) < k {
            bail!("router: topk_group {tg} must be in 1..={g} (n_group) and its groups must hold at least top_k {k} experts ({} each)", e / g)
        }
        if (g > 1 || self.expert_bias) && self.scoring == Scoring::TopKThenSoftmax {
            bail!("router: group-limited routing and the expert bias choose on scores; use softmax-then-top-k or sigmoid scoring")
        }
        if !(self.bias_update_rate >= 0.0 && self.bias_update_rate.is_finite()) {
            bail!(
                "router: bias_update_rate {} must be finite and at least 0",
                self.bias_update_rate
            )
        }
        if self.bias_update_rate > 0.0 && !self.expert_bias {
            bail!("router: bias_update_rate {} updates an expert bias the config does not have (expert_bias: false)", self.bias_update_rate)
        }
        Ok(())
    }
}

/// The expert load a [`Router::update_bias`] balanced: tokens routed to each expert since the
/// previous update, summed over the batch group.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertLoad {
    pub tokens: Vec<f64>,
}

impl ExpertLoad {
    /// The busiest expert's load over the mean (1 is perfect balance).
    pub fn max_over_mean(&self) -> f64 {
        let mean = self.tokens.iter().sum::<f64>() / self.tokens.len().max(1) as f64;
        let max = self.tokens.iter().copied().fold(0.0, f64::max);
        if mean > 0.0 {
            max / mean
        } else {
            1.0
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
    /// `[E]` f32 selection bias (`expert_bias`).
    bias: Mutex<Option<Tensor>>,
    /// Training routings since the last bias update: tokens per expert.
    load: Mutex<Vec<u64>>,
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
        cfg.check()?;
        let bias = match cfg.expert_bias {
            true => Some(Tensor::zeros(e, DType::F32, weight.device())?),
            false => None,
        };
        Ok(Self {
            weight,
            cfg,
            calls: AtomicU64::new(0),
            seed: 0x5EED,
            bias: Mutex::new(bias),
            load: Mutex::new(vec![0; e]),
        })
    }

    /// Sets the selection bias (`[E]`, e.g. a checkpoint's `e_score_correction_bias`).
    pub fn set_bias(&self, bias: &Tensor) -> Result<()> {
        if !self.cfg.expert_bias {
            bail!("router: a selection bias for a config without one (expert_bias: false)")
        }
        if bias.dims() != [self.cfg.num_experts] {
            bail!(
                "router: the selection bias has shape {:?}, the router {} experts",
                bias.dims(),
                self.cfg.num_experts
            )
        }
        *lock(&self.bias) = Some(bias.to_dtype(DType::F32)?.detach());
        Ok(())
    }

    /// The selection bias (`None` without `expert_bias`).
    pub fn bias(&self) -> Option<Tensor> {
        lock(&self.bias).clone()
    }

    /// DeepSeek-V3's auxiliary-loss-free balancing, once per step after the optimizer: the
    /// tokens each expert got in the training routings since the last update, summed over
    /// `batch` (every rank that routes other tokens: dp, and ep with all-to-all dispatch; the
    /// same update on each of them), move the bias by `γ · sign(mean load − expert load)`.
    /// Returns the load balanced (`None` without `expert_bias` or with γ = 0).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_parallel::moe::{Router, RouterConfig};
    ///
    /// // Expert 0 wins every token; the bias turns the choice away from it.
    /// let w = Tensor::new(&[[1f32, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], &Device::Cpu)?;
    /// let router = Router::new(w, RouterConfig::deepseek_v3(4, 1, 1, 1, 1.0))?;
    /// let x = Tensor::new(&[[1f32, 0.5]; 8], &Device::Cpu)?;
    /// router.route(&x, true)?;
    /// let load = router.update_bias(None)?.unwrap();
    /// assert_eq!(load.tokens, [8.0, 0.0, 0.0, 0.0]);
    /// let b = router.bias().unwrap().to_vec1::<f32>()?;
    /// assert!(b[0] < 0.0 && b[1] > 0.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn update_bias(&self, batch: Option<&Comm>) -> Result<Option<ExpertLoad>> {
        if !self.cfg.expert_bias || self.cfg.bias_update_rate == 0.0 {
            return Ok(None);
        }
        let counts: Vec<f64> =
            std::mem::replace(&mut *lock(&self.load), vec![0; self.cfg.num_experts])
                .into_iter()
                .map(|c| c as f64)
                .collect();
        let device = self.weight.device();
        let counts = Tensor::new(counts.as_slice(), device)?;
        let tokens = match batch {
            Some(c) if c.size() > 1 => c.all_reduce(&counts, ReduceOp::Sum)?,
            _ => counts,
        }
        .to_vec1::<f64>()?;
        let mean = tokens.iter().sum::<f64>() / tokens.len() as f64;
        let gamma = self.cfg.bias_update_rate;
        // Up for an expert below the mean load, down above it, unchanged at it.
        let step: Vec<f32> = tokens
            .iter()
            .map(|&t| match t.partial_cmp(&mean) {
                Some(std::cmp::Ordering::Less) => gamma as f32,
                Some(std::cmp::Ordering::Greater) => -gamma as f32,
                _ => 0.0,
            })
            .collect();
        let mut bias = lock(&self.bias);
        let current = bias.clone().expect("a bias with expert_bias");
        *bias = Some((current + Tensor::new(step.as_slice(), device)?)?);
        Ok(Some(ExpertLoad { tokens }))
    }

    /// The experts chosen from `choice` (`[T, E]` scores plus the selection bias): the top-k
    /// of the `topk_group` best groups (all groups when `n_group` is 1).
    fn choose(&self, choice: &Tensor) -> Result<Tensor> {
        let (t, e) = choice.dims2()?;
        let (g, k) = (self.cfg.n_group, self.cfg.top_k);
        let choice = if g > 1 {
            // A group's score: the sum of its best members (fewer in smaller groups).
            let per = e / g;
            let grouped = choice.reshape((t, g, per))?;
            let best = grouped
                .arg_sort_last_dim(false)?
                .narrow(2, 0, per.min(self.cfg.group_score_members.max(1)))?
                .contiguous()?;
            let group_scores = grouped.gather(&best, 2)?.sum(2)?;
            let groups = group_scores
                .arg_sort_last_dim(false)?
                .narrow(1, 0, self.cfg.topk_group)?
                .contiguous()?;
            let ones = Tensor::ones((t, self.cfg.topk_group), DType::F32, choice.device())?;
            let kept = Tensor::zeros((t, g), DType::F32, choice.device())?
                .scatter_add(&groups, &ones, 1)?
                .unsqueeze(2)?
                .broadcast_as((t, g, per))?
                .reshape((t, e))?;
            let floor = Tensor::full(f32::NEG_INFINITY, (t, e), choice.device())?;
            kept.ne(0f32)?.where_cond(choice, &floor)?
        } else {
            choice.clone()
        };
        choice
            .arg_sort_last_dim(false)?
            .narrow(1, 0, k)?
            .contiguous()
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
    pub fn route(&self, x: &Tensor, train: bool) -> Result<Routing> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let x = if train && self.cfg.jitter > 0.0 {
            let n = x.elem_count();
            let j = self.cfg.jitter;
            let noise: Vec<f32> = (0..n)
                .map(|i| (1.0 - j + 2.0 * j * uniform01(self.seed ^ call, i as u64)) as f32)
                .collect();
            (x * Tensor::from_vec(noise, x.dims(), x.device())?.to_dtype(x.dtype())?)?
        } else {
            x.clone()
        };
        let logits = self.forward(&x)?.to_dtype(DType::F32)?;
        let k = self.cfg.top_k;
        let (scores, experts, weights) = match self.cfg.scoring {
            Scoring::SoftmaxThenTopK | Scoring::Sigmoid => {
                let scores = if self.cfg.scoring == Scoring::Sigmoid {
                    candle_nn::ops::sigmoid(&logits)?
                } else {
                    ops::softmax_last_dim(&logits)?
                };
                let choice = match self.bias() {
                    Some(b) => scores.detach().broadcast_add(&b)?,
                    None => scores.detach(),
                };
                let experts = self.choose(&choice)?;
                let mut w = scores.gather(&experts, 1)?;
                if self.cfg.renormalize {
                    w = w.broadcast_div(&w.sum_keepdim(1)?)?;
                }
                if self.cfg.routed_scaling_factor != 1.0 {
                    w = (w * self.cfg.routed_scaling_factor)?;
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
        if train && self.cfg.bias_update_rate > 0.0 {
            let mut load = lock(&self.load);
            for e in experts.flatten_all()?.to_vec1::<u32>()? {
                load[e as usize] += 1;
            }
        }
        Ok(Routing {
            logits,
            scores,
            experts,
            weights,
        })
    }
}

/// The gate alone, as Hugging Face's `gate` module: `[..., hidden] -> [..., E]` logits (in the
/// input's dtype). [`Router::route`] makes the top-k decision.
impl Module for Router {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // `ops::linear`: its weight gradient lands in the weight's layout and, in zero-bubble
        // schedules, waits for the weight-gradient step as every other matmul's does.
        crate::ops::linear(x, &self.weight)
    }
}
