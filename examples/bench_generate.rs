//! Decoding speed: tokens/s of one sequence, greedy, with a KV cache, for our Llama-style and
//! Mixtral-style models at tp = ep = 1 against candle-transformers' implementations on the same
//! random checkpoints, measured side by side (alternating runs) in one process.
//!
//! ```text
//! cargo run --release --example bench_generate
//! cargo run --release --example bench_generate -- --new-tokens 64 --reps 7
//! ```
//!
//! Each repetition decodes `--new-tokens` tokens after an 8-token prompt (the prompt's forward
//! pass is not timed); the table shows the median tokens/s over `--reps` repetitions and the
//! ratio ours / candle-transformers. Both produce the same tokens (checked).
use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::moe::Dispatch;
use candle_parallel::Launcher;
use candle_parallel_models::llama::{KvCache, Llama, LlamaConfig};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
use candle_parallel_models::testing::{write_random_llama, write_random_mixtral};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Decoding tokens/s: ours against candle-transformers")]
struct Args {
    /// Tokens decoded per repetition.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Repetitions of each model (alternating ours and candle-transformers'); medians shown.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where the random checkpoints are written (created once, reused).
    #[arg(long, default_value = "target/bench-generate")]
    dir: PathBuf,
}

const PROMPT: [u32; 8] = [1, 17, 99, 3, 200, 5, 42, 7];

fn llama_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 1024,
        intermediate_size: 2816,
        vocab_size: 8192,
        num_hidden_layers: 6,
        num_attention_heads: 16,
        num_key_value_heads: Some(4),
        max_position_embeddings: 512,
        ..LlamaConfig::tiny()
    }
}

fn mixtral_config() -> MixtralConfig {
    MixtralConfig {
        hidden_size: 512,
        intermediate_size: 1408,
        vocab_size: 8192,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        num_local_experts: 8,
        max_position_embeddings: 512,
        // candle-transformers' Mixtral needs a window; ours refuses positions past it.
        sliding_window: Some(512),
        ..MixtralConfig::tiny()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Greedy decoding with `step(input, pos) -> last position's logits`: (tokens, seconds of
/// the decoding after the prompt).
fn decode(
    n: usize,
    mut step: impl FnMut(&Tensor, usize) -> Result<Tensor>,
) -> Result<(Vec<u32>, f64)> {
    let logits = step(&Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?, 0)?;
    let mut next = logits.argmax(0)?.to_scalar::<u32>()?;
    let mut out = vec![next];
    let t = Instant::now();
    for i in 0..n - 1 {
        let logits = step(&Tensor::new(&[[next]], &Device::Cpu)?, PROMPT.len() + i)?;
        next = logits.argmax(0)?.to_scalar::<u32>()?;
        out.push(next);
    }
    Ok((out, t.elapsed().as_secs_f64()))
}

/// [`decode`] with our models: a fresh KV cache, the logits' last position.
fn decode_ours(
    n: usize,
    mut cache: KvCache,
    forward: impl Fn(&Tensor, usize, &mut KvCache) -> Result<Tensor>,
) -> Result<(Vec<u32>, f64)> {
    decode(n, |input, pos| {
        let l = forward(input, pos, &mut cache)?.squeeze(0)?;
        l.get(l.dim(0)? - 1)
    })
}

fn mmap(dir: &Path) -> Result<candle_nn::VarBuilder<'static>> {
    // SAFETY: the benchmark's own files, not modified while mapped.
    unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
}

/// Ours and candle-transformers' Llama: tokens/s of each repetition.
fn llama(dir: &Path, a: &Args) -> Result<(Vec<f64>, Vec<f64>)> {
    use candle_transformers::models::llama as ct;
    let cfg = llama_config();
    let text = candle_parallel::checkpoint::read_text(&dir.join("config.json"))?;
    let ct_cfg: ct::LlamaConfig = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
    let ct_cfg = ct_cfg.into_config(false);
    let theirs = ct::Llama::load(mmap(dir)?, &ct_cfg)?;
    let ours = Launcher::new(1).run(|ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?;
        Llama::new(&cfg, vb, ctx.comm())
    })?;
    let ours = &ours[0];
    race(
        "Llama",
        a,
        || {
            decode_ours(a.new_tokens, ours.new_cache(), |input, pos, cache| {
                ours.forward(input, pos, Some(cache))
            })
        },
        || {
            let mut cache = ct::Cache::new(true, DType::F32, &ct_cfg, &Device::Cpu)?;
            decode(a.new_tokens, |input, pos| {
                theirs.forward(input, pos, &mut cache)?.squeeze(0)
            })
        },
    )
}

/// `--reps` alternating runs of our decoding and candle-transformers': tokens/s of each, and
/// the same tokens from both.
fn race(
    name: &str,
    a: &Args,
    mut ours: impl FnMut() -> Result<(Vec<u32>, f64)>,
    mut theirs: impl FnMut() -> Result<(Vec<u32>, f64)>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut a_s, mut b_s) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        let (x, t) = ours()?;
        a_s.push((a.new_tokens - 1) as f64 / t);
        let (y, t) = theirs()?;
        b_s.push((a.new_tokens - 1) as f64 / t);
        if x != y {
            candle_core::bail!("{name}: our tokens {x:?} differ from candle-transformers' {y:?}");
        }
    }
    Ok((a_s, b_s))
}

