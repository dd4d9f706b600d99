//! The tensor-parallel Llama-style model on CPU ranks.
//!
//! ```text
//! cargo run --release --example llama -- eval --tokens 1,2,3 --tp 2 --out out.safetensors --grads
//! cargo run --release --example llama -- eval --model DIR --tokens 1,2,3 --tp 2 --out out.safetensors
//! ```
//!
//! `eval` writes a safetensors file with `logits` (`[T, vocab]`, gathered over the tp group),
//! `loss` (next-token cross-entropy over the tokens) and, with `--grads`, the gradient of
//! `loss` for every parameter under its Hugging Face name at its full (unsharded) shape.
//! `DIR` holds `config.json` and `model.safetensors` (or an index and several files); without
//! `--model`, a small random model is created on the fly.
use candle_core::{DType, Result, Tensor};
use candle_parallel::checkpoint::{full_gradients, ParallelVarBuilder};
use candle_parallel::Launcher;
use candle_parallel_models::llama::{Llama, LlamaConfig};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Tensor-parallel Llama-style model")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Logits, loss and (optionally) full-shape gradients for one token sequence.
    Eval {
        /// Hugging Face model directory (config.json + safetensors); default: a small random model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Token ids, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
        tokens: Vec<u32>,
        /// Tensor-parallel size (ranks run as threads).
        #[arg(long, default_value_t = 2)]
        tp: usize,
        /// Output safetensors file.
        #[arg(long, default_value = "out.safetensors")]
        out: PathBuf,
        /// Also write the gradient of the loss for every parameter.
        #[arg(long)]
        grads: bool,
        /// Seed of the random model (without --model).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let Command::Eval {
        model,
        tokens,
        tp,
        out,
        grads,
        seed,
    } = Args::parse().command;
    let cfg = match &model {
        Some(dir) => LlamaConfig::from_file(&dir.join("config.json"))?,
        None => LlamaConfig::tiny(),
    };
    if tokens.is_empty() {
        candle_core::bail!("--tokens needs at least one token id");
    }
    let results = Launcher::new(tp).run(|ctx| {
        let vb = match &model {
            Some(dir) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            None => ParallelVarBuilder::from_init(seed, DType::F32, ctx.device()),
        };
        let vb = if grads { vb.trainable() } else { vb };
        let llama = Llama::new(&cfg, vb.clone(), ctx.comm())?;
        let ids = Tensor::new(tokens.as_slice(), ctx.device())?.unsqueeze(0)?;
        let logits = llama.forward(&ids, 0, None)?.squeeze(0)?;
        let mut tensors = vec![("logits".to_string(), logits)];
        if tokens.len() >= 2 {
            let loss = llama.loss(&ids)?;
            if grads {
                let g = loss.backward()?;
                tensors.extend(full_gradients(&vb.params(), &g, ctx.comm())?);
            }
            tensors.push(("loss".to_string(), loss.detach()));
        } else {
            tracing::warn!("one token: no next-token loss (and no gradients) to compute");
        }
        tracing::info!(read_bytes = vb.bytes_read(), "done");
        Ok(tensors)
    })?;
    // Every rank holds the same gathered results; rank 0's are written.
    if !candle_parallel::launch::process::is_lead()? {
        return Ok(()); // in a multi-process job, rank 0's process writes and reports
    }
    let tensors: HashMap<String, Tensor> =
        results.into_iter().next().unwrap().into_iter().collect();
    candle_core::safetensors::save(&tensors, &out)?;
    let loss = tensors
        .get("loss")
        .map(|l| l.to_scalar::<f32>())
        .transpose()?;
    println!(
        "tp={tp}: logits {:?}, loss {}, {} gradients -> {}",
        tensors["logits"].dims(),
        loss.map_or("n/a".to_string(), |l| format!("{l:.6}")),
        tensors.len() - 1 - usize::from(loss.is_some()),
        out.display()
    );
    Ok(())
}
