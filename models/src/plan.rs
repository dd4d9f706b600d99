//! The planner: which layout (dp × pp × ep × tp, ZeRO stage, recomputation, micro-batches,
//! schedule) fits a model on a cluster, and how fast it runs, predicted from the model's
//! `config.json` alone, before anything is allocated.
//!
//! Memory per rank is counted the way the library holds it: parameters, gradient buffers and
//! AdamW's moments by ZeRO stage (ZeRO's formulas, which `bench_data_parallel` measures to
//! 0.1%), the activations from the model's own count ([`crate::activations`], measured within
//! a few percent by the counting allocator), and the buffers in flight (gradient buckets,
//! ZeRO 3's gathered layers). Step time is compute at the device's achievable rate plus each
//! group's communication over its link (inside a node or across nodes, from where the mesh
//! puts the group: tp varies fastest, then ep, pp, dp), gradient reduction hidden behind the
//! backward where it overlaps, and the pipeline's bubble.
//!
//! ```
//! use candle_parallel_models::plan::{plan_layout, Cluster, DeviceSpec, Layout, ModelShape, Workload};
//!
//! let model = ModelShape::from_config_str(r#"{"model_type": "mixtral", "hidden_size": 4096,
//!     "intermediate_size": 14336, "vocab_size": 32000, "num_hidden_layers": 32,
//!     "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
//!     "num_experts_per_tok": 2}"#)?;
//! let cluster = Cluster::new(DeviceSpec::h100(), 8, 8)?;
//! let work = Workload { global_batch: 8, seq: 4096, dtype_bytes: 2, lora_rank: None };
//! // A full bf16 fine-tune of Mixtral 8x7B with plain ZeRO 3 over 8 GPUs: 18 bytes per
//! // parameter over 8 ranks is more than 80 GB.
//! let plan = plan_layout(&model, &work, &cluster, &Layout::parse("dp=8,zero=3")?)?;
//! assert!(!plan.fits);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::activations::{mixtral_activations, ActivationLayout};
use crate::mixtral::MixtralConfig;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_parallel::data_parallel::{Recompute, DEFAULT_BUCKET_BYTES};
use candle_parallel::pipeline::{Schedule, ScheduleKind};
use serde::Serialize;

/// A decoder-only model's shape, as the planner needs it (read from `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    /// `model_type` as read.
    pub family: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Routed experts per MoE layer (0: a dense model).
    pub experts: usize,
    pub top_k: usize,
    /// Each routed expert's intermediate size.
    pub expert_ffn: usize,
    /// The dense MLP's intermediate size (dense models and dense layers among MoE ones).
    pub dense_ffn: usize,
    /// Shared experts' total intermediate size per MoE layer (0: none).
    pub shared_ffn: usize,
    /// How many layers are MoE layers (the others dense).
    pub moe_layers: usize,
    pub tie_embeddings: bool,
}

impl ModelShape {
    /// From a `config.json`'s text: Mixtral, Qwen2-MoE and Qwen3-MoE (`num_experts`,
    /// `moe_intermediate_size`, `shared_expert_intermediate_size`, `decoder_sparse_step`,
    /// `mlp_only_layers`), DeepSeek-style (`n_routed_experts`, `n_shared_experts`,
    /// `first_k_dense_replace`) and dense Llama-style models (Llama, Mistral, Qwen2, Qwen3).
    pub fn from_config_str(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| candle_core::Error::msg(format!("config.json: {e}")))?;
        Self::from_config(&v)
    }

    /// From a parsed `config.json` (see [`ModelShape::from_config_str`]).
    pub fn from_config(v: &serde_json::Value) -> Result<Self> {
        let get = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|x| x as usize)
        };
        let need = |k: &str| match get(k) {
            Some(x) => Ok(x),
            None => bail!("config.json: `{k}` is missing (or not a number); the planner needs it"),
        };
        let family = v
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("llama")
            .to_string();
        let (hidden, layers, heads) = (
            need("hidden_size")?,
            need("num_hidden_layers")?,
            need("num_attention_heads")?,
        );
        if heads == 0 || layers == 0 || hidden == 0 {
            bail!("config.json: hidden_size, num_hidden_layers and num_attention_heads must be positive")
        }
        let kv_heads = get("num_key_value_heads").unwrap_or(heads);
        let head_dim = get("head_dim").unwrap_or(hidden / heads);
        let vocab = need("vocab_size")?;
        let dense_ffn = get("intermediate_size").unwrap_or(0);
        let experts = get("num_local_experts")
            .or(get("num_experts"))
            .or(get("n_routed_experts"))
            .unwrap_or(0);
        let top_k = get("num_experts_per_tok").unwrap_or(if experts > 0 { 2 } else { 0 });
        let expert_ffn = get("moe_intermediate_size").unwrap_or(dense_ffn);
        let shared_ffn = get("shared_expert_intermediate_size")
            .or_else(|| get("n_shared_experts").map(|n| n * expert_ffn))
            .unwrap_or(0);
        let moe_layers = if experts == 0 {
            0
        } else {
            let step = get("decoder_sparse_step").unwrap_or(1).max(1);
            let dense_first = get("first_k_dense_replace").unwrap_or(0);
            let only_mlp: Vec<usize> = v
                .get("mlp_only_layers")
                .and_then(serde_json::Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            (0..layers)
                .filter(|&i| i >= dense_first && (i + 1) % step == 0 && !only_mlp.contains(&i))
                .count()
        };
        if experts > 0 && (top_k == 0 || top_k > experts || expert_ffn == 0) {
            bail!("config.json: {experts} experts with num_experts_per_tok {top_k} and an expert size of {expert_ffn}: the planner needs 1 ≤ top-k ≤ experts and a positive expert size")
        }
        if moe_layers < layers && dense_ffn == 0 {
            bail!("config.json: dense layers need `intermediate_size`")
        }
        Ok(Self {
            family,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab,
            experts,
            top_k,
            expert_ffn,
            dense_ffn,
            shared_ffn,
            moe_layers,
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// The shape of a [`MixtralConfig`].
    pub fn of_mixtral(cfg: &MixtralConfig) -> Self {
        Self {
            family: cfg.model_type.clone(),
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.hidden_size / cfg.num_attention_heads,
            vocab: cfg.vocab_size,
            experts: cfg.num_local_experts,
            top_k: cfg.num_experts_per_tok,
            expert_ffn: cfg.intermediate_size,
            dense_ffn: cfg.intermediate_size,
            shared_ffn: 0,
            moe_layers: cfg.num_hidden_layers,
            tie_embeddings: cfg.tie_word_embeddings,
        }
    }

    /// Attention's parameters per layer (q, k, v, o and the two norms).
    fn attention_params(&self) -> usize {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        self.hidden * q + 2 * self.hidden * kv + q * self.hidden + 2 * self.hidden
    }

    /// The routed experts' parameters per MoE layer.
    fn expert_params(&self) -> usize {
        self.experts * 3 * self.hidden * self.expert_ffn
    }

    /// An MoE layer's parameters besides attention and routed experts: the router and the
    /// shared experts.
    fn moe_dense_params(&self) -> usize {
        self.hidden * self.experts + 3 * self.hidden * self.shared_ffn
    }

    fn dense_mlp_params(&self) -> usize {
        3 * self.hidden * self.dense_ffn
    }

    /// Every parameter of the model.
    pub fn params(&self) -> usize {
        let dense_layers = self.layers - self.moe_layers;
        let embed = self.vocab * self.hidden * if self.tie_embeddings { 1 } else { 2 };
        self.layers * self.attention_params()
            + self.moe_layers * (self.expert_params() + self.moe_dense_params())
            + dense_layers * self.dense_mlp_params()
            + embed
            + self.hidden
    }

    /// The parameters one token passes through (matmuls only: the embedding lookup is not
    /// one; the head is).
    pub fn active_params(&self) -> usize {
        let dense_layers = self.layers - self.moe_layers;
        self.layers * self.attention_params()
            + self.moe_layers
                * (self.top_k * 3 * self.hidden * self.expert_ffn + self.moe_dense_params())
            + dense_layers * self.dense_mlp_params()
            + self.vocab * self.hidden
    }

    /// Training FLOPs per token (forward and backward: three forwards), attention's scores
    /// included (`seq` tokens of context).
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        let attn = 4.0 * (seq as f64) * (self.heads * self.head_dim) as f64 * self.layers as f64;
        3.0 * (2.0 * self.active_params() as f64 + attn)
    }

    /// The Mixtral-style configuration whose activation count stands for this shape (dense
    /// layers as one expert taken by every token).
    fn as_mixtral(&self) -> MixtralConfig {
        let (experts, top_k, ffn) = match self.experts {
            0 => (1, 1, self.dense_ffn),
            e => (
                e,
                self.top_k,
                self.expert_ffn + self.shared_ffn / self.top_k.max(1),
            ),
        };
        MixtralConfig {
            hidden_size: self.hidden,
            intermediate_size: ffn,
            vocab_size: self.vocab,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            num_local_experts: experts,
            num_experts_per_tok: top_k,
            max_position_embeddings: usize::MAX / 2,
            sliding_window: None,
            tie_word_embeddings: self.tie_embeddings,
            ..MixtralConfig::tiny()
        }
    }
}

/// A kind of device: its speed, memory and links (data, not code: add a row for another).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceSpec {
    pub name: String,
    /// Dense 16-bit matmul FLOP/s at peak.
    pub peak_flops_16: f64,
    /// Dense f32 matmul FLOP/s at peak.
    pub peak_flops_32: f64,
    /// The share of peak a training step's matmuls reach.
    pub achievable: f64,
    /// Memory per device, bytes.
    pub memory_bytes: f64,
    /// Bytes per second each device moves to a peer inside its node (one direction).
    pub intra_node_bw: f64,
    /// Bytes per second each device moves to a peer in another node.
    pub inter_node_bw: f64,
    /// Seconds per collective or message on either link.
    pub latency_s: f64,
    /// Bytes per second a device's memory moves (the optimizer step is bound by it).
    pub memory_bw: f64,
    /// Whether the ranks share one machine's cores (CPU ranks as threads): a rank that waits
    /// (the pipeline's bubble) leaves its cores to the others, and what the step moves through
    /// memory besides the matmuls (activations, gradients, the backend's copies) is counted
    /// at `memory_bw` (on GPUs, `achievable` covers it).
    pub shared_cores: bool,
    /// Bytes per second of a rank's share of the cores the backend's all-reduce runs at (its
    /// copies and sums; the local backend runs them on the ranks' cores), or 0 where
    /// collectives take no compute from the ranks (NCCL on GPUs).
    pub collective_bw: f64,
    /// How much faster one rank runs while the others wait than with every rank busy (ranks
    /// sharing cores: the pipeline's bubble leaves the waiting ranks' share to the others,
    /// up to this); 1 where every rank has a device of its own.
    pub alone_speedup: f64,
}

