//! The tensor-parallel Llama-style model on CPU ranks.
//!
//! ```text
//! cargo run --release --example llama -- eval --tokens 1,2,3 --tp 2 --out out.safetensors --grads
//! cargo run --release --example llama -- eval --model DIR --tokens 1,2,3 --tp 2 --out out.safetensors
//! cargo run --release --example llama -- eval --tokens 1,2,3 --tp 2 --pp 2 --out out.safetensors --grads
//! ```
//!
//! With `--pp P` the layers are split into P pipeline stages (uneven splits allowed), each
//! rank building and reading only its stage's layers; the output is the same.
//!
//! `eval` writes a safetensors file with `logits` (`[T, vocab]`, gathered over the tp group),
//! `loss` (next-token cross-entropy over the tokens) and, with `--grads`, the gradient of
//! `loss` for every parameter under its Hugging Face name at its full (unsharded) shape.
//! `DIR` holds `config.json` and `model.safetensors` (or an index and several files); without
//! `--model`, a small random model is created on the fly.
use candle_core::{DType, Result, Shape, Tensor};
use candle_parallel::checkpoint::{full_gradients_of, ParallelVarBuilder};
use candle_parallel::pipeline::{run_step, split_layers, Schedule};
use candle_parallel::{Launcher, MeshShape};
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
        /// Pipeline stages (the world is pp × tp ranks).
        #[arg(long, default_value_t = 1)]
        pp: usize,
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
        pp,
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
    let stages = split_layers(cfg.num_hidden_layers, pp)?;
    let t = tokens.len();
    let results = Launcher::new(pp * tp)
        .mesh(MeshShape::new().pp(pp).tp(tp))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let (pp_comm, tp_comm) = (mesh.pp(), mesh.tp());
            let vb = match &model {
                Some(dir) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
                None => ParallelVarBuilder::from_init(seed, DType::F32, ctx.device()),
            };
            let vb = if grads { vb.trainable() } else { vb };
            let stage = pp_comm.rank();
            let llama = Llama::new_stage(&cfg, vb.clone(), tp_comm, stages[stage].clone())?;
            let ids = Tensor::new(tokens.as_slice(), ctx.device())?.unsqueeze(0)?;
            if t < 2 {
                tracing::warn!("one token: no next-token loss (and no gradients) to compute");
            }
            // One micro-batch through the stages; the last one keeps the logits and the loss.
            let logits = std::sync::Mutex::new(None);
            let params = vb.params();
            let vars: Vec<_> = params.iter().map(|p| p.var.clone()).collect();
            let out = run_step(
                pp_comm,
                &Schedule::gpipe(pp, 1)?,
                &[&llama],
                &vars,
                std::slice::from_ref(&ids),
                (&Shape::from((1, t, cfg.hidden_size)), DType::F32),
                &|_, y| {
                    *logits.lock().unwrap() = Some(llama.gather_logits(y)?.squeeze(0)?);
                    if t < 2 {
                        return y.sum_all()?.affine(0.0, 0.0); // nothing to learn from
                    }
                    llama.loss_of_logits(y, &ids)
                },
            )?;
            // Rank 0 writes: the last stage (its tp rank 0) broadcasts the logits...
            let root = (pp - 1) * tp;
            let mine = logits.into_inner().unwrap();
            let logits = ctx.comm().broadcast(
                &mine.unwrap_or(Tensor::zeros(
                    (t, cfg.vocab_size),
                    DType::F32,
                    ctx.device(),
                )?),
                root,
            )?;
            let mut tensors = vec![("logits".to_string(), logits)];
            if t >= 2 {
                if grads {
                    // ...and every stage's tp rank 0 its full-shape gradients.
                    let full = full_gradients_of(&params, &out.grads, tp_comm)?;
                    let bytes = if tp_comm.rank() == 0 {
                        safetensors::serialize(
                            full.iter()
                                .map(|(n, g)| (n.clone(), g.clone()))
                                .collect::<HashMap<_, _>>(),
                            None,
                        )
                        .map_err(candle_core::Error::wrap)?
                    } else {
                        Vec::new()
                    };
                    for part in ctx.comm().all_gather_bytes(&bytes)? {
                        if part.is_empty() {
                            continue;
                        }
                        let loaded = candle_core::safetensors::load_buffer(&part, ctx.device())?;
                        for (name, g) in loaded {
                            // A tied embedding lives on the first and the last stage: its
                            // gradient is the sum of both.
                            match tensors.iter_mut().find(|(n, _)| *n == name) {
                                Some((_, acc)) => *acc = (&*acc + g)?,
                                None => tensors.push((name, g)),
                            }
                        }
                    }
                }
                tensors.push(("loss".to_string(), Tensor::new(out.loss, ctx.device())?));
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
        "tp={tp} pp={pp}: logits {:?}, loss {}, {} gradients -> {}",
        tensors["logits"].dims(),
        loss.map_or("n/a".to_string(), |l| format!("{l:.6}")),
        tensors.len() - 1 - usize::from(loss.is_some()),
        out.display()
    );
    Ok(())
}