/// Ours and candle-transformers' Mixtral: tokens/s of each repetition.
fn mixtral(dir: &Path, a: &Args) -> Result<(Vec<f64>, Vec<f64>)> {
    use candle_transformers::models::mixtral as ct;
    let cfg = mixtral_config();
    let mut json: serde_json::Value = serde_json::from_str(
        &candle_parallel::checkpoint::read_text(&dir.join("config.json"))?,
    )
    .map_err(candle_core::Error::wrap)?;
    json["use_flash_attn"] = serde_json::json!(false);
    let ct_cfg: ct::Config = serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
    let ours = Launcher::new(1).run(|ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?;
        Mixtral::new(&cfg, vb, ctx.comm(), ctx.comm(), Dispatch::AllReduce)
    })?;
    let ours = &ours[0];
    race(
        "Mixtral",
        a,
        || {
            decode_ours(a.new_tokens, ours.new_cache(), |input, pos, cache| {
                ours.forward(input, pos, Some(cache))
            })
        },
        || {
            // Its KV cache lives in the model: a fresh model per repetition.
            let mut theirs = ct::Model::new(&ct_cfg, mmap(dir)?)?;
            decode(a.new_tokens, |input, pos| {
                theirs.forward(input, pos)?.squeeze(0)?.squeeze(0)
            })
        },
    )
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.new_tokens < 2 || a.reps == 0 {
        candle_core::bail!("--new-tokens must be at least 2 and --reps at least 1");
    }
    let (ld, md) = (a.dir.join("llama"), a.dir.join("mixtral"));
    if !ld.join("model.safetensors").is_file() {
        write_random_llama(&ld, &llama_config(), 5)?;
    }
    if !md.join("model.safetensors").is_file() {
        write_random_mixtral(&md, &mixtral_config(), 5)?;
    }
    println!(
        "\none sequence, greedy, f32, {}-token prompt then {} tokens; median of {} repetitions\n",
        PROMPT.len(),
        a.new_tokens,
        a.reps
    );
    println!("| model | ours tok/s | candle-transformers tok/s | ours / theirs |");
    println!("|---|---:|---:|---:|");
    for (name, (ours, theirs)) in [
        ("Llama-style, 6 layers, hidden 1024", llama(&ld, &a)?),
        (
            "Mixtral-style, 4 layers, 8 experts top-2, hidden 512",
            mixtral(&md, &a)?,
        ),
    ] {
        let (o, t) = (median(ours), median(theirs));
        println!("| {name} | {o:.1} | {t:.1} | {:.2} |", o / t);
    }
    Ok(())
}
