//! The configuration of the sparse MoE families ([`MoeFamily`]: Mixtral, Qwen2-MoE, Qwen3-MoE),
//! read from Hugging Face's `config.json`: one model ([`crate::mixtral::Mixtral`]) runs them
//! all, and a family is a `model_type`, a few switches and the names of its weights.

use crate::llama::LlamaConfig;
use candle_core::{bail, Result};
use candle_parallel::moe::{ExpertNames, RouterConfig, Scoring};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A Hugging Face `config.json` of a Mixtral-style sparse MoE model: the fields this model
/// uses, `model_type` and `architectures` (what transformers' Auto classes need; added when a
/// config lacks them), and every other field as it was read (written back unchanged).
///
/// `model_type` picks the family ([`MoeFamily`]): `mixtral`, `qwen2_moe` or `qwen3_moe`. A
/// Qwen config's `num_experts` is read as [`MixtralConfig::num_local_experts`] (and written
/// back as `num_experts`); its other keys (`moe_intermediate_size`, `head_dim`,
/// `shared_expert_intermediate_size`, `decoder_sparse_step`, `mlp_only_layers`, `qkv_bias`,
/// `norm_topk_prob`, ...) stay in [`MixtralConfig::extra`] and are read through this type's
/// methods.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MixtralConfig {
    #[serde(default = "mixtral_model_type")]
    pub model_type: String,
    #[serde(default = "mixtral_architectures")]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(alias = "num_experts")]
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Attention only reaches this far back; sequences longer than it are refused.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default = "default_aux_coef")]
    pub router_aux_loss_coef: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// The config's other fields, kept as read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn mixtral_model_type() -> String {
    "mixtral".into()
}
fn mixtral_architectures() -> Vec<String> {
    vec!["MixtralForCausalLM".into()]
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    1e6
}
fn default_max_pos() -> usize {
    32768
}
fn default_aux_coef() -> f64 {
    0.02
}
fn default_act() -> String {
    "silu".into()
}

/// The sparse MoE families this model reads, by `model_type`: what differs between them is
/// a few switches and the names of the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeFamily {
    /// `mixtral`: `block_sparse_moe.gate`, `experts.J.w1/w2/w3`.
    Mixtral,
    /// `qwen2_moe`: `mlp.gate`, `mlp.experts.J.gate_proj/up_proj/down_proj`, a shared expert
    /// with a sigmoid gate (`mlp.shared_expert`, `mlp.shared_expert_gate`), biases on the query,
    /// key and value projections (`qkv_bias`).
    Qwen2Moe,
    /// `qwen3_moe`: Qwen2-MoE's names without the shared expert, RMS norms over each query and
    /// key head (`q_norm`, `k_norm`), `head_dim`.
    Qwen3Moe,
}

impl MoeFamily {
    /// The family of `model_type`.
    pub fn of(model_type: &str) -> Result<Self> {
        Ok(match model_type {
            "mixtral" => Self::Mixtral,
            "qwen2_moe" => Self::Qwen2Moe,
            "qwen3_moe" => Self::Qwen3Moe,
            other => bail!(
                "config: model_type {other:?} is not a sparse MoE family this model reads: use mixtral, qwen2_moe or qwen3_moe"
            ),
        })
    }

    /// Where a decoder layer keeps its feed-forward (`model.layers.N.<this>`).
    pub fn ffn_prefix(self) -> &'static str {
        match self {
            Self::Mixtral => "block_sparse_moe",
            Self::Qwen2Moe | Self::Qwen3Moe => "mlp",
        }
    }

    /// What its checkpoints call an expert's projections.
    pub fn expert_names(self) -> ExpertNames {
        match self {
            Self::Mixtral => ExpertNames::MIXTRAL,
            Self::Qwen2Moe | Self::Qwen3Moe => ExpertNames::GATE_UP_DOWN,
        }
    }

    /// The config key of the number of routed experts.
    fn experts_key(self) -> &'static str {
        match self {
            Self::Mixtral => "num_local_experts",
            Self::Qwen2Moe | Self::Qwen3Moe => "num_experts",
        }
    }

    /// The module names LoRA targets by default: attention and the experts' projections.
    pub fn lora_targets(self) -> Vec<String> {
        let e = self.expert_names();
        ["q_proj", "k_proj", "v_proj", "o_proj", e.gate, e.up, e.down]
            .map(String::from)
            .to_vec()
    }
}