impl DeviceSpec {
    /// NVIDIA H100 SXM 80 GB: 989 TFLOP/s bf16 dense, NVLink 4 (450 GB/s per direction),
    /// 400 Gbit/s InfiniBand per GPU.
    pub fn h100() -> Self {
        Self {
            name: "h100".into(),
            peak_flops_16: 989e12,
            peak_flops_32: 67e12,
            achievable: 0.55,
            memory_bytes: 80e9,
            intra_node_bw: 450e9,
            inter_node_bw: 50e9,
            latency_s: 10e-6,
            memory_bw: 3.35e12,
            shared_cores: false,
            collective_bw: 0.0,
            alone_speedup: 1.0,
        }
    }

    /// NVIDIA A100 SXM 80 GB: 312 TFLOP/s bf16 dense, NVLink 3 (300 GB/s per direction),
    /// 200 Gbit/s InfiniBand per GPU.
    pub fn a100() -> Self {
        Self {
            name: "a100".into(),
            peak_flops_16: 312e12,
            peak_flops_32: 19.5e12,
            achievable: 0.55,
            memory_bytes: 80e9,
            intra_node_bw: 300e9,
            inter_node_bw: 25e9,
            latency_s: 10e-6,
            memory_bw: 2.0e12,
            shared_cores: false,
            collective_bw: 0.0,
            alone_speedup: 1.0,
        }
    }

    /// A CPU rank of the local backend (ranks are threads sharing the cores), from measured
    /// rates: `matmul_flops` (what one rank's matmuls reach with every rank busy),
    /// `memory_bytes` per rank, the link (`link_bw` bytes/s per rank, `latency_s`) and
    /// `memory_bw`, the bytes per second each rank's elementwise work moves with every rank
    /// busy, and `collective_bw`, the bytes per second of an all-reduce's input each rank gets
    /// through with every rank in it.
    pub fn cpu(
        matmul_flops: f64,
        memory_bytes: f64,
        link_bw: f64,
        latency_s: f64,
        memory_bw: f64,
        collective_bw: f64,
    ) -> Self {
        Self {
            name: "cpu".into(),
            peak_flops_16: matmul_flops,
            peak_flops_32: matmul_flops,
            achievable: 1.0,
            memory_bytes,
            intra_node_bw: link_bw,
            inter_node_bw: link_bw,
            latency_s,
            memory_bw,
            shared_cores: true,
            collective_bw,
            // Every rank busy or not, unless measured (`calibrate_cpu`).
            alone_speedup: 1.0,
        }
    }

    /// `h100` or `a100` by name.
    pub fn named(name: &str) -> Result<Self> {
        match name {
            "h100" => Ok(Self::h100()),
            "a100" => Ok(Self::a100()),
            other => bail!("unknown device {other:?}: use h100, a100 or cpu (calibrated here)"),
        }
    }
}

/// The devices: how many, of which kind, how many per node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cluster {
    pub device: DeviceSpec,
    pub devices: usize,
    pub per_node: usize,
}

