//! Text generation with the Llama-style (tensor-parallel) or Mixtral-style (expert × tensor
//! parallel) model, streaming tokens as they come, with a KV cache.
//!
//! ```text
//! cargo run --release --example generate -- --prompt "Hello"        # random model, byte tokenizer
//! cargo run --release --example generate -- --model DIR --tp 2 --prompt "The capital of France is"
//! cargo run --release --example generate -- --model DIR --temperature 0.8 --top-p 0.9 --seed 3 --prompt "..."
//! cargo run --release --example generate -- --checkpoint runs/step-000300 --ep 2 --tp 2 --prompt "3 + 4 ="
//! cargo run --release --example generate -- --model BASE --adapters runs/adapters --prompt "3 + 4 ="
//! ```
//!
//! `DIR` holds `config.json`, the safetensors weights and `tokenizer.json`; `--checkpoint`
//! reads a distributed checkpoint directory instead (its config and the tokenizer that
//! travelled with it), saved under any layout. A config with `model_type: mixtral` (or
//! experts) gets the Mixtral-style model. Without either, a small random Llama-style model and
//! a byte-level tokenizer (built with the `tokenizers` crate) are created on the fly: the text
//! is noise, but every step of the pipeline runs. Decoding is greedy (`--temperature 0`, the
//! default) or sampled, with nucleus (`--top-p`) filtering; every rank samples with the same
//! seed from the same gathered logits, so the ranks stay in step, and rank 0 prints.
use candle_core::{DType, Result, Tensor};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::moe::Dispatch;
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::chat::{ChatTemplate, Message};
use candle_parallel_models::llama::{KvCache, Llama, LlamaConfig};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig, MoeFamily};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use tokenizers::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "Generate text with the Llama-style or Mixtral-style model")]
struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, conflicts_with = "checkpoint")]
    model: Option<PathBuf>,
    /// A distributed checkpoint directory (as finetune_mixtral saves), any layout.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// LoRA adapters in PEFT's format (adapter_config.json, adapter_model.safetensors) to
    /// apply to --model (as finetune_mixtral --lora-rank writes them), under any layout.
    #[arg(long, requires = "model")]
    adapters: Option<PathBuf>,
    /// Tensor-parallel size (ranks run as threads).
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Expert-parallel size for a Mixtral-style model (the world is ep × tp ranks).
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Nucleus sampling: sample from the most likely tokens whose probabilities add up to
    /// this (1: all); with --temperature > 0.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Also write the prompt and generated token ids to this JSON file.
    #[arg(long)]
    ids_out: Option<PathBuf>,
    /// The text to continue (with --chat: the user's message).
    #[arg(long, default_value = "Once upon a time")]
    prompt: String,
    /// Treat --prompt as a user's turn of a conversation, rendered with the model's chat
    /// template (its tokenizer_config.json's `chat_template`, as transformers'
    /// `apply_chat_template(..., add_generation_prompt=True)`), and answer it.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system turn before the user's.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: this Jinja template (or tokenizer_config.json holding one) instead of the
    /// model's.
    #[arg(long, requires = "chat")]
    chat_template: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 for greedy decoding; otherwise softmax sampling at this temperature.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The end-of-sequence ids of a config (`eos_token_id` may be one id or a list).
fn eos_ids(json: &serde_json::Value) -> Vec<u32> {
    match json.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// xorshift64*: a tiny deterministic generator, identical on every rank.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn choose(logits: &Tensor, temperature: f64, top_p: f64, rng: &mut Rng) -> Result<u32> {
    let logits = logits.to_dtype(DType::F32)?;
    if temperature <= 0.0 {
        return logits.argmax(0)?.to_scalar::<u32>();
    }
    let probs = candle_nn::ops::softmax_last_dim(&(logits / temperature)?)?.to_vec1::<f32>()?;
    // The smallest set of most likely tokens whose probabilities reach top_p (ties broken by
    // id, so every rank keeps the same set).
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut kept = 0;
    let mut mass = 0f32;
    for &i in &order {
        kept += 1;
        mass += probs[i];
        if mass as f64 >= top_p {
            break;
        }
    }
    let mut u = rng.next_f64() as f32 * mass;
    for &i in &order[..kept] {
        u -= probs[i];
        if u <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(order[kept - 1] as u32)
}

/// The model, whichever architecture the config names.
enum Model {
    Llama(Box<Llama>),
    Mixtral(Box<Mixtral>),
}

impl Model {
    fn new_cache(&self) -> KvCache {
        match self {
            Model::Llama(m) => m.new_cache(),
            Model::Mixtral(m) => m.new_cache(),
        }
    }

    fn forward(&self, ids: &Tensor, pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Model::Llama(m) => m.forward(ids, pos, Some(cache)),
            Model::Mixtral(m) => m.forward(ids, pos, Some(cache)),
        }
    }
}