/// Written as read: the family's own name for the expert count, then every other field.
impl Serialize for MixtralConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde_json::json;
        let experts_key = MoeFamily::of(&self.model_type)
            .map(MoeFamily::experts_key)
            .unwrap_or("num_local_experts");
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("model_type", json!(self.model_type)),
            ("architectures", json!(self.architectures)),
            ("hidden_size", json!(self.hidden_size)),
            ("intermediate_size", json!(self.intermediate_size)),
            ("vocab_size", json!(self.vocab_size)),
            ("num_hidden_layers", json!(self.num_hidden_layers)),
            ("num_attention_heads", json!(self.num_attention_heads)),
            ("num_key_value_heads", json!(self.num_key_value_heads)),
            (experts_key, json!(self.num_local_experts)),
            ("num_experts_per_tok", json!(self.num_experts_per_tok)),
            ("rms_norm_eps", json!(self.rms_norm_eps)),
            ("rope_theta", json!(self.rope_theta)),
            (
                "max_position_embeddings",
                json!(self.max_position_embeddings),
            ),
            ("sliding_window", json!(self.sliding_window)),
            ("router_aux_loss_coef", json!(self.router_aux_loss_coef)),
            ("tie_word_embeddings", json!(self.tie_word_embeddings)),
            ("hidden_act", json!(self.hidden_act)),
            ("bos_token_id", json!(self.bos_token_id)),
            ("eos_token_id", json!(self.eos_token_id)),
        ] {
            m.insert(k.to_string(), v);
        }
        for (k, v) in &self.extra {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        m.serialize(s)
    }
}

