//! The decoder block Llama and Mixtral share: pre-norm attention and a pre-norm feed-forward
//! (Llama's SwiGLU MLP, Mixtral's MoE layer), each added to the residual stream.

use crate::llama::{Attention, LlamaConfig};
use candle_core::{Result, Tensor};
use candle_nn::Init;
use candle_parallel::checkpoint::{ParallelVarBuilder, Placement};
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
