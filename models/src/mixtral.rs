//! A Mixtral-style sparse MoE transformer with expert and tensor parallelism, reading Hugging
//! Face checkpoints of the families [`MoeFamily`] names by `model_type`: Mixtral
//! (`model.layers.N.block_sparse_moe.gate.weight`, `...experts.J.w1/w2/w3.weight`), Qwen2-MoE
//! and Qwen3-MoE (`model.layers.N.mlp.gate.weight`, `...experts.J.gate_proj/up_proj/down_proj`,
//! Qwen2's shared expert, dense layers among the sparse ones); attention as Llama's (with
//! Qwen2's q/k/v biases or Qwen3's q/k norms).
//!
//! Each rank reads only its experts (ep) and its tp slices. Attention, embedding and LM head
//! are split over tp as in [`crate::llama`]; every MoE layer routes with the config's router
//! (Mixtral's: softmax, top-k, renormalised, dropless; `norm_topk_prob`, DeepSeek-style keys)
//! and dispatches over the ep group.

use crate::block::{DecoderBlock, Ffn};
use crate::llama::{
    check_next_token_ids, chunk_ends, next_token_loss, rope_tables, stage_embedding, stage_ends,
    stage_norm_and_head, KvCache, IGNORE_INDEX,
};
pub use crate::moe_config::{MixtralConfig, MoeFamily};
use candle_core::backprop::GradStore;
use candle_core::{bail, Module, Result, Tensor, Var, D};
use candle_parallel::checkpoint::{ParallelVarBuilder, Param};
use candle_parallel::data_parallel::{BatchGroups, GradSink, Recompute};
use candle_parallel::mesh::{DeviceMesh, MeshDim};
use candle_parallel::moe::{
    hf_load_balancing_loss_of_token_sums_over, hf_load_balancing_loss_over,
    hf_load_balancing_token_sums, AuxScope, Dispatch, ExpertLoad, MoeStats,
};
use candle_parallel::pipeline::with_micro_batch;
use candle_parallel::pipeline::{ModelSchedule, Schedule, ScheduleKind, StageTape, UnitStage};
use candle_parallel::tensor_parallel::{ColumnParallelLinear, TpHeads, VocabParallelEmbedding};
use candle_parallel::zero::ShardedModule;
use candle_parallel::{ops, Comm, ReduceOp};

type Block = DecoderBlock<Ffn>;

/// The losses of one forward over a batch.
pub struct MixtralLosses {
    /// Mean next-token cross-entropy.
    pub ce_loss: Tensor,
    /// Hugging Face's load-balancing loss over all layers, unscaled.
    pub aux_loss: Tensor,
    /// `ce_loss + router_aux_loss_coef · aux_loss`.
    pub loss: Tensor,
    /// Per-layer routing statistics.
    pub stats: Vec<MoeStats>,
}

impl MixtralLosses {
    /// `[ce_loss, aux_loss, loss]` on the host.
    fn values(&self) -> Result<[f64; 3]> {
        let v = |t: &Tensor| t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>();
        Ok([v(&self.ce_loss)?, v(&self.aux_loss)?, v(&self.loss)?])
    }
}

/// The expert- and tensor-parallel Mixtral model; see the [module docs](self).
pub struct Mixtral {
    cfg: MixtralConfig,
    /// On the first stage (and on the last when the head is tied to it).
    embed: Option<VocabParallelEmbedding>,
    /// The layers of its chunks, in order.
    blocks: Vec<Block>,
    /// The model's layer index of each block.
    layers: Vec<usize>,
    /// Its chunks' layer ranges, in order: one contiguous stage, or several chunks per rank
    /// for the interleaved schedule ([`Mixtral::new_chunks`]).
    chunks: Vec<std::ops::Range<usize>>,
    /// On the last stage.
    norm: Option<Tensor>,
    lm_head: Option<ColumnParallelLinear>,
    rope: (Tensor, Tensor),
    tp: Comm,
    /// The pipeline schedule of its training steps (1F1B unless set).
    schedule: ModelSchedule,
    /// The ranks the training steps' load-balancing loss sums over (`None`: this rank's).
    aux_batch: Option<Comm>,
    /// The expert-parallel group (its ranks meet in every MoE layer).
    ep: Comm,
}

impl Mixtral {
    /// Builds this rank's part: its tp slices of everything and, of the experts, only those of
    /// its ep rank. `dispatch` says whether the ep ranks hold different tokens (`AllToAll`) or
    /// share them (`AllReduce`).
    pub fn new(
        cfg: &MixtralConfig,
        vb: ParallelVarBuilder,
        ep: &Comm,
        tp: &Comm,
        dispatch: Dispatch,
    ) -> Result<Self> {
        Self::new_stage(cfg, vb, ep, tp, dispatch, 0..cfg.num_hidden_layers)
    }

    /// One pipeline stage: decoder layers `layers` under their HF names (each stage reads
    /// only its layers), the embedding on the first stage, the final norm and head on the
    /// last. Stages pass one packed f32 tensor ([`Mixtral::forward_stage`]): the hidden states
    /// and the running sums of the load-balancing loss, whose probability part carries its
    /// gradient back through the pipeline, so that the aux loss over every layer equals HF's.
    pub fn new_stage(
        cfg: &MixtralConfig,
        vb: ParallelVarBuilder,
        ep: &Comm,
        tp: &Comm,
        dispatch: Dispatch,
        layers: std::ops::Range<usize>,
    ) -> Result<Self> {
        Self::new_chunks(cfg, vb, ep, tp, dispatch, &[layers])
    }

