//! The expert- and tensor-parallel Mixtral-style model on CPU ranks.
//!
//! ```text
//! cargo run --release --example mixtral -- eval --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors --grads
//! cargo run --release --example mixtral -- eval --model DIR --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors
//! cargo run --release --example mixtral -- eval --tokens 1,2,3 --pp 2 --tp 2 --ep 2 --out out.safetensors --grads
//! ```
//!
//! With `--pp P` the layers are split into P pipeline stages (uneven splits allowed), each
//! rank building and reading only its stage's layers; the aux loss still covers every layer
//! (its sums travel with the activations, gradient included); the output is the same.
//!
//! `eval` writes `logits` (`[T, vocab]`, gathered), `ce_loss` (next-token cross-entropy),
//! `aux_loss` (Hugging Face's load-balancing loss, unscaled), `loss` = ce_loss +
//! router_aux_loss_coef × aux_loss (from config.json) and, with `--grads`, the gradient of
//! `loss` for every parameter under its HF name at full shape (experts gathered from every ep
//! rank). The ep ranks share the tokens (all-reduce dispatch). Without `--model`, a small
//! random Mixtral-style model is created on the fly.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_parallel::checkpoint::{full_gradients_of, ParallelVarBuilder};
use candle_parallel::moe::Dispatch;
use candle_parallel::pipeline::{run_step, split_layers, Schedule};
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig, MixtralStage};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Expert- and tensor-parallel Mixtral-style model")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Logits, losses and (optionally) full-shape gradients for one token sequence.
    Eval {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
        tokens: Vec<u32>,
        #[arg(long, default_value_t = 2)]
        tp: usize,
        #[arg(long, default_value_t = 2)]
        ep: usize,
        /// Pipeline stages (the world is pp × ep × tp ranks).
        #[arg(long, default_value_t = 1)]
        pp: usize,
        #[arg(long, default_value = "out.safetensors")]
        out: PathBuf,
        #[arg(long)]
        grads: bool,
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
        ep,
        pp,
        out,
        grads,
        seed,
    } = Args::parse().command;
    let cfg = match &model {
        Some(dir) => MixtralConfig::from_file(&dir.join("config.json"))?,
        None => MixtralConfig::tiny(),
    };
    if tokens.len() < 2 {
        candle_core::bail!(
            "--tokens needs at least two token ids (the loss predicts the next token)"
        );
    }
    let stages = split_layers(cfg.num_hidden_layers, pp)?;
    let t = tokens.len();
    let mesh = MeshShape::new().pp(pp).ep(ep).tp(tp);
    let results = Launcher::new(pp * ep * tp).mesh(mesh).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = match &model {
            Some(dir) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            None => ParallelVarBuilder::from_init(seed, DType::F32, ctx.device()),
        };
        let vb = if grads { vb.trainable() } else { vb };
        let stage = mesh.pp().rank();
        let m = Mixtral::new_stage(
            &cfg,
            vb.clone(),
            mesh.ep(),
            mesh.tp(),
            Dispatch::AllReduce,
            stages[stage].clone(),
        )?;
        let ids = Tensor::new(tokens.as_slice(), ctx.device())?.unsqueeze(0)?;
        // One micro-batch through the stages; the last one keeps the logits and losses.
        let last = std::sync::Mutex::new(None);
        let params = vb.params();
        let vars: Vec<_> = params.iter().map(|p| p.var.clone()).collect();
        let out = run_step(
            mesh.pp(),
            &Schedule::gpipe(pp, 1)?,
            &[&MixtralStage {
                model: &m,
                train: false,
            }],
            &vars,
            std::slice::from_ref(&ids),
            (&Shape::from(m.stage_activation_len(1, t)), DType::F32),
            &|_, y| {
                let (l, logits) = m.stage_losses(y, &ids)?;
                let values = Tensor::cat(
                    &[
                        l.ce_loss.unsqueeze(0)?,
                        l.aux_loss.unsqueeze(0)?,
                        l.loss.unsqueeze(0)?,
                    ],
                    0,
                )?;
                *last.lock().unwrap() = Some((logits.squeeze(0)?, values.detach()));
                Ok(l.loss)
            },
        )?;
        // The last stage (its first ep and tp rank) tells everyone the logits and losses.
        let root = (pp - 1) * ep * tp;
        let (logits, values) = match last.into_inner().unwrap() {
            Some(v) => v,
            None => (
                Tensor::zeros((t, cfg.vocab_size), DType::F32, ctx.device())?,
                Tensor::zeros(3, DType::F32, ctx.device())?,
            ),
        };
        let logits = ctx.comm().broadcast(&logits, root)?;
        let values = ctx.comm().broadcast(&values, root)?.to_vec1::<f32>()?;
        let mut tensors: Vec<(String, Tensor)> = vec![("logits".into(), logits)];
        for (name, v) in ["ce_loss", "aux_loss", "loss"].iter().zip(values) {
            tensors.push((name.to_string(), Tensor::new(v, ctx.device())?));
        }
        if grads {
            let full = full_gradients_of(&params, &out.grads, mesh.tp())?;
            // Experts live on different ep ranks and layers on different stages: each
            // stage's first tp rank of every ep rank sends its experts, its first ep rank also
            // the shared weights.
            let first_tp = mesh.tp().rank() == 0;
            let mine: HashMap<String, Tensor> = full
                .into_iter()
                .filter(|(n, _)| first_tp && (Mixtral::is_expert_param(n) || mesh.ep().rank() == 0))
                .collect();
            let bytes = if mine.is_empty() {
                Vec::new()
            } else {
                safetensors::serialize(mine.iter().map(|(n, t)| (n.as_str(), t)), None)
                    .map_err(|e| candle_core::Error::msg(format!("serialising gradients: {e}")))?
            };
            for b in ctx.comm().all_gather_bytes(&bytes)? {
                if b.is_empty() {
                    continue;
                }
                for (name, g) in candle_core::safetensors::load_buffer(&b, &Device::Cpu)? {
                    // A tied embedding lives on the first and the last stage: its gradient is
                    // the sum of both.
                    match tensors.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, acc)) => *acc = (&*acc + g)?,
                        None => tensors.push((name, g)),
                    }
                }
            }
        }
        Ok(tensors)
    })?;
    if !candle_parallel::launch::process::is_lead()? {
        return Ok(()); // in a multi-process job, rank 0's process writes and reports
    }
    let tensors: HashMap<String, Tensor> =
        results.into_iter().next().unwrap().into_iter().collect();
    candle_core::safetensors::save(&tensors, &out)?;
    println!(
        "pp={pp} ep={ep} tp={tp}: logits {:?}, ce_loss {:.6}, aux_loss {:.6}, loss {:.6}, {} gradients -> {}",
        tensors["logits"].dims(),
        tensors["ce_loss"].to_scalar::<f32>()?,
        tensors["aux_loss"].to_scalar::<f32>()?,
        tensors["loss"].to_scalar::<f32>()?,
        tensors.len() - 4,
        out.display()
    );
    Ok(())
}