/// A config's architecture, as the model loads it.
enum Config {
    Llama(LlamaConfig),
    Mixtral(MixtralConfig),
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let a = Args::parse();
    let err = |e: tokenizers::Error| candle_core::Error::msg(format!("tokenizer: {e}"));
    // The config (JSON), the tokenizer, and where the weights are.
    let (json, tokenizer) = match (&a.model, &a.checkpoint) {
        (Some(dir), _) | (None, Some(dir)) => {
            let json: serde_json::Value = match &a.checkpoint {
                Some(_) => candle_parallel::checkpoint::read_metadata(dir)?.config,
                None => serde_json::from_str(&candle_parallel::checkpoint::read_text(
                    &dir.join("config.json"),
                )?)
                .map_err(|e| {
                    candle_core::Error::msg(format!("{}: {e}", dir.join("config.json").display()))
                })?,
            };
            let tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
                candle_core::Error::msg(format!(
                    "{}: cannot load tokenizer.json: {e}",
                    dir.display()
                ))
            })?;
            (json, tok)
        }
        (None, None) => {
            let tok = candle_parallel_models::tokenizer::byte_tokenizer()?;
            let mut json =
                serde_json::to_value(LlamaConfig::tiny()).map_err(candle_core::Error::wrap)?;
            json["eos_token_id"] = serde_json::json!(256);
            (json, tok)
        }
    };
    let eos = eos_ids(&json);
    let parse = |what: &str, e: serde_json::Error| {
        candle_core::Error::msg(format!("the {what} config: {e}"))
    };
    // Mixtral and the Qwen MoE families run as the sparse MoE model.
    let sparse = json
        .get("model_type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| MoeFamily::of(t).is_ok())
        || json.get("num_local_experts").is_some();
    let cfg = if sparse {
        Config::Mixtral(MixtralConfig::from_json(json.clone())?)
    } else {
        let c: LlamaConfig = serde_json::from_value(json.clone()).map_err(|e| parse("Llama", e))?;
        c.check()?;
        Config::Llama(c)
    };
    let max_positions = match &cfg {
        Config::Llama(c) => c.max_position_embeddings,
        Config::Mixtral(c) => c.max_position_embeddings,
    };
    if a.ep == 0 || a.tp == 0 {
        candle_core::bail!("--ep and --tp must be at least 1");
    }
    if a.ep > 1 && !sparse {
        candle_core::bail!(
            "--ep {}: the Llama-style model has no experts; use --ep 1",
            a.ep
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        candle_core::bail!("--top-p {} must be in (0, 1]", a.top_p);
    }
    // With --chat, the conversation as the template renders it, its special tokens written
    // out in the text (none added, as apply_chat_template tokenizes).
    let (text, add_special) = if a.chat {
        let dir = match (&a.model, &a.checkpoint) {
            (Some(d), _) | (None, Some(d)) => d.clone(),
            (None, None) => candle_core::bail!(
                "--chat needs --model or --checkpoint (a model with a chat template)"
            ),
        };
        let template = ChatTemplate::from_model(&dir, a.chat_template.as_deref())?;
        let mut turns = Vec::new();
        if let Some(s) = &a.system {
            turns.push(Message::new("system", s));
        }
        turns.push(Message::new("user", &a.prompt));
        (template.render(&turns, true)?, false)
    } else {
        (a.prompt.clone(), true)
    };
    let prompt: Vec<u32> = tokenizer
        .encode(text.as_str(), add_special)
        .map_err(err)?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        candle_core::bail!("the prompt encodes to no tokens");
    }
    if prompt.len() + a.max_tokens > max_positions {
        candle_core::bail!(
            "prompt ({} tokens) + --max-tokens {} exceed the model's {max_positions} positions",
            prompt.len(),
            a.max_tokens
        );
    }
    print!("{text}");
    std::io::stdout().flush()?;
    let mesh = MeshShape::new().ep(a.ep).tp(a.tp);
    let out = Launcher::new(a.ep * a.tp).mesh(mesh).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = match (&a.model, &a.checkpoint) {
            (Some(dir), _) => match &a.adapters {
                Some(ad) => candle_parallel::lora::from_hf_dir_with_adapters(
                    dir,
                    ad,
                    DType::F32,
                    ctx.device(),
                )?,
                None => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            },
            (None, Some(dir)) => {
                ParallelVarBuilder::from_checkpoint(dir, DType::F32, ctx.device())?
            }
            (None, None) => ParallelVarBuilder::from_init(a.seed, DType::F32, ctx.device()),
        };
        let model = match &cfg {
            Config::Llama(c) => Model::Llama(Box::new(Llama::new(c, vb, mesh.tp())?)),
            // One sequence: the ep ranks share its tokens.
            Config::Mixtral(c) => Model::Mixtral(Box::new(Mixtral::new(
                c,
                vb,
                mesh.ep(),
                mesh.tp(),
                Dispatch::AllReduce,
            )?)),
        };
        let mut cache = model.new_cache();
        let mut rng = Rng(a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut ids = prompt.clone();
        let mut input = Tensor::new(prompt.as_slice(), ctx.device())?.unsqueeze(0)?;
        let mut printed = tokenizer.decode(&ids, true).map_err(err)?.len();
        for _ in 0..a.max_tokens {
            let pos = cache.len();
            let logits = model.forward(&input, pos, &mut cache)?.squeeze(0)?;
            let next = choose(
                &logits.get(logits.dim(0)? - 1)?,
                a.temperature,
                a.top_p,
                &mut rng,
            )?;
            if eos.contains(&next) {
                break;
            }
            ids.push(next);
            if ctx.rank() == 0 {
                // Decode everything and print what is new, so multi-byte characters come out whole.
                let text = tokenizer.decode(&ids, true).map_err(err)?;
                if text.len() > printed && text.is_char_boundary(printed) {
                    print!("{}", &text[printed..]);
                    std::io::stdout().flush()?;
                    printed = text.len();
                }
            }
            input = Tensor::new(&[next], ctx.device())?.unsqueeze(0)?;
        }
        Ok(ids)
    })?;
    if candle_parallel::launch::process::is_lead()? {
        let ids = &out[0];
        println!(
            "\n[{} tokens generated at ep={} tp={}]",
            ids.len() - prompt.len(),
            a.ep,
            a.tp
        );
        if let Some(path) = &a.ids_out {
            let json = serde_json::json!({ "prompt": prompt, "generated": ids[prompt.len()..] });
            candle_parallel::checkpoint::write_file(path, json.to_string())?;
        }
    }
    Ok(())
}
