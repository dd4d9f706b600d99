//! The model's own count of its training activations: what a Mixtral-style decoder layer and
//! the head keep from their forward to their backward, and the step's activation peak by
//! recomputation mode, counted tensor by tensor from the operations the forward records (the
//! same operations the code runs), not measured. `bench_data_parallel` prints it next to what
//! the counting allocator measures; the planner builds on it.

use crate::mixtral::MixtralConfig;
use candle_core::{bail, Result};
use candle_parallel::data_parallel::Recompute;

/// How a step runs on one rank, for [`mixtral_activations`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationLayout {
    /// Sequences per micro-batch on this rank.
    pub rows: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Tensor-parallel ranks (heads, the experts' width and the vocabulary are split).
    pub tp: usize,
    /// Expert-parallel ranks (the experts are split; with all-to-all dispatch each rank
    /// computes about as many routed rows as its own tokens send).
    pub ep: usize,
    /// Bytes per activation element (4 for f32, 2 for bf16; router and loss stay f32).
    pub dtype_bytes: usize,
    pub recompute: Recompute,
    /// Micro-batches whose activations this rank holds at once: 1 without pipeline stages;
    /// with them, as the schedule says (1F1B on stage `r` of `p`: `min(m, p − r)`; GPipe: `m`).
    pub in_flight: usize,
    /// Whether this rank runs the head (the last pipeline stage, or no pipeline).
    pub head: bool,
    /// Whether activations pass between pipeline stages: each micro-batch in flight keeps its
    /// packed input and output (hidden states and load-balancing sums).
    pub stage_boundaries: bool,
    /// LoRA adapters of this rank on attention and the experts (the families' default
    /// targets), or 0 for a full fine-tune.
    pub lora_rank: usize,
}

impl ActivationLayout {
    /// One rank that holds the whole model over `rows` sequences of `seq` tokens, in f32: no
    /// tensor or expert parallelism, no pipeline stages (the head on this rank), one
    /// micro-batch in flight, no adapters. The other layouts change fields of it.
    pub fn one_rank(rows: usize, seq: usize, recompute: Recompute) -> Self {
        Self {
            rows,
            seq,
            tp: 1,
            ep: 1,
            dtype_bytes: 4,
            recompute,
            in_flight: 1,
            head: true,
            stage_boundaries: false,
            lora_rank: 0,
        }
    }

    /// One rank of a pipeline of `stages` on stage `stage`, a 1F1B schedule of
    /// `micro_batches` (the layout's other fields as given).
    pub fn one_f_one_b(self, stage: usize, stages: usize, micro_batches: usize) -> Self {
        Self {
            in_flight: micro_batches.min(stages - stage).max(1),
            head: stage + 1 == stages,
            stage_boundaries: stages > 1,
            ..self
        }
    }
}

/// Activation bytes of one rank ([`mixtral_activations`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivationEstimate {
    /// One decoder layer's graph, kept from its forward to its backward unless recomputed.
    pub layer_graph: usize,
    /// Kept per layer whatever the recomputation: its input as a variable and its router
    /// logits.
    pub layer_boundary: usize,
    /// What one layer's backward adds while it runs: its parameters' full gradients (until
    /// the sink takes them), the activation gradients in flight and what selective
    /// recomputation rebuilds.
    pub layer_backward: usize,
    /// The head's graph (final norm, logits, cross-entropy) and the embedding's output (0
    /// where the rank runs no head).
    pub head_graph: usize,
    /// What the head's backward adds while it runs.
    pub head_backward: usize,
    /// The most held during the forward: what every layer keeps, with the head's graph (or,
    /// recomputing everything, one layer's graph while it runs).
    pub forward: usize,
    /// The step's activation peak on this rank: during the head's backward or during the
    /// first layer's backward, whichever is higher.
    pub peak: usize,
    /// The most held during the head's backward (every layer's keep, the head's graph and
    /// backward).
    pub head_phase: usize,
    /// The most held during a layer's backward (every layer's keep, the layer's graph where
    /// recomputed, its backward's own: its full parameter gradients among them).
    pub layer_phase: usize,
    /// One decoder layer's parameters on this rank, in f32 (what ZeRO 3 gathers per unit).
    pub layer_param_bytes: usize,
}