    /// Several pipeline stages on this rank ("chunks", Megatron's virtual stages), for the
    /// interleaved schedule: the decoder layers of each range in `chunks` (increasing and
    /// disjoint; [`candle_parallel::pipeline::rank_chunks`] gives a rank's), the embedding
    /// when the first starts at layer 0, the final norm and head when the last ends the
    /// model. Its training steps run [`ScheduleKind::Interleaved`] over the chunks
    /// ([`Mixtral::set_schedule`]); [`Mixtral::stages`] gives one pipeline stage per chunk.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_parallel::checkpoint::ParallelVarBuilder;
    /// use candle_parallel::moe::Dispatch;
    /// use candle_parallel::pipeline::{rank_chunks, ScheduleKind};
    /// use candle_parallel::launch;
    /// use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
    ///
    /// let mut cfg = MixtralConfig::tiny();
    /// cfg.num_hidden_layers = 4;
    /// let held = launch(1, |ctx| {
    ///     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu);
    ///     // Rank 1 of 2 pipeline ranks, two chunks each.
    ///     let chunks = rank_chunks(cfg.num_hidden_layers, 2, 2, 1)?;
    ///     let (c, d) = (ctx.comm(), ctx.comm());
    ///     let mut m = Mixtral::new_chunks(&cfg, vb, c, d, Dispatch::AllReduce, &chunks)?;
    ///     m.set_schedule(ScheduleKind::Interleaved)?;
    ///     Ok((m.chunks().to_vec(), m.is_first_stage(), m.is_last_stage()))
    /// })?;
    /// assert_eq!(held[0], (vec![1..2, 3..4], false, true));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new_chunks(
        cfg: &MixtralConfig,
        vb: ParallelVarBuilder,
        ep: &Comm,
        tp: &Comm,
        dispatch: Dispatch,
        chunks: &[std::ops::Range<usize>],
    ) -> Result<Self> {
        cfg.check()?;
        let (first, last) = chunk_ends("Mixtral", chunks, cfg.num_hidden_layers)?;
        let layers: Vec<usize> = chunks.iter().flat_map(|c| c.clone()).collect();
        let lcfg = cfg.as_llama();
        let heads = TpHeads::new(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            lcfg.head_dim(),
            tp,
        )?;
        let m = vb.pp("model");
        let embed = stage_embedding(&lcfg, first, last, &vb, tp)?;
        let router = cfg.router_config()?;
        let mut blocks = Vec::with_capacity(layers.len());
        for &i in &layers {
            let l = m.pp("layers").pp(i);
            let ffn = Ffn::new(cfg, i, router, dispatch, &l, ep, tp)?;
            blocks.push(DecoderBlock::new(&lcfg, &heads, &l, tp, ffn)?);
        }
        let (norm, lm_head) = stage_norm_and_head(&lcfg, last, embed.as_ref(), &vb, tp)?;
        Ok(Self {
            rope: rope_tables(&lcfg, vb.dtype(), vb.device())?,
            cfg: cfg.clone(),
            embed: if first { embed } else { None },
            blocks,
            layers,
            chunks: chunks.to_vec(),
            norm,
            lm_head,
            tp: tp.clone(),
            // Several chunks: interleaved, the one schedule that runs them.
            schedule: ModelSchedule::for_chunks(chunks.len())?,
            aux_batch: None,
            ep: ep.clone(),
        })
    }

    /// The pipeline schedule its training steps ([`Mixtral::batch_grads`],
    /// [`Mixtral::train_grads`]) run with pipeline stages: GPipe, 1F1B (the default) or
    /// zero-bubble, planned for the F, I and W costs measured in its first step, on a model of
    /// one stage per rank; interleaved 1F1B on a model of several chunks
    /// ([`Mixtral::new_chunks`]). Any other pairing is an error that says what to change.
    pub fn set_schedule(&mut self, kind: ScheduleKind) -> Result<()> {
        self.schedule = ModelSchedule::new(kind, self.chunks.len())?;
        Ok(())
    }

    /// The layer ranges of its chunks (one for a plain pipeline stage).
    pub fn chunks(&self) -> &[std::ops::Range<usize>] {
        &self.chunks
    }

    /// Its pipeline stages as modules for `pipeline::run_step`, one per chunk in order, with
    /// (`train`) or without training-time routing.
    pub fn stages(&self, train: bool) -> Vec<MixtralStage<'_>> {
        (0..self.chunks.len())
            .map(|chunk| MixtralStage {
                model: self,
                train,
                chunk,
            })
            .collect()
    }

    /// The blocks of chunk `c` (indices into `blocks`).
    fn chunk_blocks(&self, c: usize) -> std::ops::Range<usize> {
        let start: usize = self.chunks[..c].iter().map(|r| r.len()).sum();
        start..start + self.chunks[c].len()
    }

    /// The schedule setting (and zero-bubble's measured costs).
    pub fn schedule(&self) -> &ModelSchedule {
        &self.schedule
    }

    /// The training steps' load-balancing loss over the whole batch that `batch` splits
    /// (`--aux-scope global`: every rank holding other tokens, dp and ep with all-to-all
    /// dispatch; each expert's counts summed over them before the loss, so any layout computes
    /// Hugging Face's loss of the whole batch), or over each rank's tokens (`None`, local:
    /// Megatron's default). Evaluation stays local.
    pub fn set_aux_scope(&mut self, batch: Option<Comm>) {
        self.aux_batch = batch;
    }

    /// After each optimizer step, with DeepSeek-style routing (`topk_method: noaux_tc`): every
    /// MoE layer's selection bias moves against its experts' load over `batch` (the ranks that
    /// route other tokens: dp, and ep with all-to-all dispatch), the same on each of them.
    /// The loads balanced, one per layer of this stage (empty without a bias to update).
    /// Collective over `batch`.
    pub fn update_router_biases(&self, batch: &Comm) -> Result<Vec<ExpertLoad>> {
        let mut loads = Vec::new();
        for b in &self.blocks {
            let Some(moe) = b.ffn.moe() else { continue };
            if let Some(l) = moe.router().update_bias(Some(batch))? {
                loads.push(l);
            }
        }
        Ok(loads)
    }

    /// The routers' selection biases under their Hugging Face names
    /// (`model.layers.N.block_sparse_moe.gate.e_score_correction_bias`, or `mlp.gate` for the
    /// Qwen families), replicated on every
    /// rank of this stage: what checkpoints save beside the parameters (and what the model
    /// reads back when built from one).
    pub fn router_buffers(&self) -> Vec<(String, Tensor)> {
        self.blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let bias = b.ffn.moe()?.router().bias()?;
                let layer = self.layers[i];
                let ffn = self.cfg.family().ok()?.ffn_prefix();
                Some((
                    format!("model.layers.{layer}.{ffn}.gate.e_score_correction_bias"),
                    bias,
                ))
            })
            .collect()
    }

    /// Whether this stage starts at the first layer (takes token ids).
    pub fn is_first_stage(&self) -> bool {
        self.chunks[0].start == 0
    }

    /// Whether this stage ends with the head.
    pub fn is_last_stage(&self) -> bool {
        self.lm_head.is_some()
    }

    /// The length of the packed tensor that stages pass for `b` sequences of `s` tokens:
    /// `[b, s]`, the hidden states, and each token's router probabilities (`E`) and choice
    /// counts (`k · E`) summed over the layers so far (per token, so that the last stage can
    /// leave padding out of the load-balancing loss).
    pub fn stage_activation_len(&self, b: usize, s: usize) -> usize {
        stage_activation_len(&self.cfg, b, s)
    }

    /// One stage's computation (positions from 0): token ids `[b, s]` (first stage) or the
    /// previous stage's packed tensor in; the packed tensor out, or on the last stage this
    /// rank's logit columns packed with the load-balancing sums (for [`Mixtral::stage_losses`]).
    pub fn forward_stage(&self, input: &Tensor, train: bool) -> Result<Tensor> {
        if self.chunks.len() > 1 {
            bail!(
                "forward_stage: this rank holds {} chunks ({:?}): run each with forward_chunk (Mixtral::stages gives them as pipeline stages)",
                self.chunks.len(),
                self.chunks
            )
        }
        self.forward_chunk(0, input, train)
    }

    /// [`Mixtral::forward_stage`] of chunk `c` of this rank's chunks.
    pub fn forward_chunk(&self, c: usize, input: &Tensor, train: bool) -> Result<Tensor> {
        if c >= self.chunks.len() {
            bail!(
                "forward_chunk: chunk {c} asked of a rank holding {} ({:?})",
                self.chunks.len(),
                self.chunks
            )
        }
        let StageIn {
            mut x,
            b,
            s,
            p_in,
            f_in,
        } = self.stage_in(c, input)?;
        let (router_logits, _) =
            self.blocks_forward_with_stats(&mut x, self.chunk_blocks(c), 0, None, train)?;
        self.stage_out(c, &x, &router_logits, p_in, f_in, b, s)
    }

    /// Chunk `c`'s first unit: token ids `[b, s]` embedded (first stage), or the previous
    /// stage's packed tensor unpacked (the hidden states and the load-balancing sums so far:
    /// views of it, so their gradients reach it).
    fn stage_in(&self, c: usize, input: &Tensor) -> Result<StageIn> {
        let (e, k, h) = (
            self.cfg.num_local_experts,
            self.cfg.num_experts_per_tok,
            self.cfg.hidden_size,
        );
        match &self.embed {
            Some(embed) if self.chunks[c].start == 0 => {
                let (b, s) = input.dims2()?;
                self.check_positions(s)?;
                Ok(StageIn {
                    x: embed.forward(input)?,
                    b,
                    s,
                    p_in: Tensor::zeros((b * s, e), candle_core::DType::F32, input.device())?,
                    f_in: Tensor::zeros((b * s, k * e), candle_core::DType::F32, input.device())?,
                })
            }
            _ => {
                let head = input.narrow(0, 0, 2)?.to_vec1::<f32>()?;
                let (b, s) = (head[0] as usize, head[1] as usize);
                if input.dims1()? != self.stage_activation_len(b, s) {
                    bail!(
                        "Mixtral stage at layer {}: got {} values, expected {} for {b} x {s} tokens",
                        self.chunks[c].start,
                        input.dims1()?,
                        self.stage_activation_len(b, s)
                    )
                }
                self.check_positions(s)?;
                let n = b * s * h;
                Ok(StageIn {
                    x: input
                        .narrow(0, 2, n)?
                        .reshape((b, s, h))?
                        .to_dtype(self.rope.0.dtype())?,
                    b,
                    s,
                    p_in: input.narrow(0, 2 + n, b * s * e)?.reshape((b * s, e))?,
                    f_in: input
                        .narrow(0, 2 + n + b * s * e, b * s * k * e)?
                        .reshape((b * s, k * e))?,
                })
            }
        }
    }

    /// Chunk `c`'s last unit: the load-balancing sums with its layers' (from their
    /// `router_logits`), the head on the last stage's output `x`, all packed into one f32
    /// tensor whatever the model's dtype (its parts get their own dtype back).
    #[allow(clippy::too_many_arguments)]
    fn stage_out(
        &self,
        c: usize,
        x: &Tensor,
        router_logits: &[Tensor],
        p_in: Tensor,
        f_in: Tensor,
        b: usize,
        s: usize,
    ) -> Result<Tensor> {
        let (e, k) = (self.cfg.num_local_experts, self.cfg.num_experts_per_tok);
        // A stage of dense layers only passes the sums on.
        let (p, f) = if router_logits.is_empty() {
            (p_in.flatten_all()?, f_in.flatten_all()?)
        } else {
            let (p, f) = hf_load_balancing_token_sums(router_logits, e, k)?;
            ((p_in + p)?.flatten_all()?, (f_in + f)?.flatten_all()?)
        };
        let last = self.chunks[c].end == self.cfg.num_hidden_layers;
        let body = match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) if last => {
                head.forward(&ops::rms_norm(x, norm, self.cfg.rms_norm_eps)?)?
            }
            _ => x.clone(),
        };
        let shape = Tensor::new(&[b as f32, s as f32], body.device())?;
        let body = body.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        Tensor::cat(&[shape, body, p, f], 0)
    }

    /// The losses from the last stage's packed output for `ids`: the cross-entropy over this
    /// rank's logit columns, HF's load-balancing loss over every layer, their weighted sum, and
    /// the gathered logits `[b, s, vocab]`.
    pub fn stage_losses(&self, out: &Tensor, ids: &Tensor) -> Result<(MixtralLosses, Tensor)> {
        self.stage_losses_labeled(out, ids, None, None)
    }

    /// [`Mixtral::stage_losses`] with `labels` and `attention_mask` (see
    /// [`Mixtral::losses_labeled`]).
    pub fn stage_losses_labeled(
        &self,
        out: &Tensor,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<(MixtralLosses, Tensor)> {
        self.stage_losses_over(out, ids, labels, attention_mask, None)
    }

    /// [`Mixtral::stage_losses_labeled`] with the load-balancing loss over `aux_batch` (the
    /// training steps' aux scope).
    fn stage_losses_over(
        &self,
        out: &Tensor,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        aux_batch: Option<&Comm>,
    ) -> Result<(MixtralLosses, Tensor)> {
        let Some(head) = &self.lm_head else {
            bail!("stage_losses: this stage has no head (it is not the last pipeline stage)")
        };
        losses_of_packed(
            &self.cfg,
            &self.tp,
            head.weight().dim(0)?,
            self.rope.0.dtype(),
            out,
            ids,
            labels,
            attention_mask,
            aux_batch,
        )
    }

    pub fn config(&self) -> &MixtralConfig {
        &self.cfg
    }

    /// A KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// This rank's logit columns `[b, s, padded_vocab / tp]`, every layer's router logits and
    /// routing statistics. `train` enables router jitter (none for Mixtral's router).
    pub fn forward_shard(
        &self,
        ids: &Tensor,
        pos: usize,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<(Tensor, Vec<Tensor>, Vec<MoeStats>)> {
        let (embed, norm, head) = self.whole_model(ids, pos, "forward_shard")?;
        let mut x = embed.forward(ids)?;
        let blocks = 0..self.blocks.len();
        let (logits, stats) = self.blocks_forward_with_stats(&mut x, blocks, pos, cache, train)?;
        let out = head.forward(&ops::rms_norm(&x, norm, self.cfg.rms_norm_eps)?)?;
        Ok((out, logits, stats))
    }

    /// The embedding, final norm and head of a whole model (not a pipeline stage), after
    /// checking that `ids` at positions `pos..` fit the model.
    /// Positions `0..end` must be within the rope tables and outside the sliding window
    /// (which this model does not implement).
    fn check_positions(&self, end: usize) -> Result<()> {
        if end > self.cfg.max_position_embeddings {
            bail!(
                "Mixtral: positions up to {end} exceed max_position_embeddings {}: use sequences of at most {} tokens (or a config with a larger max_position_embeddings)",
                self.cfg.max_position_embeddings,
                self.cfg.max_position_embeddings
            )
        }
        if let Some(w) = self.cfg.attention_window() {
            if end > w {
                bail!("Mixtral: positions up to {end} exceed the sliding window {w}, which this model does not implement: use sequences of at most {w} tokens")
            }
        }
        Ok(())
    }

    fn whole_model(
        &self,
        ids: &Tensor,
        pos: usize,
        what: &str,
    ) -> Result<(&VocabParallelEmbedding, &Tensor, &ColumnParallelLinear)> {
        let (_, s) = ids.dims2()?;
        self.check_positions(pos + s)?;
        let (Some(embed), Some(norm), Some(head)) = (&self.embed, &self.norm, &self.lm_head) else {
            bail!(
                "{what} needs the whole model, but this is the pipeline stage of layers {:?}: use forward_stage",
                self.chunks
            )
        };
        if self.layers.len() != self.cfg.num_hidden_layers {
            bail!(
                "{what} needs every layer, and this model holds layers {:?} of {}: build it with every layer (Mixtral::new)",
                self.chunks,
                self.cfg.num_hidden_layers
            )
        }
        Ok((embed, norm, head))
    }

    /// The decoder layers `blocks` (indices into this rank's) on `x` (updated in place) at
    /// positions `pos..`: every layer's router logits and routing statistics.
    fn blocks_forward_with_stats(
        &self,
        x: &mut Tensor,
        blocks: std::ops::Range<usize>,
        pos: usize,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<(Vec<Tensor>, Vec<MoeStats>)> {
        let (mut logits, mut stats) = (Vec::new(), Vec::new());
        for i in blocks {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (y, routed) = self.block_forward(i, x, pos, layer_cache, train)?;
            *x = y;
            if let Some((l, st)) = routed {
                logits.push(l);
                stats.push(st);
            }
        }
        Ok((logits, stats))
    }

    /// This stage's decoder layer `i` on `x`: its output and, for a sparse layer, its router
    /// logits and routing statistics.
    fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        pos: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<(Tensor, Option<(Tensor, MoeStats)>)> {
        let eps = self.cfg.rms_norm_eps;
        let (y, aux) = self.blocks[i].forward(x, pos, &self.rope, cache, eps, |ffn, n| {
            ffn.forward(n, train)
        })?;
        let Some(aux) = aux else {
            return Ok((y, None));
        };
        tracing::debug!(
            layer = self.layers[i],
            tokens_per_expert = ?aux.stats.tokens_per_expert,
            max_over_mean = aux.stats.max_over_mean(),
            dropped = aux.stats.dropped,
            "moe"
        );
        Ok((y, Some((aux.routing.logits, aux.stats))))
    }

    /// Full logits `[b, s, vocab]` on every rank.
    pub fn forward(&self, ids: &Tensor, pos: usize, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (shard, _, _) = self.forward_shard(ids, pos, cache, false)?;
        ops::gather_from_group(&shard, D::Minus1, &self.tp)?.narrow(
            D::Minus1,
            0,
            self.cfg.vocab_size,
        )
    }

    /// Next-token cross-entropy, the HF load-balancing loss and their weighted sum, for `ids`
    /// (`[b, s]`, s ≥ 2), computed on the vocabulary shards.
    pub fn losses(&self, ids: &Tensor, train: bool) -> Result<MixtralLosses> {
        self.losses_labeled(ids, None, None, train)
    }

    /// [`Mixtral::losses`] with HF's `labels` and `attention_mask`: the cross-entropy over
    /// the positions `labels` (`[b, s]`, i64) does not mark [`crate::llama::IGNORE_INDEX`] (the
    /// loss of instruction tuning, where the prompt does not count), and the load-balancing
    /// loss over the tokens `attention_mask` (`[b, s]`, 1 for a token, 0 for padding) keeps,
    /// as HF leaves padding out of it. Padding goes at the end of a row: causal attention
    /// then keeps it out of every real token's output.
    pub fn losses_labeled(
        &self,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<MixtralLosses> {
        check_next_token_ids(ids)?;
        check_attention_mask(attention_mask, ids, labels)?;
        let (logits, router_logits, stats) = self.forward_shard(ids, 0, None, train)?;
        let ce_loss = next_token_loss(&logits, ids, labels, self.cfg.vocab_size, &self.tp)?;
        let aux_loss = hf_load_balancing_loss_over(
            &router_logits,
            attention_mask,
            self.cfg.num_local_experts,
            self.cfg.num_experts_per_tok,
            self.aux_batch.as_ref().filter(|_| train),
        )?;
        let loss = (&ce_loss + (&aux_loss * self.cfg.router_aux_loss_coef)?)?;
        Ok(MixtralLosses {
            ce_loss,
            aux_loss,
            loss,
            stats,
        })
    }

    /// With all-to-all dispatch the ep ranks are data-parallel for every weight but their own
    /// experts: sums the gradients of those shared weights over the ep group (the experts get
    /// theirs from every rank through the all-to-all). Scale each rank's loss by `1 / ep` for
    /// the mean over the global batch.
    pub fn sum_shared_grads(params: &[Param], grads: &mut GradStore, ep: &Comm) -> Result<()> {
        for p in params.iter().filter(|p| !p.is_local_to(MeshDim::Ep)) {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let g = ep.all_reduce(g, ReduceOp::Sum)?;
                grads.insert(p.var.as_tensor(), g);
            }
        }
        Ok(())
    }

    /// Whether parameter `name` is an expert weight (held by one ep rank) rather than replicated
    /// over the ep group.
    pub fn is_expert_param(name: &str) -> bool {
        name.contains(".block_sparse_moe.experts.") || name.contains(".mlp.experts.")
    }
}

/// Labels of instruction tuning ([`Mixtral::losses_labeled`]'s convention) and how the
/// cross-entropy is normalised: by every counted token of the global batch (Hugging Face's
/// `num_items_in_batch`), so that micro-batches and replicas with more completion tokens weigh
/// more and every split of the batch gives the same gradient.
pub struct Targets<'a> {
    /// `[b, s]`, i64, this rank's rows.
    pub labels: &'a Tensor,
    /// Counted targets (labels past the first position that are not ignored) of the whole
    /// global batch, over all replicas.
    pub global_tokens: usize,
    /// Replicas the global batch is split over (dp × ep with all-to-all dispatch).
    pub replicas: usize,
    /// HF's `attention_mask` of this rank's rows (`[b, s]`: 1 for a token, 0 for padding at
    /// the end of a row), which leaves padding out of the load-balancing loss; `None`: no
    /// padding.
    pub attention_mask: Option<&'a Tensor>,
    /// HF's `position_ids` of packed rows (`[b, s]`, u32: several examples per row, each
    /// with positions from 0 and attending only to itself; see [`crate::packing`]); `None`: each
    /// row one sequence from position 0.
    pub position_ids: Option<&'a Tensor>,
}

/// The counted targets of `labels` (`[b, s]`): positions past the first not ignored.
pub fn counted_targets(labels: &Tensor) -> Result<usize> {
    let s = labels.dim(1)?;
    Ok(labels
        .narrow(1, 1, s - 1)?
        .ge(0i64)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize)
}

/// One training step's forward and backward over this rank's examples
/// ([`Mixtral::batch_grads`]).
pub struct BatchGrads {
    /// The gradients of this rank's mean loss, in the order of the variables given.
    pub grads: Vec<Option<Tensor>>,
    /// Mean next-token cross-entropy over this rank's examples (on every stage).
    pub ce_loss: f64,
    /// HF's load-balancing loss (unscaled), averaged over the micro-batches.
    pub aux_loss: f64,
    /// `ce_loss + router_aux_loss_coef · aux_loss`.
    pub loss: f64,
    /// Per-layer routing statistics of the last micro-batch (without pipeline stages).
    pub stats: Vec<MoeStats>,
}

/// One training step's losses, its gradients handed to a [`GradSink`] (see
/// [`Mixtral::train_grads`]).
#[derive(Clone, Debug, Default)]
pub struct BatchLosses {
    /// Mean next-token cross-entropy over this rank's examples (on every stage).
    pub ce_loss: f64,
    /// HF's load-balancing loss (unscaled), averaged over the micro-batches.
    pub aux_loss: f64,
    /// `ce_loss + router_aux_loss_coef · aux_loss`.
    pub loss: f64,
    /// Per-layer routing statistics of the last micro-batch (without pipeline stages).
    pub stats: Vec<MoeStats>,
}

/// The losses of a last stage's packed output: (output, ids, labels, attention mask).
type PackedLosses<'a> =
    dyn Fn(&Tensor, &Tensor, Option<&Tensor>, Option<&Tensor>) -> Result<MixtralLosses> + 'a;

/// One training step of a pipeline stage that runs its own unit-wise backward: `micro_batches`
/// of `ids` on `schedule` (GPipe or 1F1B) over `pp` (`run_step_into`), each micro-batch's gradients to
/// `sink`, the losses of the last stage's packed output by `losses` (`out`, ids, labels,
/// attention mask), on every rank of the pipeline.
#[allow(clippy::too_many_arguments)]
fn pipeline_train(
    schedule: &Schedule,
    stage: &dyn UnitStage,
    sink: &mut dyn GradSink,
    ids: &Tensor,
    targets: Option<&Targets>,
    micro_batches: usize,
    pp: &Comm,
    cfg: &MixtralConfig,
    losses: &PackedLosses,
) -> Result<BatchLosses> {
    let mb = MicroBatches::new(ids, targets, micro_batches)?;
    let (b, s) = mb.ids[0].dims2()?;
    let values = std::sync::Mutex::new(vec![[0f64; 3]; micro_batches]);
    mb.run(|| {
        candle_parallel::pipeline::run_step_into(
            pp,
            schedule,
            stage,
            sink,
            &mb.ids,
            (
                &candle_core::Shape::from(stage_activation_len(cfg, b, s)),
                candle_core::DType::F32,
            ),
            &|i, y| {
                let l = weighted(
                    losses(y, &mb.ids[i], mb.label(i), mb.mask(i))?,
                    mb.weights[i],
                )?;
                values.lock().unwrap_or_else(|e| e.into_inner())[i] = l.values()?;
                Ok(l.loss)
            },
        )
    })?;
    let values = values.into_inner().unwrap_or_else(|e| e.into_inner());
    pipeline_losses(&values, pp)
}

/// The length of the packed tensor that stages pass for `b` sequences of `s` tokens (see
/// [`Mixtral::stage_activation_len`]).
fn stage_activation_len(cfg: &MixtralConfig, b: usize, s: usize) -> usize {
    let (e, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
    2 + b * s * (cfg.hidden_size + e + k * e)
}

/// The means over micro-batches of their `[ce, aux, loss]`, which the last stage knows, on
/// every rank of its pipeline.
fn pipeline_losses(values: &[[f64; 3]], pp: &Comm) -> Result<BatchLosses> {
    let m = values.len() as f64;
    let mean: Vec<f64> = (0..3)
        .map(|j| values.iter().map(|v| v[j]).sum::<f64>() / m)
        .collect();
    let mean = pp
        .broadcast(&Tensor::new(mean.as_slice(), pp.device())?, pp.size() - 1)?
        .to_vec1::<f64>()?;
    Ok(BatchLosses {
        ce_loss: mean[0],
        aux_loss: mean[1],
        loss: mean[2],
        stats: Vec::new(),
    })
}

impl BatchLosses {
    /// Adds one of `m` micro-batches' `[ce, aux, loss]` to the means.
    fn add_mean(&mut self, [ce, aux, loss]: [f64; 3], m: f64) {
        self.ce_loss += ce / m;
        self.aux_loss += aux / m;
        self.loss += loss / m;
    }
}

impl Mixtral {
    /// The gradients (for `vars`, in their order) of the mean loss over `ids` (`[b, s]`,
    /// this rank's examples): `micro_batches` forward and backward passes, through the
    /// pipeline stages of `pp` with its schedule ([`Mixtral::set_schedule`], 1F1B unless set)
    /// when it has several ranks (this model being this rank's stage), summed into one gradient without synchronising. Every rank
    /// of `pp` gets the losses.
    pub fn batch_grads(
        &self,
        vars: &[Var],
        ids: &Tensor,
        targets: Option<&Targets>,
        micro_batches: usize,
        pp: &Comm,
    ) -> Result<BatchGrads> {
        let mb = MicroBatches::new(ids, targets, micro_batches)?;
        if pp.size() == 1 {
            return accumulate(vars, &mb, |i, ids| {
                self.losses_labeled(ids, mb.label(i), mb.mask(i), true)
            });
        }
        self.schedule
            .check_stages(pp, &self.chunks, self.cfg.num_hidden_layers)?;
        let (b, s) = mb.ids[0].dims2()?;
        let values = std::sync::Mutex::new(vec![[0f64; 3]; micro_batches]);
        let stages = self.stages(true);
        let stages: Vec<&dyn Module> = stages.iter().map(|s| s as &dyn Module).collect();
        let out = mb.run(|| {
            candle_parallel::pipeline::run_step(
                pp,
                &self.schedule.schedule(pp.size(), micro_batches)?,
                &stages,
                vars,
                &mb.ids,
                (
                    &candle_core::Shape::from(self.stage_activation_len(b, s)),
                    candle_core::DType::F32,
                ),
                &|i, y| {
                    let (l, _) = self.stage_losses_over(
                        y,
                        &mb.ids[i],
                        mb.label(i),
                        mb.mask(i),
                        self.aux_batch.as_ref(),
                    )?;
                    let l = weighted(l, mb.weights[i])?;
                    values.lock().unwrap_or_else(|e| e.into_inner())[i] = l.values()?;
                    Ok(l.loss)
                },
            )
        })?;
        // Every rank that meets this one inside a stage (tp, ep) plans the same order.
        self.schedule
            .observe(&[pp, &self.tp, &self.ep], &out.executed)?;
        let values = values.into_inner().unwrap_or_else(|e| e.into_inner());
        let mean = pipeline_losses(&values, pp)?;
        Ok(BatchGrads {
            grads: out.grads,
            ce_loss: mean.ce_loss,
            aux_loss: mean.aux_loss,
            loss: mean.loss,
            stats: Vec::new(),
        })
    }
}

impl Mixtral {
    /// One training step's gradients, handed to `sink` (e.g. the trainer) unit by unit
    /// instead of returned whole: the forward runs the embedding, each decoder layer and the
    /// head as units with detached boundaries, the backward runs them in reverse, one at a
    /// time, each seeded with the gradient of its outputs (`(out · grad).sum()`, as pipeline
    /// stages are), and each unit's gradients go to the sink as soon as its backward ends (the
    /// sink packs and reduces them and they are freed), so at most one unit's full gradients
    /// exist at once. `recompute` keeps each layer's activations (`None`) or only its input,
    /// recomputing the layer just before its backward (`Full`). Returns the losses, as
    /// [`Mixtral::batch_grads`] does; the gradients are its gradients bit for bit.
    ///
    /// With pipeline stages (`pp` of several ranks) the micro-batches run on its schedule
    /// ([`Mixtral::set_schedule`]: GPipe or 1F1B, the default) of [`MixtralUnitStage`]s: each
    /// stage's backward is unit-wise too, and recomputes as asked; the sink then gets one
    /// micro-batch at a time. Zero-bubble splits each backward, which a unit-wise backward
    /// cannot, and interleaving runs several chunks per rank: with those the stage's backward
    /// runs whole ([`Mixtral::batch_grads`]) and the sink gets the step's gradients at its
    /// end (accumulated in an f32 copy meanwhile).
    #[allow(clippy::too_many_arguments)]
    pub fn train_grads(
        &self,
        sink: &mut dyn GradSink,
        ids: &Tensor,
        targets: Option<&Targets>,
        micro_batches: usize,
        pp: &Comm,
        recompute: Recompute,
    ) -> Result<BatchLosses> {
        if pp.size() > 1 && self.schedule.kind().needs_whole_backward() {
            return self.whole_backward_train(sink, ids, targets, micro_batches, pp, recompute);
        }
        if pp.size() > 1 {
            let stage = MixtralUnitStage {
                model: self,
                recompute,
            };
            let cols = self.lm_head.as_ref().map_or(Ok(0), |h| h.weight().dim(0))?;
            let dtype = self.rope.0.dtype();
            return pipeline_train(
                &self.schedule.schedule(pp.size(), micro_batches)?,
                &stage,
                sink,
                ids,
                targets,
                micro_batches,
                pp,
                &self.cfg,
                &|out, ids, labels, mask| {
                    Ok(losses_of_packed(
                        &self.cfg,
                        &self.tp,
                        cols,
                        dtype,
                        out,
                        ids,
                        labels,
                        mask,
                        self.aux_batch.as_ref(),
                    )?
                    .0)
                },
            );
        }
        let mb = MicroBatches::new(ids, targets, micro_batches)?;
        let m = micro_batches as f64;
        let mut out = BatchLosses::default();
        for (i, ids) in mb.ids.iter().enumerate() {
            let (l, stats) = mb.run(|| {
                with_micro_batch(i, || {
                    self.micro_batch_into(
                        sink,
                        ids,
                        mb.label(i),
                        mb.mask(i),
                        mb.weights[i],
                        recompute,
                        i + 1 == mb.ids.len(),
                    )
                })
            })?;
            out.add_mean(l, m);
            out.stats = stats;
        }
        Ok(out)
    }

    /// [`Mixtral::train_grads`] on a schedule whose stages run their backward whole
    /// ([`ScheduleKind::needs_whole_backward`]: zero-bubble splits each backward, interleaving
    /// runs several chunks per rank): [`Mixtral::batch_grads`], its gradients handed to `sink`
    /// as one micro-batch's at the end.
    fn whole_backward_train(
        &self,
        sink: &mut dyn GradSink,
        ids: &Tensor,
        targets: Option<&Targets>,
        micro_batches: usize,
        pp: &Comm,
        recompute: Recompute,
    ) -> Result<BatchLosses> {
        if recompute == Recompute::Full {
            bail!("--recompute full reruns each layer in a unit-wise backward, which the {} schedule cannot run ({}): use --recompute selective or none with it, or the gpipe or 1f1b schedule", self.schedule.kind(), match self.schedule.kind() {
                ScheduleKind::Interleaved => "it runs several chunks per rank, each backward whole",
                _ => "it splits each backward into input- and weight-gradient steps",
            })
        }
        let vars = sink.sink_vars();
        let g = ops::with_selective_recompute(recompute == Recompute::Selective, || {
            self.batch_grads(&vars, ids, targets, micro_batches, pp)
        })?;
        sink.begin_backward(true)?;
        for (i, g) in g.grads.iter().enumerate() {
            if let Some(g) = g {
                sink.add_grad(i, g)?;
            }
        }
        sink.end_micro_batch()?;
        Ok(BatchLosses {
            ce_loss: g.ce_loss,
            aux_loss: g.aux_loss,
            loss: g.loss,
            stats: g.stats,
        })
    }

    /// One micro-batch's forward and unit-wise backward into `sink` (see
    /// [`Mixtral::train_grads`]): its weighted losses `[ce, aux, loss]` and routing stats.
    #[allow(clippy::too_many_arguments)]
    fn micro_batch_into(
        &self,
        sink: &mut dyn GradSink,
        ids: &Tensor,
        labels: Option<&Tensor>,
        mask: Option<&Tensor>,
        weight: f64,
        recompute: Recompute,
        last: bool,
    ) -> Result<([f64; 3], Vec<MoeStats>)> {
        check_next_token_ids(ids)?;
        check_attention_mask(mask, ids, labels)?;
        let (embed, norm, head) = self.whole_model(ids, 0, "train_grads")?;
        let x0 = embed.forward(ids)?;
        let layers = self.layers_forward_units(&x0, recompute)?;
        // The head: the losses from the last layer's output and every layer's router logits.
        let x = layers.output();
        let shard = head.forward(&ops::rms_norm(x, norm, self.cfg.rms_norm_eps)?)?;
        let ce_loss = next_token_loss(&shard, ids, labels, self.cfg.vocab_size, &self.tp)?;
        let router = layers.router_logits();
        let aux_loss = hf_load_balancing_loss_over(
            &router,
            mask,
            self.cfg.num_local_experts,
            self.cfg.num_experts_per_tok,
            self.aux_batch.as_ref(),
        )?;
        let loss = (&ce_loss + (&aux_loss * self.cfg.router_aux_loss_coef)?)?;
        let l = weighted(
            MixtralLosses {
                ce_loss,
                aux_loss,
                loss,
                stats: Vec::new(),
            },
            weight,
        )?;
        let values = l.values()?;
        sink.begin_backward(last)?;
        let mut store = ops::backward(&l.loss)?;
        drop((l, shard, router));
        sink.add_store(&mut store)?;
        sink.unit_done(&["model.norm.", "lm_head."])?;
        let seeds = layers.seeds(&store);
        drop(store);
        let stats = layers.stats.clone();
        if let Some(g) = self.layers_backward_units(layers, seeds, sink)? {
            let mut store = ops::backward(&(x0 * g)?.sum_all()?)?;
            sink.add_store(&mut store)?;
        }
        sink.unit_done(&["model.embed_tokens."])?;
        sink.end_micro_batch()?;
        Ok((values, stats))
    }

    /// The decoder layers' forward as units: each layer's input a variable, `x` (the first
    /// layer's input) detached.
    fn layers_forward_units(&self, x: &Tensor, recompute: Recompute) -> Result<LayerTapes> {
        let n = self.blocks.len();
        let mut t = LayerTapes {
            inputs: vec![Var::from_tensor(&x.detach())?],
            outputs: Vec::with_capacity(n),
            logits: Vec::with_capacity(n),
            stats: Vec::with_capacity(n),
        };
        let selective = recompute == Recompute::Selective;
        for i in 0..n {
            let (y, routed) = ops::with_selective_recompute(selective, || {
                self.block_forward(i, t.inputs[i].as_tensor(), 0, None, true)
            })?;
            t.inputs.push(Var::from_tensor(&y.detach())?);
            let l = match routed {
                Some((l, st)) => {
                    t.logits.push(Some(Var::from_tensor(&l.detach())?));
                    t.stats.push(st);
                    Some(l)
                }
                None => {
                    t.logits.push(None);
                    None
                }
            };
            // Recomputed: the graph (every activation of the layer) is dropped here.
            t.outputs
                .push((recompute != Recompute::Full).then_some((y, l)));
        }
        Ok(t)
    }

    /// The decoder layers' backward, last to first, each seeded with the gradients of its
    /// output and router logits (`seeds`: of the last layer's output, and of each layer's
    /// logits), each layer's gradients handed to `sink` as its backward ends. Returns the
    /// gradient of the first layer's input.
    fn layers_backward_units(
        &self,
        mut t: LayerTapes,
        (mut seed, mut seeds_l): (Option<Tensor>, Vec<Option<Tensor>>),
        sink: &mut dyn GradSink,
    ) -> Result<Option<Tensor>> {
        for i in (0..self.blocks.len()).rev() {
            let (y, l) = match t.outputs[i].take() {
                Some(kept) => kept,
                None => {
                    let (y, routed) =
                        self.block_forward(i, t.inputs[i].as_tensor(), 0, None, true)?;
                    (y, routed.map(|(l, _)| l))
                }
            };
            let prefix = format!("model.layers.{}.", self.layers[i]);
            let mut total: Option<Tensor> = None;
            for (out, g) in [(Some(&y), seed.take()), (l.as_ref(), seeds_l[i].take())] {
                if let (Some(out), Some(g)) = (out, g) {
                    // In f32: the hidden states may be 16-bit, the router logits are f32.
                    let s = (out * g)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
                    total = Some(match total {
                        Some(t) => (t + s)?,
                        None => s,
                    });
                }
            }
            drop((y, l));
            if let Some(total) = total {
                let mut store = ops::backward(&total)?;
                seed = grad_of(&store, t.inputs[i].as_tensor());
                sink.add_store(&mut store)?;
            }
            sink.unit_done(&[&prefix])?;
            t.inputs.truncate(i + 1);
        }
        Ok(seed)
    }
}

/// Detached: a gradient can carry a graph of its own (a custom op's backward computed from
/// variables), which the next unit's backward must not walk into.
fn grad_of(store: &GradStore, v: &Tensor) -> Option<Tensor> {
    store.get(v).map(Tensor::detach)
}

/// What the decoder layers' unit-wise forward keeps for their backward.
struct LayerTapes {
    /// Each layer's input as a variable (its gradient is the previous unit's seed), then the
    /// last layer's output.
    inputs: Vec<Var>,
    /// Each layer's output and router logits (dense layers: none) with their graphs (`None`:
    /// recomputed).
    outputs: Vec<Option<(Tensor, Option<Tensor>)>>,
    /// Each layer's router logits as a variable (dense layers: none).
    logits: Vec<Option<Var>>,
    /// The sparse layers' routing statistics.
    stats: Vec<MoeStats>,
}

impl LayerTapes {
    /// The last layer's output (the first layer's input without layers).
    fn output(&self) -> &Tensor {
        self.inputs[self.inputs.len() - 1].as_tensor()
    }

    fn router_logits(&self) -> Vec<Tensor> {
        self.logits
            .iter()
            .flatten()
            .map(|l| l.as_tensor().clone())
            .collect()
    }

    /// The seeds of the layers' backward from what follows them: the gradients of the last
    /// output and of each layer's router logits.
    fn seeds(&self, store: &GradStore) -> (Option<Tensor>, Vec<Option<Tensor>>) {
        (
            grad_of(store, self.output()),
            self.logits
                .iter()
                .map(|l| l.as_ref().and_then(|l| grad_of(store, l.as_tensor())))
                .collect(),
        )
    }
}

/// A Mixtral pipeline stage that runs its backward unit by unit
/// ([`candle_parallel::pipeline::run_step_into`]): the embedding or the unpacking of the
/// previous stage's tensor, each decoder layer, and the head with the packing, as units with
/// detached boundaries (as [`Mixtral::train_grads`] without stages); the same values as
/// [`Mixtral::forward_stage`] in training, and the same gradients.
pub struct MixtralUnitStage<'a> {
    pub model: &'a Mixtral,
    pub recompute: Recompute,
}

impl UnitStage for MixtralUnitStage<'_> {
    fn forward_units<'s>(&'s self, input: &Tensor) -> Result<(Tensor, Box<dyn StageTape + 's>)> {
        let m = self.model;
        if m.chunks.len() > 1 {
            bail!("MixtralUnitStage runs one stage per rank, and this rank holds {} chunks ({:?}): run them through Mixtral::batch_grads (the interleaved schedule)", m.chunks.len(), m.chunks)
        }
        // The previous stage's tensor as a variable: its gradient goes back (the first
        // stage's token ids have none).
        let input = match m.is_first_stage() && m.embed.is_some() {
            true => StageInput::Ids(input.clone()),
            false => StageInput::Packed(Var::from_tensor(input)?),
        };
        let StageIn {
            x: x0,
            b,
            s,
            p_in,
            f_in,
        } = m.stage_in(0, input.tensor())?;
        let layers = m.layers_forward_units(&x0, self.recompute)?;
        let out = m.stage_out(
            0,
            layers.output(),
            &layers.router_logits(),
            p_in,
            f_in,
            b,
            s,
        )?;
        let tape = MixtralStageTape {
            model: m,
            input,
            // Recomputed: the first unit runs again before its backward (the embedding's
            // gather; the unpacking is a view).
            x0: (self.recompute != Recompute::Full).then_some(x0),
            layers,
            out: out.clone(),
        };
        Ok((out.detach(), Box::new(tape)))
    }
}