impl Cluster {
    pub fn new(device: DeviceSpec, devices: usize, per_node: usize) -> Result<Self> {
        if devices == 0 || per_node == 0 {
            bail!("the cluster needs at least one device and one per node")
        }
        Ok(Self {
            device,
            devices,
            per_node: per_node.min(devices),
        })
    }
}

/// What one step trains.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// Sequences per optimizer step, over every replica.
    pub global_batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Bytes per parameter and activation element (2: bf16 with f32 master weights; 4: f32).
    pub dtype_bytes: usize,
    /// LoRA adapters of this rank on every linear layer (only they train), or a full
    /// fine-tune.
    pub lora_rank: Option<usize>,
}

/// One way to lay the job out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub dp: usize,
    pub pp: usize,
    pub ep: usize,
    pub tp: usize,
    pub zero: u8,
    #[serde(serialize_with = "display")]
    pub recompute: Recompute,
    pub micro_batches: usize,
    #[serde(serialize_with = "display")]
    pub schedule: ScheduleKind,
    /// Model chunks per pipeline rank (several only with the interleaved schedule).
    pub chunks: usize,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(
    t: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_string())
}

impl Layout {
    /// `dp=4,pp=2,ep=2,tp=1,zero=1,recompute=selective,micro-batches=4,schedule=1f1b`; any
    /// key left out takes 1 (sizes and micro-batches), 0 (zero), none, or 1f1b; `chunks`
    /// (model chunks per rank) takes the schedule's default (2 for interleaved, else 1).
    pub fn parse(s: &str) -> Result<Self> {
        let mut l = Self {
            dp: 1,
            pp: 1,
            ep: 1,
            tp: 1,
            zero: 0,
            recompute: Recompute::None,
            micro_batches: 1,
            schedule: ScheduleKind::OneFOneB,
            chunks: 1,
        };
        let mut chunks = None;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                bail!("layout {s:?}: {part:?} is not key=value (e.g. dp=4,ep=2,zero=3)")
            };
            let n = || {
                v.parse::<usize>().map_err(|_| {
                    candle_core::Error::msg(format!("layout {s:?}: {k}={v} is not a number"))
                })
            };
            match k {
                "dp" => l.dp = n()?,
                "pp" => l.pp = n()?,
                "ep" => l.ep = n()?,
                "tp" => l.tp = n()?,
                "zero" => l.zero = n()?.min(255) as u8,
                "micro-batches" | "micro_batches" | "mb" => l.micro_batches = n()?,
                "recompute" => l.recompute = v.parse()?,
                "schedule" => l.schedule = v.parse()?,
                "chunks" => chunks = Some(n()?),
                _ => bail!("layout {s:?}: unknown key {k:?} (dp, pp, ep, tp, zero, recompute, micro-batches, schedule, chunks)"),
            }
        }
        l.chunks = chunks.unwrap_or(l.schedule.default_chunks());
        if [l.dp, l.pp, l.ep, l.tp, l.micro_batches, l.chunks].contains(&0) || l.zero > 3 {
            bail!("layout {s:?}: sizes and micro-batches must be at least 1, zero 0 to 3")
        }
        Ok(l)
    }

    pub fn world(&self) -> usize {
        self.dp * self.pp * self.ep * self.tp
    }

    /// The `finetune_mixtral` flags that run this layout.
    pub fn flags(&self) -> String {
        let mut f = format!(
            "--mesh dp={},pp={},ep={},tp={} --zero {} --recompute {} --micro-batches {}",
            self.dp, self.pp, self.ep, self.tp, self.zero, self.recompute, self.micro_batches
        );
        if self.pp > 1 {
            f += &format!(" --schedule {}", self.schedule);
        }
        if self.chunks > 1 {
            f += &format!(" --chunks {}", self.chunks);
        }
        f
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dp={},pp={},ep={},tp={},zero={},recompute={},mb={}",
            self.dp, self.pp, self.ep, self.tp, self.zero, self.recompute, self.micro_batches
        )?;
        if self.pp > 1 {
            write!(f, ",schedule={}", self.schedule)?;
        }
        if self.chunks > 1 {
            write!(f, ",chunks={}", self.chunks)?;
        }
        Ok(())
    }
}

/// Peak bytes per rank, by kind (the most loaded rank: the first pipeline stage, or the
/// last where its head weighs more).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub parameters: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    /// Gradient buckets in flight, ZeRO 3's gathered layers.
    pub buffers: f64,
    pub peak_bytes_per_rank: f64,
}

impl MemoryPlan {
    /// Parameters, gradients, optimizer state, activations and buffers, in that order.
    pub fn kinds(&self) -> [f64; 5] {
        [
            self.parameters,
            self.gradients,
            self.optimizer,
            self.activations,
            self.buffers,
        ]
    }
}

/// Seconds per optimizer step, by kind (communication: what is not hidden).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimePlan {
    pub compute: f64,
    pub tp_comm: f64,
    pub ep_comm: f64,
    pub dp_comm: f64,
    pub pp_comm: f64,
    pub bubble: f64,
    /// The optimizer's step over the parameters this rank updates (memory-bound).
    pub optimizer: f64,
    pub step: f64,
}

impl TimePlan {
    /// Compute, tp, ep, dp and pp communication, the bubble and the optimizer step, in that
    /// order (they add up to the step).
    pub fn kinds(&self) -> [f64; 7] {
        [
            self.compute,
            self.tp_comm,
            self.ep_comm,
            self.dp_comm,
            self.pp_comm,
            self.bubble,
            self.optimizer,
        ]
    }
}

/// A layout's predicted memory and speed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub layout: Layout,
    pub memory: MemoryPlan,
    pub time: TimePlan,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: the model's training FLOPs (no recomputation) per second over
    /// every device's peak.
    pub mfu: f64,
    pub fits: bool,
    /// Why it does not fit (by how much), where it does not.
    pub why_not: Option<String>,
}

