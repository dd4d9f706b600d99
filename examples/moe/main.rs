//! The expert- and tensor-parallel sparse MoE models on CPU ranks: Mixtral, Qwen2-MoE and
//! Qwen3-MoE (the family is the model's `config.json` `model_type`). `mixtral` is the same
//! program under its first name.
//!
//! ```text
//! cargo run --release --example moe -- train --model QWEN3_MOE_DIR --batch FILE.json --ep 2 --tp 2 --out params.safetensors
//! cargo run --release --example mixtral -- eval --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors --grads
//! cargo run --release --example mixtral -- eval --model DIR --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors
//! cargo run --release --example mixtral -- eval --tokens 1,2,3 --pp 2 --tp 2 --ep 2 --out out.safetensors --grads
//! cargo run --release --example mixtral -- train --model DIR --batch FILE.json --steps 3 --lr 1e-3 \
//!     --weight-decay 0.01 --clip 1.0 --dp 2 --tp 2 --ep 2 --zero 2 --out params.safetensors
//! ```
//!
//! `train` runs AdamW steps over one global batch (`{"batch": [[ids], ...]}`, labels = the
//! inputs shifted; optionally HF's `"labels"` with -100 for positions that do not count and
//! `"attention_mask"` with 0 on padding at the end of rows) on dp × pp × ep × tp ranks: every dp and ep rank takes its own rows (the
//! experts' ranks dispatch tokens all-to-all), the replicas' gradients are reduced (ZeRO stage
//! 0, 1 or 2), the global norm is clipped, and `--out` gets every parameter at full shape
//! under its HF name, with `loss.<i>` and `grad_norm.<i>` before step i.
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
use candle_parallel::checkpoint::{
    full_gradients_of, merge_on_all, ParallelVarBuilder, SaveOptions,
};
use candle_parallel::data_parallel::{BatchGroups, Recompute};
use candle_parallel::moe::{AuxScope, Dispatch};
use candle_parallel::optim::AdamWConfig;
use candle_parallel::pipeline::{
    rank_chunks, run_step, split_layers, ModelSchedule, Schedule, ScheduleKind,
};
use candle_parallel::trainer::{LrSchedule, Trainer, TrainerConfig};
use candle_parallel::MeshDim;
use candle_parallel::{ops, Launcher, MeshShape};
use candle_parallel_models::mixtral::{
    counted_targets, Mixtral, MixtralConfig, MixtralModel as Model, MixtralStage, ShardedMixtral,
    Targets,
};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Expert- and tensor-parallel sparse MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE)")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Logits, losses and (optionally) full-shape gradients for one token sequence.
    Eval {
        /// A Hugging Face Mixtral directory; without it, a small random model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Token ids of the sequence, comma separated (at least two).
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
        tokens: Vec<u32>,
        /// Tensor-parallel ranks.
        #[arg(long, default_value_t = 2)]
        tp: usize,
        /// Expert-parallel ranks (they share the tokens here: all-reduce dispatch).
        #[arg(long, default_value_t = 2)]
        ep: usize,
        /// Pipeline stages (the world is pp × ep × tp ranks).
        #[arg(long, default_value_t = 1)]
        pp: usize,
        /// Output safetensors file.
        #[arg(long, default_value = "out.safetensors")]
        out: PathBuf,
        /// Also write every parameter's gradient of the loss at full shape.
        #[arg(long)]
        grads: bool,
        /// Seed of the random model (without --model).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// AdamW steps on one global batch under any layout; writes the parameters after the
    /// last step, and the loss and gradient norm before each. With dp > 1, ep > 1 or
    /// --micro-batches > 1 the load-balancing loss is computed per split of the batch (each
    /// rank's or micro-batch's tokens), which differs from the whole batch's by definition;
    /// with --aux-coef 0 every layout computes the same numbers.
    Train {
        /// A Hugging Face Mixtral directory (config.json, model.safetensors); without it, the
        /// small random model `eval` uses, or one of `--config`'s shape.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A Mixtral `config.json` to train a randomly initialised model of (deterministic
        /// from `--seed`; nothing is read but the config), instead of `--model`.
        #[arg(long, conflicts_with = "model")]
        config: Option<PathBuf>,
        /// JSON file `{"batch": [[token ids], ...]}`: every row the same length (≥ 2).
        /// Optionally `"labels"` (HF's: -100 where the loss does not count, and past the first
        /// padded position; default the ids, -100 on padding) and `"attention_mask"` (1 for a
        /// token, 0 for padding at the end of a row; padding stays out of the load-balancing
        /// loss), and `"position_ids"` for packed rows (several examples a row, each from
        /// position 0, attending only to itself; default labels then leave out each
        /// example's first token), all of the batch's shape.
        #[arg(long)]
        batch: PathBuf,
        /// Optimizer steps, each over the whole batch.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// AdamW learning rate (constant).
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// AdamW's decoupled weight decay.
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        /// Clip the global gradient norm to this (torch's clip_grad_norm_).
        #[arg(long, default_value_t = 1.0)]
        clip: f64,
        /// Weight of the load-balancing loss (default: config.json's router_aux_loss_coef).
        #[arg(long)]
        aux_coef: Option<f64>,
        /// Data-parallel replicas.
        #[arg(long, default_value_t = 1)]
        dp: usize,
        /// Tensor-parallel ranks.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Expert-parallel ranks (they also split the batch: all-to-all dispatch).
        #[arg(long, default_value_t = 1)]
        ep: usize,
        /// Pipeline stages (1F1B over the micro-batches).
        #[arg(long, default_value_t = 1)]
        pp: usize,
        /// ZeRO stage: 0 (replicated optimizer), 1 (optimizer state sharded over the
        /// replicas), 2 (gradients too), 3 (parameters too: each layer gathered just before
        /// use; inside pipeline stages too).
        #[arg(long, default_value_t = 0)]
        zero: u8,
        /// Micro-batches per step on each replica (gradient accumulation; pipelined with pp).
        #[arg(long, default_value_t = 1)]
        micro_batches: usize,
        /// Activation recomputation: none, selective (the attention scores, the experts'
        /// SwiGLU activations and the MoE combine recomputed in the backward) or full (each
        /// layer's input kept, the layer run again just before its backward), at every ZeRO
        /// stage.
        #[arg(long, default_value_t = Recompute::None)]
        recompute: Recompute,
        /// Pipeline schedule with --pp above 1: gpipe, 1f1b, interleaved (several model
        /// chunks per rank, --chunks; ZeRO 0-2) or zero-bubble (split backwards, planned for
        /// the costs measured in the first step; ZeRO 0-2).
        #[arg(long, default_value_t = ScheduleKind::OneFOneB)]
        schedule: ScheduleKind,
        /// Model chunks per pipeline rank (Megatron's virtual stages) with the interleaved
        /// schedule: the layers are split into pp × chunks stages, rank r holding stages r,
        /// r + pp, ... Default: 2 with interleaved, 1 otherwise.
        #[arg(long)]
        chunks: Option<usize>,
        /// ZeRO 3: keep each layer's gathered parameters from its forward to its backward
        /// (FSDP2's reshard_after_forward=False: one gather per step instead of two).
        #[arg(long)]
        no_reshard_after_forward: bool,
        /// The dtype gradients cross the replicas in: f32, or bf16 (half the bytes; packing,
        /// accumulation and the step stay f32).
        #[arg(long, default_value = "f32")]
        reduce_dtype: String,
        /// Reduce the gradients only after the backward, not bucket by bucket while it runs
        /// (for comparison: the numbers are the same).
        #[arg(long)]
        no_overlap: bool,
        /// The load-balancing loss over the whole global batch (global: any layout computes
        /// Hugging Face's loss of the whole batch) or over each rank's tokens (local).
        #[arg(long, default_value_t = AuxScope::Global)]
        aux_scope: AuxScope,
        /// Output safetensors file.
        #[arg(long, default_value = "params.safetensors")]
        out: PathBuf,
        /// Seed of the random model (without --model).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Save a distributed checkpoint (parameters and optimizer state) into
        /// DIR/step-NNNNNN every --checkpoint-every steps and after the last.
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// Steps between checkpoints in --checkpoint-dir (0: only after the last).
        #[arg(long, default_value_t = 0)]
        checkpoint_every: usize,
        /// Resume from a checkpoint directory (saved under any layout, any ZeRO stage): its
        /// parameters, optimizer state and step; runs the steps after it up to --steps.
        #[arg(long)]
        resume: Option<PathBuf>,
    },
}

