//! LoRA (low-rank adapters) on the tensor-parallel layers: `y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ` with the
//! base weight `W` frozen and only `A` (`[r, in]`) and `B` (`[out, r]`) trained, sharded so that
//! no rank holds more than its share and the gradients equal the single-device ones.
//!
//! - **Column-parallel** (`W` split along its output): `A` replicated, `B` split like `W`'s
//!   output. Each rank's `B` slice sees only its output features, so `A`'s gradient is summed
//!   over the tp group (`copy_to_group` on `A`: one all-reduce of `[r, in]` in backward).
//! - **Row-parallel** (`W` split along its input): `A` split like `W`'s input; the rank's
//!   partial `x Aᵀ` is all-reduced once (`[tokens, r]`); `B` is split along its output and
//!   each rank adds its columns to its partial output, which the layer's own reduction (or the
//!   MoE layer's, for experts) then sums. `B`'s gradient is its output columns' only, with
//!   no further reduction.
//! - Key/value projections whose heads are replicated over tp: `B` is sliced and its gradient
//!   summed like the weight.
//!
//! Modules are chosen as PEFT's `target_modules`: a name matches when it equals a target or
//! ends with `.target` (`q_proj`, `w1`, `experts.0.w2`). Adapters are named as PEFT names them
//! (`...q_proj.lora_A.weight`); [`save_peft`] writes `adapter_config.json` and
//! `adapter_model.safetensors` as Python's `peft` reads them, and [`merge`] folds adapters into
//! base weights for an export.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_parallel::checkpoint::ParallelVarBuilder;
//! use candle_parallel::lora::{LoraBuilder, LoraConfig};
//! use candle_parallel::{launch, tensor_parallel::column_parallel_linear_no_bias};
//!
//! let names = launch(2, |ctx| {
//!     let cfg = LoraConfig { rank: 4, alpha: 8.0, target_modules: vec!["q_proj".into()] };
//!     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable().with_lora(cfg)?;
//!     let q = column_parallel_linear_no_bias(8, 8, vb.pp("attn.q_proj"), ctx.comm())?;
//!     let y = q.forward(&Tensor::ones((2, 8), DType::F32, &Device::Cpu)?)?;
//!     assert_eq!(y.dims(), &[2, 4]);
//!     Ok(vb.params().into_iter().map(|p| p.name).collect::<Vec<_>>())
//! })?;
//! // The base weight is frozen: only the adapters are parameters.
//! assert_eq!(names[0], ["attn.q_proj.lora_A.weight", "attn.q_proj.lora_B.weight"]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::checkpoint::{ParallelVarBuilder, Placement};
use crate::comm::Comm;
use crate::ops;
use candle_core::{bail, Result, Tensor, D};
use candle_nn::Init;
use std::collections::HashMap;
use std::path::Path;

/// PEFT's `LoraConfig`: rank, scaling numerator and the modules to adapt.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    /// The adapter's output is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Module names (or their last parts), e.g. `q_proj`, `v_proj`, `w1`, `w2`, `w3`.
    pub target_modules: Vec<String>,
}

/// The initialisation seed of LoRA adapters a checkpoint does not hold.
const LORA_SEED: u64 = 0x4C6F_5241;

/// LoRA's rule on a builder: only adapters are trained; an adapter a checkpoint lacks (a fresh
/// fine-tuning run over a base model) is initialised from its name.
impl crate::checkpoint::ParamPolicy for LoraConfig {
    fn trains(&self, name: &str) -> bool {
        is_adapter(name)
    }