/// The activations of training `layers` decoder layers of `cfg` (the whole model's head and
/// embedding included) on one rank laid out as `l`, with the unit-wise backward
/// ([`crate::mixtral::Mixtral::train_grads`]).
///
/// Counted from the forward's operations: attention keeps its normed input, the q/k/v
/// projections and their head-major copies, the rotated q and k, the repeated keys and values
/// (grouped-query heads), four `[b, heads, s, s]` score tensors (scores, scaled, masked,
/// probabilities) and the `[s, s]` mask, the attention output and its token-major copy, the output projection and
/// the residual sum; the MoE layer its normed input, the router's logits and probabilities,
/// per routed copy the gate and up projections and the expert output (the grouped experts make
/// the gathered input and the SwiGLU output again in their backward; the fused combine keeps
/// nothing of its own), the combined output and the residual sum. Selective recomputation
/// drops the scores and mask and the repeated keys and values. Over tp each block also keeps
/// its input copied to the group and its all-reduced output; over ep the all-to-alls' rows;
/// with LoRA every adapted projection its adapter's intermediates, the experts running one by
/// one. (Measured by the counting allocator, a layer keeps 3–5% more: index and
/// bookkeeping tensors this count leaves out.) The
/// head keeps the normed states, the logits and three logits-sized tensors of the
/// cross-entropy; its backward adds seven (one gradient per operation and their sums).
///
/// ```
/// use candle_parallel::data_parallel::Recompute;
/// use candle_parallel_models::activations::{mixtral_activations, ActivationLayout};
/// use candle_parallel_models::mixtral::MixtralConfig;
///
/// let cfg = MixtralConfig::tiny();
/// let layout = |recompute| ActivationLayout::one_rank(2, 64, recompute);
/// let none = mixtral_activations(&cfg, 2, &layout(Recompute::None))?;
/// let full = mixtral_activations(&cfg, 2, &layout(Recompute::Full))?;
/// let selective = mixtral_activations(&cfg, 2, &layout(Recompute::Selective))?;
/// assert!(full.peak <= selective.peak && selective.peak < none.peak);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn mixtral_activations(
    cfg: &MixtralConfig,
    layers: usize,
    l: &ActivationLayout,
) -> Result<ActivationEstimate> {
    if l.tp == 0 || l.ep == 0 || l.rows == 0 || l.seq == 0 || l.in_flight == 0 || l.dtype_bytes == 0
    {
        bail!("mixtral_activations: {l:?}: rows, seq, tp, ep, dtype_bytes and in_flight must be at least 1")
    }
    let lc = cfg.as_llama();
    let (b, s, t) = (l.rows, l.seq, l.rows * l.seq);
    let h = cfg.hidden_size;
    let d = lc.head_dim();
    let heads = cfg.num_attention_heads.div_ceil(l.tp);
    let kv = cfg.num_key_value_heads.div_ceil(l.tp).max(1);
    let ffn = cfg.expert_intermediate_size().div_ceil(l.tp);
    let vocab = cfg.vocab_size.div_ceil(l.tp);
    let (e, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
    let selective = l.recompute == Recompute::Selective;
    // Elements, then bytes: hidden-state tensors in the model's dtype, router in f32.
    let repeat = if kv < heads { 2 * t * heads * d } else { 0 };
    // Over tp, a block copies its input to the group once (`copy_to_group`, a tensor of its
    // own) and all-reduces its row-parallel output into another.
    let group_copies = if l.tp > 1 { 2 * t * h } else { 0 };
    // LoRA: each adapted projection keeps x·A (r wide), B's output, its scaled copy and the
    // sum with the base output; o_proj's output is padded to the full width first over tp.
    let r = l.lora_rank;
    let lora_attention = match r {
        0 => 0,
        _ => {
            let outs = (heads + 2 * kv) * d + h.div_ceil(l.tp);
            t * (4 * r + 3 * outs + if l.tp > 1 { h } else { 0 })
        }
    };
    let scores = 4 * b * heads * s * s;
    let attention = t * h // normed input
        + 2 * t * heads * d // q and its head-major copy
        + 2 * 2 * t * kv * d // k, v and their copies
        + t * (heads + kv) * d // rotated q and k
        + if selective { 0 } else { repeat + scores + s * s } // and the causal mask
        + 2 * t * heads * d // attention output and its token-major copy
        + 2 * t * h // output projection, residual sum
        + group_copies // over tp: the input copied to the group, the reduced projection
        + lora_attention;
    let routed = k * t;
    // The grouped experts keep each routed copy's gate and up projections (the gathered input
    // and the SwiGLU output are made again in their backward) and their output rows; the fused
    // combine keeps nothing but its inputs. The same under selective recomputation.
    // With adapters the experts run one by one (the grouped op takes bare weights): each keeps
    // its gathered rows, the gate and up projections with their adapters' three tensors each,
    // the SwiGLU output, the down projection with its adapter's and the concatenated rows.
    // Selective recomputation makes the SwiGLU and down projection again in the backward.
    let experts = match (r, selective) {
        (0, _) => routed * (2 * ffn + h),
        (_, false) => routed * (9 * ffn + 6 * h + 3 * r),
        (_, true) => routed * (8 * ffn + 3 * h + 2 * r),
    };
    // Over ep, the all-to-alls' rows: those sent in expert order, those received (the
    // experts' input) and the outputs returned. Over tp, the experts' input copied to the
    // group and their outputs all-reduced.
    let dispatched = if l.ep > 1 { 3 * routed * h } else { 0 };
    let expert_input = if l.ep > 1 { routed } else { t };
    let expert_copies = if l.tp > 1 {
        (expert_input + routed) * h
    } else {
        0
    };
    // Qwen2-MoE's shared expert: its MLP (gate, up and SwiGLU outputs, down output), the gate's
    // logit and sigmoid, the gated output and its sum with the routed one.
    let shared_ffn = cfg
        .shared_expert_intermediate_size()
        .unwrap_or(0)
        .div_ceil(l.tp);
    // LoRA on an MLP's gate, up and down projections (the families' default targets match the
    // shared expert and dense layers too): three tensors each as for attention's.
    let lora_mlp = |f: usize| match r {
        0 => 0,
        _ => t * (3 * r + 3 * (2 * f + h.div_ceil(l.tp)) + if l.tp > 1 { h } else { 0 }),
    };
    let shared = match shared_ffn {
        0 => 0,
        f => 3 * t * f + 3 * t * h + 2 * t + group_copies + lora_mlp(f),
    };
    let moe = t * h // normed input
        + experts
        + dispatched
        + expert_copies
        + shared
        + 2 * t * h; // combined, residual sum
    let router = 3 * t * e; // logits, probabilities, top-k weights (f32)
    let sparse_graph = (attention + moe) * l.dtype_bytes + router * 4;
    // A dense layer (Qwen's mlp_only_layers, decoder_sparse_step): the MLP's normed input, gate,
    // up and SwiGLU outputs, down output and the residual sum.
    let dense_ffn = cfg.intermediate_size.div_ceil(l.tp);
    let dense_graph =
        (attention + t * h + 3 * t * dense_ffn + 2 * t * h + group_copies + lora_mlp(dense_ffn))
            * l.dtype_bytes;
    // Per layer, as the model's layers mix them (every layer sparse for Mixtral).
    let all = cfg.num_hidden_layers.max(1);
    let sparse_layers = cfg.sparse_layers(0..cfg.num_hidden_layers);
    let layer_graph = (sparse_graph * sparse_layers + dense_graph * (all - sparse_layers)) / all;
    let layer_boundary = t * h * l.dtype_bytes + t * e * 4;
    let layer_params = h * (heads * d + 2 * kv * d)
        + heads * d * h
        + 2 * h
        + h * e
        + e.div_ceil(l.ep) * 3 * h * ffn
        + 3 * h * shared_ffn;
    // The activation gradients in flight: the attention's backward holds about six
    // score-sized tensors at once (the probabilities' gradient, the softmax backward's three
    // temporaries, the masked and scaled scores' gradients), the experts' about four
    // activation-sized ones.
    // Over ep the experts' backward also holds the gradient rows the all-to-alls carry back
    // and forth (about four row sets); over tp the input gradient's all-reduced copy and its
    // partial (two).
    let exchanged = match (l.ep > 1, l.tp > 1) {
        (true, true) => 6,
        (true, false) => 4,
        (false, true) => 2,
        (false, false) => 0,
    };
    let in_flight_grads = (6 * b * heads * s * s)
        .max(routed * (4 * ffn + exchanged * h))
        .max(4 * t * h);
    // Selective recomputation rebuilds what it dropped, one checkpoint at a time.
    let rebuilt = if selective {
        (repeat + scores + s * s).max(routed * ffn).max(routed * h)
    } else {
        0
    };
    let layer_backward = layer_params * 4 + (in_flight_grads + rebuilt) * l.dtype_bytes;
    let logits = t * vocab * 4;
    let head_graph = 2 * t * h * l.dtype_bytes + 4 * logits;
    let head_backward = 7 * logits + vocab * h * 4;
    let kept_per_layer = layer_boundary
        + match l.recompute {
            Recompute::Full => 0,
            _ => layer_graph,
        };
    // Between stages: the packed input as a variable and the packed output's graph (the
    // hidden states, each token's router probability and choice sums, f32).
    let packed = t * (h + e + k * e) * 4;
    let io = if l.stage_boundaries { 2 * packed } else { 0 };
    // The last stage's packed output carries the logits: the output, and the variable the
    // loss is computed from, hold them twice more.
    let logits_out = if l.stage_boundaries && l.head {
        2 * t * vocab * 4
    } else {
        0
    };
    let kept = l.in_flight * (layers * kept_per_layer + io);
    let recomputed = match l.recompute {
        Recompute::Full => sparse_graph.max(dense_graph),
        _ => 0,
    };
    let (head_graph, head_backward) = if l.head {
        (head_graph, head_backward)
    } else {
        (0, 0)
    };
    let forward = (kept + logits_out + head_graph).max(kept + recomputed);
    let head_phase = kept + logits_out + head_graph + head_backward;
    let layer_phase = kept + recomputed + layer_backward;
    Ok(ActivationEstimate {
        layer_graph,
        layer_boundary,
        layer_backward,
        head_graph,
        head_backward,
        forward,
        peak: head_phase.max(layer_phase),
        head_phase,
        layer_phase,
        layer_param_bytes: layer_params * 4,
    })
}
