//! The tensor-parallel Llama-style model on CPU ranks.
//!
//! ```text
//! cargo run --release --example llama -- eval --tokens 1,2,3 --tp 2 --out out.safetensors --grads
//! cargo run --release --example llama -- eval --model DIR --tokens 1,2,3 --tp 2 --out out.safetensors
//! cargo run --release --example llama -- eval --tokens 1,2,3 --tp 2 --pp 2 --out out.safetensors --grads
//! cargo run --release --example llama -- train --pp 2 --schedule zero-bubble --micro-batches 4 --out params.safetensors
//! ```
//!
//! With `--pp P` the layers are split into P pipeline stages (uneven splits allowed), each
//! rank building and reading only its stage's layers; the output is the same.
//!
//! `train` runs AdamW steps (the library's trainer: global-norm clipping, ZeRO 0-2 over
//! `--dp` replicas) on one batch of token rows under dp × pp × tp, the micro-batches on the
//! pipeline schedule of `--schedule` (gpipe, 1f1b, interleaved with `--chunks` per rank, or
//! zero-bubble), and writes every parameter after the last step at full shape under its HF
//! name, with `loss.<i>` and `grad_norm.<i>`: the same at every layout and schedule.
//!
//! `eval` writes a safetensors file with `logits` (`[T, vocab]`, gathered over the tp group),
//! `loss` (next-token cross-entropy over the tokens) and, with `--grads`, the gradient of
//! `loss` for every parameter under its Hugging Face name at its full (unsharded) shape.
//! `DIR` holds `config.json` and `model.safetensors` (or an index and several files); without
//! `--model`, a small random model is created on the fly.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_parallel::checkpoint::{full_gradients_of, ParallelVarBuilder};
use candle_parallel::optim::AdamWConfig;
use candle_parallel::pipeline::{
    rank_chunks, run_step, split_layers, ModelSchedule, Schedule, ScheduleKind,
};
use candle_parallel::trainer::{LrSchedule, Trainer, TrainerConfig};
use candle_parallel::{Launcher, MeshDim, MeshShape};
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
    /// AdamW steps on one batch of token rows under dp × pp × tp, with a pipeline schedule.
    Train {
        /// Hugging Face model directory (config.json + safetensors); default: a small random model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The batch's token ids, comma separated, `--rows` rows of equal length; default:
        /// `--rows` × `--seq-len` pseudo-random ids from `--seed`.
        #[arg(long, value_delimiter = ',')]
        tokens: Vec<u32>,
        /// Rows in the batch (the global batch: split over the dp replicas).
        #[arg(long, default_value_t = 8)]
        rows: usize,
        /// Tokens per row when the batch is generated.
        #[arg(long, default_value_t = 16)]
        seq_len: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Clip the global gradient norm to this.
        #[arg(long, default_value_t = 1.0)]
        clip: f64,
        /// Data-parallel replicas (each takes its share of the rows).
        #[arg(long, default_value_t = 1)]
        dp: usize,
        #[arg(long, default_value_t = 1)]
        tp: usize,
        #[arg(long, default_value_t = 1)]
        pp: usize,
        /// ZeRO stage over the replicas: 0, 1 or 2.
        #[arg(long, default_value_t = 0)]
        zero: u8,
        /// Micro-batches per step on each replica (pipelined with --pp).
        #[arg(long, default_value_t = 1)]
        micro_batches: usize,
        /// Pipeline schedule with --pp above 1: gpipe, 1f1b, interleaved (--chunks model chunks
        /// per rank) or zero-bubble.
        #[arg(long, default_value_t = ScheduleKind::OneFOneB)]
        schedule: ScheduleKind,
        /// Model chunks per pipeline rank with the interleaved schedule (rank r holding stages
        /// r, r + pp, ...). Default: 2 with interleaved, 1 otherwise.
        #[arg(long)]
        chunks: Option<usize>,
        /// Decoder layers of the random model (without --model; default: the tiny config's).
        #[arg(long)]
        layers: Option<usize>,
        /// Output safetensors file.
        #[arg(long, default_value = "out.safetensors")]
        out: PathBuf,
        /// Seed of the random model and batch (without --model / --tokens).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    match Args::parse().command {
        Command::Eval {
            model,
            tokens,
            tp,
            pp,
            out,
            grads,
            seed,
        } => eval(model, tokens, tp, pp, out, grads, seed),
        train @ Command::Train { .. } => run_train(train),
    }
}