    fn seed_if_missing(&self, name: &str) -> Option<u64> {
        is_adapter(name).then_some(LORA_SEED)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// LoRA on a [`ParallelVarBuilder`]: the builder knows no layers; this sets and reads its
/// LoRA configuration (as the builder's [`ParamPolicy`](crate::checkpoint::ParamPolicy)).
pub trait LoraBuilder: Sized {
    /// From now on, the linear layers this builder (or a clone) creates whose module names
    /// match `cfg` get LoRA adapters, and only the adapters are recorded as trainable
    /// parameters (the base weights are frozen: no gradients, no optimizer state). Call it
    /// before building the model; an error if the builder has a policy already.
    fn with_lora(self, cfg: LoraConfig) -> Result<Self>;
    /// The LoRA configuration, if any.
    fn lora(&self) -> Option<&LoraConfig>;
}

impl LoraBuilder for ParallelVarBuilder {
    fn with_lora(self, cfg: LoraConfig) -> Result<Self> {
        cfg.check()?;
        self.with_policy(Box::new(cfg))
    }

    fn lora(&self) -> Option<&LoraConfig> {
        self.policy()?.as_any().downcast_ref::<LoraConfig>()
    }
}

/// A Hugging Face model directory with the LoRA adapters a PEFT directory holds
/// (`adapter_model.safetensors`, as [`save_peft`] writes it, read under PEFT's names), and its
/// `adapter_config.json` as the builder's LoRA configuration: the adapted model, under any
/// layout. Make it trainable to go on training the adapters. Adapters for modules that
/// `target_modules` does not list are ignored with a warning naming them.
pub fn from_hf_dir_with_adapters(
    dir: &Path,
    adapters: &Path,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<ParallelVarBuilder> {
    let cfg = LoraConfig::from_peft_dir(adapters)?;
    let unlisted = unlisted_adapter_modules(adapters, &cfg)?;
    if !unlisted.is_empty() {
        tracing::warn!(
            dir = %adapters.display(),
            modules = ?unlisted,
            target_modules = ?cfg.target_modules,
            "adapters for modules that target_modules does not list are ignored (PEFT would not load them either): add their names to target_modules in adapter_config.json to use them"
        );
    }
    let mut files = crate::checkpoint::hf_safetensors_files(dir)?;
    files.push(adapters.join("adapter_model.safetensors"));
    let peft = |name: &str| is_adapter(name).then(|| peft_name(name));
    ParallelVarBuilder::from_safetensors_aliased(&files, dtype, device, peft)?.with_lora(cfg)
}

impl LoraConfig {
    pub(crate) fn check(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1")
        }
        if self.target_modules.is_empty() {
            bail!("LoRA needs at least one target module (e.g. q_proj, v_proj)")
        }
        Ok(())
    }

    /// Whether module `name` gets an adapter (PEFT's suffix match).
    pub fn matches(&self, name: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| name == t || name.ends_with(&format!(".{t}")))
    }

    /// The configuration in a PEFT adapter directory's `adapter_config.json`.
    pub fn from_peft_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: not JSON: {e}", path.display())))?;
        if v["peft_type"] != "LORA" {
            bail!(
                "{}: peft_type {} is not LORA",
                path.display(),
                v["peft_type"]
            )
        }
        // What this implementation does not do, refused rather than computed differently.
        let on = |k: &str| v.get(k).is_some_and(|x| x.as_bool() == Some(true));
        let nonempty = |k: &str| {
            v.get(k)
                .is_some_and(|x| !x.is_null() && x.as_object().is_none_or(|o| !o.is_empty()))
        };
        for (what, unsupported) in [
            ("use_rslora", on("use_rslora")),
            ("use_dora", on("use_dora")),
            ("fan_in_fan_out", on("fan_in_fan_out")),
            ("rank_pattern", nonempty("rank_pattern")),
            ("alpha_pattern", nonempty("alpha_pattern")),
            ("modules_to_save", nonempty("modules_to_save")),
        ] {
            if unsupported {
                bail!(
                    "{}: {what} is not supported (plain LoRA adapters only)",
                    path.display()
                )
            }
        }
        let targets = match &v["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
            other => bail!(
                "{}: target_modules {other} is not a list of module names (a regex or \"all-linear\" is not supported)",
                path.display()
            ),
        };
        let cfg = Self {
            rank: v["r"].as_u64().unwrap_or(0) as usize,
            alpha: v["lora_alpha"].as_f64().unwrap_or(8.0),
            target_modules: targets,
        };
        cfg.check()
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Whether a parameter name is a LoRA adapter's.
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// Which parallel layer an adapter sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Column,
    Row,
}

/// One layer's adapter: this rank's slices of `A` and `B`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    tp: Comm,
    /// Row-parallel only: the first output column this rank's `B` slice adds to.
    out: usize,
    /// Key/value heads replicated over these ranks: `B`'s gradient is summed over them.
    b_group: Option<Comm>,
}

