//! [`MoeLayer`]: the router, this rank's experts and a token dispatcher, composed.

use super::dispatcher::{Dispatch, TokenDispatcher};
use super::experts::{Expert, ExpertNames, LocalExperts};
use super::losses::{router_z_loss, switch_aux_loss};
use super::plan::plan_tokens;
use super::router::{Router, RouterConfig, Routing};
use crate::checkpoint::{ParallelVarBuilder, Placement};
use crate::comm::Comm;
use crate::mesh::MeshDim;
use candle_core::{bail, DType, ModuleT, Result, Tensor};
use std::sync::Mutex;

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

/// What a MoE layer returns: its output, and what the auxiliary losses and logs need.
pub struct MoeOutput {
    pub output: Tensor,
    pub aux: MoeAux,
}

/// A MoE layer; see the [module docs](super).
///
/// As a [`ModuleT`] (`layer.forward_t(&x, train)`) it returns the output alone and keeps the
/// rest (routing, statistics) for [`MoeLayer::take_aux`], so that it drops into a candle-nn
/// model; [`MoeLayer::forward`] returns everything at once.
pub struct MoeLayer {
    router: Router,
    experts: LocalExperts,
    dispatcher: Box<dyn TokenDispatcher>,
    last_aux: Mutex<Option<MoeAux>>,
}

/// A layer's routing and statistics: what the auxiliary losses and logs need (part of
/// [`MoeOutput`]; what [`ModuleT::forward_t`] leaves for [`MoeLayer::take_aux`]).
pub struct MoeAux {
    pub routing: Routing,
    pub stats: MoeStats,
    /// Fraction of this rank's routed copies per expert (before dropping), for the Switch loss.
    pub fractions: Vec<f32>,
}

impl MoeAux {
    /// Switch / Megatron auxiliary loss of this layer: `E · Σ_e f_e · P_e`, `f_e` the fraction of
    /// routed copies sent to expert `e`, `P_e` its mean router score.
    pub fn switch_aux_loss(&self) -> Result<Tensor> {
        switch_aux_loss(&self.routing.scores, &self.fractions)
    }

    /// Router z-loss of this layer.
    pub fn z_loss(&self) -> Result<Tensor> {
        router_z_loss(&self.routing.logits)
    }
}

impl MoeLayer {
    /// Composes the replicated router, this rank's experts (`experts.range()` of the router's
    /// experts) and a dispatcher over the expert-parallel group `ep`.
    pub fn new(
        router: Router,
        experts: LocalExperts,
        dispatcher: Box<dyn TokenDispatcher>,
        ep: &Comm,
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
        if experts.range().end > e {
            bail!(
                "moe: local experts {:?} are not among the router's {e} experts",
                experts.range()
            )
        }
        Ok(Self {
            router,
            experts,
            dispatcher,
            last_aux: Mutex::new(None),
        })
    }

    /// The same layer with another token dispatcher.
    pub fn with_dispatcher(mut self, dispatcher: Box<dyn TokenDispatcher>) -> Self {
        self.dispatcher = dispatcher;
        self
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The experts this rank holds.
    pub fn experts(&self) -> &LocalExperts {
        &self.experts
    }

    /// Routes and runs `x` (`[..., hidden]`, flattened to tokens); the output has `x`'s shape.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<MoeOutput> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let x2 = x.reshape(((), hidden))?;
        let routing = self.router.route(&x2, train)?;
        let p = plan_tokens(&routing.experts, &routing.weights, self.router.config())?;
        let d = self.dispatcher.dispatch(&x2, &routing, &p, &self.experts)?;
        Ok(MoeOutput {
            output: d.output.reshape(dims)?,
            aux: MoeAux {
                routing,
                stats: MoeStats {
                    tokens_per_expert: d.tokens_per_expert,
                    dropped: p.dropped,
                },
                fractions: p.fractions,
            },
        })
    }

    /// The routing and statistics of the last [`ModuleT::forward_t`] call, taken out (each
    /// call replaces what the previous one left; [`MoeLayer::forward`] returns them in its
    /// output instead and leaves nothing). Take them after every forward that needs them, e.g. per
    /// micro-batch: until taken they keep the router's part of the graph alive.
    pub fn take_aux(&self) -> Option<MoeAux> {
        self.last_aux
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl ModuleT for MoeLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.forward(x, train)?;
        *self.last_aux.lock().unwrap_or_else(|e| e.into_inner()) = Some(out.aux);
        Ok(out.output)
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
    vb: ParallelVarBuilder,
    ep: &Comm,
    tp: &Comm,
) -> Result<MoeLayer> {
    moe_layer_named(
        hidden,
        ffn,
        router_cfg,
        dispatch,
        vb,
        ep,
        tp,
        ExpertNames::MIXTRAL,
    )
}

/// [`moe_layer`] with the experts' projections under `names`
/// (`experts.J.gate_proj/up_proj/down_proj.weight` for Qwen-MoE: [`ExpertNames::GATE_UP_DOWN`]).
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_named(
    hidden: usize,
    ffn: usize,
    router_cfg: RouterConfig,
    dispatch: Dispatch,
    vb: ParallelVarBuilder,
    ep: &Comm,
    tp: &Comm,
    names: ExpertNames,
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
        Placement::Replicated,
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let el = e / ep.size();
    let first = ep.rank() * el;
    // Each ep rank holds its own experts (not replicas of one another's).
    let experts_vb = vb.pp("experts").local_to(MeshDim::Ep);
    let experts = (first..first + el)
        .map(|j| Expert::load_named(hidden, ffn, &experts_vb.pp(j), tp, names))
        .collect::<Result<Vec<_>>>()?;
    let router = Router::new(gate, router_cfg)?;
    // DeepSeek-V3's selection bias, where the checkpoint has one (else zeros).
    let gate_vb = vb.pp("gate");
    if router_cfg.expert_bias && gate_vb.contains("e_score_correction_bias") {
        let bias = gate_vb.get_untracked_in(
            e,
            "e_score_correction_bias",
            Placement::Replicated,
            candle_nn::Init::Const(0.0),
            DType::F32,
        )?;
        router.set_bias(&bias)?;
    }
    MoeLayer::new(
        router,
        LocalExperts::new(experts, first, tp),
        dispatch.dispatcher(ep),
        ep,
    )
}