pub fn main() -> Result<()> {
    candle_parallel::logging::init();
    match Args::parse().command {
        Command::Eval {
            model,
            tokens,
            tp,
            ep,
            pp,
            out,
            grads,
            seed,
        } => eval(model, tokens, tp, ep, pp, out, grads, seed),
        train @ Command::Train { .. } => run_train(train),
    }
}

#[allow(clippy::too_many_arguments)]
fn eval(
    model: Option<PathBuf>,
    tokens: Vec<u32>,
    tp: usize,
    ep: usize,
    pp: usize,
    out: PathBuf,
    grads: bool,
    seed: u64,
) -> Result<()> {
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
                chunk: 0,
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
            let mine: Vec<(String, Tensor)> = full
                .into_iter()
                .filter(|(n, _)| first_tp && (Mixtral::is_expert_param(n) || mesh.ep().rank() == 0))
                .collect();
            // A tied embedding lives on the first and the last stage: its gradient is the sum
            // of both.
            tensors.extend(merge_on_all(ctx.comm(), mine)?);
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

/// The `train` subcommand.
fn run_train(command: Command) -> Result<()> {
    let Command::Train {
        model,
        batch,
        steps,
        lr,
        weight_decay,
        clip,
        aux_coef,
        dp,
        tp,
        ep,
        pp,
        zero,
        micro_batches,
        recompute,
        schedule,
        chunks,
        no_reshard_after_forward,
        reduce_dtype,
        no_overlap,
        aux_scope,
        out,
        seed,
        checkpoint_dir,
        checkpoint_every,
        resume,
        config,
    } = command
    else {
        unreachable!("called for train")
    };
    let mut cfg = match (&resume, &model) {
        (Some(dir), _) => {
            let meta = candle_parallel::checkpoint::check_checkpoint(dir)?;
            MixtralConfig::from_json(meta.config).map_err(|e| {
                candle_core::Error::msg(format!(
                    "{}: the checkpoint's config is not a sparse MoE config: {e}",
                    dir.display()
                ))
            })?
        }
        (None, Some(dir)) => MixtralConfig::from_file(&dir.join("config.json"))?,
        (None, None) => match &config {
            Some(file) => MixtralConfig::from_file(file)?,
            None => MixtralConfig::tiny(),
        },
    };
    if let Some(c) = aux_coef {
        cfg.router_aux_loss_coef = c;
    }
    cfg.check_aux_loss()?;
    // Everything that can be wrong with the input, before any rank starts.
    for (flag, v) in [
        ("--steps", steps),
        ("--dp", dp),
        ("--tp", tp),
        ("--ep", ep),
        ("--pp", pp),
        ("--micro-batches", micro_batches),
    ] {
        if v == 0 {
            candle_core::bail!("{flag} must be at least 1");
        }
    }
    if zero > 3 {
        candle_core::bail!("--zero {zero}: the ZeRO stages are 0, 1, 2 and 3");
    }
    let reduce_dtype = match reduce_dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => candle_core::bail!("--reduce-dtype {other}: use f32 or bf16"),
    };
    let Batch {
        rows,
        labels,
        attention_mask,
        position_ids,
    } = read_batch(&batch, cfg.vocab_size)?;
    let limit = cfg
        .max_position_embeddings
        .min(cfg.sliding_window.unwrap_or(usize::MAX));
    if rows[0].len() > limit {
        candle_core::bail!(
            "{}: rows of {} tokens exceed the model's {} of {limit}: use rows of at most {limit} tokens",
            batch.display(),
            rows[0].len(),
            if limit == cfg.max_position_embeddings { "max_position_embeddings" } else { "sliding_window" }
        );
    }
    let replicas = dp * ep;
    if rows.len() % (replicas * micro_batches) != 0 {
        candle_core::bail!(
            "{}: a batch of {} rows does not split over dp × ep = {replicas} replicas and {micro_batches} micro-batches each: use a batch whose row count is a multiple of {}",
            batch.display(),
            rows.len(),
            replicas * micro_batches
        );
    }
    let stages = split_layers(cfg.num_hidden_layers, pp)?;
    let chunks = ModelSchedule::chunks_for(schedule, chunks, cfg.num_hidden_layers, pp)?;
    if pp > 1 && cfg.tie_word_embeddings {
        candle_core::bail!("--pp: a head tied to the embedding would be two copies on the first and last stages; train it with --pp 1");
    }
    let mesh = MeshShape::new().dp(dp).pp(pp).ep(ep).tp(tp);
    let results = Launcher::new(mesh.world_size()).mesh(mesh).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = match (&resume, &model) {
            (Some(dir), _) => ParallelVarBuilder::from_checkpoint(dir, DType::F32, ctx.device())?,
            (None, Some(dir)) => ParallelVarBuilder::from_hf_dir(dir, DType::F32, ctx.device())?,
            (None, None) => ParallelVarBuilder::from_init(seed, DType::F32, ctx.device()),
        }
        .trainable();
        let tcfg = TrainerConfig {
            steps,
            lr: LrSchedule::constant(lr),
            adamw: AdamWConfig {
                lr,
                weight_decay,
                ..Default::default()
            },
            clip: Some(clip),
            zero_stage: zero,
            reduce_dtype,
            overlap_comm: !no_overlap,
            // The whole global batch every step (for the tokens/s of the step lines).
            tokens_per_step: rows.iter().map(Vec::len).sum(),
            ..Default::default()
        };
        let batch_dims = [MeshDim::Dp, MeshDim::Ep];
        let (model, mut trainer) = if zero == 3 {
            let groups = BatchGroups::new(mesh, &batch_dims)?;
            // With pipeline stages each rank builds (and keeps a partition of) its stage's
            // layers only.
            let layers = stages[mesh.pp().rank()].clone();
            let mut m = ShardedMixtral::new_stage(
                &cfg,
                vb.clone(),
                &groups,
                mesh,
                Dispatch::AllToAll,
                layers,
            )?;
            m.set_reshard_after_forward(!no_reshard_after_forward);
            m.set_recompute(recompute);
            m.set_schedule(schedule)?;
            // Every parameter lives in a layer's sharded module.
            let t = Trainer::sharded(&m.units(), vb.params(), &groups, mesh, tcfg)?;
            (Model::Sharded(Box::new(m)), t)
        } else {
            // Several chunks per rank with the interleaved schedule.
            let layers = rank_chunks(cfg.num_hidden_layers, pp, chunks, mesh.pp().rank())?;
            let mut m = Mixtral::new_chunks(
                &cfg,
                vb.clone(),
                mesh.ep(),
                mesh.tp(),
                Dispatch::AllToAll,
                &layers,
            )?;
            m.set_schedule(schedule)?;
            let t = Trainer::new(vb.params(), mesh, &batch_dims, tcfg)?;
            (Model::Whole(Box::new(m)), t)
        };
        if resume.is_some() {
            trainer.resume(&vb)?;
        }
        let batch_comm = mesh.comm_over(&batch_dims)?;
        let mut model = model;
        model.set_aux_scope(aux_scope, &batch_comm);
        let save = |trainer: &Trainer, model: &Model| -> Result<()> {
            let Some(dir) = &checkpoint_dir else {
                return Ok(());
            };
            let opts = SaveOptions {
                config: serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?,
                ..Default::default()
            };
            trainer.save_with(
                &dir.join(format!("step-{:06}", trainer.steps_done())),
                &opts,
                &model.buffers(),
            )
        };
        // This replica's rows: dp-major, then ep.
        let per = rows.len() / replicas;
        let replica = mesh.dp().rank() * ep + mesh.ep().rank();
        let ids = Tensor::new(
            rows[replica * per..(replica + 1) * per].to_vec(),
            ctx.device(),
        )?;
        // With labels or a mask, the cross-entropy is the mean over the global batch's counted
        // labels (HF's), and padding stays out of the load-balancing loss.
        let mine = |t: &Tensor| t.narrow(0, replica * per, per);
        let global_labels = labels
            .as_ref()
            .map(|l| Tensor::new(l.clone(), ctx.device()))
            .transpose()?;
        let my_labels = global_labels.as_ref().map(mine).transpose()?;
        let my_mask = attention_mask
            .as_ref()
            .map(|m| mine(&Tensor::new(m.clone(), ctx.device())?))
            .transpose()?;
        let my_positions = position_ids
            .as_ref()
            .map(|p| mine(&Tensor::new(p.clone(), ctx.device())?))
            .transpose()?;
        let global_tokens = global_labels.as_ref().map(counted_targets).transpose()?;
        let targets = my_labels
            .as_ref()
            .zip(global_tokens)
            .map(|(labels, global_tokens)| Targets {
                labels,
                global_tokens,
                replicas,
                attention_mask: my_mask.as_ref(),
                position_ids: my_positions.as_ref(),
            });
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for i in trainer.steps_done()..steps {
            // Each layer's gradients go to the trainer as soon as its backward ends.
            let g = match &model {
                Model::Whole(m) => m.train_grads(
                    &mut trainer,
                    &ids,
                    targets.as_ref(),
                    micro_batches,
                    mesh.pp(),
                    recompute,
                )?,
                // Selective recomputation spares the layers' attention scores and expert
                // activations (full recomputation is the layers' own setting).
                Model::Sharded(m) => {
                    ops::with_selective_recompute(recompute == Recompute::Selective, || {
                        m.train_grads(&mut trainer, &ids, targets.as_ref(), micro_batches)
                    })?
                }
            };
            let r = trainer.step_accumulated(g.loss)?;
            model.update_router_biases(&batch_comm)?;
            tensors.push((
                format!("loss.{i}"),
                Tensor::new(r.loss as f32, &Device::Cpu)?,
            ));
            tensors.push((
                format!("grad_norm.{i}"),
                Tensor::new(r.grad_norm as f32, &Device::Cpu)?,
            ));
            if (checkpoint_every > 0 && r.step % checkpoint_every == 0) || r.step == steps {
                save(&trainer, &model)?;
            }
        }
        // One copy of every parameter at full shape, written by rank 0 tensor by tensor: tp
        // slices gathered; each expert from its ep rank, every other weight from ep rank 0;
        // the replicas are equal, dp rank 0 sends; at ZeRO 3 one layer gathered at a time.
        let params = trainer.optimizer().write_model_with(
            &out,
            &tensors,
            &model.buffers(),
            Some(DType::F32),
        )?;
        Ok((tensors, params))
    })?;
    if !candle_parallel::launch::process::is_lead()? {
        return Ok(());
    }
    let (tensors, params) = results.into_iter().next().unwrap();
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    let ran: Vec<usize> = (0..steps)
        .filter(|i| tensors.contains_key(&format!("loss.{i}")))
        .collect();
    if ran.is_empty() {
        println!(
            "the checkpoint is at step {steps} already: nothing to run; parameters -> {}",
            out.display()
        );
        return Ok(());
    }
    let at = |name: String| tensors[&name].to_scalar::<f32>();
    let (first, last) = (ran[0], ran[ran.len() - 1]);
    println!(
        "dp={dp} pp={pp} ep={ep} tp={tp} zero={zero} micro-batches={micro_batches}: steps {}..={}, loss {:.6} -> {:.6}, grad norm {:.6} -> {:.6}; {params} parameters -> {}",
        first + 1,
        last + 1,
        at(format!("loss.{first}"))?,
        at(format!("loss.{last}"))?,
        at(format!("grad_norm.{first}"))?,
        at(format!("grad_norm.{last}"))?,
        out.display()
    );
    Ok(())
}

