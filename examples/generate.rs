//! Text generation with the tensor-parallel Llama-style model, streaming tokens as they come.
//!
//! ```text
//! cargo run --release --example generate -- --prompt "Hello"        # random model, byte tokenizer
//! cargo run --release --example generate -- --model DIR --tp 2 --prompt "The capital of France is"
//! cargo run --release --example generate -- --model DIR --temperature 0.8 --seed 3 --prompt "..."
//! ```
//!
//! `DIR` holds `config.json`, the safetensors weights and `tokenizer.json`. Without `--model`,
//! a small random model and a byte-level tokenizer (built with the `tokenizers` crate) are
//! created on the fly: the text is noise, but every step of the pipeline runs. Decoding is
//! greedy (`--temperature 0`, the default) or sampled; every rank samples with the same seed
//! from the same gathered logits, so the ranks stay in step, and rank 0 prints.
use candle_core::{DType, Result, Tensor};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::Launcher;
use candle_parallel_models::llama::{Llama, LlamaConfig};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use tokenizers::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "Generate text with the tensor-parallel Llama-style model")]
struct Args {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel size (ranks run as threads).
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// The text to continue.
    #[arg(long, default_value = "Once upon a time")]
    prompt: String,
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
fn eos_ids(cfg: &LlamaConfig) -> Vec<u32> {
    match &cfg.eos_token_id {
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

fn choose(logits: &Tensor, temperature: f64, rng: &mut Rng) -> Result<u32> {
    let logits = logits.to_dtype(DType::F32)?;
    if temperature <= 0.0 {
        return logits.argmax(0)?.to_scalar::<u32>();
    }
    let probs = candle_nn::ops::softmax_last_dim(&(logits / temperature)?)?.to_vec1::<f32>()?;
    let mut u = rng.next_f64() as f32;
    for (i, p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(probs.len() as u32 - 1)
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let a = Args::parse();
    let err = |e: tokenizers::Error| candle_core::Error::msg(format!("tokenizer: {e}"));
    let (cfg, tokenizer, eos) = match &a.model {
        Some(dir) => {
            let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
            let tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(err)?;
            let eos = eos_ids(&cfg);
            (cfg, tok, eos)
        }
        None => {
            let tok = candle_parallel_models::tokenizer::byte_tokenizer()?;
            (LlamaConfig::tiny(), tok, vec![256])
        }
    };
    let prompt: Vec<u32> = tokenizer
        .encode(a.prompt.as_str(), true)
        .map_err(err)?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        candle_core::bail!("the prompt encodes to no tokens");
    }
    if prompt.len() + a.max_tokens > cfg.max_position_embeddings {
        candle_core::bail!(
            "prompt ({} tokens) + --max-tokens {} exceed the model's {} positions",
            prompt.len(),
            a.max_tokens,
            cfg.max_position_embeddings
        );
    }
    print!("{}", a.prompt);
    std::io::stdout().flush()?;
    let out = Launcher::new(a.tp).run(|ctx| {
        let vb = match &a.model {
            Some(dir) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            None => ParallelVarBuilder::from_init(a.seed, DType::F32, ctx.device()),
        };
        let model = Llama::new(&cfg, vb, ctx.comm())?;
        let mut cache = model.new_cache();
        let mut rng = Rng(a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut ids = prompt.clone();
        let mut input = Tensor::new(prompt.as_slice(), ctx.device())?.unsqueeze(0)?;
        let mut printed = tokenizer.decode(&ids, true).map_err(err)?.len();
        for _ in 0..a.max_tokens {
            let pos = cache.len();
            let logits = model.forward(&input, pos, Some(&mut cache))?.squeeze(0)?;
            let next = choose(&logits.get(logits.dim(0)? - 1)?, a.temperature, &mut rng)?;
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
        Ok(ids.len() - prompt.len())
    })?;
    if candle_parallel::launch::process::is_lead()? {
        println!("\n[{} tokens generated at tp={}]", out[0], a.tp);
    }
    Ok(())
}