/// Whether `l` can run `model` on `work` at all (sizes divide), and why not.
pub fn check_layout(
    model: &ModelShape,
    work: &Workload,
    cluster: &Cluster,
    l: &Layout,
) -> std::result::Result<(), String> {
    if l.world() != cluster.devices {
        return Err(format!(
            "dp×pp×ep×tp = {} is not the {} devices",
            l.world(),
            cluster.devices
        ));
    }
    if !model.heads.is_multiple_of(l.tp) {
        return Err(format!(
            "tp={} does not divide the {} attention heads",
            l.tp, model.heads
        ));
    }
    if l.tp > model.kv_heads && !l.tp.is_multiple_of(model.kv_heads)
        || l.tp <= model.kv_heads && !model.kv_heads.is_multiple_of(l.tp)
    {
        return Err(format!(
            "tp={} and the {} key/value heads: one must divide the other",
            l.tp, model.kv_heads
        ));
    }
    if model.experts > 0 && !model.experts.is_multiple_of(l.ep) {
        return Err(format!(
            "ep={} does not divide the {} experts",
            l.ep, model.experts
        ));
    }
    if model.experts == 0 && l.ep > 1 {
        return Err(format!("ep={} on a dense model", l.ep));
    }
    let ffn = if model.experts > 0 {
        model.expert_ffn
    } else {
        model.dense_ffn
    };
    if !ffn.is_multiple_of(l.tp) {
        return Err(format!(
            "tp={} does not divide the intermediate size {ffn}",
            l.tp
        ));
    }
    for (what, size) in [
        ("dense MLP", model.dense_ffn),
        ("shared expert", model.shared_ffn),
    ] {
        if size > 0 && !size.is_multiple_of(l.tp) {
            return Err(format!(
                "tp={} does not divide the {what}'s intermediate size {size}",
                l.tp
            ));
        }
    }
    if model.tie_embeddings && (l.pp > 1 || l.zero == 3) {
        return Err(
            "a head tied to the embedding is refused by the trainer with pipeline stages or ZeRO 3"
                .to_string(),
        );
    }
    if l.pp > model.layers {
        return Err(format!(
            "pp={} is more stages than the {} layers",
            l.pp, model.layers
        ));
    }
    let replicas = l.dp * l.ep;
    if !work.global_batch.is_multiple_of(replicas * l.micro_batches) {
        return Err(format!(
            "the global batch of {} sequences does not split into dp×ep={replicas} replicas of {} micro-batches",
            work.global_batch,
            l.micro_batches
        ));
    }
    if l.pp == 1 && l.micro_batches > 1 && l.schedule != ScheduleKind::OneFOneB {
        return Err("a schedule without pipeline stages".to_string());
    }
    if l.zero == 3 && (work.lora_rank.is_some() || l.schedule.needs_whole_backward()) {
        return Err(
            "ZeRO 3 with LoRA, a split-backward or an interleaved schedule is refused by the trainer"
                .to_string(),
        );
    }
    if l.schedule.needs_whole_backward() && l.recompute == Recompute::Full {
        return Err(
            "full recomputation with a split-backward or interleaved schedule is refused by the trainer"
                .to_string(),
        );
    }
    if let Err(e) = candle_parallel::pipeline::ModelSchedule::new(l.schedule, l.chunks) {
        return Err(format!("{e}"));
    }
    if l.pp * l.chunks > model.layers {
        return Err(format!(
            "pp={} × {} chunks is more stages than the {} layers",
            l.pp, l.chunks, model.layers
        ));
    }
    if l.schedule == ScheduleKind::Interleaved && l.pp == 1 {
        return Err("the interleaved schedule without pipeline stages".to_string());
    }
    Ok(())
}

/// The link a group of `size` ranks whose neighbours are `stride` ranks apart runs over
/// (inside a node where the whole group fits in one).
fn link_bw(cluster: &Cluster, stride: usize, size: usize) -> f64 {
    match stride * size <= cluster.per_node {
        true => cluster.device.intra_node_bw,
        false => cluster.device.inter_node_bw,
    }
}

/// Seconds to all-reduce `bytes` over `n` ranks (ring: each moves 2(n−1)/n of it).
fn all_reduce_s(bytes: f64, n: usize, bw: f64, lat: f64) -> f64 {
    match n {
        1 => 0.0,
        _ => 2.0 * (n - 1) as f64 / n as f64 * bytes / bw + lat * 2.0 * (n - 1) as f64,
    }
}

/// Seconds for a reduce-scatter or all-gather of `bytes` (the full size) over `n` ranks.
fn half_s(bytes: f64, n: usize, bw: f64, lat: f64) -> f64 {
    all_reduce_s(bytes, n, bw, lat) / 2.0
}

/// Ranks sharing cores: how much the pipeline schedule of `kind` over `p` stages and `m`
/// micro-batches stretches a step's compute, simulated on the clock with unit costs, each tick
/// as long as its busy ranks (every replica's, `ranks` in all) take at the speed their share
/// of the cores gives them (every rank busy: 1; fewer: up to `alone_speedup`). Remembered per
/// schedule: `enumerate` asks for the same ones many times.
fn shared_stretch(
    (kind, chunks): (ScheduleKind, usize),
    p: usize,
    m: usize,
    ranks: usize,
    alone_speedup: f64,
) -> Result<f64> {
    type Key = (String, usize, usize, usize, usize, u64);
    type Seen = std::sync::Mutex<std::collections::HashMap<Key, f64>>;
    static SEEN: std::sync::OnceLock<Seen> = std::sync::OnceLock::new();
    let key = (
        kind.to_string(),
        chunks,
        p,
        m,
        ranks,
        alone_speedup.to_bits(),
    );
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&v) = seen.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(v);
    }
    let sim = match kind {
        ScheduleKind::GPipe => Schedule::gpipe(p, m)?,
        ScheduleKind::ZeroBubble => Schedule::zero_bubble(p, m)?,
        ScheduleKind::Interleaved => Schedule::interleaved(p, chunks, m)?,
        ScheduleKind::OneFOneB => Schedule::one_f_one_b(p, m)?,
    }
    .simulate()?;
    // Busy stages per tick, from a difference array over the actions.
    let span = sim.makespan();
    let mut delta = vec![0i64; span + 1];
    for a in sim.timeline().iter().flatten() {
        delta[a.start] += 1;
        delta[a.end] -= 1;
    }
    let (replicas, all) = ((ranks / p).max(1) as f64, ranks.max(1) as f64);
    let (mut busy, mut ticks) = (0i64, 0.0);
    for d in &delta[..span] {
        busy += d;
        if busy > 0 {
            let speed = alone_speedup.min(all / (busy as f64 * replicas)).max(1.0);
            ticks += 1.0 / speed;
        }
    }
    let work: usize = sim.timeline()[0].iter().map(|t| t.end - t.start).sum();
    let v = ticks / work.max(1) as f64;
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, v);
    Ok(v)
}

/// The most chunk-forwards each rank holds under the interleaved schedule of `chunks` chunks
/// over `p` ranks and `m` micro-batches (simulated; remembered: `enumerate` asks many times).
fn interleaved_peaks(p: usize, chunks: usize, m: usize) -> Result<Vec<usize>> {
    type Seen = std::sync::Mutex<std::collections::HashMap<(usize, usize, usize), Vec<usize>>>;
    static SEEN: std::sync::OnceLock<Seen> = std::sync::OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(v) = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(p, chunks, m))
    {
        return Ok(v.clone());
    }
    let v = Schedule::interleaved(p, chunks, m)?
        .simulate()?
        .peak_in_flight();
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((p, chunks, m), v.clone());
    Ok(v)
}

