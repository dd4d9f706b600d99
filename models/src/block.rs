//! The blocks every model shares: the decoder block (pre-norm attention and a pre-norm
//! feed-forward, each added to the residual stream) and the sparse families' feed-forward
//! ([`Ffn`]: an MoE layer, with Qwen2-MoE's gated shared expert, or a dense MLP).

use crate::llama::{Attention, LlamaConfig, Mlp};
use crate::moe_config::MixtralConfig;
use candle_core::{Module, Result, Tensor};
use candle_nn::Init;
use candle_parallel::checkpoint::{ParallelVarBuilder, Placement};
use candle_parallel::moe::{moe_layer_named, Dispatch, MoeAux, MoeLayer, RouterConfig};
use candle_parallel::tensor_parallel::TpHeads;
use candle_parallel::{ops, Comm};

/// One decoder layer with the feed-forward `F`.
pub(crate) struct DecoderBlock<F> {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    pub ffn: F,
}

impl<F> DecoderBlock<F> {
    /// Layer `layer` (`vb` at `model.layers.i`): its norms and attention under their HF names,
    /// heads split over `tp` by `heads`, and the feed-forward `ffn` the model built.
    pub fn new(
        cfg: &LlamaConfig,
        heads: &TpHeads,
        layer: &ParallelVarBuilder,
        tp: &Comm,
        ffn: F,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let ones = Init::Const(1.0);
        Ok(Self {
            input_norm: layer.pp("input_layernorm").get(
                h,
                "weight",
                Placement::Replicated,
                ones,
            )?,
            attn: Attention::new(cfg, heads, &layer.pp("self_attn"), tp)?,
            post_norm: layer.pp("post_attention_layernorm").get(
                h,
                "weight",
                Placement::Replicated,
                ones,
            )?,
            ffn,
        })
    }

    /// `x + attn(norm(x))`, then `+ ffn(norm(·))` at positions `pos..` (keys and values
    /// appended to `cache`); `ffn` runs the feed-forward on its normed input and returns its
    /// output with whatever the model keeps of it (the MoE's routing).
    pub fn forward<R>(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &(Tensor, Tensor),
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        eps: f64,
        ffn: impl FnOnce(&F, &Tensor) -> Result<(Tensor, R)>,
    ) -> Result<(Tensor, R)> {
        let a = self
            .attn
            .forward(&ops::rms_norm(x, &self.input_norm, eps)?, pos, rope, cache)?;
        let x = (x + a)?;
        let (f, kept) = ffn(&self.ffn, &ops::rms_norm(&x, &self.post_norm, eps)?)?;
        Ok(((x + f)?, kept))
    }
}

/// A decoder layer's feed-forward: an MoE layer (with Qwen2-MoE's gated shared expert), or a
/// dense MLP of `intermediate_size` (Qwen's `mlp_only_layers` and `decoder_sparse_step`).
pub(crate) enum Ffn {
    Sparse {
        moe: Box<MoeLayer>,
        shared: Option<SharedExpert>,
    },
    Dense(Mlp),
}

/// Qwen2-MoE's shared expert: an MLP every token goes through, scaled by
/// `sigmoid(shared_expert_gate · x)` (the gate `[1, hidden]`, replicated).
pub(crate) struct SharedExpert {
    mlp: Mlp,
    gate: Tensor,
}

impl Ffn {
    /// Layer `layer`'s feed-forward from `vb` at `model.layers.N`.
    pub(crate) fn new(
        cfg: &MixtralConfig,
        layer: usize,
        router: RouterConfig,
        dispatch: Dispatch,
        vb: &ParallelVarBuilder,
        ep: &Comm,
        tp: &Comm,
    ) -> Result<Self> {
        let family = cfg.family()?;
        let h = cfg.hidden_size;
        let vb = vb.pp(family.ffn_prefix());
        if !cfg.is_sparse_layer(layer) {
            return Ok(Self::Dense(Mlp::new(h, cfg.intermediate_size, &vb, tp)?));
        }
        let moe = moe_layer_named(
            h,
            cfg.expert_intermediate_size(),
            router,
            dispatch,
            vb.clone(),
            ep,
            tp,
            family.expert_names(),
        )?;
        let shared = match cfg.shared_expert_intermediate_size() {
            Some(ffn) => Some(SharedExpert {
                mlp: Mlp::new(h, ffn, &vb.pp("shared_expert"), tp)?,
                gate: vb.pp("shared_expert_gate").get(
                    (1, h),
                    "weight",
                    Placement::Replicated,
                    candle_parallel::tensor_parallel::linear_weight_init(),
                )?,
            }),
            None => None,
        };
        Ok(Self::Sparse {
            moe: Box::new(moe),
            shared,
        })
    }

    /// The MoE layer, if this is a sparse layer.
    pub(crate) fn moe(&self) -> Option<&MoeLayer> {
        match self {
            Self::Sparse { moe, .. } => Some(moe),
            Self::Dense(_) => None,
        }
    }

    /// The output for the normed input `x` (`[b, s, h]`), with the routing of a sparse layer.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<MoeAux>)> {
        match self {
            Self::Dense(mlp) => Ok((mlp.forward(x)?, None)),
            Self::Sparse { moe, shared } => {
                let o = moe.forward(x, train)?;
                let out = match shared {
                    None => o.output,
                    Some(sh) => {
                        let g = candle_nn::ops::sigmoid(&ops::linear(x, &sh.gate)?)?;
                        (o.output + sh.mlp.forward(x)?.broadcast_mul(&g)?)?
                    }
                };
                Ok((out, Some(o.aux)))
            }
        }
    }
}