/// A batch file's contents, checked.
struct Batch {
    rows: Vec<Vec<u32>>,
    labels: Option<Vec<Vec<i64>>>,
    attention_mask: Option<Vec<Vec<u8>>>,
    /// Packed rows' positions (HF's `position_ids`: from 0 in each example).
    position_ids: Option<Vec<Vec<u32>>>,
}

/// The rows of a batch file, checked: equal lengths of at least 2, ids in the vocabulary;
/// labels and attention mask (if given) of the batch's shape, labels in the vocabulary or
/// -100, the mask 1s then 0s in every row (padding at the end) with a token in every row.
fn read_batch(path: &std::path::Path, vocab: usize) -> Result<Batch> {
    #[derive(serde::Deserialize)]
    struct BatchFile {
        batch: Vec<Vec<u32>>,
        labels: Option<Vec<Vec<i64>>>,
        attention_mask: Option<Vec<Vec<u8>>>,
        position_ids: Option<Vec<Vec<u32>>>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        candle_core::Error::msg(format!(
            "cannot read the batch file {}: {e}",
            path.display()
        ))
    })?;
    let file: BatchFile = serde_json::from_str(&text).map_err(|e| {
        candle_core::Error::msg(format!(
            "{}: expected {{\"batch\": [[token ids], ...]}} with non-negative integer ids (and \
             optionally \"labels\", \"attention_mask\" and \"position_ids\" of the same shape): {e}",
            path.display()
        ))
    })?;
    let rows = file.batch;
    let Some(first) = rows.first() else {
        candle_core::bail!("{}: the batch has no rows", path.display());
    };
    if first.len() < 2 {
        candle_core::bail!(
            "{}: rows need at least 2 tokens (the loss predicts the next one); row 0 has {}",
            path.display(),
            first.len()
        );
    }
    for (i, r) in rows.iter().enumerate() {
        if r.len() != first.len() {
            candle_core::bail!(
                "{}: the rows must have the same length: row 0 has {} tokens, row {i} has {} (pad or cut them to one length)",
                path.display(),
                first.len(),
                r.len()
            );
        }
        if let Some((j, id)) = r.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            candle_core::bail!(
                "{}: row {i}, position {j}: token id {id} is out of the vocabulary (size {vocab})",
                path.display()
            );
        }
    }
    let same_shape = |what: &str, lens: Vec<usize>| -> Result<()> {
        if lens.len() != rows.len() || lens.iter().any(|&l| l != first.len()) {
            candle_core::bail!(
                "{}: \"{what}\" must have the batch's shape, {} rows of {} (got row lengths {lens:?})",
                path.display(),
                rows.len(),
                first.len()
            );
        }
        Ok(())
    };
    if let Some(labels) = &file.labels {
        same_shape("labels", labels.iter().map(Vec::len).collect())?;
        for (i, r) in labels.iter().enumerate() {
            if let Some((j, l)) = r
                .iter()
                .enumerate()
                .find(|(_, &l)| l != -100 && (l < 0 || l as usize >= vocab))
            {
                candle_core::bail!(
                    "{}: labels row {i}, position {j}: {l} is neither a token id (vocabulary size \
                     {vocab}) nor -100 (ignored)",
                    path.display()
                );
            }
        }
    }
    let mut labels = file.labels;
    if let Some(pos) = &file.position_ids {
        same_shape("position_ids", pos.iter().map(Vec::len).collect())?;
        if labels.is_none() {
            // The ids, but for each example's first token (nothing before it in its row
            // predicts it) and the padding.
            labels = Some(
                rows.iter()
                    .zip(pos)
                    .enumerate()
                    .map(|(i, (r, p))| {
                        r.iter()
                            .zip(p)
                            .enumerate()
                            .map(|(j, (&t, &p))| {
                                let pad =
                                    file.attention_mask.as_ref().is_some_and(|m| m[i][j] == 0);
                                if p == 0 || pad {
                                    -100
                                } else {
                                    t as i64
                                }
                            })
                            .collect()
                    })
                    .collect(),
            );
        }
    }
    if let Some(mask) = &file.attention_mask {
        same_shape("attention_mask", mask.iter().map(Vec::len).collect())?;
        if labels.is_none() {
            // The ids, with padding ignored (as HF's collators label it).
            labels = Some(
                rows.iter()
                    .zip(mask)
                    .map(|(r, m)| {
                        r.iter()
                            .zip(m)
                            .map(|(&t, &m)| if m == 1 { t as i64 } else { -100 })
                            .collect()
                    })
                    .collect(),
            );
        }
        for (i, r) in mask.iter().enumerate() {
            let tokens = r.iter().take_while(|&&m| m == 1).count();
            if tokens == 0 || r[tokens..].iter().any(|&m| m != 0) {
                candle_core::bail!(
                    "{}: attention_mask row {i} is {r:?}: each row must be 1s (at least one) then \
                     0s, padding at the end (causal attention keeps end padding away from the \
                     tokens; left padding is not supported)",
                    path.display()
                );
            }
        }
    }
    Ok(Batch {
        rows,
        labels,
        attention_mask: file.attention_mask,
        position_ids: file.position_ids,
    })
}