/// The plan of layout `l` (an error where it does not divide the model or the batch).
pub fn plan_layout(
    model: &ModelShape,
    work: &Workload,
    cluster: &Cluster,
    l: &Layout,
) -> Result<Plan> {
    check_layout(model, work, cluster, l).map_err(candle_core::Error::msg)?;
    let d = work.dtype_bytes as f64;
    let dev = &cluster.device;
    // Parameters on one rank of the first and the last stage.
    let per_stage = model.layers.div_ceil(l.pp);
    let moe_share = model.moe_layers as f64 / model.layers as f64;
    let kv_split = l.tp.min(model.kv_heads) as f64;
    let attn = {
        let (q, kv) = (
            (model.heads * model.head_dim) as f64,
            (model.kv_heads * model.head_dim) as f64,
        );
        let h = model.hidden as f64;
        (2.0 * h * q) / l.tp as f64 + 2.0 * h * kv / kv_split + 2.0 * h
    };
    let layer_dense = attn
        + moe_share * model.moe_dense_params() as f64 / l.tp as f64
        + (1.0 - moe_share) * model.dense_mlp_params() as f64 / l.tp as f64;
    let layer_experts = moe_share * model.expert_params() as f64 / (l.ep * l.tp) as f64;
    let embed = (model.vocab * model.hidden) as f64 / l.tp as f64;
    // (dense, expert) parameters of a stage's rank: the first stage has the embedding, the
    // last the head (a tied head is the embedding, on the first stage).
    let stage_params = |layers: usize, first: bool, last: bool| {
        let mut dense = layers as f64 * layer_dense;
        if first || (last && !model.tie_embeddings) {
            dense += embed;
        }
        if last && first && !model.tie_embeddings {
            dense += embed;
        }
        (dense, layers as f64 * layer_experts)
    };
    // ZeRO partitions dense parameters over dp × ep and experts over dp.
    let (n_dense, n_expert) = ((l.dp * l.ep) as f64, l.dp as f64);
    // LoRA's A and B on every linear layer of a stage's layers (r × (in + out) each): about
    // 2r/h of attention's square-ish weights, r(1/h + 1/ffn) of the experts'.
    let adapters = |layers: usize, r: usize| -> (f64, f64) {
        let (r, h) = (r as f64, model.hidden as f64);
        let ffn = model.expert_ffn.max(1) as f64;
        (
            layers as f64 * layer_dense * 2.0 * r / h,
            layers as f64 * layer_experts * r * (1.0 / h + 1.0 / ffn),
        )
    };
    // What a stage of `layers` layers trains: its parameters, or its adapters under LoRA.
    let trained = |layers: usize, first: bool, last: bool| match work.lora_rank {
        None => stage_params(layers, first, last),
        Some(r) => adapters(layers, r),
    };
    // A rank's activation layout: its micro-batch's rows, the mesh's tp and ep, stages or not.
    let rank_layout = |recompute: Recompute| ActivationLayout {
        tp: l.tp,
        ep: l.ep,
        dtype_bytes: work.dtype_bytes,
        stage_boundaries: l.pp > 1,
        lora_rank: work.lora_rank.unwrap_or(0),
        ..ActivationLayout::one_rank(
            work.global_batch / (l.dp * l.ep * l.micro_batches),
            work.seq,
            recompute,
        )
    };
    let memory_of = |first: bool, last: bool, stage: usize| -> Result<MemoryPlan> {
        let (dense, experts) = stage_params(per_stage, first, last);
        // Bytes per trained parameter: the parameter, its f32 master copy (16-bit), the f32
        // gradient buffer and two f32 moments, partitioned by stage.
        let master = if work.dtype_bytes < 4 { 4.0 } else { 0.0 };
        let part = |n: f64, stage_min: u8| if l.zero >= stage_min { n } else { 1.0 };
        let (trained_d, trained_e, frozen) = match work.lora_rank {
            None => (dense, experts, 0.0),
            Some(r) => {
                let (ad, ae) = adapters(per_stage, r);
                (ad, ae, (dense + experts) * d)
            }
        };
        let parameters =
            frozen + trained_d * d / part(n_dense, 3) + trained_e * d / part(n_expert, 3);
        let gradients = trained_d * 4.0 / part(n_dense, 2) + trained_e * 4.0 / part(n_expert, 2);
        let optimizer = trained_d * (8.0 + master) / part(n_dense, 1)
            + trained_e * (8.0 + master) / part(n_expert, 1);
        // Interleaved: the chunks whose activations the rank holds at its peak (the schedule
        // simulated), each a chunk's share of the stage's layers.
        let (in_flight, held_layers) = match (l.pp, l.schedule) {
            (1, _) => (1, per_stage),
            (_, ScheduleKind::GPipe) => (l.micro_batches, per_stage),
            (p, ScheduleKind::Interleaved) => (
                interleaved_peaks(p, l.chunks, l.micro_batches)?[stage],
                per_stage.div_ceil(l.chunks),
            ),
            _ => (l.micro_batches.min(l.pp - stage), per_stage),
        };
        let layout = ActivationLayout {
            in_flight,
            head: last,
            ..rank_layout(l.recompute)
        };
        let est = mixtral_activations(&model.as_mixtral(), held_layers, &layout)?;
        let buffers = match l.zero {
            // A layer's gathered parameters, the next one's prefetched, the layer's gradients.
            3 => (layer_dense + layer_experts) * (2.0 * d + 4.0),
            _ => 0.0,
        };
        // ZeRO 3's last sharded module holds the last layer and the head, and its loss is
        // taken outside it on its packed output: the loss's graph and backward over the
        // logits (the head phase) come first, then the module's own backward runs the head's
        // and the layer's again on top of what the loss left (its seed, the packed output).
        // The ZeRO 0-2 unit-wise backward runs the head as a unit of its own.
        // ZeRO 2 packs a layer's gradients into its synchronisation group's bucket (dense over
        // dp × ep, experts over dp) and reduce-scatters it in place as
        // the layer's backward ends: on top of the layer phase only.
        let bucket = (DEFAULT_BUCKET_BYTES as f64).min(4.0 * trained_d.max(trained_e));
        // A split-backward or interleaved schedule runs each stage's backward whole and hands
        // the sink the step's gradients at its end: they accumulate, in f32, over the
        // micro-batches.
        let accumulated = if l.pp > 1 && l.schedule.needs_whole_backward() {
            (trained_d + trained_e) * 4.0
        } else {
            0.0
        };
        let activations = accumulated
            + match (l.zero, last) {
                (3, true) => (est.peak + est.head_graph + est.head_backward) as f64,
                (2, _) => (est.head_phase as f64).max(est.layer_phase as f64 + bucket),
                _ => est.peak as f64,
            };
        Ok(MemoryPlan {
            parameters,
            gradients,
            optimizer,
            activations,
            buffers,
            peak_bytes_per_rank: parameters + gradients + optimizer + activations + buffers,
        })
    };
    let first = memory_of(true, l.pp == 1, 0)?;
    let memory = match l.pp {
        1 => first,
        _ => {
            let last = memory_of(false, true, l.pp - 1)?;
            if last.peak_bytes_per_rank > first.peak_bytes_per_rank {
                last
            } else {
                first
            }
        }
    };
    // Time: each rank runs its stage's layers over its replica's tokens.
    let tokens = (work.global_batch * work.seq) as f64;
    let rank_tokens = tokens / (l.dp * l.ep) as f64;
    let flops_rate = dev.achievable
        * if work.dtype_bytes < 4 {
            dev.peak_flops_16
        } else {
            dev.peak_flops_32
        };
    let model_flops = model.train_flops_per_token(work.seq) * tokens;
    let recompute_factor = match l.recompute {
        Recompute::None => 1.0,
        // The attention core again (a small share of the forward).
        Recompute::Selective => 1.0 + 0.05,
        Recompute::Full => 4.0 / 3.0,
    };
    let lora_factor = if work.lora_rank.is_some() {
        2.0 / 3.0
    } else {
        1.0
    };
    // Per token: the head's matmul (the embedding's lookup is none) and a layer's share of the
    // rest. A stage's compute: its layers, and the last one's head (one stage: both); the
    // heaviest stage sets the pace.
    let head_flops = 6.0 * (model.vocab * model.hidden) as f64;
    let layer_flops = (model.train_flops_per_token(work.seq) - head_flops) / model.layers as f64;
    let stage_sizes: Vec<usize> = candle_parallel::pipeline::split_layers(model.layers, l.pp)?
        .iter()
        .map(|r| r.len())
        .collect();
    let rank_tokens_tp = rank_tokens / l.tp as f64;
    let stage_matmuls = |layers: usize, head: bool| {
        rank_tokens_tp
            * (layers as f64 * layer_flops * recompute_factor + if head { head_flops } else { 0.0 })
            * lora_factor
            / flops_rate
    };
    // Trained parameters on a rank of the first stage (dense, experts).
    let (td, te) = trained(per_stage, true, l.pp == 1);
    // On CPU ranks what is not a matmul takes the cores' memory bandwidth too: every tensor
    // the forward makes is written and read, and the backward writes and reads a gradient
    // of each and reads what the forward kept (about six passes over the forward's tensors, two
    // more where full recomputation runs the forward again); each micro-batch's weight
    // gradients are written, read and added into the step's (16 bytes a parameter). On GPUs
    // `achievable` covers it.
    let stage_traffic = |layers: usize, first: bool, last: bool| -> Result<f64> {
        if !dev.shared_cores {
            return Ok(0.0);
        }
        let est = mixtral_activations(
            &model.as_mixtral(),
            layers,
            &ActivationLayout {
                head: last,
                ..rank_layout(Recompute::None)
            },
        )?;
        let made = (layers * est.layer_graph + est.head_graph) as f64;
        let passes = match l.recompute {
            Recompute::Full => 8.0,
            _ => 6.0,
        };
        let (pd, pe) = trained(layers, first, last);
        Ok(l.micro_batches as f64 * (passes * made + 16.0 * (pd + pe)) / dev.memory_bw)
    };
    let stages: Vec<f64> = stage_sizes
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let (first, last) = (s == 0, s + 1 == l.pp);
            Ok(stage_matmuls(n, last) + stage_traffic(n, first, last)?)
        })
        .collect::<Result<_>>()?;
    let heaviest = stages.iter().copied().fold(0.0, f64::max);
    // Devices of their own: the heaviest stage sets the pace. Ranks sharing cores: a rank
    // waiting for the heaviest leaves it its share, so the pace is the mean stage, unless the
    // heaviest alone (at the speed a lone rank gets) takes longer.
    let compute = match (dev.shared_cores, l.pp) {
        (true, p) if p > 1 => {
            let mean = stages.iter().sum::<f64>() / p as f64;
            mean.max(heaviest / dev.alone_speedup.max(1.0))
        }
        _ => heaviest,
    };
    // Ranks sharing cores: the step's compute stretched by the ticks of the pipeline's
    // schedule where the ranks cannot keep the cores busy.
    let shared_pipeline = match (dev.shared_cores, l.pp) {
        (true, p) if p > 1 => Some(shared_stretch(
            (l.schedule, l.chunks),
            p,
            l.micro_batches,
            cluster.devices,
            dev.alone_speedup,
        )?),
        _ => None,
    };
    // The seconds of a rank's cores an all-reduce of `bytes` over `n` ranks takes where the
    // backend runs on them (the local backend's is direct: each rank reads and writes the
    // whole of it whatever the group's size).
    let cores_s = |bytes: f64, n: usize| {
        if dev.collective_bw <= 0.0 || n < 2 {
            0.0
        } else {
            bytes / dev.collective_bw
        }
    };
    let lat = dev.latency_s;
    let (tp_stride, ep_stride, pp_stride) = (1, l.tp, l.tp * l.ep);
    let act_bytes = rank_tokens * model.hidden as f64 * d;
    // Two all-reduces of the hidden states per layer forward, two backward.
    // (A dialled link waits only for what the backend's own work left of its time.)
    let tp_comm = per_stage as f64
        * 4.0
        * all_reduce_s(
            act_bytes / l.micro_batches as f64,
            l.tp,
            link_bw(cluster, tp_stride, l.tp),
            lat,
        )
        .max(cores_s(act_bytes / l.micro_batches as f64, l.tp))
        * l.micro_batches as f64;
    // Dispatch and combine of top-k copies per MoE layer, forward and backward.
    let ep_comm = match l.ep {
        1 => 0.0,
        n => {
            let bytes = act_bytes * model.top_k as f64 * (n - 1) as f64 / n as f64;
            // (On CPU ranks each all-to-all also copies its rows out and in.)
            let copies = match dev.shared_cores {
                true => 2.0 * bytes / dev.memory_bw,
                false => 0.0,
            };
            per_stage as f64
                * moe_share
                * 4.0
                * (bytes / link_bw(cluster, ep_stride, n) + lat * l.micro_batches as f64 + copies)
        }
    };
    // Gradient reduction (and ZeRO's parameter gathers) over the replicas, hidden behind the
    // backward (two thirds of the compute) but for the last layer's.
    // Dense parameters are reduced over the dp × ep replicas, experts over dp; a group runs
    // inside a node where all its ranks fit in one (its span: tp·ep, or the world with dp).
    let span = |with_dp: usize, without: usize| if l.dp > 1 { with_dp } else { without };
    let dense_bw = link_bw(cluster, 1, span(l.world(), l.tp * l.ep));
    let expert_bw = link_bw(cluster, 1, span(l.world(), 1));
    let (nd, ne) = (l.dp * l.ep, l.dp);
    let both = |f: &dyn Fn(f64, usize, f64, f64) -> f64, dense: f64, experts: f64| {
        f(dense, nd, dense_bw, lat) + f(experts, ne, expert_bw, lat)
    };
    let reduce = match l.zero {
        0 => both(&all_reduce_s, td * 4.0, te * 4.0),
        _ => both(&half_s, td * 4.0, te * 4.0),
    };
    let after_step = match l.zero {
        1 | 2 => both(&half_s, td * d, te * d),
        _ => 0.0,
    };
    let gathers = match l.zero {
        3 => 2.0 * both(&half_s, td * d, te * d),
        _ => 0.0,
    };
    let layers = per_stage as f64;
    let hidden_behind = compute * 2.0 / 3.0 * (layers - 1.0) / layers;
    // What the backend's copies and sums take of the cores (the dialled link's wait is what
    // can hide): the gradients' reduction (an all-reduce, or a reduce-scatter: half of one)
    // and the parameters' gathers. The gradients are packed into buckets and the reduced ones
    // (ZeRO 1-3: the gathered parameters) copied back out (8 bytes a parameter each, read and
    // written; ZeRO 3 gathers twice a step), for the parameters a group reduces.
    let on_cores = |f: f64, bytes_per_param: f64| {
        f * (cores_s(td * bytes_per_param, nd) + cores_s(te * bytes_per_param, ne))
    };
    let reduced = |n: usize, params: f64| if n > 1 { params } else { 0.0 };
    let copies = |n: f64| match dev.shared_cores {
        true => n * 8.0 * (reduced(nd, td) + reduced(ne, te)) / dev.memory_bw,
        false => 0.0,
    };
    let dp_cores = match l.zero {
        0 => on_cores(1.0, 4.0) + copies(2.0),
        1 | 2 => on_cores(0.5, 4.0) + on_cores(0.5, d) + copies(2.0),
        _ => on_cores(0.5, 4.0) + on_cores(1.0, d) + copies(3.0),
    };
    let dp_comm = (reduce - hidden_behind).max(reduce / layers)
        + after_step
        + (gathers - compute * (layers - 1.0) / layers).max(gathers / layers)
        + dp_cores;
    // Each micro-batch's activations cross each stage boundary forward and back (each of a
    // rank's chunks has its own boundaries).
    let pp_comm = match l.pp {
        1 => 0.0,
        _ => {
            2.0 * l.chunks as f64
                * (act_bytes / link_bw(cluster, pp_stride, 2) + lat * l.micro_batches as f64)
        }
    };
    let per_micro = (compute + tp_comm + ep_comm) / l.micro_batches as f64;
    // The pipeline's idle micro-batch slots: (p − 1) for GPipe and 1F1B, a third of that for
    // zero-bubble, (p − 1) / v for interleaving v chunks.
    let idle_slots = match (l.pp, l.schedule) {
        (1, _) => 0.0,
        (p, ScheduleKind::ZeroBubble) => (p - 1) as f64 / 3.0,
        (p, ScheduleKind::Interleaved) => (p - 1) as f64 / l.chunks as f64,
        (p, _) => (p - 1) as f64,
    };
    let bubble = match shared_pipeline {
        Some(stretch) => (stretch - 1.0).max(0.0) * (compute + tp_comm + ep_comm),
        None => idle_slots * per_micro,
    };
    // AdamW reads the parameter, its gradient and two moments and writes three of them back
    // (and a 16-bit copy), over the partition this rank steps.
    let step_bytes = if work.dtype_bytes < 4 { 34.0 } else { 28.0 };
    let part = |n: usize| if l.zero >= 1 { n as f64 } else { 1.0 };
    let stepped = td / part(nd) + te / part(ne);
    let optimizer = stepped * step_bytes / dev.memory_bw;
    let step = compute + tp_comm + ep_comm + dp_comm + pp_comm + bubble + optimizer;
    let peak_all = cluster.devices as f64
        * if work.dtype_bytes < 4 {
            dev.peak_flops_16
        } else {
            dev.peak_flops_32
        };
    let fits = memory.peak_bytes_per_rank <= dev.memory_bytes;
    let why_not = (!fits).then(|| {
        format!(
            "needs {:.1} GB per rank, {:.1} GB more than the {:.0} GB a device has",
            memory.peak_bytes_per_rank / 1e9,
            (memory.peak_bytes_per_rank - dev.memory_bytes) / 1e9,
            dev.memory_bytes / 1e9
        )
    });
    Ok(Plan {
        layout: *l,
        memory,
        time: TimePlan {
            compute,
            tp_comm,
            ep_comm,
            dp_comm,
            pp_comm,
            bubble,
            optimizer,
            step,
        },
        tokens_per_s: tokens / step,
        mfu: model_flops * lora_factor / step / peak_all,
        fits,
        why_not,
    })
}