/// What a stage's first unit gives: its hidden states `[b, s, hidden]` and the load-balancing
/// sums so far (probabilities `[b·s, E]`, choice counts `[b·s, k·E]`).
struct StageIn {
    x: Tensor,
    b: usize,
    s: usize,
    p_in: Tensor,
    f_in: Tensor,
}

/// What a stage's first unit took in.
enum StageInput {
    /// The first stage's token ids.
    Ids(Tensor),
    /// The previous stage's packed tensor, as a variable (its gradient goes back).
    Packed(Var),
}

impl StageInput {
    fn tensor(&self) -> &Tensor {
        match self {
            Self::Ids(t) => t,
            Self::Packed(v) => v.as_tensor(),
        }
    }
}

/// What a [`MixtralUnitStage`]'s forward kept for one micro-batch.
struct MixtralStageTape<'a> {
    model: &'a Mixtral,
    input: StageInput,
    /// The first unit's output with its graph (`None`: recomputed).
    x0: Option<Tensor>,
    layers: LayerTapes,
    /// The packed output with the last unit's graph.
    out: Tensor,
}

impl StageTape for MixtralStageTape<'_> {
    fn backward(self: Box<Self>, grad: &Tensor, sink: &mut dyn GradSink) -> Result<Option<Tensor>> {
        let MixtralStageTape {
            model: m,
            input,
            x0,
            layers,
            out,
        } = *self;
        let mut store = ops::backward(&(out * grad)?.sum_all()?)?;
        sink.add_store(&mut store)?;
        if m.is_last_stage() {
            sink.unit_done(&["model.norm.", "lm_head."])?;
        }
        let seeds = layers.seeds(&store);
        // The gradient of the input's probability sums, which pass through the last unit.
        let mut input_grad = match &input {
            StageInput::Packed(v) => grad_of(&store, v.as_tensor()),
            StageInput::Ids(_) => None,
        };
        drop(store);
        if let Some(g) = m.layers_backward_units(layers, seeds, sink)? {
            let x0 = match x0 {
                Some(x0) => x0,
                None => m.stage_in(0, input.tensor())?.x,
            };
            let mut store = ops::backward(&(x0 * g)?.sum_all()?)?;
            sink.add_store(&mut store)?;
            if let StageInput::Packed(v) = &input {
                if let Some(gx) = grad_of(&store, v.as_tensor()) {
                    // Disjoint parts of the input (hidden states, probability sums): exact.
                    input_grad = Some(match input_grad {
                        Some(gp) => (gp + gx)?,
                        None => gx,
                    });
                }
            }
        }
        if m.is_first_stage() {
            sink.unit_done(&["model.embed_tokens."])?;
        }
        Ok(input_grad)
    }
}

