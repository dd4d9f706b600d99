//! A Llama-style dense transformer with tensor parallelism, reading Hugging Face checkpoints
//! (`model.layers.N.self_attn.q_proj.weight`, ...).
//!
//! Every rank holds its slice of each layer: query heads and MLP columns split over the tp
//! group, key/value heads split or replicated (GQA), vocabulary split (padded) for the
//! embedding and the LM head. Training (forward + backward through the trainable ops) and
//! inference with a KV cache.

use crate::block::DecoderBlock;
use candle_core::{bail, DType, Device, Module, Result, Shape, Tensor, Var, D};
use candle_nn::Init;
use candle_parallel::checkpoint::{ParallelVarBuilder, Placement};
use candle_parallel::ops;
use candle_parallel::pipeline::{run_step, split_batch, ModelSchedule, ScheduleKind};
use candle_parallel::tensor_parallel::{
    column_parallel_linear, column_parallel_linear_no_bias, row_parallel_linear_no_bias,
    vocab_parallel_cross_entropy, vocab_parallel_embedding, ColumnParallelLinear,
    RowParallelLinear, TpHeads, VocabParallelEmbedding, VocabRange,
};
use candle_parallel::Comm;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face Llama `config.json` this model uses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// What transformers' Auto classes need (added when a config lacks them).
    #[serde(default = "llama_model_type")]
    pub model_type: String,
    #[serde(default = "llama_architectures")]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Not supported yet: a config that sets it is rejected rather than run with wrong numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// The attention heads' width where it is not `hidden_size / num_attention_heads`
    /// (Qwen3's 128 at hidden 2048 with 32 heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Biases on the query, key and value projections (Qwen2's; set by the MoE families, not
    /// read from a Llama config, whose `attention_bias` would put one on `o_proj` too).
    #[serde(skip)]
    pub qkv_bias: bool,
    /// RMS norms over each query and key head before the rotation (Qwen3's `q_norm` and
    /// `k_norm`; set by the MoE families).
    #[serde(skip)]
    pub qk_norm: bool,
    /// The config's other fields, kept as read (written back unchanged).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn llama_model_type() -> String {
    "llama".into()
}
fn llama_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}

fn default_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::read_json(path, "Llama config")?;
        cfg.check()?;
        Ok(cfg)
    }

    /// A small random-model configuration for examples and tests.
    pub fn tiny() -> Self {
        Self {
            model_type: llama_model_type(),
            architectures: llama_architectures(),
            extra: serde_json::Map::new(),
            hidden_size: 64,
            intermediate_size: 192,
            vocab_size: 257,
            num_hidden_layers: 2,
            num_attention_heads: 8,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            rope_scaling: None,
            head_dim: None,
            qkv_bias: false,
            qk_norm: false,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks what the model relies on.
    pub fn check(&self) -> Result<()> {
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("config sets rope_scaling, which this Llama model does not implement yet")
        }
        if self.extra.get("attention_bias").and_then(|v| v.as_bool()) == Some(true)
            || self.extra.get("mlp_bias").and_then(|v| v.as_bool()) == Some(true)
        {
            bail!("config sets attention_bias or mlp_bias, which this Llama model does not implement: biases on o_proj and the MLP are not read")
        }
        if self.head_dim == Some(0) {
            bail!("config: head_dim is 0")
        }
        if self.num_attention_heads == 0
            || (self.head_dim.is_none()
                && !self.hidden_size.is_multiple_of(self.num_attention_heads))
        {
            bail!(
                "config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            )
        }
        Ok(())
    }
}

/// The rotary tables `[max_pos, head_dim / 2]`, computed as Hugging Face and
/// candle-transformers do.
pub(crate) fn rope_tables(
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let theta: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / hd as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, cfg.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.max_position_embeddings, 1))?
        .matmul(&theta.reshape((1, hd / 2))?)?;
    Ok((idx.cos()?.to_dtype(dtype)?, idx.sin()?.to_dtype(dtype)?))
}

/// The LM head: this rank's vocabulary rows (padded), or the embedding's when they are tied.
pub(crate) fn lm_head(
    vocab: usize,
    hidden: usize,
    tied: bool,
    embed: &VocabParallelEmbedding,
    vb: &ParallelVarBuilder,
    tp: &Comm,
) -> Result<ColumnParallelLinear> {
    if !tied {
        return untied_lm_head(vocab, hidden, vb, tp);
    }
    Ok(ColumnParallelLinear::new(embed.weight().clone(), None, tp))
}

