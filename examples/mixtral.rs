//! The expert- and tensor-parallel Mixtral-style model on CPU ranks.
//!
//! ```text
//! cargo run --release --example mixtral -- eval --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors --grads
//! cargo run --release --example mixtral -- eval --model DIR --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors
//! ```
//!
//! `eval` writes `logits` (`[T, vocab]`, gathered), `ce_loss` (next-token cross-entropy),
//! `aux_loss` (Hugging Face's load-balancing loss, unscaled), `loss` = ce_loss +
//! router_aux_loss_coef × aux_loss (from config.json) and, with `--grads`, the gradient of
//! `loss` for every parameter under its HF name at full shape (experts gathered from every ep
//! rank). The ep ranks share the tokens (all-reduce dispatch). Without `--model`, a small
//! random Mixtral-style model is created on the fly.
use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::{full_gradients, ParallelVarBuilder};
use candle_parallel::moe::Dispatch;
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
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
    let mesh = MeshShape::new().ep(ep).tp(tp);
    let results = Launcher::new(ep * tp).mesh(mesh).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = match &model {
            Some(dir) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            None => ParallelVarBuilder::from_init(seed, DType::F32, ctx.device()),
        };
        let vb = if grads { vb.trainable() } else { vb };
        let m = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), Dispatch::AllReduce)?;
        let ids = Tensor::new(tokens.as_slice(), ctx.device())?.unsqueeze(0)?;
        let logits = m.forward(&ids, 0, None)?.squeeze(0)?;
        let l = m.losses(&ids, false)?;
        let mut tensors: Vec<(String, Tensor)> = vec![
            ("logits".into(), logits),
            ("ce_loss".into(), l.ce_loss.detach()),
            ("aux_loss".into(), l.aux_loss.detach()),
            ("loss".into(), l.loss.detach()),
        ];
        if grads {
            let g = l.loss.backward()?;
            let full = full_gradients(&vb.params(), &g, mesh.tp())?;
            // Experts live on different ep ranks: collect every rank's full expert gradients.
            let (experts, shared): (Vec<_>, Vec<_>) = full
                .into_iter()
                .partition(|(n, _)| Mixtral::is_expert_param(n));
            let mine: HashMap<String, Tensor> = experts.into_iter().collect();
            let bytes = safetensors::serialize(mine.iter().map(|(n, t)| (n.as_str(), t)), None)
                .map_err(|e| {
                    candle_core::Error::msg(format!("serialising expert gradients: {e}"))
                })?;
            for b in mesh.ep().all_gather_bytes(&bytes)? {
                tensors.extend(candle_core::safetensors::load_buffer(&b, &Device::Cpu)?);
            }
            tensors.extend(shared);
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
        "ep={ep} tp={tp}: logits {:?}, ce_loss {:.6}, aux_loss {:.6}, loss {:.6}, {} gradients -> {}",
        tensors["logits"].dims(),
        tensors["ce_loss"].to_scalar::<f32>()?,
        tensors["aux_loss"].to_scalar::<f32>()?,
        tensors["loss"].to_scalar::<f32>()?,
        tensors.len() - 4,
        out.display()
    );
    Ok(())
}