/// The losses from a last stage's packed output for `ids` (see [`Mixtral::stage_losses`]):
/// `cols` logit columns on this rank, cast back to `dtype`.
#[allow(clippy::too_many_arguments)]
fn losses_of_packed(
    cfg: &MixtralConfig,
    tp: &Comm,
    cols: usize,
    dtype: candle_core::DType,
    out: &Tensor,
    ids: &Tensor,
    labels: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    aux_batch: Option<&Comm>,
) -> Result<(MixtralLosses, Tensor)> {
    check_next_token_ids(ids)?;
    check_attention_mask(attention_mask, ids, labels)?;
    let (b, s) = ids.dims2()?;
    let (e, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
    let n = b * s * cols;
    let header = out.narrow(0, 0, 2)?.to_vec1::<f32>()?;
    if out.dims1()? != 2 + n + b * s * (e + k * e) || header != [b as f32, s as f32] {
        bail!(
            "stage_losses: the last stage's output ({} values for {} x {} tokens) does not belong to ids of shape {:?}",
            out.dims1()?,
            header[0],
            header[1],
            ids.dims()
        )
    }
    let logits = out
        .narrow(0, 2, n)?
        .reshape((b, s, cols))?
        .to_dtype(dtype)?;
    let p = out.narrow(0, 2 + n, b * s * e)?.reshape((b * s, e))?;
    let f = out
        .narrow(0, 2 + n + b * s * e, b * s * k * e)?
        .reshape((b * s, k * e))?;
    let ce_loss = next_token_loss(&logits, ids, labels, cfg.vocab_size, tp)?;
    let aux_loss = hf_load_balancing_loss_of_token_sums_over(
        &p,
        &f,
        attention_mask,
        cfg.sparse_layers(0..cfg.num_hidden_layers),
        aux_batch,
    )?;
    let loss = (&ce_loss + (&aux_loss * cfg.router_aux_loss_coef)?)?;
    let full =
        ops::gather_from_group(&logits, D::Minus1, tp)?.narrow(D::Minus1, 0, cfg.vocab_size)?;
    Ok((
        MixtralLosses {
            ce_loss,
            aux_loss,
            loss,
            stats: Vec::new(),
        },
        full,
    ))
}

/// An attention mask must have the shape of the ids it goes with and pad only at the end of
/// a row (1s, at least one, then 0s): causal attention keeps end padding away from the real
/// tokens, so only then are their outputs HF's (this model does not mask attention keys). A
/// label predicted from padding (past the first padded position) must be ignored (-100, as
/// HF's collators set it): HF predicts it from other hidden states.
fn check_attention_mask(
    mask: Option<&Tensor>,
    ids: &Tensor,
    labels: Option<&Tensor>,
) -> Result<()> {
    let Some(m) = mask else {
        return Ok(());
    };
    if m.dims() != ids.dims() {
        bail!(
            "attention_mask of shape {:?} for ids of shape {:?}: give one 1 (token) or 0 (padding) \
             per id",
            m.dims(),
            ids.dims()
        )
    }
    let rows = m.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let labels = labels.map(|l| l.to_vec2::<i64>()).transpose()?;
    for (i, r) in rows.iter().enumerate() {
        let n = r.iter().take_while(|&&v| v == 1.0).count();
        if n == 0 || r[n..].iter().any(|&v| v != 0.0) {
            bail!(
                "attention_mask row {i} is {r:?}: each row must be 1s (at least one) then 0s, \
                 padding at the end (left padding and holes are not supported)"
            )
        }
        if let Some((j, l)) = labels.as_ref().and_then(|l| {
            l[i].iter()
                .enumerate()
                .skip(n + 1)
                .find(|(_, &l)| l != IGNORE_INDEX)
        }) {
            bail!(
                "labels row {i}, position {j}: {l} would be predicted from padding (the attention \
                 mask keeps {n} tokens): set it to {IGNORE_INDEX}, as HF's collators do"
            )
        }
    }
    Ok(())
}

/// A batch in micro-batches: ids, labels and attention masks in equal parts, and each part's
/// weight of its mean cross-entropy.
struct MicroBatches {
    ids: Vec<Tensor>,
    labels: Option<Vec<Tensor>>,
    masks: Option<Vec<Tensor>>,
    /// Packed rows' position ids, per micro-batch.
    positions: Option<Vec<Tensor>>,
    weights: Vec<f64>,
}

impl MicroBatches {
    /// `ids` (and the targets) in `micro_batches` equal parts; a part's weight is its counted
    /// tokens' share of the global batch's, times the micro-batches and replicas the gradients
    /// are averaged over (1 without targets).
    fn new(ids: &Tensor, targets: Option<&Targets>, micro_batches: usize) -> Result<Self> {
        let split = |t: &Tensor| candle_parallel::pipeline::split_batch(t, micro_batches);
        let mbs = split(ids)?;
        let Some(t) = targets else {
            return Ok(Self {
                ids: mbs,
                labels: None,
                masks: None,
                positions: None,
                weights: vec![1.0; micro_batches],
            });
        };
        if t.global_tokens == 0 {
            bail!("the global batch has no counted target (every label is ignored)")
        }
        check_attention_mask(t.attention_mask, ids, Some(t.labels))?;
        if let Some(p) = t.position_ids {
            crate::packing::check_position_ids(p, ids.dims2()?)?;
        }
        let lbs = split(t.labels)?;
        let weights = lbs
            .iter()
            .map(|l| {
                Ok(
                    counted_targets(l)? as f64 * (micro_batches * t.replicas) as f64
                        / t.global_tokens as f64,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            ids: mbs,
            labels: Some(lbs),
            masks: t.attention_mask.map(split).transpose()?,
            positions: t.position_ids.map(split).transpose()?,
            weights,
        })
    }

    fn label(&self, i: usize) -> Option<&Tensor> {
        self.labels.as_ref().map(|l| &l[i])
    }

    fn mask(&self, i: usize) -> Option<&Tensor> {
        self.masks.as_ref().map(|m| &m[i])
    }

    /// `f` with these micro-batches' packed positions as the attention's (see
    /// [`crate::packing`]); each micro-batch runs inside [`with_micro_batch`].
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        crate::packing::with_position_ids(self.positions.as_deref(), f)
    }
}

/// The losses with the cross-entropy weighted by `w` (the aux loss as it was).
fn weighted(l: MixtralLosses, w: f64) -> Result<MixtralLosses> {
    if w == 1.0 {
        return Ok(l);
    }
    let ce = (&l.ce_loss * w)?;
    let loss = ((&l.loss - &l.ce_loss)? + &ce)?;
    Ok(MixtralLosses {
        ce_loss: ce,
        loss,
        ..l
    })
}

/// The mean of `losses(mb)` over micro-batches, backward after each, gradients (for `vars`)
/// summed without synchronising.
fn accumulate(
    vars: &[Var],
    mb: &MicroBatches,
    losses: impl Fn(usize, &Tensor) -> Result<MixtralLosses>,
) -> Result<BatchGrads> {
    let m = mb.ids.len() as f64;
    let mut acc = candle_parallel::data_parallel::GradAccumulator::default();
    let mut out = BatchLosses::default();
    mb.run(|| {
        for (i, ids) in mb.ids.iter().enumerate() {
            with_micro_batch(i, || -> Result<()> {
                let l = weighted(losses(i, ids)?, mb.weights[i])?;
                let store = ops::backward(&l.loss)?;
                let g: Vec<Option<Tensor>> = vars
                    .iter()
                    .map(|x| store.get(x.as_tensor()).cloned())
                    .collect();
                acc.add(&g)?;
                out.add_mean(l.values()?, m);
                out.stats = l.stats;
                Ok(())
            })?;
        }
        Ok::<_, candle_core::Error>(())
    })?;
    Ok(BatchGrads {
        grads: acc.take()?,
        ce_loss: out.ce_loss,
        aux_loss: out.aux_loss,
        loss: out.loss,
        stats: out.stats,
    })
}

/// Mixtral with its parameters sharded over the replicas (ZeRO stage 3): every decoder layer
/// is a [`ShardedModule`] (the first also holding the embedding, the last the final norm and
/// the head), gathered just before use and freed after, in forward and again in backward.
/// Computes what [`Mixtral`] computes.
pub struct ShardedMixtral {
    cfg: MixtralConfig,
    /// Layers `first_layer..first_layer + units.len()`, one sharded module each.
    units: Vec<ShardedModule>,
    first_layer: usize,
    tp: Comm,
    pp: Comm,
    dtype: candle_core::DType,
    /// The pipeline schedule (GPipe or 1F1B) of its training steps with pipeline stages.
    schedule: ModelSchedule,
    /// The ranks the training steps' load-balancing loss sums over (`None`: this rank's).
    aux_batch: Option<Comm>,
}

/// A one-layer stage that owns its model (what a sharded module rebuilds).
struct OwnedStage(Mixtral);

impl Module for OwnedStage {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.0.forward_stage(input, true)
    }
}