/// Whether a pipeline stage of decoder `layers` (of `n`) is the first and the last; an error
/// naming `model` for an empty or out-of-range range.
/// [`stage_ends`] of several chunks of one rank, checked increasing and disjoint: whether
/// they start at the first layer and end at the last.
pub(crate) fn chunk_ends(
    model: &str,
    chunks: &[std::ops::Range<usize>],
    n: usize,
) -> Result<(bool, bool)> {
    let (Some(head), Some(tail)) = (chunks.first(), chunks.last()) else {
        bail!("a {model} rank needs at least one chunk of its {n} layers, got none")
    };
    for c in chunks {
        stage_ends(model, c, n)?;
    }
    if let Some(w) = chunks.windows(2).find(|w| w[0].end > w[1].start) {
        bail!(
            "{model} chunks {:?} and {:?} overlap or are out of order: pass increasing, disjoint layer ranges (pipeline::rank_chunks gives a rank's)",
            w[0],
            w[1]
        )
    }
    Ok((head.start == 0, tail.end == n))
}

pub(crate) fn stage_ends(
    model: &str,
    layers: &std::ops::Range<usize>,
    n: usize,
) -> Result<(bool, bool)> {
    if layers.start >= layers.end || layers.end > n {
        bail!("a {model} stage needs a non-empty range of its {n} layers, got {layers:?}")
    }
    Ok((layers.start == 0, layers.end == n))
}

/// The embedding a stage holds: on the first stage, and on the last too when the head is tied
/// to it (its gradient is then the sum of both stages' copies).
pub(crate) fn stage_embedding(
    cfg: &LlamaConfig,
    first: bool,
    last: bool,
    vb: &ParallelVarBuilder,
    tp: &Comm,
) -> Result<Option<VocabParallelEmbedding>> {
    if !(first || (last && cfg.tie_word_embeddings)) {
        return Ok(None);
    }
    let e = vocab_parallel_embedding(
        cfg.vocab_size,
        cfg.hidden_size,
        vb.pp("model").pp("embed_tokens"),
        tp,
    )?;
    Ok(Some(e))
}

/// The final norm and head of the last stage (`None`s elsewhere); a tied head shares `embed`.
pub(crate) fn stage_norm_and_head(
    cfg: &LlamaConfig,
    last: bool,
    embed: Option<&VocabParallelEmbedding>,
    vb: &ParallelVarBuilder,
    tp: &Comm,
) -> Result<(Option<Tensor>, Option<ColumnParallelLinear>)> {
    if !last {
        return Ok((None, None));
    }
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let norm =
        vb.pp("model")
            .pp("norm")
            .get(h, "weight", Placement::Replicated, Init::Const(1.0))?;
    let head = match embed {
        Some(e) => lm_head(v, h, cfg.tie_word_embeddings, e, vb, tp)?,
        None => untied_lm_head(v, h, vb, tp)?,
    };
    Ok((Some(norm), Some(head)))
}

/// The head's own weight (`lm_head.weight`, vocabulary rows split over tp).
fn untied_lm_head(
    vocab: usize,
    hidden: usize,
    vb: &ParallelVarBuilder,
    tp: &Comm,
) -> Result<ColumnParallelLinear> {
    let w = vb.pp("lm_head").get(
        (vocab, hidden),
        "weight",
        Placement::split_padded_over(0, tp),
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(ColumnParallelLinear::new(w, None, tp))
}

/// Checks that `ids` (`[b, s]`) has a next token to predict.
pub(crate) fn check_next_token_ids(ids: &Tensor) -> Result<()> {
    let (_, s) = ids.dims2()?;
    if s < 2 {
        bail!("the next-token loss needs at least 2 tokens per sequence, got {s}")
    }
    Ok(())
}

/// The label of a position that does not count in the loss (Hugging Face's convention).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy of `ids` (`[b, s]`) from this rank's logit columns
/// (`[b, s, padded_vocab / tp]`), without gathering the full logits. With `labels` (`[b, s]`,
/// i64, shifted inside as HF's `labels`), positions labelled [`IGNORE_INDEX`] (a prompt,
/// padding) do not count: the mean is over the others.
pub(crate) fn next_token_loss(
    logits_shard: &Tensor,
    ids: &Tensor,
    labels: Option<&Tensor>,
    vocab: usize,
    tp: &Comm,
) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let cols = VocabRange::new(vocab, tp.rank(), tp.size()).padded;
    let logits = logits_shard
        .narrow(1, 0, s - 1)?
        .reshape((b * (s - 1), cols))?;
    match labels {
        None => {
            let targets = ids.narrow(1, 1, s - 1)?.flatten_all()?;
            vocab_parallel_cross_entropy(&logits, &targets, vocab, tp, None)
        }
        Some(l) => {
            if l.dims() != ids.dims() {
                bail!(
                    "labels of shape {:?} for ids of shape {:?}: they must match (HF's labels are shifted inside)",
                    l.dims(),
                    ids.dims()
                )
            }
            let targets = l
                .to_dtype(candle_core::DType::I64)?
                .narrow(1, 1, s - 1)?
                .flatten_all()?;
            vocab_parallel_cross_entropy(&logits, &targets, vocab, tp, Some(IGNORE_INDEX))
        }
    }
}

