//! Fine-tunes a Mixtral-style MoE checkpoint on 4 CPU ranks laid out as ep=2 × tp=2.
//!
//! ```text
//! cargo run --release --example finetune_mixtral          # built-in task, no downloads, no flags
//! # on 4 GPUs, ranks as processes with NCCL:
//! cargo build --release --features nccl --example finetune_mixtral --example launch
//! cargo run --release --features nccl --example launch -- --nproc 4 -- finetune_mixtral
//! cargo run --release --example finetune_mixtral -- --data my.jsonl --steps 500 --mesh ep=2,tp=2
//! cargo run --release --example finetune_mixtral -- --model DIR --out runs/ckpt --lr 1e-3
//! ```
//!
//! With no arguments it creates (or reuses) a small random Mixtral-style checkpoint in Hugging
//! Face format under `target/finetune-mixtral/model`, with a word-level tokenizer built by the
//! `tokenizers` crate, and teaches it a task whose learning is visible: digit addition modulo 10
//! (`3 + 4 = 7`), measured as answer accuracy over all 100 problems. `--data` takes a text file
//! (one example a line) or JSONL (`{"text": ...}`); a new model for it gets a byte-level
//! tokenizer, and the evaluation is the held-out loss.
//!
//! Training: the ep ranks see different examples (data parallel for every weight but their own
//! experts, tokens exchanged with all-to-all); the tp ranks split every matrix. AdamW, gradient
//! clipping by the global norm across all ranks, a progress bar, loss and expert-load logging
//! (per rank, `RUST_LOG=debug` for every layer), periodic evaluation, and at the end a
//! distributed checkpoint that `cargo run --release --example checkpoint -- export` turns into
//! a Hugging Face model.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_parallel::checkpoint::{
    save_checkpoint, ParallelVarBuilder, SaveOptions, ShardedTensor,
};
use candle_parallel::launch::process::is_lead;
use candle_parallel::moe::Dispatch;
use candle_parallel::optim::{clip_factor, grad_norm_sq_of, AdamW, AdamWConfig};
use candle_parallel::pipeline::{run_step, split_batch, split_layers, Schedule};
use candle_parallel::{Launcher, MeshDim, MeshShape, ReduceOp};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig, MixtralStage};
use candle_parallel_models::testing::write_random_mixtral;
use candle_parallel_models::tokenizer::{byte_tokenizer, word_tokenizer};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a Mixtral-style MoE model with expert and tensor parallelism")]
struct Args {
    /// Hugging Face Mixtral-style model directory (config.json, safetensors, tokenizer.json);
    /// created with random weights if it does not exist.
    #[arg(long, default_value = "target/finetune-mixtral/model")]
    model: PathBuf,
    /// Training text: one example per line, or JSONL with a "text" field. Default: the built-in
    /// addition task.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Layout; the world size is the product of the sizes.
    #[arg(long, default_value = "ep=2,tp=2")]
    mesh: String,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Sequences per ep rank per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Tokens per training sequence for --data.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Micro-batches per step with pipeline stages (`pp` in --mesh; 1F1B schedule); default
    /// twice the stages. Must divide --batch-size.
    #[arg(long)]
    micro_batches: Option<usize>,
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Where the final distributed checkpoint goes (a new `step-N` directory inside).
    #[arg(long, default_value = "target/finetune-mixtral/checkpoints")]
    out: PathBuf,
    /// Write one log file per rank into this directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The training data, as token ids.
enum Data {
    /// Digit addition modulo 10: every problem `a + b = c`.
    Addition { problems: Vec<[u32; 5]> },
    /// A token stream; the last tenth is held out for evaluation.
    Text { train: Vec<u32>, eval: Vec<u32> },
}

const ADDITION_WORDS: [&str; 12] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "+", "="];

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| candle_core::Error::msg(format!("tokenizer: {e}")))?
        .get_ids()
        .to_vec())
}