impl ShardedMixtral {
    /// Builds every layer once from `vb` (trainable; each rank reads its tp/ep slices) and
    /// keeps this rank's partition of it. Collective over the world.
    pub fn new(
        cfg: &MixtralConfig,
        vb: ParallelVarBuilder,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        dispatch: Dispatch,
    ) -> Result<Self> {
        Self::new_stage(cfg, vb, batch, mesh, dispatch, 0..cfg.num_hidden_layers)
    }

    /// One pipeline stage at ZeRO 3: decoder layers `layers` (the embedding with the first,
    /// the norm and head with the last), each a sharded module over the batch groups; the
    /// stage runs in [`ShardedMixtral::train_grads`]'s schedule over `mesh.pp()` (FSDP2
    /// with pipelining: each layer gathered for its forward and again for its backward, inside
    /// every micro-batch). Collective over the world.
    pub fn new_stage(
        cfg: &MixtralConfig,
        vb: ParallelVarBuilder,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        dispatch: Dispatch,
        layers: std::ops::Range<usize>,
    ) -> Result<Self> {
        cfg.check()?;
        stage_ends("ShardedMixtral", &layers, cfg.num_hidden_layers)?;
        if cfg.router_config()?.expert_bias {
            bail!("ZeRO 3 rebuilds each layer, its router included, from the gathered parameters at every use, so a router's selection bias (topk_method noaux_tc) would not persist: train this model at ZeRO 0, 1 or 2")
        }

        if cfg.tie_word_embeddings {
            bail!("ZeRO stage 3: a head tied to the embedding would be two copies in the first and last layers' sharded modules; train this model at stage 0, 1 or 2")
        }
        let mut units = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let (c, ep, tp) = (cfg.clone(), mesh.ep().clone(), mesh.tp().clone());
            units.push(ShardedModule::new(
                &format!("layer {i}"),
                &vb,
                batch,
                mesh,
                move |vb| {
                    Ok(OwnedStage(Mixtral::new_stage(
                        &c,
                        vb,
                        &ep,
                        &tp,
                        dispatch,
                        i..i + 1,
                    )?))
                },
            )?);
        }
        let model = Self {
            cfg: cfg.clone(),
            units,
            first_layer: layers.start,
            tp: mesh.tp().clone(),
            pp: mesh.pp().clone(),
            dtype: vb.dtype(),
            schedule: ModelSchedule::default(),
            aux_batch: None,
        };
        model.set_prefetch(true);
        Ok(model)
    }

    /// [`Mixtral::set_aux_scope`] for its training steps.
    pub fn set_aux_scope(&mut self, batch: Option<Comm>) {
        self.aux_batch = batch;
    }

    /// The pipeline schedule of its training steps with pipeline stages: GPipe or 1F1B (the
    /// default). A ZeRO 3 stage gathers, differentiates and reduce-scatters each layer in one
    /// backward, which zero-bubble's split backwards cannot take apart: an error says so.
    pub fn set_schedule(&mut self, kind: ScheduleKind) -> Result<()> {
        if kind.splits_backwards() {
            bail!("ZeRO 3 with pipeline stages runs each layer's backward whole (gather, backward, reduce-scatter), which the {kind} schedule would split: use gpipe or 1f1b, or ZeRO 0-2 with {kind}")
        }
        if kind == ScheduleKind::Interleaved {
            bail!("ZeRO 3 builds one contiguous stage of sharded layers per pipeline rank, and the interleaved schedule needs several chunks per rank: use gpipe or 1f1b with --zero 3, or ZeRO 0-2 with --schedule interleaved")
        }
        self.schedule = ModelSchedule::new(kind, 1)?;
        Ok(())
    }

    /// FSDP2's prefetch (on by default): each layer's forward starts gathering the next
    /// layer's parameters, and each layer's backward the previous layer's, on the replicas'
    /// communication lane while it computes; `false` gathers each layer when it is reached
    /// (the same numbers, the gathers exposed).
    pub fn set_prefetch(&self, prefetch: bool) {
        for (i, u) in self.units.iter().enumerate() {
            let (next, prev) = match prefetch {
                true => (
                    self.units.get(i + 1),
                    i.checked_sub(1).map(|p| &self.units[p]),
                ),
                false => (None, None),
            };
            u.set_modules_to_forward_prefetch(&next.into_iter().collect::<Vec<_>>());
            u.set_modules_to_backward_prefetch(&prev.into_iter().collect::<Vec<_>>());
        }
    }

    /// FSDP2's `reshard_after_forward` for every layer (see
    /// [`ShardedModule::set_reshard_after_forward`]): `false` keeps each layer's gathered
    /// parameters from its forward to its backward (no second gather).
    pub fn set_reshard_after_forward(&self, reshard: bool) {
        for u in &self.units {
            u.set_reshard_after_forward(reshard);
        }
    }

    /// Activation checkpointing of every layer ([`ShardedModule::set_recompute`]):
    /// `Recompute::Full` keeps each layer's input only and runs the layer again in its
    /// backward; `None` and `Selective` keep the layer's activations (selective ones apart,
    /// under [`ops::with_selective_recompute`]). Gathered parameters are freed after the
    /// forward either way, unless [`ShardedMixtral::set_reshard_after_forward`] keeps them.
    pub fn set_recompute(&self, recompute: Recompute) {
        for u in &self.units {
            u.set_recompute(recompute == Recompute::Full);
        }
    }

    /// The sharded modules, first layer first.
    pub fn units(&self) -> Vec<&ShardedModule> {
        self.units.iter().collect()
    }

    /// The losses for `ids` (`[b, s]`; `labels` and `attention_mask` as
    /// [`Mixtral::losses_labeled`]) and the gathered logits `[b, s, vocab]`, for evaluation:
    /// nothing tracks gradients (each layer is gathered, run and freed); train with
    /// [`ShardedMixtral::train_grads`] or [`ShardedMixtral::batch_grads`].
    pub fn losses(
        &self,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<(MixtralLosses, Tensor)> {
        check_attention_mask(attention_mask, ids, labels)?;
        self.check_whole("losses")?;
        // Evaluation: no layer keeps anything for a backward.
        let mut x = ids.clone();
        for u in &self.units {
            x = u.forward_untracked(&x)?;
        }
        self.losses_of_packed(&x, ids, labels, attention_mask, None)
    }

    /// The training forward's losses (every layer kept for a backward), with the
    /// load-balancing loss over `aux_batch`.
    fn losses_over(
        &self,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        aux_batch: Option<&Comm>,
    ) -> Result<(MixtralLosses, Tensor)> {
        check_attention_mask(attention_mask, ids, labels)?;
        self.check_whole("losses")?;
        let x = self.forward_stage(ids)?;
        self.losses_of_packed(&x, ids, labels, attention_mask, aux_batch)
    }

    /// The losses from the whole model's packed output `x`.
    fn losses_of_packed(
        &self,
        x: &Tensor,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        aux_batch: Option<&Comm>,
    ) -> Result<(MixtralLosses, Tensor)> {
        let cols = self.cfg.vocab_size.div_ceil(self.tp.size());
        losses_of_packed(
            &self.cfg,
            &self.tp,
            cols,
            self.dtype,
            x,
            ids,
            labels,
            attention_mask,
            aux_batch,
        )
    }

    /// As [`Mixtral::batch_grads`] without pipeline stages: the gradients (for `vars`, e.g.
    /// the trainer's, which include the units' shards) of the mean loss over `ids` in
    /// `micro_batches` passes.
    pub fn batch_grads(
        &self,
        vars: &[Var],
        ids: &Tensor,
        targets: Option<&Targets>,
        micro_batches: usize,
    ) -> Result<BatchGrads> {
        self.check_whole("batch_grads")?;
        let mb = MicroBatches::new(ids, targets, micro_batches)?;
        accumulate(vars, &mb, |i, ids| {
            Ok(self
                .losses_over(ids, mb.label(i), mb.mask(i), self.aux_batch.as_ref())?
                .0)
        })
    }

    /// The length of the packed tensor stages pass for `b` sequences of `s` tokens (as
    /// [`Mixtral::stage_activation_len`]).
    pub fn stage_activation_len(&self, b: usize, s: usize) -> usize {
        stage_activation_len(&self.cfg, b, s)
    }

    /// This stage's layers on `input` (token ids on the first stage, else the previous
    /// stage's packed tensor): the packed tensor out, as [`Mixtral::forward_stage`].
    pub fn forward_stage(&self, input: &Tensor) -> Result<Tensor> {
        let mut x = input.clone();
        for u in &self.units {
            x = u.forward(&x)?;
        }
        Ok(x)
    }

    /// The losses from the last stage's packed output (as [`Mixtral::stage_losses_labeled`])
    /// and the gathered logits `[b, s, vocab]`.
    pub fn stage_losses_labeled(
        &self,
        out: &Tensor,
        ids: &Tensor,
        labels: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<(MixtralLosses, Tensor)> {
        if self.first_layer + self.units.len() != self.cfg.num_hidden_layers {
            bail!("stage_losses: this stage has no head (it is not the last pipeline stage)")
        }
        let cols = self.cfg.vocab_size.div_ceil(self.tp.size());
        losses_of_packed(
            &self.cfg,
            &self.tp,
            cols,
            self.dtype,
            out,
            ids,
            labels,
            attention_mask,
            None,
        )
    }

    /// Refuses a pipeline stage where `what` needs the whole model.
    fn check_whole(&self, what: &str) -> Result<()> {
        if self.first_layer != 0 || self.units.len() != self.cfg.num_hidden_layers {
            bail!(
                "ShardedMixtral::{what} needs the whole model, but this is the pipeline stage of layers {}..{}: use train_grads, which runs the stages",
                self.first_layer,
                self.first_layer + self.units.len()
            )
        }
        Ok(())
    }

    /// The losses of the last layer's packed output `out` for `ids`.
    fn losses_of(
        &self,
        out: &Tensor,
        ids: &Tensor,
        labels: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<MixtralLosses> {
        let cols = self.cfg.vocab_size.div_ceil(self.tp.size());
        Ok(losses_of_packed(
            &self.cfg,
            &self.tp,
            cols,
            self.dtype,
            out,
            ids,
            labels,
            mask,
            self.aux_batch.as_ref(),
        )?
        .0)
    }

    /// As [`Mixtral::train_grads`]: the layers' backward passes run one at a time (boundaries
    /// detached), each handing its partition's gradient (reduce-scattered in the sharded
    /// module's backward) to `sink` as soon as it exists. Each layer's gathered parameters
    /// are freed after its forward and gathered again for its backward (unless
    /// [`ShardedMixtral::set_reshard_after_forward`] keeps them); its forward runs again in
    /// its backward under [`ShardedMixtral::set_recompute`]'s `Recompute::Full`. With pipeline stages (built by [`ShardedMixtral::new_stage`] on a mesh whose pp
    /// has several ranks), the micro-batches run on its schedule
    /// ([`ShardedMixtral::set_schedule`], 1F1B unless set).
    pub fn train_grads(
        &self,
        sink: &mut dyn GradSink,
        ids: &Tensor,
        targets: Option<&Targets>,
        micro_batches: usize,
    ) -> Result<BatchLosses> {
        if self.pp.size() > 1 {
            return pipeline_train(
                &self.schedule.schedule(self.pp.size(), micro_batches)?,
                self,
                sink,
                ids,
                targets,
                micro_batches,
                &self.pp,
                &self.cfg,
                &|out, ids, labels, mask| self.losses_of(out, ids, labels, mask),
            );
        }
        self.check_whole("train_grads")?;
        let mb = MicroBatches::new(ids, targets, micro_batches)?;
        let m = micro_batches as f64;
        let mut out = BatchLosses::default();
        for (i, ids) in mb.ids.iter().enumerate() {
            let (labels, mask) = (mb.label(i), mb.mask(i));
            check_attention_mask(mask, ids, labels)?;
            let _scope = crate::packing::PositionsScope::micro_batch(&mb.positions, i);
            let (y, tape) = self.forward_units(ids)?;
            let last = Var::from_tensor(&y)?;
            drop(y);
            let l = weighted(
                self.losses_of(last.as_tensor(), ids, labels, mask)?,
                mb.weights[i],
            )?;
            sink.begin_backward(i + 1 == mb.ids.len())?;
            let seed = ops::backward(&l.loss)?
                .remove(last.as_tensor())
                .map(|g| g.detach());
            // The losses' graph (the head's logits and softmax) goes before the layers'
            // backward passes.
            let values = l.values()?;
            drop((l, last));
            if let Some(g) = seed {
                tape.backward(&g, sink)?;
            }
            sink.end_micro_batch()?;
            out.add_mean(values, m);
        }
        Ok(out)
    }
}

/// [`ShardedMixtral::forward_stage`], for `candle_parallel::pipeline::run_step`.
impl Module for ShardedMixtral {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_stage(input)
    }
}

/// A ZeRO 3 stage (or the whole model) runs its layers as units: each layer's input a
/// variable, its output kept with its (sharded module's) graph.
impl UnitStage for ShardedMixtral {
    fn forward_units<'s>(&'s self, x: &Tensor) -> Result<(Tensor, Box<dyn StageTape + 's>)> {
        // The stage's own input: token ids on the first stage, else the previous stage's
        // packed tensor as a variable (its gradient goes back).
        let input = match self.first_layer {
            0 => None,
            _ => Some(Var::from_tensor(x)?),
        };
        let mut cur = input
            .as_ref()
            .map_or_else(|| x.clone(), |v| v.as_tensor().clone());
        let mut inputs: Vec<Var> = Vec::with_capacity(self.units.len());
        let mut outs: Vec<Tensor> = Vec::with_capacity(self.units.len());
        for (j, u) in self.units.iter().enumerate() {
            if j > 0 {
                let v = Var::from_tensor(&cur.detach())?;
                cur = v.as_tensor().clone();
                inputs.push(v);
            }
            cur = u.forward(&cur)?;
            outs.push(cur.clone());
        }
        Ok((
            cur.detach(),
            Box::new(ShardedTape {
                input,
                inputs,
                outs,
            }),
        ))
    }
}