/// Every layout of `cluster.devices` ranks that divides the model and the batch, with each
/// ZeRO stage, recompute mode, micro-batch count (powers of two) and schedule: the plans
/// (those that fit, fastest first; then those that do not, closest to fitting first) and the
/// layouts rejected for not dividing, with why.
pub fn enumerate(
    model: &ModelShape,
    work: &Workload,
    cluster: &Cluster,
) -> (Vec<Plan>, Vec<(Layout, String)>) {
    let n = cluster.devices;
    let divisors: Vec<usize> = (1..=n).filter(|&k| n.is_multiple_of(k)).collect();
    let (mut plans, mut rejected) = (Vec::new(), Vec::new());
    for &tp in &divisors {
        for &ep in &divisors {
            for &pp in &divisors {
                if !n.is_multiple_of(tp * ep * pp) {
                    continue;
                }
                let dp = n / (tp * ep * pp);
                for zero in 0..=3u8 {
                    for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
                        // Gradient accumulation without stages, or the pipeline's micro-batches.
                        let mbs: Vec<usize> = (0..7).map(|i| 1 << i).collect();
                        let schedules: &[ScheduleKind] = match pp {
                            1 => &[ScheduleKind::OneFOneB],
                            _ => &[
                                ScheduleKind::OneFOneB,
                                ScheduleKind::ZeroBubble,
                                ScheduleKind::Interleaved,
                            ],
                        };
                        for &micro_batches in &mbs {
                            for &schedule in schedules {
                                let l = Layout {
                                    dp,
                                    pp,
                                    ep,
                                    tp,
                                    zero,
                                    recompute,
                                    micro_batches,
                                    schedule,
                                    chunks: schedule.default_chunks(),
                                };
                                match check_layout(model, work, cluster, &l) {
                                    Err(why) => rejected.push((l, why)),
                                    Ok(()) => match plan_layout(model, work, cluster, &l) {
                                        Ok(p) => plans.push(p),
                                        Err(e) => rejected.push((l, format!("{e:#}"))),
                                    },
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Those that fit, fastest first; then those that do not, closest to fitting first.
    plans.sort_by(|a, b| {
        let memory = a
            .memory
            .peak_bytes_per_rank
            .total_cmp(&b.memory.peak_bytes_per_rank);
        b.fits.cmp(&a.fits).then(match a.fits {
            true => b.tokens_per_s.total_cmp(&a.tokens_per_s).then(memory),
            false => memory,
        })
    });
    (plans, rejected)
}

/// Measures this machine for `devices` CPU ranks (threads of one process), in a few seconds,
/// with Candle's pools set as [`candle_parallel::launch::Launcher`] sets them and every rank
/// busy: each rank's matmul rate, elementwise rate (`memory_bw`) and share of the local
/// backend's all-reduce (`collective_bw`), and the memory available per rank; the link is the
/// one `CANDLE_PARALLEL_LINK` dials (`gbps=25,latency_us=5`), else none (the backend's own
/// work is then all a collective costs). (A link dialled process-wide with
/// [`candle_parallel::comm::local::dial_link`] would pace the all-reduce measured here too.)
pub fn calibrate_cpu(devices: usize) -> Result<DeviceSpec> {
    // Candle's pools as the ranks will have them.
    candle_parallel::launch::share_cores_between_ranks(devices);
    // Elementwise work with every rank busy: every thread, started together, adds two
    // 4M-element tensors (12 bytes moved an element) a fixed number of times; a rank's share
    // is the bytes over the time until the last one finished. The best of three rounds.
    let n = 4 << 20;
    let ranks = devices.max(1);
    // Bytes each of `ranks` threads moves per second while all of them run `f`: it prepares
    // its tensors, calls `go` (which returns once every thread has called it, or left early:
    // an error or panic in one thread's preparation never leaves the others waiting) and
    // returns the bytes it moved from then on; a rank's share is the bytes over the time from
    // the first start to the last end.
    type Go<'a> = &'a dyn Fn() -> std::time::Instant;
    let together = |f: &(dyn Fn(usize, Go) -> Result<f64> + Sync)| -> Result<f64> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let arrived = AtomicUsize::new(0);
        struct Arrive<'a>(&'a AtomicUsize, std::cell::Cell<bool>);
        impl Arrive<'_> {
            fn once(&self) {
                if !self.1.replace(true) {
                    self.0.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        impl Drop for Arrive<'_> {
            fn drop(&mut self) {
                self.once();
            }
        }
        let arrived = &arrived;
        let results: Vec<Result<(f64, std::time::Instant, std::time::Instant)>> =
            std::thread::scope(|s| {
                let mut handles = Vec::with_capacity(ranks);
                for r in 0..ranks {
                    let spawned = std::thread::Builder::new().spawn_scoped(s, move || {
                        let me = Arrive(arrived, std::cell::Cell::new(false));
                        let started = std::cell::Cell::new(None);
                        let go = || {
                            me.once();
                            while arrived.load(Ordering::SeqCst) < ranks {
                                std::thread::sleep(std::time::Duration::from_micros(50));
                            }
                            let t = std::time::Instant::now();
                            started.set(Some(t));
                            t
                        };
                        let bytes = f(r, &go)?;
                        let end = std::time::Instant::now();
                        Ok((bytes, started.get().unwrap_or(end), end))
                    });
                    match spawned {
                        Ok(h) => handles.push(h),
                        Err(e) => {
                            // The threads not started never arrive: count them, so that the
                            // others do not wait for them.
                            arrived.fetch_add(ranks - r, Ordering::SeqCst);
                            handles.truncate(r);
                            let mut out: Vec<Result<_>> = handles
                                .into_iter()
                                .map(|h| {
                                    h.join().unwrap_or_else(|_| {
                                        Err(candle_core::Error::msg("calibration thread panicked"))
                                    })
                                })
                                .collect();
                            out.push(Err(candle_core::Error::msg(format!(
                                "calibration: cannot start a thread: {e}"
                            ))));
                            return out;
                        }
                    }
                }
                // Every thread joined before any error is returned.
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(candle_core::Error::msg("calibration thread panicked"))
                        })
                    })
                    .collect()
            });
        let runs = results.into_iter().collect::<Result<Vec<_>>>()?;
        let first = runs.iter().map(|r| r.1).min();
        let last = runs.iter().map(|r| r.2).max();
        let (Some(first), Some(last)) = (first, last) else {
            bail!("calibration: no thread ran")
        };
        let bytes: f64 = runs.iter().map(|r| r.0).sum();
        Ok(bytes / ranks as f64 / (last - first).as_secs_f64().max(1e-9))
    };
    // Matmuls of 256 × 1024 by 1024 × 1024 with every rank busy, and one rank alone (what a
    // rank gets where the others wait: the pipeline's bubble).
    let (m, k) = (256, 1024);
    let matmuls = |go: Go| -> Result<f64> {
        let a = Tensor::ones((m, k), DType::F32, &Device::Cpu)?;
        let b = Tensor::ones((k, k), DType::F32, &Device::Cpu)?;
        a.matmul(&b)?; // warm-up
        go();
        for _ in 0..24 {
            a.matmul(&b)?;
        }
        Ok(24.0 * 2.0 * (m * k * k) as f64)
    };
    let mut flops: f64 = 0.0;
    for _ in 0..2 {
        flops = flops.max(together(&|_, go| matmuls(go))?);
    }
    let started = std::cell::Cell::new(std::time::Instant::now());
    let alone = matmuls(&|| {
        started.set(std::time::Instant::now());
        started.get()
    })? / started.get().elapsed().as_secs_f64().max(1e-9);
    let mut memory_bw: f64 = 0.0;
    for _ in 0..3 {
        memory_bw = memory_bw.max(together(&|_, go| {
            let a = Tensor::ones(n, DType::F32, &Device::Cpu)?;
            let b = Tensor::ones(n, DType::F32, &Device::Cpu)?;
            drop((&a + &b)?); // warm-up: the allocator's pages
            go();
            for _ in 0..8 {
                drop((&a + &b)?);
            }
            Ok(8.0 * 12.0 * n as f64)
        })?);
    }
    // The local backend's all-reduce over every rank, no link dialled: bytes of its input per
    // second (the best of three rounds of four). A rank that fails tells the others, which
    // then stop waiting for it.
    let collective_bw = if devices > 1 {
        let fabric = candle_parallel::comm::local::LocalFabric::new(
            devices,
            std::time::Duration::from_secs(60),
        );
        let comms = fabric.world_comms();
        let (comms, fabric) = (&comms, &fabric);
        let mut best: f64 = 0.0;
        for _ in 0..3 {
            best = best.max(together(&|r, go| {
                // A rank that fails, by an error or a panic, tells the others, which then stop
                // waiting for it.
                struct FailOthers<'a>(&'a candle_parallel::comm::local::LocalFabric, usize, bool);
                impl Drop for FailOthers<'_> {
                    fn drop(&mut self) {
                        if !self.2 {
                            self.0.fail(self.1, "calibration: a rank stopped");
                        }
                    }
                }
                let mut guard = FailOthers(fabric, r, false);
                let x = Tensor::ones(n, DType::F32, &Device::Cpu)?;
                go();
                for _ in 0..4 {
                    comms[r].all_reduce_in_place(&x, candle_parallel::comm::ReduceOp::Sum)?;
                }
                guard.2 = true;
                Ok(4.0 * 4.0 * n as f64)
            })?);
        }
        best
    } else {
        0.0
    };
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<f64>().ok())
                })
        })
        .map_or(16e9, |kb| kb * 1024.0);
    let (link_bw, latency) = match candle_parallel::comm::local::LinkModel::from_env()? {
        Some(link) => (link.gbps * 1e9 / 8.0, link.latency.as_secs_f64()),
        // No link dialled: the backend's own copies and sums are all a collective costs
        // (`collective_bw`).
        None => (1e18, 0.0),
    };
    Ok(DeviceSpec {
        alone_speedup: (alone / flops).max(1.0),
        ..DeviceSpec::cpu(
            flops,
            total / devices.max(1) as f64,
            link_bw,
            latency,
            memory_bw,
            collective_bw,
        )
    })
}