impl MixtralConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: serde_json::Value = crate::read_json(path, "Mixtral config")?;
        Self::from_json(v).map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))
    }

    /// Reads and checks a parsed `config.json`. Transformers 5 writes the rotary base inside
    /// `rope_parameters` (`{"rope_type": "default", "rope_theta": ...}`); it is read from there
    /// where the config has no `rope_theta` of its own. Keys a Qwen config leaves out take
    /// transformers' defaults for its family (`rms_norm_eps` 1e-6, `rope_theta` 10 000,
    /// `router_aux_loss_coef` 0.001, `norm_topk_prob` false, the expert counts and widths of
    /// `Qwen2MoeConfig` / `Qwen3MoeConfig`), not Mixtral's.
    pub fn from_json(mut v: serde_json::Value) -> Result<Self> {
        if let Some(obj) = v.as_object_mut() {
            let family = obj.get("model_type").and_then(|t| t.as_str());
            // transformers' Qwen2MoeConfig / Qwen3MoeConfig defaults for their own keys.
            let sizes: &[(&str, usize)] = match family {
                Some("qwen2_moe") => &[
                    ("num_experts", 60),
                    ("num_experts_per_tok", 4),
                    ("moe_intermediate_size", 1408),
                    ("shared_expert_intermediate_size", 5632),
                ],
                Some("qwen3_moe") => &[
                    ("num_experts", 128),
                    ("num_experts_per_tok", 8),
                    ("moe_intermediate_size", 768),
                ],
                _ => &[],
            };
            let qwen = !sizes.is_empty();
            if qwen && !obj.contains_key("num_local_experts") {
                for &(k, n) in sizes {
                    obj.entry(k).or_insert(serde_json::json!(n));
                }
            }
            if qwen {
                for (k, default) in [
                    ("rms_norm_eps", serde_json::json!(1e-6)),
                    ("router_aux_loss_coef", serde_json::json!(0.001)),
                    ("norm_topk_prob", serde_json::json!(false)),
                ] {
                    obj.entry(k).or_insert(default);
                }
                if !obj.contains_key("rope_theta")
                    && obj
                        .get("rope_parameters")
                        .and_then(|r| r.get("rope_theta"))
                        .is_none()
                {
                    obj.insert("rope_theta".into(), serde_json::json!(10_000.0));
                }
            }
            if !obj.contains_key("rope_theta") {
                let theta = obj
                    .get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .cloned();
                if let Some(theta) = theta {
                    obj.insert("rope_theta".into(), theta);
                }
            }
        }
        let cfg: Self = serde_json::from_value(v)
            .map_err(|e| candle_core::Error::msg(format!("config: {e}")))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The family its `model_type` names.
    pub fn family(&self) -> Result<MoeFamily> {
        MoeFamily::of(&self.model_type)
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.extra.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                candle_core::Error::msg(format!("config: {key} is {v}, not true or false"))
            }),
        }
    }

    fn size(&self, key: &str) -> Result<Option<usize>> {
        match self.extra.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => bail!("config: {key} is {v}, not a count"),
            },
        }
    }

    /// Each routed expert's width: Qwen's `moe_intermediate_size`, Mixtral's
    /// `intermediate_size`.
    pub fn expert_intermediate_size(&self) -> usize {
        match self.family() {
            Ok(MoeFamily::Qwen2Moe | MoeFamily::Qwen3Moe) => self
                .size("moe_intermediate_size")
                .ok()
                .flatten()
                .unwrap_or(self.intermediate_size),
            _ => self.intermediate_size,
        }
    }

    /// Qwen2-MoE's shared expert width (`shared_expert_intermediate_size`), if it has one.
    pub fn shared_expert_intermediate_size(&self) -> Option<usize> {
        match self.family() {
            Ok(MoeFamily::Qwen2Moe) => self
                .size("shared_expert_intermediate_size")
                .ok()
                .flatten()
                .filter(|&n| n > 0),
            _ => None,
        }
    }

    /// Whether decoder layer `layer` is sparse (an MoE layer) rather than a dense MLP of
    /// `intermediate_size`: Qwen's rule, every `decoder_sparse_step`-th layer not listed in
    /// `mlp_only_layers`; every layer for Mixtral.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        match self.family() {
            Ok(MoeFamily::Qwen2Moe | MoeFamily::Qwen3Moe) => {
                let step = self.size("decoder_sparse_step").ok().flatten().unwrap_or(1);
                let dense = self
                    .extra
                    .get("mlp_only_layers")
                    .and_then(|v| v.as_array())
                    .is_some_and(|l| l.iter().any(|x| x.as_u64() == Some(layer as u64)));
                !dense && self.num_local_experts > 0 && step > 0 && (layer + 1).is_multiple_of(step)
            }
            _ => true,
        }
    }

    /// The number of sparse layers among `layers`.
    pub fn sparse_layers(&self, layers: std::ops::Range<usize>) -> usize {
        layers.filter(|&l| self.is_sparse_layer(l)).count()
    }

    /// How far back attention reaches: `sliding_window`, which Qwen configs set but use only
    /// with `use_sliding_window`.
    pub fn attention_window(&self) -> Option<usize> {
        match self.family() {
            Ok(MoeFamily::Qwen2Moe | MoeFamily::Qwen3Moe)
                if !self.flag("use_sliding_window", false).unwrap_or(false) =>
            {
                None
            }
            _ => self.sliding_window,
        }
    }

    /// A small random-model configuration: 4 experts, top-2.
    pub fn tiny() -> Self {
        Self {
            model_type: mixtral_model_type(),
            architectures: mixtral_architectures(),
            extra: serde_json::Map::new(),
            hidden_size: 64,
            intermediate_size: 128,
            vocab_size: 257,
            num_hidden_layers: 2,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            num_local_experts: 4,
            num_experts_per_tok: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            max_position_embeddings: 256,
            sliding_window: Some(256),
            router_aux_loss_coef: 0.02,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }

    pub fn check(&self) -> Result<()> {
        let family = self.family()?;
        if self.hidden_act != "silu" {
            bail!(
                "config: hidden_act {} is not supported (Mixtral, Qwen2-MoE and Qwen3-MoE use silu)",
                self.hidden_act
            )
        }
        if let Some(r) = self.extra.get("rope_parameters").filter(|r| !r.is_null()) {
            let kind = r
                .get("rope_type")
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                bail!("config: rope_parameters.rope_type {kind:?} is not implemented (only the default rotary embedding is): use a config without rope scaling")
            }
        }
        for key in [
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "decoder_sparse_step",
            "head_dim",
        ] {
            self.size(key)?;
        }
        self.flag("use_sliding_window", false)?;
        if family == MoeFamily::Qwen2Moe {
            self.flag("qkv_bias", true)?;
        }
        if family == MoeFamily::Qwen3Moe && self.flag("attention_bias", false)? {
            bail!("config: attention_bias is true, which puts a bias on o_proj too; this model reads biases on q_proj, k_proj and v_proj only (Qwen2-MoE's qkv_bias)")
        }
        if self.flag("use_sliding_window", false)? {
            bail!("config: use_sliding_window is true, which this model does not implement: set it to false")
        }
        if let Some(v) = self.extra.get("mlp_only_layers").filter(|v| !v.is_null()) {
            let ok = v
                .as_array()
                .is_some_and(|l| l.iter().all(|x| x.as_u64().is_some()));
            if !ok {
                bail!("config: mlp_only_layers is {v}, not a list of layer indices")
            }
        }
        if self.size("decoder_sparse_step")? == Some(0) {
            bail!("config: decoder_sparse_step is 0: use 1 for every layer sparse")
        }
        if self.sparse_layers(0..self.num_hidden_layers) == 0 {
            bail!("config: no layer is sparse (num_experts, decoder_sparse_step, mlp_only_layers): a dense model runs as Llama")
        }
        self.router_config()?;
        self.as_llama().check()
    }

    /// The MoE layers' router: Mixtral's, or DeepSeek-style where the config says so with
    /// DeepSeek-V3's keys (kept in [`MixtralConfig::extra`]): `scoring_func` (`softmax` or
    /// `sigmoid`), `topk_method` (`noaux_tc`: a selection bias balanced without an auxiliary
    /// loss, `e_score_correction_bias` per gate, updated after each step by
    /// `router_bias_update_rate`, 0.001 unless given), `n_group` / `topk_group`
    /// (group-limited routing), `routed_scaling_factor` and `norm_topk_prob`.
    pub fn router_config(&self) -> Result<RouterConfig> {
        let x = &self.extra;
        let text = |k: &str| x.get(k).and_then(|v| v.as_str());
        let number = |k: &str| -> Result<Option<f64>> {
            match x.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(n) => Ok(Some(n)),
                    None => bail!("config: {k} is {v}, not a number"),
                },
            }
        };
        let count = |k: &str| -> Result<Option<usize>> {
            match number(k)? {
                Some(n) if n >= 1.0 && n.fract() == 0.0 => Ok(Some(n as usize)),
                Some(n) => bail!("config: {k} is {n}, not a count of at least 1"),
                None => Ok(None),
            }
        };
        let mut r = RouterConfig::mixtral(self.num_local_experts, self.num_experts_per_tok);
        match text("scoring_func") {
            None | Some("softmax") => {}
            Some("sigmoid") => r.scoring = Scoring::Sigmoid,
            Some(other) => {
                bail!("config: scoring_func {other:?} is not supported: use softmax or sigmoid")
            }
        }
        // Groups count for the group-limited methods only, as in transformers.
        let grouped = match text("topk_method") {
            None | Some("greedy") => false,
            Some("group_limited_greedy") => {
                // DeepSeek-V2: a group scores its best expert.
                r.group_score_members = 1;
                true
            }
            Some("noaux_tc") => {
                r.expert_bias = true;
                r.bias_update_rate = number("router_bias_update_rate")?.unwrap_or(1e-3);
                true
            }
            Some(other) => bail!("config: topk_method {other:?} is not supported: use greedy, group_limited_greedy or noaux_tc"),
        };
        if let Some(g) = count("n_group")?.filter(|_| grouped) {
            r.n_group = g;
            r.topk_group = count("topk_group")?.unwrap_or(g);
        }
        if let Some(f) = number("routed_scaling_factor")? {
            r.routed_scaling_factor = f;
        }
        if let Some(v) = x.get("norm_topk_prob") {
            r.renormalize = v.as_bool().ok_or_else(|| {
                candle_core::Error::msg(format!("config: norm_topk_prob is {v}, not true or false"))
            })?;
        }
        r.check()
            .map_err(|e| candle_core::Error::msg(format!("config: {e}")))?;
        Ok(r)
    }

    /// For training: refuses Hugging Face Mixtral's load-balancing loss beside another router
    /// (that loss counts a softmax top-k choice over all experts, which a sigmoid, grouped or
    /// biased router does not make). Inference needs no such check.
    pub fn check_aux_loss(&self) -> Result<()> {
        let r = self.router_config()?;
        let mixtral_routing =
            r.scoring == Scoring::SoftmaxThenTopK && r.n_group == 1 && !r.expert_bias;
        if !mixtral_routing && self.router_aux_loss_coef != 0.0 {
            bail!(
                "config: router_aux_loss_coef {} adds Mixtral's load-balancing loss, which does not fit this config's routing (scoring_func / topk_method / n_group; DeepSeek-style routing balances by its selection bias): set router_aux_loss_coef to 0 (mixtral train: --aux-coef 0)",
                self.router_aux_loss_coef
            )
        }
        Ok(())
    }

    /// The attention part, as a Llama config.
    pub fn as_llama(&self) -> LlamaConfig {
        LlamaConfig {
            model_type: "llama".into(),
            architectures: vec!["LlamaForCausalLM".into()],
            extra: serde_json::Map::new(),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: Some(self.num_key_value_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta as f32,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.map(|e| serde_json::json!(e)),
            rope_scaling: None,
            head_dim: self.size("head_dim").ok().flatten(),
            qkv_bias: matches!(self.family(), Ok(MoeFamily::Qwen2Moe))
                && self.flag("qkv_bias", true).unwrap_or(true),
            qk_norm: matches!(self.family(), Ok(MoeFamily::Qwen3Moe)),
        }
    }
}
