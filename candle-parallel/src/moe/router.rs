//! The router: a replicated linear gate that picks each token's top-k experts.

use crate::ops;
use crate::random::uniform01;
use candle_core::{bail, DType, Module, Result, Tensor};
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

/// The gate alone, as Hugging Face's `gate` module: `[..., hidden] -> [..., E]` logits (in the
/// input's dtype). [`Router::route`] makes the top-k decision.
impl Module for Router {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // `ops::linear`: its weight gradient lands in the weight's layout and, in zero-bubble
        // schedules, waits for the weight-gradient step as every other matmul's does.
        crate::ops::linear(x, &self.weight)
    }
}