/// Cached keys and values of every layer, for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(crate) struct Attention {
    q: ColumnParallelLinear,
    k: ColumnParallelLinear,
    v: ColumnParallelLinear,
    o: RowParallelLinear,
    /// Qwen3's per-head RMS norms of the queries and keys (`[head_dim]`) and their epsilon.
    qk_norm: Option<(Tensor, Tensor, f64)>,
    tp: Comm,
    heads: TpHeads,
}

impl Attention {
    /// The attention of one layer (`vb` at `...self_attn`), heads split over `tp` by `heads`.
    pub(crate) fn new(
        cfg: &LlamaConfig,
        heads: &TpHeads,
        vb: &ParallelVarBuilder,
        tp: &Comm,
    ) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let q = if cfg.qkv_bias {
            column_parallel_linear(h, cfg.num_attention_heads * hd, vb.pp("q_proj"), tp)?
        } else {
            column_parallel_linear_no_bias(h, cfg.num_attention_heads * hd, vb.pp("q_proj"), tp)?
        };
        let qk_norm = if cfg.qk_norm {
            let norm = |name: &str| {
                vb.pp(name)
                    .get(hd, "weight", Placement::Replicated, Init::Const(1.0))
            };
            Some((norm("q_norm")?, norm("k_norm")?, cfg.rms_norm_eps))
        } else {
            None
        };
        // The input is copied to the group once for q, k and v (`forward`), not once each:
        // every copy is a hidden-state-sized tensor the graph keeps.
        Ok(Self {
            q: q.with_external_communication(true),
            k: heads
                .kv_projection(h, cfg.qkv_bias, vb.pp("k_proj"), tp)?
                .with_external_communication(true),
            v: heads
                .kv_projection(h, cfg.qkv_bias, vb.pp("v_proj"), tp)?
                .with_external_communication(true),
            o: row_parallel_linear_no_bias(cfg.num_attention_heads * hd, h, vb.pp("o_proj"), tp)?,
            qk_norm,
            tp: tp.clone(),
            heads: heads.clone(),
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &(Tensor, Tensor),
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let hd = self.heads.head_dim();
        let (hl, kvl) = (self.heads.local_heads(), self.heads.local_kv_heads());
        let split = |t: Tensor, h: usize| t.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous();
        let x = &ops::copy_to_group(x, &self.tp)?;
        // Qwen3 normalises each head of the queries and keys (over head_dim) before the rotation.
        let (q, k) = (self.q.forward(x)?, self.k.forward(x)?);
        // Each rank holds some of the heads, so the norms' weight gradients are partial sums:
        // summed over tp in the backward (every query head counted on one rank; a key head
        // replicated over ranks gets each rank's queries' part).
        let (q, k) = match &self.qk_norm {
            Some((qn, kn, eps)) => (
                ops::rms_norm(
                    &q.reshape((b, s, hl, hd))?,
                    &ops::copy_to_group(qn, &self.tp)?,
                    *eps,
                )?,
                ops::rms_norm(
                    &k.reshape((b, s, kvl, hd))?,
                    &ops::copy_to_group(kn, &self.tp)?,
                    *eps,
                )?,
            ),
            None => (q, k),
        };
        // Packed rows (a training step's position ids): each example's own positions and
        // attention; otherwise positions `pos..pos + s` of one sequence per row.
        let packed = match crate::packing::current_position_ids() {
            Some(p) if cache.is_none() && pos == 0 => {
                if p.dims() != [b, s] {
                    bail!(
                        "attention: packed position_ids of shape {:?} for a micro-batch of {b} rows of {s} tokens",
                        p.dims()
                    )
                }
                Some(p)
            }
            _ => None,
        };
        let (cos, sin, mask) = match &packed {
            Some(p) => (
                crate::packing::rope_at(&rope.0, p)?,
                crate::packing::rope_at(&rope.1, p)?,
                Some(crate::packing::packed_causal_mask(p, x.dtype())?),
            ),
            None => (rope.0.narrow(0, pos, s)?, rope.1.narrow(0, pos, s)?, None),
        };
        let q = ops::rope(&split(q, hl)?, &cos, &sin)?;
        let mut k = ops::rope(&split(k, kvl)?, &cos, &sin)?;
        let mut v = split(self.v.forward(x)?, kvl)?;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = cache.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *cache = Some((k.detach(), v.detach()));
        }
        let out = if ops::selective_recompute() && (q.track_op() || k.track_op() || v.track_op()) {
            // The scores and probabilities (`[b, heads, s, s]` each) and the repeated keys and
            // values are recomputed in the backward instead of kept.
            let heads = self.heads.clone();
            ops::checkpoint("core_attention", &[&q, &k, &v], move |t| {
                core_attention(&t[0], &t[1], &t[2], &heads, pos, mask.as_ref())
            })?
        } else {
            core_attention(&q, &k, &v, &self.heads, pos, mask.as_ref())?
        };
        let out = out.transpose(1, 2)?.reshape((b, s, hl * hd))?;
        self.o.forward(&out)
    }
}