fn load_text(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        candle_core::Error::msg(format!("cannot read --data {}: {e}", path.display()))
    })?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                candle_core::Error::msg(format!("{}:{}: not JSON: {e}", path.display(), i + 1))
            })?;
            match v.get("text").and_then(|t| t.as_str()) {
                Some(t) => out.push(t.to_string()),
                None => {
                    candle_core::bail!("{}:{}: no string field \"text\"", path.display(), i + 1)
                }
            }
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        candle_core::bail!("--data {} holds no examples", path.display());
    }
    Ok(out)
}

/// Loads the model directory's config and tokenizer, creating a random model first if needed.
fn prepare_model(args: &Args) -> Result<(MixtralConfig, Tokenizer)> {
    let dir = &args.model;
    let holds_files = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if !dir.join("config.json").exists() && holds_files {
        candle_core::bail!(
            "{} has no config.json: point --model at a Hugging Face model directory, or at a \
             new path to create a random model there",
            dir.display()
        );
    }
    if !dir.join("config.json").exists() && !is_lead()? {
        // Rank 0's process creates the model; wait for it to appear (it is renamed into place).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !dir.join("config.json").exists() {
            if std::time::Instant::now() > deadline {
                candle_core::bail!(
                    "{} did not appear within 300s: rank 0 creates it",
                    dir.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    if !dir.join("config.json").exists() {
        let tok = if args.data.is_some() {
            byte_tokenizer()?
        } else {
            word_tokenizer(&ADDITION_WORDS)?
        };
        let cfg = MixtralConfig {
            vocab_size: tok.get_vocab_size(true),
            ..MixtralConfig::tiny()
        };
        eprintln!(
            "creating a random Mixtral-style model in {} (once)",
            dir.display()
        );
        // Built aside and renamed into place, so that no reader sees a half-written model.
        let tmp = PathBuf::from(format!("{}.partial-{}", dir.display(), std::process::id()));
        write_random_mixtral(&tmp, &cfg, args.seed)?;
        tok.save(tmp.join("tokenizer.json"), true)
            .map_err(|e| candle_core::Error::msg(format!("saving the tokenizer: {e}")))?;
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join("config.json").exists() {
                candle_core::bail!("cannot move the new model into {}: {e}", dir.display());
            }
        }
    }
    let cfg = MixtralConfig::from_file(&dir.join("config.json"))?;
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
        candle_core::Error::msg(format!(
            "{}: cannot load tokenizer.json: {e}",
            dir.display()
        ))
    })?;
    Ok((cfg, tok))
}