/// What a [`ShardedMixtral`] stage's forward kept for one micro-batch.
struct ShardedTape {
    /// The stage's input as a variable (`None`: token ids).
    input: Option<Var>,
    /// Unit `j`'s input for `j ≥ 1` (at `j − 1`).
    inputs: Vec<Var>,
    /// Each unit's output with its graph.
    outs: Vec<Tensor>,
}

impl StageTape for ShardedTape {
    fn backward(self: Box<Self>, grad: &Tensor, sink: &mut dyn GradSink) -> Result<Option<Tensor>> {
        let ShardedTape {
            input,
            mut inputs,
            mut outs,
        } = *self;
        let mut seed = Some(grad.clone());
        while let Some(y) = outs.pop() {
            let j = outs.len();
            let Some(g) = seed.take() else {
                continue;
            };
            let mut store = ops::backward(&(y * g)?.sum_all()?)?;
            let input_var = match j {
                0 => input.as_ref(),
                _ => inputs.get(j - 1),
            };
            seed = input_var
                .and_then(|v| store.remove(v.as_tensor()))
                .map(|g| g.detach());
            sink.add_store(&mut store)?;
            inputs.truncate(j.saturating_sub(1));
        }
        Ok(seed)
    }
}

/// A Mixtral as a training job holds it: whole parameters (ZeRO 0–2) or partitioned (ZeRO 3).
pub enum MixtralModel {
    Whole(Box<Mixtral>),
    Sharded(Box<ShardedMixtral>),
}