/// The adapter of the layer `vb` builds, if its LoRA configuration names it: `A` and `B`
/// read from the checkpoint when it has them, else initialised as PEFT does (`A` uniform in
/// ±1/√in, `B` zeros, so the adapted layer starts equal to the base). `b_shard` is how `B`'s
/// rows are held (the weight's output placement for a column-parallel layer).
pub(crate) fn adapter(
    vb: &ParallelVarBuilder,
    in_dim: usize,
    out_dim: usize,
    kind: Kind,
    b_shard: Placement,
    b_group: Option<Comm>,
    tp: &Comm,
) -> Result<Option<LoraAdapter>> {
    let Some(cfg) = LoraBuilder::lora(vb) else {
        return Ok(None);
    };
    if !cfg.matches(&vb.path()) {
        return Ok(None);
    }
    let r = cfg.rank;
    let bound = 1.0 / (in_dim as f64).sqrt();
    let a_shard = match kind {
        Kind::Column => Placement::Replicated,
        Kind::Row => Placement::split_over(1, tp),
    };
    let b_shard = match kind {
        Kind::Column => b_shard,
        Kind::Row => Placement::split_over(0, tp),
    };
    if kind == Kind::Row && !out_dim.is_multiple_of(tp.size()) {
        bail!(
            "LoRA on {}: its output {out_dim} is not divisible by the tensor-parallel size {}",
            vb.path(),
            tp.size()
        )
    }
    let a = vb.pp("lora_A").get(
        (r, in_dim),
        "weight",
        a_shard,
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb
        .pp("lora_B")
        .get((out_dim, r), "weight", b_shard, Init::Const(0.0))?;
    let start = match kind {
        Kind::Row => tp.rank() * out_dim / tp.size(),
        Kind::Column => 0,
    };
    Ok(Some(LoraAdapter {
        a,
        b,
        scale: cfg.scale(),
        tp: tp.clone(),
        out: start,
        b_group,
    }))
}

impl LoraAdapter {
    /// This rank's `A` slice.
    pub fn a(&self) -> &Tensor {
        &self.a
    }

    /// This rank's `B` slice.
    pub fn b(&self) -> &Tensor {
        &self.b
    }

    /// This adapter with `a` and `b` in place of its `A` and `B` (same shapes).
    pub(crate) fn with_weights(&self, a: &Tensor, b: &Tensor) -> Self {
        Self {
            a: a.clone(),
            b: b.clone(),
            ..self.clone()
        }
    }

    /// The adapter's contribution to a column-parallel layer's output slice, from the layer's
    /// (replicated) input.
    pub(crate) fn column(&self, x: &Tensor) -> Result<Tensor> {
        // Each rank's B slice sees its own outputs only: A's gradient is summed over tp.
        let a = ops::copy_to_group(&self.a, &self.tp)?;
        let b = match &self.b_group {
            Some(g) => ops::copy_to_group(&self.b, g)?,
            None => self.b.clone(),
        };
        ops::linear(&ops::linear(x, &a)?, &b)? * self.scale
    }

    /// The adapter's contribution to a row-parallel layer's partial output (before the
    /// reduction over tp), from the rank's input slice: this rank's output columns, zeros
    /// elsewhere.
    pub(crate) fn row(&self, x: &Tensor, out_dim: usize) -> Result<Tensor> {
        let u = ops::reduce_from_group(&ops::linear(x, &self.a)?, &self.tp)?;
        // Each rank uses u with its own B columns: u's gradient is summed over tp.
        let u = ops::copy_to_group(&u, &self.tp)?;
        let y = (ops::linear(&u, &self.b)? * self.scale)?;
        let n = self.b.dim(0)?;
        y.pad_with_zeros(D::Minus1, self.out, out_dim - self.out - n)
    }
}

/// The modules whose adapters the PEFT directory `dir` holds (in `adapter_model.safetensors`)
/// but its `target_modules` (in `cfg`) does not list: adapters nothing loads (PEFT would not
/// inject them either). Reads the file's header only.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_parallel::lora::{save_peft, unlisted_adapter_modules, LoraConfig};
/// use std::collections::HashMap;
///
/// let dir = std::env::temp_dir().join(format!("cp-unlisted-{}", std::process::id()));
/// let t = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let adapters: HashMap<String, Tensor> = ["q_proj", "v_proj"]
///     .iter()
///     .flat_map(|m| ["lora_A", "lora_B"].map(|ab| (format!("model.layers.0.self_attn.{m}.{ab}.weight"), t.clone())))
///     .collect();
/// let all = LoraConfig { rank: 2, alpha: 4.0, target_modules: vec!["q_proj".into(), "v_proj".into()] };
/// save_peft(&dir, &all, &adapters, "base")?;
/// let only_q = LoraConfig { target_modules: vec!["q_proj".into()], ..all };
/// assert_eq!(unlisted_adapter_modules(&dir, &only_q)?, ["model.layers.0.self_attn.v_proj"]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn unlisted_adapter_modules(dir: &Path, cfg: &LoraConfig) -> Result<Vec<String>> {
    let header = crate::checkpoint::safetensors_header(&dir.join("adapter_model.safetensors"))?;
    let mut out: Vec<String> = header
        .keys()
        .filter(|k| is_adapter(k))
        .filter_map(|k| {
            let module = k.strip_prefix("base_model.model.").unwrap_or(k);
            let module = &module[..module.find(".lora_")?];
            (!cfg.matches(module)).then(|| module.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// PEFT's tensor name for one of our adapter parameters.
pub fn peft_name(name: &str) -> String {
    format!("base_model.model.{name}")
}

/// Writes `adapters` (full-shape tensors under our parameter names, e.g. gathered from every
/// rank) as Python's `peft` saves a LoRA adapter: `adapter_model.safetensors` (PEFT's names)
/// and `adapter_config.json`, into `dir`, atomically.
pub fn save_peft(
    dir: &Path,
    cfg: &LoraConfig,
    adapters: &HashMap<String, Tensor>,
    base_model: &str,
) -> Result<()> {
    crate::checkpoint::create_dir(dir)?;
    let named: HashMap<String, Tensor> = adapters
        .iter()
        .map(|(n, t)| (peft_name(n), t.clone()))
        .collect();
    let bytes = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| candle_core::Error::msg(format!("serialising the adapters: {e}")))?;
    crate::checkpoint::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": null,
    });
    crate::checkpoint::write_atomic(
        &dir.join("adapter_config.json"),
        &serde_json::to_vec_pretty(&config).map_err(candle_core::Error::wrap)?,
    )
}

/// Folds adapters into base weights: `W + (α/r)·B A` for every module with both adapter
/// tensors in `adapters` (full shapes, our names); returns how many weights changed.
pub fn merge(
    weights: &mut HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    cfg: &LoraConfig,
) -> Result<usize> {
    let mut merged = 0;
    for module in adapted_modules(adapters)? {
        let key = format!("{module}.weight");
        let Some(w) = weights.get(&key) else {
            bail!("LoRA merge: no base weight {key} for the adapter")
        };
        let new = merge_weight(&key, w, adapters, cfg)?;
        weights.insert(key, new);
        merged += 1;
    }
    Ok(merged)
}

/// The modules `adapters` adapts (each with its `lora_A` and `lora_B`), in name order.
pub fn adapted_modules(adapters: &HashMap<String, Tensor>) -> Result<Vec<String>> {
    let mut modules = Vec::new();
    for name in adapters.keys().filter(|n| n.ends_with(".lora_A.weight")) {
        let module = name.trim_end_matches(".lora_A.weight");
        if !adapters.contains_key(&format!("{module}.lora_B.weight")) {
            bail!("LoRA merge: {module} has lora_A but no lora_B")
        }
        modules.push(module.to_string());
    }
    modules.sort();
    Ok(modules)
}

/// Base weight `name` with its adapter folded in (`W + (α/r)·B A`, in `W`'s dtype), or `W`
/// itself where no adapter targets it: one weight at a time, for writing a merged model
/// tensor by tensor.
pub fn merge_weight(
    name: &str,
    w: &Tensor,
    adapters: &HashMap<String, Tensor>,
    cfg: &LoraConfig,
) -> Result<Tensor> {
    let Some(module) = name.strip_suffix(".weight") else {
        return Ok(w.clone());
    };
    let (Some(a), Some(b)) = (
        adapters.get(&format!("{module}.lora_A.weight")),
        adapters.get(&format!("{module}.lora_B.weight")),
    ) else {
        return Ok(w.clone());
    };
    let delta = (b.matmul(a)? * cfg.scale())?.to_dtype(w.dtype())?;
    w + delta
}

#[cfg(test)]
mod tests {
    use super::LoraConfig;

    /// PEFT configurations this implementation would compute differently are refused.
    #[test]
    fn unsupported_peft_configs_are_refused() {
        let dir = std::env::temp_dir().join(format!("cp-lora-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |v: serde_json::Value| {
            std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
            LoraConfig::from_peft_dir(&dir)
        };
        let base = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
        let cfg = write(base.clone()).unwrap();
        assert_eq!((cfg.rank, cfg.alpha, cfg.target_modules.len()), (4, 8.0, 1));
        for (k, v, msg) in [
            (
                "use_rslora",
                serde_json::json!(true),
                "use_rslora is not supported",
            ),
            (
                "use_dora",
                serde_json::json!(true),
                "use_dora is not supported",
            ),
            (
                "target_modules",
                serde_json::json!("all-linear"),
                "is not a list of module names",
            ),
            (
                "modules_to_save",
                serde_json::json!(["lm_head"]),
                "modules_to_save is not supported",
            ),
        ] {
            let mut c = base.clone();
            c[k] = v;
            let e = write(c).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