/// Causal attention of `q` (`[b, heads, s, hd]`, positions `pos..pos + s`) over `k` and `v`
/// (`[b, kv_heads, total, hd]`, positions `0..total`): `[b, heads, s, hd]`; with `packed`
/// (the additive `[b, 1, s, s]` mask of packed rows) that mask instead of the causal one.
fn core_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: &TpHeads,
    pos: usize,
    packed: Option<&Tensor>,
) -> Result<Tensor> {
    let s = q.dim(2)?;
    let hd = heads.head_dim();
    let (k, v) = (heads.repeat_kv(k)?, heads.repeat_kv(v)?);
    let total = k.dim(2)?;
    let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    let scores = if let Some(mask) = packed {
        scores.broadcast_add(mask)?
    } else if s > 1 {
        // Query i (absolute position pos + i) sees keys 0..=pos + i.
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| {
                (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (s, total), q.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    ops::softmax_last_dim(&scores)?.matmul(&v)
}

/// A SwiGLU MLP, `down(silu(gate x) · up x)`, split over tp (gate and up column-parallel,
/// down row-parallel): Llama's feed-forward, and the dense layers and shared expert of the MoE
/// families.
pub(crate) struct Mlp {
    gate: ColumnParallelLinear,
    up: ColumnParallelLinear,
    down: RowParallelLinear,
    tp: Comm,
}

impl Mlp {
    /// `vb` at the MLP (`gate_proj`, `up_proj`, `down_proj`), `ffn` wide.
    pub(crate) fn new(
        hidden: usize,
        ffn: usize,
        vb: &ParallelVarBuilder,
        tp: &Comm,
    ) -> Result<Self> {
        if !ffn.is_multiple_of(tp.size()) {
            bail!(
                "MLP {}: intermediate size {ffn} is not divisible by the tensor-parallel size {}",
                vb.path(),
                tp.size()
            )
        }
        Ok(Self {
            // The input is copied to the group once for both (`forward`).
            gate: column_parallel_linear_no_bias(hidden, ffn, vb.pp("gate_proj"), tp)?
                .with_external_communication(true),
            up: column_parallel_linear_no_bias(hidden, ffn, vb.pp("up_proj"), tp)?
                .with_external_communication(true),
            down: row_parallel_linear_no_bias(ffn, hidden, vb.pp("down_proj"), tp)?,
            tp: tp.clone(),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = &ops::copy_to_group(x, &self.tp)?;
        self.down
            .forward(&ops::swiglu(&self.gate.forward(x)?, &self.up.forward(x)?)?)
    }
}

type Block = DecoderBlock<Mlp>;

/// The tensor-parallel Llama model, or one pipeline stage of it; see the [module docs](self).
pub struct Llama {
    cfg: LlamaConfig,
    /// On the first stage; also on the last when the head is tied to it.
    embed: Option<VocabParallelEmbedding>,
    /// The layers of its chunks, in order.
    blocks: Vec<Block>,
    /// Its chunks' layer ranges, in order: one contiguous stage, or several chunks per rank
    /// for the interleaved schedule ([`Llama::new_chunks`]).
    chunks: Vec<std::ops::Range<usize>>,
    /// On the last stage.
    norm: Option<Tensor>,
    lm_head: Option<ColumnParallelLinear>,
    rope: (Tensor, Tensor),
    tp: Comm,
    /// The pipeline schedule of its training steps (1F1B unless set).
    schedule: ModelSchedule,
}

impl Llama {
    /// Builds this rank's part of the model from `vb` (a checkpoint with HF names, or an
    /// initialisation) over the tensor-parallel group `tp`.
    pub fn new(cfg: &LlamaConfig, vb: ParallelVarBuilder, tp: &Comm) -> Result<Self> {
        Self::new_stage(cfg, vb, tp, 0..cfg.num_hidden_layers)
    }

    /// One pipeline stage: decoder layers `layers` (under their HF names, so a checkpoint
    /// loads per stage unchanged, each stage reading only its layers), with the embedding when
    /// `layers` starts at 0 and the final norm and head when it ends at the last layer. A
    /// stage's [`Module::forward`] maps token ids (first stage) or hidden states `[b, s, h]` to
    /// hidden states, or to this rank's logit columns (last stage).
    pub fn new_stage(
        cfg: &LlamaConfig,
        vb: ParallelVarBuilder,
        tp: &Comm,
        layers: std::ops::Range<usize>,
    ) -> Result<Self> {
        Self::new_chunks(cfg, vb, tp, &[layers])
    }

    /// Several pipeline stages on this rank ("chunks", Megatron's virtual stages) for the
    /// interleaved schedule: the decoder layers of each range in `chunks` (increasing and
    /// disjoint; `pipeline::rank_chunks` gives a rank's), the embedding when the first starts
    /// at layer 0, the final norm and head when the last ends the model; [`Llama::stages`]
    /// gives one pipeline stage per chunk.
    pub fn new_chunks(
        cfg: &LlamaConfig,
        vb: ParallelVarBuilder,
        tp: &Comm,
        chunks: &[std::ops::Range<usize>],
    ) -> Result<Self> {
        cfg.check()?;
        let (first, last) = chunk_ends("Llama", chunks, cfg.num_hidden_layers)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        // Collective when KV heads are replicated: create the groups once, share them.
        let heads = TpHeads::new(cfg.num_attention_heads, cfg.num_kv_heads(), hd, tp)?;
        if !cfg.intermediate_size.is_multiple_of(tp.size()) {
            bail!(
                "intermediate_size {} is not divisible by the tensor-parallel size {}",
                cfg.intermediate_size,
                tp.size()
            )
        }
        let m = vb.pp("model");
        let embed = stage_embedding(cfg, first, last, &vb, tp)?;
        let mut blocks = Vec::new();
        for i in chunks.iter().flat_map(|c| c.clone()) {
            let l = m.pp("layers").pp(i);
            let mlp = Mlp::new(h, cfg.intermediate_size, &l.pp("mlp"), tp)?;
            blocks.push(DecoderBlock::new(cfg, &heads, &l, tp, mlp)?);
        }
        let (norm, lm_head) = stage_norm_and_head(cfg, last, embed.as_ref(), &vb, tp)?;
        let rope = rope_tables(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed: if first { embed } else { None },
            blocks,
            chunks: chunks.to_vec(),
            norm,
            lm_head,
            rope,
            tp: tp.clone(),
            // Several chunks: interleaved, the one schedule that runs them.
            schedule: ModelSchedule::for_chunks(chunks.len())?,
        })
    }

    /// The pipeline schedule of its training steps ([`Llama::batch_grads`]): GPipe, 1F1B (the
    /// default) or zero-bubble (each backward split into its input- and weight-gradient
    /// halves, planned for the costs measured in its first step) on a model of one stage per
    /// rank; interleaved 1F1B on a model of several chunks ([`Llama::new_chunks`]).
    pub fn set_schedule(&mut self, kind: ScheduleKind) -> Result<()> {
        self.schedule = ModelSchedule::new(kind, self.chunks.len())?;
        Ok(())
    }

    /// The layer ranges of its chunks (one for a plain pipeline stage).
    pub fn chunks(&self) -> &[std::ops::Range<usize>] {
        &self.chunks
    }

    /// Its pipeline stages as modules for `pipeline::run_step`, one per chunk in order.
    pub fn stages(&self) -> Vec<LlamaChunk<'_>> {
        (0..self.chunks.len())
            .map(|chunk| LlamaChunk { model: self, chunk })
            .collect()
    }

    /// The schedule setting (and zero-bubble's measured costs).
    pub fn schedule(&self) -> &ModelSchedule {
        &self.schedule
    }

    /// One training step's gradients (for `vars`, in their order) of the mean next-token
    /// cross-entropy over `ids` (`[b, s]`, this rank's rows), and that loss: `micro_batches`
    /// forward and backward passes, summed without synchronising, through the pipeline stages
    /// of `pp` on its schedule ([`Llama::set_schedule`]) when it has several ranks (this model
    /// being this rank's stage). Every rank of `pp` gets the loss; the gradients equal one
    /// device's (tested for every schedule).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_parallel::checkpoint::ParallelVarBuilder;
    /// use candle_parallel::pipeline::{split_layers, ScheduleKind};
    /// use candle_parallel::{Launcher, MeshShape};
    /// use candle_parallel_models::llama::{Llama, LlamaConfig};
    ///
    /// let cfg = LlamaConfig::tiny();
    /// let losses = Launcher::new(2).mesh(MeshShape::new().pp(2)).run(|ctx| {
    ///     let mesh = ctx.mesh()?;
    ///     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
    ///     let layers = split_layers(cfg.num_hidden_layers, 2)?[mesh.pp().rank()].clone();
    ///     let mut m = Llama::new_stage(&cfg, vb.clone(), mesh.tp(), layers)?;
    ///     m.set_schedule(ScheduleKind::ZeroBubble)?;
    ///     let vars: Vec<_> = vb.params().iter().map(|p| p.var.clone()).collect();
    ///     let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 7, 8]], &Device::Cpu)?;
    ///     let (grads, loss) = m.batch_grads(&vars, &ids, 2, mesh.pp())?;
    ///     assert!(grads.iter().all(|g| g.is_some()));
    ///     Ok(loss)
    /// })?;
    /// assert_eq!(losses[0], losses[1]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn batch_grads(
        &self,
        vars: &[Var],
        ids: &Tensor,
        micro_batches: usize,
        pp: &Comm,
    ) -> Result<(Vec<Option<Tensor>>, f64)> {
        check_next_token_ids(ids)?;
        if pp.size() > 1 && self.cfg.tie_word_embeddings {
            bail!("Llama::batch_grads: a head tied to the embedding lives on the first and the last stage, whose two gradients this does not sum: train a tied model without pipeline stages")
        }
        // Once per model: the ranks hold their stages in the schedule's order.
        self.schedule
            .check_stages(pp, &self.chunks, self.cfg.num_hidden_layers)?;
        let mbs = split_batch(ids, micro_batches)?;
        let (b, s) = mbs[0].dims2()?;
        let stages = self.stages();
        let stages: Vec<&dyn Module> = stages.iter().map(|s| s as &dyn Module).collect();
        let out = run_step(
            pp,
            &self.schedule.schedule(pp.size(), micro_batches)?,
            &stages,
            vars,
            &mbs,
            (
                &Shape::from((b, s, self.cfg.hidden_size)),
                self.rope.0.dtype(),
            ),
            &|i, y| self.loss_of_logits(y, &mbs[i]),
        )?;
        // Every rank that meets this one inside a stage (tp) plans the same order.
        self.schedule.observe(&[pp, &self.tp], &out.executed)?;
        Ok((out.grads, out.loss as f64))
    }

    /// Whether this stage starts at the first layer (takes token ids).
    pub fn is_first_stage(&self) -> bool {
        self.chunks[0].start == 0
    }

    /// Whether this stage ends with the head (gives logits).
    pub fn is_last_stage(&self) -> bool {
        self.lm_head.is_some()
    }

    /// The stage's computation at positions `pos..`: token ids or hidden states in, hidden
    /// states or this rank's logit columns out.
    pub fn forward_stage(
        &self,
        input: &Tensor,
        pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if self.chunks.len() > 1 {
            bail!(
                "forward_stage: this rank holds {} chunks ({:?}): run each with forward_chunk (Llama::stages gives them as pipeline stages)",
                self.chunks.len(),
                self.chunks
            )
        }
        self.chunk_forward(0, input, pos, cache)
    }

    /// [`Llama::forward_stage`] of chunk `c` of this rank's chunks (positions from 0).
    pub fn forward_chunk(&self, c: usize, input: &Tensor) -> Result<Tensor> {
        if c >= self.chunks.len() {
            bail!(
                "forward_chunk: chunk {c} asked of a rank holding {} ({:?})",
                self.chunks.len(),
                self.chunks
            )
        }
        self.chunk_forward(c, input, 0, None)
    }

    fn chunk_forward(
        &self,
        c: usize,
        input: &Tensor,
        pos: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let start: usize = self.chunks[..c].iter().map(|r| r.len()).sum();
        let blocks = start..start + self.chunks[c].len();
        let mut x = match &self.embed {
            Some(e) if self.chunks[c].start == 0 => {
                let (_, s) = input.dims2()?;
                if pos + s > self.cfg.max_position_embeddings {
                    bail!(
                        "positions up to {} exceed max_position_embeddings {}",
                        pos + s,
                        self.cfg.max_position_embeddings
                    )
                }
                e.forward(input)?
            }
            _ => input.clone(),
        };
        let eps = self.cfg.rms_norm_eps;
        for i in blocks {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            (x, ()) = self.blocks[i].forward(&x, pos, &self.rope, layer_cache, eps, |mlp, n| {
                Ok((mlp.forward(n)?, ()))
            })?;
        }
        let last = self.chunks[c].end == self.cfg.num_hidden_layers;
        match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) if last => head.forward(&ops::rms_norm(&x, norm, eps)?),
            _ => Ok(x),
        }
    }

    /// Mean next-token cross-entropy of this rank's logit columns `logits` (the last stage's
    /// output) for `ids`, over the tp group.
    pub fn loss_of_logits(&self, logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
        check_next_token_ids(ids)?;
        next_token_loss(logits, ids, None, self.cfg.vocab_size, &self.tp)
    }

    /// Full logits `[b, s, vocab]` from this rank's columns (gathered over the tp group).
    pub fn gather_logits(&self, shard: &Tensor) -> Result<Tensor> {
        let full = ops::gather_from_group(shard, D::Minus1, &self.tp)?;
        full.narrow(D::Minus1, 0, self.cfg.vocab_size)
    }

    fn whole(&self, what: &str) -> Result<()> {
        let held: usize = self.chunks.iter().map(|c| c.len()).sum();
        if !self.is_first_stage() || !self.is_last_stage() || held != self.cfg.num_hidden_layers {
            bail!(
                "{what} needs the whole model, but this is the pipeline stage of layers {:?}: use forward_stage",
                self.chunks
            )
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// A KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// This rank's columns of the logits, `[b, s, padded_vocab / tp]`, for token ids `[b, s]`
    /// at positions `pos..pos + s`. With a cache, keys and values are appended to it.
    pub fn forward_shard(
        &self,
        ids: &Tensor,
        pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.whole("forward_shard")?;
        // Every chunk in turn (a whole model held as chunks too).
        let mut cache = cache;
        let mut x = ids.clone();
        for c in 0..self.chunks.len() {
            x = self.chunk_forward(c, &x, pos, cache.as_deref_mut())?;
        }
        Ok(x)
    }

    /// Full logits `[b, s, vocab]` on every rank (gathered over the tp group).
    pub fn forward(&self, ids: &Tensor, pos: usize, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let shard = self.forward_shard(ids, pos, cache)?;
        self.gather_logits(&shard)
    }

    /// Mean next-token cross-entropy over `ids` (`[b, s]`, s ≥ 2), computed on the vocabulary
    /// shards (the full logits are never gathered).
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        check_next_token_ids(ids)?;
        let logits = self.forward_shard(ids, 0, None)?;
        next_token_loss(&logits, ids, None, self.cfg.vocab_size, &self.tp)
    }
}

/// A pipeline stage is a module: ids or hidden states in, hidden states or logit columns out.
impl Module for Llama {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_stage(input, 0, None)
    }
}

/// One chunk of a [`Llama`] as a pipeline stage (for `pipeline::run_step`):
/// [`Llama::forward_chunk`]. [`Llama::stages`] gives every chunk's.
pub struct LlamaChunk<'a> {
    pub model: &'a Llama,
    pub chunk: usize,
}

impl Module for LlamaChunk<'_> {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.model.forward_chunk(self.chunk, input)
    }
}