impl MixtralModel {
    /// After each step: DeepSeek-style routers move their selection bias against the load
    /// over `batch` ([`Mixtral::update_router_biases`]; ZeRO 3 refuses such routers).
    pub fn update_router_biases(&self, batch: &Comm) -> Result<()> {
        if let Self::Whole(m) = self {
            m.update_router_biases(batch)?;
        }
        Ok(())
    }

    /// The training steps' load-balancing loss over the whole batch `batch` splits
    /// ([`AuxScope::Global`]) or over each rank's tokens.
    pub fn set_aux_scope(&mut self, scope: AuxScope, batch: &Comm) {
        let batch = (scope == AuxScope::Global).then(|| batch.clone());
        match self {
            Self::Whole(m) => m.set_aux_scope(batch),
            Self::Sharded(m) => m.set_aux_scope(batch),
        }
    }

    /// What checkpoints save beside the parameters: the routers' selection biases.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Whole(m) => m.router_buffers(),
            Self::Sharded(_) => Vec::new(),
        }
    }
}

/// A Mixtral pipeline stage as a [`Module`] (for `candle_parallel::pipeline::run_step`):
/// chunk `chunk` of the model's ([`Mixtral::forward_chunk`]; 0 for a model of one stage) with
/// or without training-time routing. [`Mixtral::stages`] gives every chunk's.
pub struct MixtralStage<'a> {
    pub model: &'a Mixtral,
    pub train: bool,
    pub chunk: usize,
}

impl Module for MixtralStage<'_> {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.model.forward_chunk(self.chunk, input, self.train)
    }
}