/// The `train` subcommand.
fn run_train(command: Command) -> Result<()> {
    let Command::Train {
        model,
        tokens,
        rows,
        seq_len,
        steps,
        lr,
        clip,
        dp,
        tp,
        pp,
        zero,
        micro_batches,
        schedule,
        chunks,
        layers,
        out,
        seed,
    } = command
    else {
        unreachable!("called for train")
    };
    let cfg = match (&model, layers) {
        (Some(_), Some(_)) => {
            candle_core::bail!("--layers sets the random model's depth: leave it out with --model")
        }
        (Some(dir), None) => LlamaConfig::from_file(&dir.join("config.json"))?,
        (None, layers) => {
            let tiny = LlamaConfig::tiny();
            LlamaConfig {
                num_hidden_layers: layers.unwrap_or(tiny.num_hidden_layers),
                ..tiny
            }
        }
    };
    for (name, v) in [
        ("--dp", dp),
        ("--tp", tp),
        ("--pp", pp),
        ("--micro-batches", micro_batches),
        ("--rows", rows),
        ("--steps", steps),
    ] {
        if v == 0 {
            candle_core::bail!("{name} must be at least 1");
        }
    }
    let chunks = ModelSchedule::chunks_for(schedule, chunks, cfg.num_hidden_layers, pp)?;
    if zero > 2 {
        candle_core::bail!("--zero {zero}: llama train runs ZeRO 0, 1 or 2 (ZeRO 3's sharded layers are Mixtral's, `moe train --zero 3`)");
    }
    if pp > 1 && cfg.tie_word_embeddings {
        candle_core::bail!("--pp: a head tied to the embedding would be two copies on the first and last stages, whose gradients are not summed in training; train it with --pp 1");
    }
    let tokens = if tokens.is_empty() {
        // A fixed pseudo-random batch (an LCG), so that every layout sees the same rows.
        let mut x = seed.wrapping_add(12345);
        (0..rows * seq_len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % cfg.vocab_size as u64) as u32
            })
            .collect()
    } else {
        tokens
    };
    if rows == 0 || tokens.len() % rows != 0 || tokens.len() / rows < 2 {
        candle_core::bail!(
            "--tokens: {} ids do not make --rows {rows} rows of at least 2 tokens: give a multiple of {rows} ids (at least {})",
            tokens.len(),
            2 * rows.max(1)
        );
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        candle_core::bail!(
            "--tokens: id {bad} is outside the model's vocabulary of {}",
            cfg.vocab_size
        );
    }
    if rows % (dp * micro_batches) != 0 {
        candle_core::bail!("--rows {rows} does not split over --dp {dp} replicas of --micro-batches {micro_batches} each: use a row count that is a multiple of {}", dp * micro_batches);
    }
    let seq = tokens.len() / rows;
    let mesh = MeshShape::new().dp(dp).pp(pp).tp(tp);
    let results = Launcher::new(mesh.world_size()).mesh(mesh).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = match &model {
            Some(dir) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            None => ParallelVarBuilder::from_init(seed, DType::F32, ctx.device()),
        }
        .trainable();
        // Its stage's layers (its chunks' with the interleaved schedule).
        let layers = rank_chunks(cfg.num_hidden_layers, pp, chunks, mesh.pp().rank())?;
        let mut llama = Llama::new_chunks(&cfg, vb.clone(), mesh.tp(), &layers)?;
        llama.set_schedule(schedule)?;
        let tcfg = TrainerConfig {
            steps,
            lr: LrSchedule::constant(lr),
            adamw: AdamWConfig {
                lr,
                ..Default::default()
            },
            clip: Some(clip),
            zero_stage: zero,
            tokens_per_step: tokens.len(),
            ..Default::default()
        };
        let mut trainer = Trainer::new(vb.params(), mesh, &[MeshDim::Dp], tcfg)?;
        // This replica's rows.
        let per = rows / dp;
        let start = mesh.dp().rank() * per * seq;
        let ids =
            Tensor::new(&tokens[start..start + per * seq], ctx.device())?.reshape((per, seq))?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for i in 0..steps {
            let vars = trainer.vars().to_vec();
            let (grads, loss) = llama.batch_grads(&vars, &ids, micro_batches, mesh.pp())?;
            let r = trainer.step(&grads, loss)?;
            tensors.push((
                format!("loss.{i}"),
                Tensor::new(r.loss as f32, &Device::Cpu)?,
            ));
            tensors.push((
                format!("grad_norm.{i}"),
                Tensor::new(r.grad_norm as f32, &Device::Cpu)?,
            ));
        }
        // One copy of every parameter at full shape, written by rank 0.
        let params = trainer
            .optimizer()
            .write_model_with(&out, &tensors, &[], Some(DType::F32))?;
        Ok((tensors, params))
    })?;
    if !candle_parallel::launch::process::is_lead()? {
        return Ok(());
    }
    let (tensors, params) = results.into_iter().next().unwrap();
    let at = |i: usize, k: &str| -> Result<f32> {
        let name = format!("{k}.{i}");
        tensors
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Ok(f32::NAN), |(_, t)| t.to_scalar::<f32>())
    };
    let last = steps.saturating_sub(1);
    println!(
        "dp={dp} pp={pp} tp={tp} zero={zero} micro-batches={micro_batches} schedule={schedule}: loss {:.6} -> {:.6}, grad norm {:.6} -> {:.6}; {params} parameters -> {}",
        at(0, "loss")?,
        at(last, "loss")?,
        at(0, "grad_norm")?,
        at(last, "grad_norm")?,
        out.display()
    );
    Ok(())
}

/// The `eval` subcommand.
fn eval(
    model: Option<PathBuf>,
    tokens: Vec<u32>,
    tp: usize,
    pp: usize,
    out: PathBuf,
    grads: bool,
    seed: u64,
) -> Result<()> {
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