fn prepare_data(args: &Args, tok: &Tokenizer, cfg: &MixtralConfig) -> Result<Data> {
    let data = match &args.data {
        None => {
            let mut problems = Vec::with_capacity(100);
            for a in 0..10 {
                for b in 0..10 {
                    let ids = encode(tok, &format!("{a} + {b} = {}", (a + b) % 10))?;
                    let ids: [u32; 5] = ids.try_into().map_err(|_| {
                        candle_core::Error::msg(
                            "the model's tokenizer does not know the digits and + =: use --data",
                        )
                    })?;
                    problems.push(ids);
                }
            }
            Data::Addition { problems }
        }
        Some(path) => {
            let mut stream = Vec::new();
            for t in load_text(path)? {
                stream.extend(encode(tok, &t)?);
            }
            let cut = stream.len() * 9 / 10;
            if cut < args.seq_len + 1 || stream.len() - cut < args.seq_len + 1 {
                candle_core::bail!(
                    "--data {} has {} tokens: too few for --seq-len {} (need 10× that)",
                    path.display(),
                    stream.len(),
                    args.seq_len
                );
            }
            let eval = stream.split_off(cut);
            Data::Text {
                train: stream,
                eval,
            }
        }
    };
    let max = match &data {
        Data::Addition { problems } => problems.iter().flatten().copied().max(),
        Data::Text { train, .. } => train.iter().copied().max(),
    };
    if max.is_some_and(|m| m as usize >= cfg.vocab_size) {
        candle_core::bail!(
            "the tokenizer produces ids beyond the model's vocabulary of {}",
            cfg.vocab_size
        );
    }
    Ok(data)
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

impl Data {
    /// A batch `[n, s]` drawn with `rng`.
    fn batch(&self, rng: &mut Rng, n: usize, seq_len: usize, device: &Device) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = match self {
            Data::Addition { problems } => (0..n)
                .map(|_| problems[rng.next(problems.len())].to_vec())
                .collect(),
            Data::Text { train, .. } => (0..n)
                .map(|_| {
                    let at = rng.next(train.len() - seq_len);
                    train[at..at + seq_len + 1].to_vec()
                })
                .collect(),
        };
        Tensor::new(rows, device)
    }
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let args = Args::parse();
    let mesh: MeshShape = args.mesh.parse()?;
    for (flag, value) in [
        ("--steps", args.steps),
        ("--eval-every", args.eval_every),
        ("--batch-size", args.batch_size),
    ] {
        if value == 0 {
            candle_core::bail!("{flag} must be at least 1");
        }
    }
    if args.seq_len < 2 {
        candle_core::bail!("--seq-len must be at least 2 (a token and the next one to predict)");
    }
    let pp = mesh.size(MeshDim::Pp);
    let micro_batches = args
        .micro_batches
        .unwrap_or(if pp > 1 { 2 * pp } else { 1 });
    if pp > 1 && mesh.size(MeshDim::Dp) > 1 {
        candle_core::bail!("--mesh: pipeline stages with data parallelism are not supported yet; use pp with ep and tp");
    }
    split_batch(
        &Tensor::zeros((args.batch_size, 1), DType::F32, &Device::Cpu)?,
        micro_batches,
    )
    .map_err(|e| candle_core::Error::msg(format!("--micro-batches: {e}")))?;
    let (cfg, tok) = prepare_model(&args)?;
    let stages = split_layers(cfg.num_hidden_layers, pp)?;
    if pp > 1 && cfg.tie_word_embeddings {
        candle_core::bail!("--mesh with pp: a head tied to the embedding would be two copies on the first and last stages, whose gradients are not summed yet; train it without pp");
    }
    let tokenizer_json = std::fs::read(args.model.join("tokenizer.json"))?;
    let data = prepare_data(&args, &tok, &cfg)?;
    let world = mesh.world_size();
    let mut launcher = Launcher::new(world).mesh(mesh);
    if let Some(dir) = &args.log_dir {
        launcher = launcher.log_dir(dir);
    }
    // Checkpoints are never overwritten: a rerun gets step-N.1, step-N.2, ...
    let base = args.out.join(format!("step-{:06}", args.steps));
    let unused_dir = || {
        std::iter::once(base.clone())
            .chain((1..).map(|i| PathBuf::from(format!("{}.{i}", base.display()))))
            .find(|d| !d.exists())
            .expect("an unused directory name")
    };
    let report = launcher.run(|ctx| {
        // Rank 0 names the checkpoint directory for all (ranks may be processes that started
        // at different times).
        let pick = if ctx.rank() == 0 { unused_dir().to_string_lossy().into_owned() } else { String::new() };
        let out_dir = PathBuf::from(String::from_utf8_lossy(&ctx.comm().all_gather_bytes(pick.as_bytes())?[0]).into_owned());
        let mesh = ctx.mesh()?;
        let (ep, tp, pp_comm) = (mesh.ep(), mesh.tp(), mesh.pp());
        let vb = ParallelVarBuilder::from_hf_dir(&args.model, DType::F32, ctx.device())?.trainable();
        // With pipeline stages each rank builds (and reads) only its stage's layers.
        let model = Mixtral::new_stage(&cfg, vb.clone(), ep, tp, Dispatch::AllToAll, stages[pp_comm.rank()].clone())?;
        // The rank that tells everyone the last stage's results: the last stage's first ep and
        // tp rank (ranks are laid out pp, ep, tp with tp fastest).
        let root = (pp - 1) * ep.size() * tp.size();
        // Logits `[b, s, vocab]` and cross-entropy for `ids`, on every rank, through the
        // pipeline stages (a forward and a discarded backward).
        let through_stages = |ids: &Tensor| -> Result<(Tensor, f32)> {
            let (b, s) = ids.dims2()?;
            let kept = std::sync::Mutex::new(None);
            run_step(
                pp_comm,
                &Schedule::gpipe(pp, 1)?,
                &[&MixtralStage { model: &model, train: false }],
                &[],
                std::slice::from_ref(ids),
                (&Shape::from(model.stage_activation_len(b, s)), DType::F32),
                &|_, y| {
                    let (l, logits) = model.stage_losses(y, ids)?;
                    *kept.lock().unwrap() = Some((logits, l.ce_loss.unsqueeze(0)?));
                    l.loss * 0.0
                },
            )?;
            let (logits, ce) = match kept.into_inner().unwrap() {
                Some(v) => v,
                None => (
                    Tensor::zeros((b, s, cfg.vocab_size), DType::F32, ctx.device())?,
                    Tensor::zeros(1, DType::F32, ctx.device())?,
                ),
            };
            let logits = ctx.comm().broadcast(&logits, root)?;
            let ce = ctx.comm().broadcast(&ce, root)?.to_vec1::<f32>()?[0];
            Ok((logits, ce))
        };
        let params = vb.params();
        let (experts, shared): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|p| Mixtral::is_expert_param(&p.name));
        let mut opt = AdamW::new(params.clone(), AdamWConfig { lr: args.lr, weight_decay: 0.0, ..Default::default() })?;
        tracing::info!(read_bytes = vb.bytes_read(), params = params.len(), experts = experts.len(), "model loaded");

        let lead = ctx.rank() == 0;
        let bar = if lead {
            ProgressBar::new(args.steps as u64).with_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}").expect("valid template"),
            )
        } else {
            ProgressBar::hidden()
        };
        // Different examples on each ep rank, the same on the ranks of a tp group.
        let mut rng = Rng(args.seed ^ (0xD1CE + ep.rank() as u64 * 0x1_0000));
        let eval = || -> Result<(f64, &'static str)> {
            match &data {
                Data::Addition { problems } => {
                    let prompts = Tensor::new(problems.iter().map(|p| p[..4].to_vec()).collect::<Vec<_>>(), ctx.device())?;
                    let logits = match pp {
                        1 => model.forward(&prompts, 0, None)?,
                        _ => through_stages(&prompts)?.0,
                    };
                    let guess = logits.narrow(1, 3, 1)?.squeeze(1)?.argmax(1)?.to_vec1::<u32>()?;
                    let right = guess.iter().zip(problems).filter(|(g, p)| **g == p[4]).count();
                    Ok((right as f64 / problems.len() as f64, "accuracy"))
                }
                Data::Text { eval, .. } => {
                    let n = (eval.len() - 1) / args.seq_len;
                    let rows: Vec<Vec<u32>> = (0..n.min(8)).map(|i| eval[i * args.seq_len..=(i + 1) * args.seq_len].to_vec()).collect();
                    let rows = Tensor::new(rows, ctx.device())?;
                    let ce = match pp {
                        1 => model.losses(&rows, false)?.ce_loss.to_scalar::<f32>()?,
                        _ => through_stages(&rows)?.1,
                    };
                    Ok((ce as f64, "eval loss"))
                }
            }
        };
        let (first_eval, metric) = eval()?;
        tracing::info!(step = 0, metric, value = first_eval, "evaluation");
        let mut history = Vec::with_capacity(args.steps);
        let mut last_eval = first_eval;
        for step in 1..=args.steps {
            let batch = data.batch(&mut rng, args.batch_size, args.seq_len, ctx.device())?;
            // Each ep rank's loss counts 1/ep of the global batch; the weights replicated over
            // the ep group sum their gradients (the experts get theirs through the all-to-all).
            let (mut grads, ce, stats) = if pp == 1 {
                let l = model.losses(&batch, true)?;
                let store = (&l.loss / ep.size() as f64)?.backward()?;
                let grads: Vec<Option<Tensor>> = params.iter().map(|p| store.get(p.var.as_tensor()).cloned()).collect();
                (grads, l.ce_loss.to_scalar::<f32>()?, l.stats)
            } else {
                // 1F1B over the micro-batches; the last stage knows the cross-entropy.
                let mbs = split_batch(&batch, micro_batches)?;
                let (b, s) = mbs[0].dims2()?;
                let ces = std::sync::Mutex::new(vec![0f32; micro_batches]);
                let vars: Vec<_> = params.iter().map(|p| p.var.clone()).collect();
                let out = run_step(
                    pp_comm,
                    &Schedule::one_f_one_b(pp, micro_batches)?,
                    &[&MixtralStage { model: &model, train: true }],
                    &vars,
                    &mbs,
                    (&Shape::from(model.stage_activation_len(b, s)), DType::F32),
                    &|mb, y| {
                        let (l, _) = model.stage_losses(y, &mbs[mb])?;
                        ces.lock().unwrap()[mb] = l.ce_loss.to_scalar::<f32>()?;
                        l.loss / ep.size() as f64
                    },
                )?;
                let ce = ces.into_inner().unwrap().iter().sum::<f32>() / micro_batches as f32;
                // From the last stage to its pipeline; the ep average below covers every example.
                let ce = pp_comm.broadcast(&Tensor::new(&[ce], ctx.device())?, pp - 1)?.to_vec1::<f32>()?[0];
                (out.grads, ce, Vec::new())
            };
            for (p, g) in params.iter().zip(grads.iter_mut()) {
                if let (false, Some(t)) = (Mixtral::is_expert_param(&p.name), g.as_mut()) {
                    *t = ep.all_reduce(t, ReduceOp::Sum)?;
                }
            }
            // Global norm over every distinct element: shared weights once (over tp, summed over
            // the pipeline stages), experts over the whole world (unique slices per rank).
            let pick = |want_expert: bool| -> Vec<Option<Tensor>> {
                params.iter().zip(&grads).filter(|(p, _)| Mixtral::is_expert_param(&p.name) == want_expert).map(|(_, g)| g.clone()).collect()
            };
            let shared_sq = grad_norm_sq_of(&shared, &pick(false), tp)?;
            let shared_sq = pp_comm.all_reduce(&Tensor::new(&[shared_sq], ctx.device())?, ReduceOp::Sum)?.to_vec1::<f64>()?[0];
            let norm = (shared_sq + grad_norm_sq_of(&experts, &pick(true), ctx.comm())?).sqrt();
            let factor = clip_factor(norm, args.max_grad_norm);
            for g in grads.iter_mut().flatten() {
                *g = (&*g * factor)?;
            }
            opt.step_with(&grads)?;
            let loss = ep.all_reduce(&Tensor::new(&[ce], ctx.device())?, ReduceOp::Avg)?.to_vec1::<f32>()?[0];
            history.push(loss);
            if step % args.eval_every == 0 || step == args.steps {
                last_eval = eval()?.0;
                let loads: Vec<String> = stats
                    .iter()
                    .map(|s| format!("{:?} (max/mean {:.2})", s.tokens_per_expert, s.max_over_mean()))
                    .collect();
                tracing::info!(step, loss, grad_norm = norm, metric, value = last_eval, expert_load = %loads.join(" | "), "evaluation");
            }
            bar.set_message(format!("loss {loss:.3}  {metric} {last_eval:.3}"));
            bar.inc(1);
        }
        bar.finish();
        let mut tensors: Vec<ShardedTensor> = params.iter().map(ShardedTensor::from).collect();
        tensors.extend(opt.state()?);
        let opts = SaveOptions {
            step: args.steps as u64,
            mesh: mesh.shape().to_string(),
            config: serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?,
            // The tokenizer travels with the checkpoint, so that an export is a complete model.
            files: vec![("tokenizer.json".to_string(), tokenizer_json.clone())],
            interrupt_at: None,
        };
        save_checkpoint(&out_dir, &tensors, &opts, ctx.comm())?;
        Ok((history, first_eval, last_eval, metric, out_dir))
    })?;
    if !is_lead()? {
        return Ok(()); // rank 0's process reports
    }
    let (history, first, last, metric, out_dir) = &report[0];
    let avg = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
    let k = (history.len() / 10).max(1);
    println!(
        "\nloss {:.3} -> {:.3} (mean of the first and last {k} steps); {metric} {first:.3} -> {last:.3}",
        avg(&history[..k]),
        avg(&history[history.len() - k..])
    );
    println!("checkpoint: {}", out_dir.display());
    println!(
        "export it: cargo run --release --example checkpoint -- export --from {} --to target/finetune-mixtral/hf",
        out_dir.display()
    );
    Ok(())
}
