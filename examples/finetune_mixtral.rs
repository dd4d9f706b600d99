//! Fine-tunes a Mixtral-style MoE checkpoint on 4 CPU ranks laid out as ep=2 × tp=2.
//!
//! ```text
//! cargo run --release --example finetune_mixtral          # built-in task, no downloads, no flags
//! # on 4 GPUs, ranks as processes with NCCL:
//! cargo build --release --features nccl --example finetune_mixtral --example launch
//! cargo run --release --features nccl --example launch -- --nproc 4 -- finetune_mixtral
//! cargo run --release --example finetune_mixtral -- --data my.jsonl --steps 500 --mesh ep=2,tp=2
//! cargo run --release --example finetune_mixtral -- --data chat.parquet --pack --seq-len 1024
//! cargo run --release --example finetune_mixtral -- --model DIR --out runs/ckpt --lr 1e-3
//! cargo run --release --example finetune_mixtral -- --mesh dp=2,ep=2 --zero 2 --dtype bf16
//! ```
//!
//! With no arguments it creates (or reuses) a small random Mixtral-style checkpoint in Hugging
//! Face format under `target/finetune-mixtral/model`, with a word-level tokenizer built by the
//! `tokenizers` crate, and teaches it a task whose learning is visible: digit addition modulo 10
//! (`3 + 4 = 7`), measured as answer accuracy over all 100 problems. `--data` takes JSONL or
//! Parquet files or directories of them, streamed (`candle_parallel_models::data`): chat
//! `messages` rendered by the model's chat template (the loss on every assistant turn),
//! `prompt`/`completion`, or `text`; `--pack` puts several examples in each row, each with its
//! own positions and attention. A new model for it gets a byte-level tokenizer and a chat
//! template, and the evaluation is the held-out loss (and token accuracy).
//!
//! Training, with `candle_parallel::trainer`: the dp and ep ranks see different examples (each
//! its share of every global batch; the ep ranks exchange tokens with all-to-all); the tp ranks
//! split every matrix; with pp the layers are split into stages (1F1B). Gradients are reduced
//! over the replicas with ZeRO stage `--zero` (0 to 3), the global norm is clipped, AdamW
//! steps with warm-up and cosine decay, in f32 or bf16 (`--dtype`, f32 master weights); a
//! progress bar, loss and expert-load logging (per rank, `RUST_LOG=debug` for every layer),
//! periodic evaluation and checkpoints (`--checkpoint-every`, `--resume`), and at the end a
//! distributed checkpoint that `cargo run --release --example checkpoint -- export` turns into
//! a Hugging Face model.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_parallel::checkpoint::{gather_model, hf_safetensors_files, SafetensorsWriter};
use candle_parallel::checkpoint::{ParallelVarBuilder, SaveOptions};
use candle_parallel::data_parallel::{BatchGroups, Recompute};
use candle_parallel::launch::process::is_lead;
use candle_parallel::lora::{adapted_modules, merge_weight, save_peft, LoraBuilder, LoraConfig};
use candle_parallel::metrics::MetricsWriter;
use candle_parallel::moe::{AuxScope, Dispatch};
use candle_parallel::optim::AdamWConfig;
use candle_parallel::pipeline::{
    rank_chunks, run_step, split_batch, split_layers, ModelSchedule, Schedule, ScheduleKind,
};
use candle_parallel::trainer::{LrSchedule, StepReport, Trainer, TrainerConfig};
use candle_parallel::{ops, Launcher, MeshDim, MeshShape};
use candle_parallel_models::chat::ChatTemplate;
use candle_parallel_models::data::{
    data_files, max_row_bytes, Example, ExampleStream, Overflow, RowBatch, RowFormat, RowReader,
    Split, SplitMix64, Tokenize,
};
use candle_parallel_models::mixtral::{
    counted_targets, Mixtral, MixtralConfig, MixtralModel as Model, ShardedMixtral, Targets,
};
use candle_parallel_models::testing::write_random_mixtral;
use candle_parallel_models::tokenizer::{byte_tokenizer, word_tokenizer};
use clap::Parser;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a Mixtral-style MoE model with expert and tensor parallelism")]
struct Args {
    /// Hugging Face Mixtral-style model directory (config.json, safetensors, tokenizer.json);
    /// created with random weights if it does not exist.
    #[arg(long, default_value = "target/finetune-mixtral/model")]
    model: PathBuf,
    /// Training data: JSONL or Parquet files, several (comma separated) or directories of
    /// them (a Hugging Face dataset's `data/*.parquet` shards), read row by row as needed.
    /// Rows of chat `messages` (rendered by the model's chat template; the loss counts every
    /// assistant turn), `prompt`/`completion` (the loss counts the completion) or `text`; plain
    /// text files (one example per line) too. Examples go one per row padded to --seq-len, or
    /// several per row with --pack; every tenth is held out for the evaluation loss (or
    /// --eval-data), the mean over every counted token of the global batch whatever the layout
    /// and micro-batches; padding goes through the experts and counts in the routing
    /// statistics, but not in the load-balancing loss, as HF's attention mask leaves it out.
    /// Text rows without --pack are one token stream (read whole) cut into rows. Default: the
    /// built-in addition task.
    #[arg(long, value_delimiter = ',')]
    data: Vec<PathBuf>,
    /// Held-out data for the evaluation loss (its first 32 examples; formats as --data)
    /// instead of every tenth example of --data.
    #[arg(long, value_delimiter = ',')]
    eval_data: Vec<PathBuf>,
    /// The chat template for `messages` rows: a Jinja file (or a tokenizer_config.json holding
    /// one) instead of the model's own (`chat_template` in its tokenizer_config.json).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Pack several examples into each row of --seq-len tokens (each keeping its own
    /// positions and attention, as flash-attention's variable-length path): no compute spent
    /// on padding. The loss and gradients equal those of the same examples padded.
    #[arg(long)]
    pack: bool,
    /// With --pack, an example longer than --seq-len: split (into rows of its own), drop, or
    /// error.
    #[arg(long, default_value_t = Overflow::Split)]
    pack_overflow: Overflow,
    /// Examples read ahead and drawn from at random (the shuffle buffer): memory holds this
    /// many examples, not the dataset. Each pass over the data is in a new order, the same for
    /// the same --seed.
    #[arg(long, default_value_t = 10_000)]
    shuffle_buffer: usize,
    /// Skip (and count) rows that are malformed (not UTF-8, not JSON, lacking a field), longer
    /// than --seq-len could hold (refused from their byte length, before tokenizing), have an
    /// empty completion or do not fit --seq-len, instead of stopping at the first with its
    /// line number.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Layout, e.g. `ep=2,tp=2`, `dp=2,ep=2`, `pp=2,ep=2`; the world size is the product of
    /// the sizes. dp and ep ranks see different examples (each its share of every global
    /// batch); tp ranks split every matrix; pp ranks hold consecutive layers.
    #[arg(long, default_value = "ep=2,tp=2")]
    mesh: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Linear warm-up from 0 to --lr over this many steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Cosine decay from --lr after the warm-up down to this at the last step (default: --lr,
    /// a constant rate).
    #[arg(long)]
    min_lr: Option<f64>,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Sequences per step over all replicas (dp × ep); each replica takes its equal share.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Tokens per training sequence for --data.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Clip the global gradient norm (over every rank) to this.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Micro-batches per step on each replica: gradient accumulation, pipelined with a 1F1B
    /// schedule when --mesh has pp. Default: 1, or twice the stages with pp. Must divide each
    /// replica's share of --batch-size.
    #[arg(long)]
    micro_batches: Option<usize>,
    /// ZeRO stage: 0 (every replica holds the whole optimizer state), 1 (optimizer state
    /// sharded over the replicas), 2 (gradients too), 3 (parameters too: each layer gathered
    /// just before use and freed after; inside pipeline stages too).
    #[arg(long, default_value_t = 0)]
    zero: u8,
    /// Activation recomputation: none (keep every layer's activations for the backward),
    /// selective (keep them but for the attention scores, the experts' SwiGLU activations
    /// and the MoE combine, recomputed in the backward) or full (keep each layer's input only; run
    /// the layer again just before its backward), at every ZeRO stage.
    #[arg(long, default_value_t = Recompute::None)]
    recompute: Recompute,
    /// Pipeline schedule with pp above 1 in --mesh: gpipe, 1f1b, interleaved (several model
    /// chunks per rank, --chunks; ZeRO 0-2) or zero-bubble (split backwards, planned for the
    /// costs measured in the first step; ZeRO 0-2).
    #[arg(long, default_value_t = ScheduleKind::OneFOneB)]
    schedule: ScheduleKind,
    /// Model chunks per pipeline rank (Megatron's virtual stages) with the interleaved
    /// schedule: the layers are split into pp × chunks stages, rank r holding stages r,
    /// r + pp, ... Default: 2 with interleaved, 1 otherwise.
    #[arg(long)]
    chunks: Option<usize>,
    /// Parameter and activation dtype: f32, or bf16 (mixed precision: f32 master weights and
    /// optimizer state, gradients reduced in --reduce-dtype).
    #[arg(long, default_value = "f32")]
    dtype: String,
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
    /// Also write TensorBoard event files into this directory (loss, aux loss, learning rate,
    /// grad norm, tokens/s, evaluation, and every layer's expert load as a histogram);
    /// `metrics.jsonl` in --out gets the same as JSON lines either way.
    #[arg(long)]
    tensorboard: Option<PathBuf>,
    /// Draw the training loss in loss.svg on a log scale.
    #[arg(long)]
    loss_log_scale: bool,
    /// Evaluate (and log the expert load) every this many steps.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Where the distributed checkpoints go (`step-N` directories inside).
    #[arg(long, default_value = "target/finetune-mixtral/checkpoints")]
    out: PathBuf,
    /// Also save a checkpoint every this many steps (0: only after the last step).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    /// Resume from a checkpoint this program saved (any layout, any ZeRO stage): its
    /// parameters, optimizer state and step, continuing the same data order and schedule.
    /// Without it, a job whose --out holds a complete checkpoint before --steps resumes from
    /// the latest one (an interrupted job picks up where it stopped).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start afresh even when --out holds an unfinished job's checkpoint.
    #[arg(long)]
    no_resume: bool,
    /// LoRA: train rank-r adapters on --lora-targets instead of every weight (0: off). The
    /// base weights are frozen; at the end the adapters are written in PEFT's format to
    /// --out/adapters and merged into the base weights in --out/merged (a Hugging Face model).
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// LoRA's alpha: the adapters' output is scaled by alpha / rank.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// The modules LoRA adapts (PEFT's target_modules, comma separated); by default attention
    /// and the experts' projections (q_proj, k_proj, v_proj, o_proj and w1, w2, w3 for Mixtral,
    /// gate_proj, up_proj, down_proj for the Qwen MoE families).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// Keep only the latest this many checkpoints in --out (older ones are deleted after a
    /// newer one is complete).
    #[arg(long, default_value_t = 3)]
    keep_last: usize,
    /// Write one log file per rank into this directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Seed of the data order (and of the random model, when one is created).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The training data, as token ids.
enum Data {
    /// Digit addition modulo 10: every problem `a + b = c`.
    Addition { problems: Vec<[u32; 5]> },
    /// Text rows without --pack: one token stream cut into rows (read whole); the last tenth
    /// held out.
    Text { train: Vec<u32>, eval: Vec<u32> },
    /// Examples read from the files as needed (chat messages, prompt/completion, or text with
    /// --pack), one per padded row or packed; the held-out set read up front.
    Examples {
        files: Vec<PathBuf>,
        format: RowFormat,
        eval: Vec<Example>,
        pad: u32,
    },
}

/// The chat template of a new model for --data: ChatML-like turns ended by the end token.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

const ADDITION_WORDS: [&str; 12] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "+", "="];

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| candle_core::Error::msg(format!("tokenizer: {e}")))?
        .get_ids()
        .to_vec())
}

/// The "text" of every row of `files`, and how many bad rows were skipped (with `skip_bad`;
/// otherwise the first bad row is an error naming its file and line or row).
fn load_text(files: &[PathBuf], skip_bad: bool) -> Result<(Vec<String>, usize)> {
    let mut rows = RowReader::new(files, usize::MAX);
    let (mut out, mut skipped) = (Vec::new(), 0);
    while let Some(row) = rows.next_row()? {
        let text = row
            .value
            .and_then(|v| match v.get("text").and_then(|t| t.as_str()) {
                Some(t) => Ok(t.to_string()),
                None => Err("no string field \"text\"".to_string()),
            });
        match text {
            Ok(t) => out.push(t),
            Err(_) if skip_bad => skipped += 1,
            Err(e) => candle_core::bail!("{}: {e} (--skip-bad-rows skips such rows)", row.at),
        }
    }
    Ok((out, skipped))
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
        let tok = if !args.data.is_empty() {
            byte_tokenizer()?
        } else {
            word_tokenizer(&ADDITION_WORDS)?
        };
        let tiny = MixtralConfig::tiny();
        let cfg = MixtralConfig {
            vocab_size: tok.get_vocab_size(true),
            // The byte tokenizer's end token ends completions and chat turns.
            eos_token_id: tok.token_to_id("<eos>").or(tiny.eos_token_id),
            ..tiny
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
        if !args.data.is_empty() {
            // A chat template, as instruct models have one, for `messages` data: each turn
            // `<|role|>` and its text, ended by the end token.
            let config = serde_json::json!({
                "chat_template": CHAT_TEMPLATE,
                "bos_token": "",
                "eos_token": "<eos>",
            });
            candle_parallel::checkpoint::write_file(
                &tmp.join("tokenizer_config.json"),
                &serde_json::to_vec_pretty(&config).map_err(candle_core::Error::wrap)?,
            )?;
        }
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

/// The rows' tokenizing for `format`: examples up to --seq-len tokens, or any length with
/// --pack (packing splits, drops or refuses the longer ones itself).
fn tokenize_for<'a>(
    args: &Args,
    format: RowFormat,
    tok: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    cfg: &MixtralConfig,
    pack: bool,
) -> Tokenize<'a> {
    let mut t = Tokenize::new(format, tok, template, cfg.eos_token_id, args.seq_len);
    if pack {
        t.max_tokens = None;
        // Packing reads rows of any length (it splits them): bound what one row may hold.
        t.max_bytes = max_row_bytes(args.seq_len * 64);
    }
    t
}

fn prepare_data(
    args: &Args,
    tok: &Tokenizer,
    cfg: &MixtralConfig,
) -> Result<(Data, Option<ChatTemplate>)> {
    if args.data.is_empty() {
        if !args.eval_data.is_empty() || args.pack {
            candle_core::bail!("--eval-data and --pack go with --data");
        }
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
        return Ok((Data::Addition { problems }, None));
    }
    let files = data_files(&args.data)?;
    let format = RowFormat::detect(&files)?;
    if format == RowFormat::Text && !args.pack {
        if !args.eval_data.is_empty() {
            candle_core::bail!("--eval-data with text rows: text without --pack is one stream whose last tenth is held out; add --pack to train on the rows as examples");
        }
        let (texts, skipped) = load_text(&files, args.skip_bad_rows)?;
        if skipped > 0 {
            eprintln!("--data: skipped {skipped} bad rows (--skip-bad-rows)");
        }
        let mut stream = Vec::new();
        for t in texts {
            stream.extend(encode(tok, &t)?);
        }
        let cut = stream.len() * 9 / 10;
        if cut < args.seq_len + 1 || stream.len() - cut < args.seq_len + 1 {
            candle_core::bail!(
                "--data {} has {} tokens: too few for --seq-len {} (need 10× that)",
                files[0].display(),
                stream.len(),
                args.seq_len
            );
        }
        let eval = stream.split_off(cut);
        check_vocab(stream.iter().chain(&eval).copied(), cfg)?;
        return Ok((
            Data::Text {
                train: stream,
                eval,
            },
            None,
        ));
    }
    let template = match format {
        RowFormat::Messages => Some(ChatTemplate::from_model(
            &args.model,
            args.chat_template.as_deref(),
        )?),
        _ => None,
    };
    let eval_files = match args.eval_data.is_empty() {
        true => None,
        false => Some(data_files(&args.eval_data)?),
    };
    // The held-out set (every tenth example of --data, or --eval-data's first), read up
    // front; it also shows the first bad rows before any rank starts. Held-out examples are
    // at most --seq-len tokens: with --pack the longer ones are cut.
    let t = tokenize_for(args, format, tok, template.as_ref(), cfg, args.pack);
    let eval = match &eval_files {
        Some(f) => ExampleStream::new(f, &t, Split::All, 0, 1, args.skip_bad_rows).first(32)?,
        None => ExampleStream::new(&files, &t, Split::Eval, 0, 1, args.skip_bad_rows).first(32)?,
    };
    if eval.is_empty() {
        candle_core::bail!("--data {}: no usable held-out example (every tenth example is held out, or give --eval-data)", files[0].display());
    }
    // And at least one to train on.
    if ExampleStream::new(&files, &t, Split::Train, 0, 1, args.skip_bad_rows)
        .first(1)?
        .is_empty()
    {
        candle_core::bail!("--data {}: no usable training example (every tenth example is held out, so at least 2 are needed)", files[0].display());
    }
    check_vocab(eval.iter().flat_map(|e| e.ids.iter()).copied(), cfg)?;
    Ok((
        Data::Examples {
            files,
            format,
            eval,
            pad: cfg.eos_token_id.unwrap_or(0),
        },
        template,
    ))
}

/// An error if a token id is beyond the model's vocabulary (a tokenizer that is not the
/// model's).
fn check_vocab(ids: impl Iterator<Item = u32>, cfg: &MixtralConfig) -> Result<()> {
    if ids.max().is_some_and(|m| m as usize >= cfg.vocab_size) {
        candle_core::bail!(
            "the tokenizer produces ids beyond the model's vocabulary of {}",
            cfg.vocab_size
        );
    }
    Ok(())
}

/// One global batch: the ids `[n, s]` and, for examples, the labels (HF's convention: what
/// the loss does not count is -100), the attention mask (0 on the padding) and,
/// packed, the position ids; and the tokens that are not padding.
struct GlobalBatch {
    ids: Tensor,
    targets: Option<(Tensor, Tensor, Option<Tensor>)>,
    tokens: usize,
}

/// Where a rank draws its global batches from: the generator (addition, text) or the example
/// stream (every rank reads the same stream, so all draw the same global batches).
enum Draw<'a> {
    Rng(SplitMix64),
    Stream(Box<ExampleStream<'a>>),
}

impl Data {
    fn draw(&self, from: &mut Draw, args: &Args, device: &Device) -> Result<GlobalBatch> {
        let (n, seq_len) = (args.batch_size, args.seq_len);
        match (self, from) {
            (Data::Examples { pad, .. }, Draw::Stream(s)) => {
                let b = if args.pack {
                    s.packed_batch(n, seq_len, *pad, args.pack_overflow)?
                } else {
                    s.padded_batch(n, seq_len, *pad)?
                };
                row_batch_tensors(&b, device)
            }
            (Data::Addition { problems }, Draw::Rng(rng)) => {
                let rows: Vec<Vec<u32>> = (0..n)
                    .map(|_| problems[rng.below(problems.len())].to_vec())
                    .collect();
                let tokens = n * rows[0].len();
                Ok(GlobalBatch {
                    ids: Tensor::new(rows, device)?,
                    targets: None,
                    tokens,
                })
            }
            (Data::Text { train, .. }, Draw::Rng(rng)) => {
                let rows: Vec<Vec<u32>> = (0..n)
                    .map(|_| {
                        let at = rng.below(train.len() - seq_len);
                        train[at..at + seq_len + 1].to_vec()
                    })
                    .collect();
                Ok(GlobalBatch {
                    ids: Tensor::new(rows, device)?,
                    targets: None,
                    tokens: n * (seq_len + 1),
                })
            }
            _ => candle_core::bail!("internal: the data and its draw do not match"),
        }
    }
}

/// A [`RowBatch`] as tensors, with the ids checked against the vocabulary.
fn row_batch_tensors(b: &RowBatch, device: &Device) -> Result<GlobalBatch> {
    let shape = (b.rows(), b.seq_len);
    let ids = Tensor::from_vec(b.ids.clone(), shape, device)?;
    let labels = Tensor::from_vec(b.labels.clone(), shape, device)?;
    let mask = Tensor::from_vec(b.mask.clone(), shape, device)?;
    let positions = b
        .positions
        .as_ref()
        .map(|p| Tensor::from_vec(p.clone(), shape, device))
        .transpose()?;
    Ok(GlobalBatch {
        ids,
        targets: Some((labels, mask, positions)),
        tokens: b.tokens(),
    })
}

/// The complete checkpoints (`step-N`, `step-N.k`) in `dir`, oldest first: (step, directory).
fn checkpoints(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix("step-")?;
            let (step, copy) = match rest.split_once('.') {
                Some((s, k)) => (s.parse().ok()?, k.parse().ok()?),
                None => (rest.parse().ok()?, 0),
            };
            e.path()
                .join(candle_parallel::checkpoint::COMPLETE_FILE)
                .is_file()
                .then(|| (step, copy, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(s, _, p)| (s, p)).collect()
}

/// About `n` round tick values (1, 2 or 5 times a power of ten apart) covering `lo..=hi`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let raw = (hi - lo).max(f64::MIN_POSITIVE) / n.max(1) as f64;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick label: few digits, without trailing zeros.
fn tick_label(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// The training loss over the steps (a line, on a log scale with `log_scale`) and the
/// evaluation metric (points, on its own scale at the right), as an SVG picture with ticked
/// axes and a light grid.
fn loss_svg(
    history: &[StepReport],
    evals: &[(usize, f64)],
    metric: &str,
    log_scale: bool,
) -> String {
    let (w, h, pad) = (680.0, 380.0, 60.0);
    let steps = |s: usize| s as f64;
    let (x0, x1) = (
        steps(evals[0].0.min(history[0].step)),
        steps(history[history.len() - 1].step).max(1.0),
    );
    let range = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5, hi + 0.5)
        }
    };
    // A log scale needs positive losses; the picture says which scale it used.
    let log_scale = log_scale && history.iter().all(|r| r.loss > 0.0);
    let scale = |v: f64| if log_scale { v.log10() } else { v };
    let (l0, l1) = range(&mut history.iter().map(|r| scale(r.loss)));
    let (e0, e1) = range(&mut evals.iter().map(|e| e.1));
    let px = |s: f64| pad + (s - x0) / (x1 - x0).max(1.0) * (w - 2.0 * pad);
    let py = |v: f64, lo: f64, hi: f64| h - pad - (v - lo) / (hi - lo) * (h - 2.0 * pad);
    let line: Vec<String> = history
        .iter()
        .map(|r| format!("{:.1},{:.1}", px(steps(r.step)), py(scale(r.loss), l0, l1)))
        .collect();
    let dots: String = evals
        .iter()
        .map(|&(s, v)| {
            format!(
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#d95f02"><title>step {s}: {metric} {v:.4}</title></circle>"##,
                px(steps(s)),
                py(v, e0, e1)
            )
        })
        .collect();
    let (b, r) = (h - pad, w - pad);
    let mut axes = String::new();
    for t in ticks(x0, x1, 8) {
        let x = px(t);
        axes += &format!(
            r##"<line x1="{x:.1}" y1="{pad}" x2="{x:.1}" y2="{b}" stroke="#eeeeee"/><line x1="{x:.1}" y1="{b}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            b + 5.0,
            b + 18.0,
            tick_label(t)
        );
    }
    // Loss ticks: on a log scale at 1, 2 and 5 times powers of ten (their logs), else round.
    let loss_ticks: Vec<(f64, f64)> = if log_scale {
        let (lo, hi) = (l0.floor() as i32, l1.ceil() as i32);
        (lo..=hi)
            .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
            .map(|v| (v.log10(), v))
            .filter(|(l, _)| (l0..=l1).contains(l))
            .collect()
    } else {
        ticks(l0, l1, 6).into_iter().map(|v| (v, v)).collect()
    };
    for (pos, v) in loss_ticks {
        let y = py(pos, l0, l1);
        axes += &format!(
            r##"<line x1="{pad}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#eeeeee"/><line x1="{:.1}" y1="{y:.1}" x2="{pad}" y2="{y:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            pad - 5.0,
            pad - 8.0,
            y + 4.0,
            tick_label(v)
        );
    }
    for t in ticks(e0, e1, 6) {
        let y = py(t, e0, e1);
        axes += &format!(
            r##"<line x1="{r}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#d95f02"/><text x="{:.1}" y="{:.1}" fill="#d95f02">{}</text>"##,
            r + 5.0,
            r + 8.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let loss_name = if log_scale {
        "training loss (left, log scale)"
    } else {
        "training loss (left)"
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
{axes}
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/><line x1="{r}" y1="{pad}" x2="{r}" y2="{b}" stroke="#d95f02"/>
<polyline fill="none" stroke="#1b9e77" stroke-width="1.5" points="{pts}"/>
{dots}
<text x="{pad}" y="{t}">{loss_name}</text>
<text x="{r}" y="{t}" text-anchor="end" fill="#d95f02">{metric} (right)</text>
<text x="{mid}" y="{xl}" text-anchor="middle">step</text>
</svg>
"##,
        t = pad - 20.0,
        mid = w / 2.0,
        xl = h - pad + 38.0,
        pts = line.join(" ")
    )
}

/// `base`, or `base.1`, `base.2`, ...: the first that does not exist (checkpoints are never
/// overwritten).
fn unused_dir(base: &Path) -> PathBuf {
    std::iter::once(base.to_path_buf())
        .chain((1..).map(|i| PathBuf::from(format!("{}.{i}", base.display()))))
        .find(|d| !d.exists())
        .expect("an unused directory name")
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
    if args.zero > 3 {
        candle_core::bail!("--zero {}: the ZeRO stages are 0, 1, 2 and 3", args.zero);
    }
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => candle_core::bail!("--dtype {other}: use f32 or bf16"),
    };
    let reduce_dtype = match args.reduce_dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => candle_core::bail!("--reduce-dtype {other}: use f32 or bf16"),
    };
    let (dp, pp, ep) = (
        mesh.size(MeshDim::Dp),
        mesh.size(MeshDim::Pp),
        mesh.size(MeshDim::Ep),
    );
    let replicas = dp * ep;
    let micro_batches = args
        .micro_batches
        .unwrap_or(if pp > 1 { 2 * pp } else { 1 });
    if args.batch_size % replicas != 0 {
        candle_core::bail!(
            "--batch-size {} does not split over the dp × ep = {replicas} replicas of --mesh {}: use a multiple of {replicas}",
            args.batch_size,
            args.mesh
        );
    }
    let per_replica = args.batch_size / replicas;
    split_batch(
        &Tensor::zeros((per_replica, 1), DType::F32, &Device::Cpu)?,
        micro_batches,
    )
    .map_err(|e| {
        candle_core::Error::msg(format!(
            "--micro-batches (each replica has {per_replica} sequences): {e}"
        ))
    })?;
    let (cfg, tok) = prepare_model(&args)?;
    cfg.check_aux_loss()?;
    let stages = split_layers(cfg.num_hidden_layers, pp)?;
    let chunks = ModelSchedule::chunks_for(args.schedule, args.chunks, cfg.num_hidden_layers, pp)?;
    let lora = (args.lora_rank > 0).then(|| LoraConfig {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
        target_modules: if args.lora_targets.is_empty() {
            cfg.family().map(|f| f.lora_targets()).unwrap_or_default()
        } else {
            args.lora_targets.clone()
        },
    });
    if lora.is_some() && args.zero == 3 {
        candle_core::bail!("--lora-rank with --zero 3: the adapters are small, shard their optimizer state with --zero 1 or 2");
    }
    if pp > 1 && cfg.tie_word_embeddings {
        candle_core::bail!("--mesh with pp: a head tied to the embedding would be two copies on the first and last stages, whose gradients are not summed yet; train it without pp");
    }
    let tokenizer_json =
        candle_parallel::checkpoint::read_file(&args.model.join("tokenizer.json"))?;
    let tokenizer_config = Some(args.model.join("tokenizer_config.json"))
        .filter(|p| p.is_file())
        .map(|p| candle_parallel::checkpoint::read_file(&p))
        .transpose()?;
    let cfg_json = serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?;
    if args.keep_last == 0 {
        candle_core::bail!("--keep-last must be at least 1 (the checkpoint just written)");
    }
    let resume = match (&args.resume, args.no_resume) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => None,
        // An unfinished job in --out: go on from its latest checkpoint.
        (None, false) => match checkpoints(&args.out).into_iter().next_back() {
            Some((step, dir)) if (step as usize) >= args.steps => {
                // A finished job: nothing to do, and nothing overwritten or pruned.
                if is_lead()? {
                    println!(
                        "{} holds the finished job (step {step}, {}): nothing to do; raise --steps to continue it, or use --no-resume or another --out to start again",
                        args.out.display(),
                        dir.display()
                    );
                }
                return Ok(());
            }
            latest => latest.map(|(_, dir)| dir),
        },
    };
    if let (Some(dir), None, true) = (&resume, &args.resume, is_lead()?) {
        eprintln!(
            "resuming from {} (the latest checkpoint in --out; --no-resume starts afresh)",
            dir.display()
        );
    }
    // The loss history so far, carried on in the next checkpoint.
    let earlier: Vec<serde_json::Value> = resume
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("history.json")).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let started = std::time::Instant::now();
    let (data, template) = prepare_data(&args, &tok, &cfg)?;
    let tokens_per_step = args.batch_size
        * match &data {
            Data::Addition { problems } => problems[0].len(),
            Data::Text { .. } => args.seq_len + 1,
            Data::Examples { .. } => args.seq_len,
        };
    // Rows the model cannot take are refused here, before any rank starts.
    let row = tokens_per_step / args.batch_size.max(1);
    let limit = cfg
        .max_position_embeddings
        .min(cfg.sliding_window.unwrap_or(usize::MAX));
    if row > limit {
        candle_core::bail!(
            "--seq-len {}: rows of {row} tokens exceed the model's {} of {limit}: use --seq-len {} or less",
            args.seq_len,
            if limit == cfg.max_position_embeddings { "max_position_embeddings" } else { "sliding_window" },
            limit - (row - args.seq_len)
        );
    }
    let world = mesh.world_size();
    let mut launcher = Launcher::new(world).mesh(mesh);
    if let Some(dir) = &args.log_dir {
        launcher = launcher.log_dir(dir);
    }
    let report = launcher.run(|ctx| {
        let mesh = ctx.mesh()?;
        let (ep_comm, tp, pp_comm) = (mesh.ep(), mesh.tp(), mesh.pp());
        let vb = match (&resume, &lora) {
            // A LoRA checkpoint holds the adapters; the base comes from --model.
            (Some(dir), Some(_)) => ParallelVarBuilder::from_checkpoint_over_hf_dir(dir, &args.model, dtype, ctx.device())?,
            (Some(dir), None) => ParallelVarBuilder::from_checkpoint(dir, dtype, ctx.device())?,
            (None, _) => ParallelVarBuilder::from_hf_dir(&args.model, dtype, ctx.device())?,
        }
        .trainable();
        let vb = match &lora {
            Some(cfg) => vb.with_lora(cfg.clone())?,
            None => vb,
        };
        let tcfg = TrainerConfig {
            steps: args.steps,
            lr: LrSchedule::warmup_cosine(args.lr, args.min_lr.unwrap_or(args.lr), args.warmup_steps, args.steps),
            adamw: AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
            clip: Some(args.max_grad_norm),
            zero_stage: args.zero,
            reduce_dtype,
            overlap_comm: !args.no_overlap,
            progress: true,
            tokens_per_step,
            ..Default::default()
        };
        let batch_dims = [MeshDim::Dp, MeshDim::Ep];
        let (model, mut trainer) = if args.zero == 3 {
            // Every layer a sharded module: gathered just before use, freed after.
            let groups = BatchGroups::new(mesh, &batch_dims)?;
            // With pipeline stages, of this rank's stage only.
            let layers = stages[pp_comm.rank()].clone();
            let mut m = ShardedMixtral::new_stage(&cfg, vb.clone(), &groups, mesh, Dispatch::AllToAll, layers)?;
            m.set_schedule(args.schedule)?;
            m.set_recompute(args.recompute);
            let t = Trainer::sharded(&m.units(), vb.params(), &groups, mesh, tcfg)?;
            (Model::Sharded(Box::new(m)), t)
        } else {
            // With pipeline stages each rank builds (and reads) only its stage's layers (its
            // chunks' with the interleaved schedule).
            let layers = rank_chunks(cfg.num_hidden_layers, pp, chunks, pp_comm.rank())?;
            let mut m = Mixtral::new_chunks(&cfg, vb.clone(), ep_comm, tp, Dispatch::AllToAll, &layers)?;
            m.set_schedule(args.schedule)?;
            if lora.is_some() && vb.params().is_empty() {
                candle_core::bail!("--lora-targets {}: no module of the model matches (this model's are {})", lora.as_ref().map(|l| l.target_modules.join(",")).unwrap_or_default(), cfg.family()?.lora_targets().join(", "));
            }
            let t = Trainer::new(vb.params(), mesh, &batch_dims, tcfg)?;
            (Model::Whole(Box::new(m)), t)
        };
        // The ranks that route other tokens: a router's balancing and the global
        // load-balancing loss sum their loads.
        let batch_comm = mesh.comm_over(&batch_dims)?;
        let mut model = model;
        model.set_aux_scope(args.aux_scope, &batch_comm);
        if resume.is_some() {
            trainer.resume(&vb)?;
        }
        tracing::info!(read_bytes = vb.bytes_read(), memory = ?trainer.memory(), "model loaded");
        // The rank that tells everyone the last stage's results: the last stage's first ep
        // and tp rank of dp replica 0 (ranks are laid out dp, pp, ep, tp with tp fastest).
        let root = (pp - 1) * ep * tp.size();
        // Logits `[b, s, vocab]` and cross-entropy for `ids`, on every rank, through the
        // pipeline stages (a forward and a discarded backward).
        let through_stages = |ids: &Tensor, labels: Option<&Tensor>, mask: Option<&Tensor>| -> Result<(Tensor, f32)> {
            let (b, s) = ids.dims2()?;
            let kept = std::sync::Mutex::new(None);
            let chunks;
            let (stages, len, schedule): (Vec<&dyn candle_core::Module>, usize, Schedule) = match &model {
                Model::Whole(m) => {
                    chunks = m.stages(false);
                    let refs = chunks.iter().map(|c| c as &dyn candle_core::Module).collect();
                    (refs, m.stage_activation_len(b, s), m.schedule().forward_schedule(pp, 1)?)
                }
                Model::Sharded(m) => (vec![m.as_ref()], m.stage_activation_len(b, s), Schedule::gpipe(pp, 1)?),
            };
            run_step(
                pp_comm,
                &schedule,
                &stages,
                &[],
                std::slice::from_ref(ids),
                (&Shape::from(len), DType::F32),
                &|_, y| {
                    let (l, logits) = match &model {
                        Model::Whole(m) => m.stage_losses_labeled(y, ids, labels, mask)?,
                        Model::Sharded(m) => m.stage_losses_labeled(y, ids, labels, mask)?,
                    };
                    *kept.lock().unwrap() = Some((logits.to_dtype(DType::F32)?, l.ce_loss.to_dtype(DType::F32)?.unsqueeze(0)?));
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
        // Held-out examples go through the model a few rows at a time: the logits of a chunk
        // (f32, every position, the whole vocabulary) stay within about 256 MiB.
        let eval_rows = ((256usize << 20) / (args.seq_len * cfg.vocab_size * 4)).max(1);
        let eval = || -> Result<(f64, &'static str)> {
            match &data {
                Data::Addition { problems } => {
                    let prompts = Tensor::new(problems.iter().map(|p| p[..4].to_vec()).collect::<Vec<_>>(), ctx.device())?;
                    let logits = match (&model, pp) {
                        (Model::Sharded(m), 1) => m.losses(&prompts, None, None)?.1,
                        (Model::Whole(m), 1) => m.forward(&prompts, 0, None)?,
                        _ => through_stages(&prompts, None, None)?.0,
                    };
                    let guess = logits.narrow(1, 3, 1)?.squeeze(1)?.argmax(1)?.to_vec1::<u32>()?;
                    let right = guess.iter().zip(problems).filter(|(g, p)| **g == p[4]).count();
                    Ok((right as f64 / problems.len() as f64, "accuracy"))
                }
                Data::Examples { eval, pad, .. } => {
                    // The held-out examples' loss (what the loss does not count and padding
                    // left out), a few rows at a time, weighted by their counted tokens.
                    let (mut sum, mut counted) = (0f64, 0usize);
                    for chunk in eval.chunks(eval_rows) {
                        let b = row_batch_tensors(&RowBatch::padded(chunk, args.seq_len, *pad), ctx.device())?;
                        let (rows, (labels, mask, _)) = (b.ids, b.targets.expect("examples have targets"));
                        let n = counted_targets(&labels)?;
                        if n == 0 {
                            continue;
                        }
                        let ce = match (&model, pp) {
                            (Model::Sharded(m), 1) => m.losses(&rows, Some(&labels), Some(&mask))?.0.ce_loss,
                            (Model::Whole(m), 1) => m.losses_labeled(&rows, Some(&labels), Some(&mask), false)?.ce_loss,
                            _ => Tensor::new(through_stages(&rows, Some(&labels), Some(&mask))?.1, ctx.device())?,
                        }
                        .to_dtype(DType::F32)?
                        .to_scalar::<f32>()?;
                        sum += ce as f64 * n as f64;
                        counted += n;
                    }
                    Ok((sum / counted.max(1) as f64, "eval loss"))
                }
                Data::Text { eval, .. } => {
                    let n = (eval.len() - 1) / args.seq_len;
                    let rows: Vec<Vec<u32>> = (0..n.min(8)).map(|i| eval[i * args.seq_len..=(i + 1) * args.seq_len].to_vec()).collect();
                    let rows = Tensor::new(rows, ctx.device())?;
                    let ce = match (&model, pp) {
                        (Model::Sharded(m), 1) => m.losses(&rows, None, None)?.0.ce_loss,
                        (Model::Whole(m), 1) => m.losses(&rows, false)?.ce_loss,
                        _ => Tensor::new(through_stages(&rows, None, None)?.1, ctx.device())?,
                    }
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                    Ok((ce as f64, "eval loss"))
                }
            }
        };
        // Examples: also the share of the held-out counted tokens the model predicts (greedy),
        // as TRL's mean_token_accuracy.
        let token_accuracy = || -> Result<Option<f64>> {
            let Data::Examples { eval, pad, .. } = &data else {
                return Ok(None);
            };
            let (mut right, mut counted) = (0usize, 0usize);
            for chunk in eval.chunks(eval_rows) {
                let b = row_batch_tensors(&RowBatch::padded(chunk, args.seq_len, *pad), ctx.device())?;
                let (rows, (labels, mask, _)) = (b.ids, b.targets.expect("examples have targets"));
                let logits = match (&model, pp) {
                    (Model::Sharded(m), 1) => m.losses(&rows, Some(&labels), Some(&mask))?.1,
                    (Model::Whole(m), 1) => m.forward(&rows, 0, None)?,
                    _ => through_stages(&rows, Some(&labels), Some(&mask))?.0,
                };
                let s = args.seq_len;
                let guess = logits.narrow(1, 0, s - 1)?.argmax(2)?.to_vec2::<u32>()?;
                let labels = labels.narrow(1, 1, s - 1)?.to_vec2::<i64>()?;
                for (g, l) in guess.iter().flatten().zip(labels.iter().flatten()) {
                    if *l >= 0 {
                        counted += 1;
                        right += usize::from(*g as i64 == *l);
                    }
                }
            }
            Ok(Some(right as f64 / counted.max(1) as f64))
        };
        let (first_eval, metric) = eval()?;
        let first_accuracy = token_accuracy()?;
        tracing::info!(step = trainer.steps_done(), metric, value = first_eval, token_accuracy = first_accuracy, "evaluation");
        let mut accuracies: Vec<(usize, f64)> = first_accuracy.map(|a| (trainer.steps_done(), a)).into_iter().collect();
        let save = |trainer: &Trainer, history: &[StepReport]| -> Result<PathBuf> {
            // Rank 0 names the checkpoint directory for all (ranks may be processes that
            // started at different times).
            let base = args.out.join(format!("step-{:06}", trainer.steps_done()));
            if ctx.rank() == 0 && base.is_dir() && !base.join(candle_parallel::checkpoint::COMPLETE_FILE).exists() {
                // What an interrupted save of this step left: never a checkpoint, safe to drop.
                tracing::warn!(dir = %base.display(), "removing an interrupted save");
                std::fs::remove_dir_all(&base).map_err(|e| candle_core::Error::msg(format!("cannot remove {}: {e}", base.display())))?;
            }
            let pick = if ctx.rank() == 0 { unused_dir(&base).to_string_lossy().into_owned() } else { String::new() };
            let dir = PathBuf::from(String::from_utf8_lossy(&ctx.comm().all_gather_bytes(pick.as_bytes())?[0]).into_owned());
            let mut log: Vec<serde_json::Value> = earlier
                .iter()
                .filter(|e| e["step"].as_u64().is_some_and(|s| (s as usize) <= history[0].step.saturating_sub(1)))
                .cloned()
                .collect();
            log.extend(history.iter().map(|r| {
                serde_json::json!({"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr, "tokens_per_sec": r.tokens_per_sec})
            }));
            let opts = SaveOptions {
                config: serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?,
                // The tokenizer travels with the checkpoint, so that an export is a complete
                // model; the loss history with it.
                files: [
                    ("tokenizer.json".to_string(), tokenizer_json.clone()),
                    ("history.json".to_string(), serde_json::to_vec_pretty(&log).map_err(candle_core::Error::wrap)?),
                ]
                .into_iter()
                // The chat template goes with it, for `generate --chat` on the export.
                .chain(tokenizer_config.clone().map(|c| ("tokenizer_config.json".to_string(), c)))
                .collect(),
                ..Default::default()
            };
            trainer.save_with(&dir, &opts, &model.buffers())?;
            if ctx.rank() == 0 {
                // The newest --keep-last complete checkpoints stay; the others go.
                let all = checkpoints(&args.out);
                for (_, old) in all.iter().take(all.len().saturating_sub(args.keep_last)) {
                    if *old != dir {
                        if let Err(e) = std::fs::remove_dir_all(old) {
                            tracing::warn!(dir = %old.display(), error = %e, "cannot delete an old checkpoint");
                        }
                    }
                }
            }
            Ok(dir)
        };
        // Rank 0's metrics for scripts (metrics.jsonl) and, asked, TensorBoard.
        let mut metrics = match ctx.rank() {
            0 => Some(MetricsWriter::create(&args.out.join("metrics.jsonl"), args.tensorboard.as_deref())?),
            _ => None,
        };
        if let Some(m) = metrics.as_mut() {
            // The evaluation before training (or at the resumed step) too.
            m.scalars(trainer.steps_done() as u64, &[(&format!("eval_{metric}"), first_eval)])?;
            if let Some(a) = first_accuracy {
                m.scalars(trainer.steps_done() as u64, &[("eval_token_accuracy", a)])?;
            }
        }
        // Every rank draws the same global batches (the same for any layout) and takes its
        // replica's rows; a resumed job skips the batches its steps already used.
        let tokenize = match &data {
            Data::Examples { format, .. } => Some(tokenize_for(&args, *format, &tok, template.as_ref(), &cfg, args.pack)),
            _ => None,
        };
        let mut draw = match (&data, &tokenize) {
            (Data::Examples { files, .. }, Some(t)) => Draw::Stream(Box::new(ExampleStream::new(files, t, Split::Train, args.seed, args.shuffle_buffer, args.skip_bad_rows))),
            _ => Draw::Rng(SplitMix64(args.seed ^ 0xD1CE)),
        };
        // What a pass over the data found, once (rank 0).
        let report_passes = |draw: &mut Draw| {
            if let Draw::Stream(s) = draw {
                for r in s.take_reports() {
                    if ctx.rank() == 0 {
                        tracing::info!(pass = r.epoch, examples = r.examples, skipped = r.skipped, dropped = r.dropped, "a pass over --data ended");
                        if r.skipped > 0 && r.epoch == 1 {
                            eprintln!("--data: skipped {} bad rows (--skip-bad-rows)", r.skipped);
                        }
                        if r.dropped > 0 && r.epoch == 1 {
                            eprintln!("--data: --pack-overflow drop left out {} examples longer than --seq-len", r.dropped);
                        }
                    }
                }
            }
        };
        for _ in 0..trainer.steps_done() {
            data.draw(&mut draw, &args, &Device::Cpu)?;
            report_passes(&mut draw);
        }
        let replica = mesh.dp().rank() * ep + ep_comm.rank();
        let mut history: Vec<StepReport> = Vec::with_capacity(args.steps);
        let mut evals = vec![(trainer.steps_done(), first_eval)];
        let mut out_dir = None;
        for step in trainer.steps_done() + 1..=args.steps {
            let batch = data.draw(&mut draw, &args, ctx.device())?;
            report_passes(&mut draw);
            let rows = |t: &Tensor| t.narrow(0, replica * per_replica, per_replica);
            let mine = rows(&batch.ids)?;
            // Examples: the loss is the mean over the global batch's counted tokens, and
            // padding stays out of the load-balancing loss.
            let global_tokens = batch.targets.as_ref().map(|(l, _, _)| counted_targets(l)).transpose()?;
            let mine_targets = batch
                .targets
                .as_ref()
                .map(|(l, m, p)| Ok::<_, candle_core::Error>((rows(l)?, rows(m)?, p.as_ref().map(rows).transpose()?)))
                .transpose()?;
            let targets = mine_targets.as_ref().zip(global_tokens).map(|((labels, mask, positions), global_tokens)| Targets {
                labels,
                global_tokens,
                replicas,
                attention_mask: Some(mask),
                position_ids: positions.as_ref(),
            });
            // Each layer's gradients go to the trainer as soon as its backward ends.
            let g = match &model {
                Model::Whole(m) => m.train_grads(&mut trainer, &mine, targets.as_ref(), micro_batches, pp_comm, args.recompute)?,
                Model::Sharded(m) => ops::with_selective_recompute(args.recompute == Recompute::Selective, || m.train_grads(&mut trainer, &mine, targets.as_ref(), micro_batches))?,
            };
            let r = trainer.step_accumulated(g.ce_loss)?;
            // The base (router biases included) stays frozen under LoRA.
            if lora.is_none() {
                model.update_router_biases(&batch_comm)?;
            }
            history.push(r);
            if let Some(m) = metrics.as_mut() {
                let s = step as u64;
                // Tokens that are not padding, per second, and padding's share of the batch.
                let real = r.tokens_per_sec * batch.tokens as f64 / tokens_per_step as f64;
                let padding = 1.0 - batch.tokens as f64 / batch.ids.elem_count() as f64;
                m.scalars(s, &[("loss", r.loss), ("ce_loss", g.ce_loss), ("aux_loss", g.aux_loss), ("grad_norm", r.grad_norm), ("lr", r.lr), ("tokens_per_sec", r.tokens_per_sec), ("example_tokens_per_sec", real), ("padding_share", padding)])?;
                // This rank's routing: tokens per expert, a histogram per layer.
                // The stats are the sparse layers' (dense ones route nothing), in order.
                let sparse = stages[pp_comm.rank()].clone().filter(|&l| cfg.is_sparse_layer(l));
                for (layer, st) in sparse.zip(&g.stats) {
                    let load: Vec<f64> = st.tokens_per_expert.iter().map(|&c| c as f64).collect();
                    m.histogram(s, &format!("expert_load/layer_{layer}"), &load)?;
                }
            }
            if step % args.eval_every == 0 || step == args.steps {
                let value = eval()?.0;
                evals.push((step, value));
                let accuracy = token_accuracy()?;
                accuracies.extend(accuracy.map(|a| (step, a)));
                if let Some(m) = metrics.as_mut() {
                    m.scalars(step as u64, &[(&format!("eval_{metric}"), value)])?;
                    if let Some(a) = accuracy {
                        m.scalars(step as u64, &[("eval_token_accuracy", a)])?;
                    }
                    m.flush()?;
                }
                tracing::info!(step, loss = r.loss, grad_norm = r.grad_norm, lr = r.lr, tokens_per_sec = r.tokens_per_sec, metric, value, token_accuracy = accuracy, "evaluation");
                if !g.stats.is_empty() {
                    // This rank's routing, a line per layer: tokens per expert, max/mean load.
                    let table: Vec<String> = g
                        .stats
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let counts: Vec<String> = s.tokens_per_expert.iter().map(|c| format!("{c:>5}")).collect();
                            format!("  layer {i:>2} |{} | {:.2}", counts.join(""), s.max_over_mean())
                        })
                        .collect();
                    tracing::info!("expert load at step {step} (tokens per expert | max/mean):\n{}", table.join("\n"));
                }
            }
            if step == args.steps || (args.checkpoint_every > 0 && step % args.checkpoint_every == 0) {
                out_dir = Some(save(&trainer, &history)?);
            }
        }
        trainer.finish();
        let out_dir = match out_dir {
            Some(d) => d,
            None => candle_core::bail!("the checkpoint is at step {} already: nothing to run (raise --steps)", trainer.steps_done()),
        };
        // LoRA: the adapters at full shape, on every rank (collective).
        let adapters = match lora {
            Some(_) => gather_model(&trainer.optimizer().named_params()?, mesh)?,
            None => Vec::new(),
        };
        Ok((history, evals, metric, out_dir, trainer.memory(), adapters, accuracies))
    })?;
    if !is_lead()? {
        return Ok(()); // rank 0's process reports
    }
    let (history, evals, metric, out_dir, memory, adapters, accuracies) = &report[0];
    let losses: Vec<f32> = history.iter().map(|r| r.loss as f32).collect();
    let avg = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
    let k = (losses.len() / 10).max(1);
    let (first, last) = (evals[0].1, evals[evals.len() - 1].1);
    // Accuracy: higher is better; a loss: lower.
    let better = |a: f64, b: f64| if *metric == "accuracy" { a > b } else { a < b };
    let best = evals
        .iter()
        .fold(evals[0], |acc, &e| if better(e.1, acc.1) { e } else { acc });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "\nloss {:.3} -> {:.3} (mean of the first and last {k} steps); {metric} {first:.3} -> {last:.3} (best {:.3} at step {})",
        avg(&losses[..k]),
        avg(&losses[losses.len() - k..]),
        best.1,
        best.0
    );
    if let (Some(a), Some(b)) = (accuracies.first(), accuracies.last()) {
        println!(
            "held-out token accuracy {:.3} -> {:.3} (the counted tokens predicted, greedy)",
            a.1, b.1
        );
    }
    println!(
        "steps {}..={} in {secs:.1} s, {} tokens seen ({:.0} tokens/s)",
        history[0].step,
        history[history.len() - 1].step,
        history.len() * tokens_per_step,
        (history.len() * tokens_per_step) as f64 / secs
    );
    println!(
        "memory on rank 0 (ZeRO {}): parameters {} KiB, gradients {} KiB, optimizer state {} KiB",
        args.zero,
        memory.param_bytes / 1024,
        memory.grad_bytes / 1024,
        memory.optimizer_bytes / 1024
    );
    let svg = args.out.join("loss.svg");
    candle_parallel::checkpoint::write_file(
        &svg,
        loss_svg(history, evals, metric, args.loss_log_scale),
    )?;
    println!(
        "checkpoint: {}   loss curve: {}",
        out_dir.display(),
        svg.display()
    );
    if lora.is_none() {
        println!(
            "export it: cargo run --release --example checkpoint -- export --from {} --to target/finetune-mixtral/hf",
            out_dir.display()
        );
    }
    // What to ask the model: a user's turn for chat data, else a prompt to continue.
    let talk = match template {
        Some(_) => "--chat --prompt \"what is 3 + 4?\"",
        None => "--prompt \"3 + 4 =\"",
    };
    match &lora {
        Some(cfg) => {
            let adapters: HashMap<String, Tensor> = adapters.iter().cloned().collect();
            let dir = args.out.join("adapters");
            save_peft(&dir, cfg, &adapters, &args.model.to_string_lossy())?;
            // The base weights with the adapters folded in: a complete Hugging Face model.
            let merged = args.out.join("merged");
            candle_parallel::checkpoint::create_dir(&merged)?;
            // Written weight by weight from the memory-mapped base: one tensor in memory.
            let base = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&hf_safetensors_files(&args.model)?)? };
            let mut names: Vec<String> = base.tensors().into_iter().map(|(n, _)| n).collect();
            names.sort();
            let entries = names.iter().map(|n| {
                let v = base.get(n)?;
                Ok((n.clone(), v.dtype().try_into()?, v.shape().to_vec()))
            }).collect::<Result<Vec<_>>>()?;
            let modules = adapted_modules(&adapters)?;
            if let Some(m) = modules.iter().find(|m| !names.contains(&format!("{m}.weight"))) {
                candle_core::bail!("LoRA merge: no base weight {m}.weight for the adapter");
            }
            let mut writer = SafetensorsWriter::create(&merged.join("model.safetensors"), entries)?;
            for n in &names {
                writer.write(n, &merge_weight(n, &base.load(n, &Device::Cpu)?, &adapters, cfg)?)?;
            }
            writer.finish()?;
            let n = modules.len();
            std::fs::write(merged.join("config.json"), serde_json::to_vec_pretty(&cfg_json).map_err(candle_core::Error::wrap)?)?;
            candle_parallel::checkpoint::write_file(&merged.join("tokenizer.json"), &tokenizer_json)?;
            if let Some(c) = &tokenizer_config {
                candle_parallel::checkpoint::write_file(&merged.join("tokenizer_config.json"), c)?;
            }
            println!(
                "LoRA adapters ({} tensors, PEFT format): {}\nmerged into {n} base weights: {}",
                adapters.len(),
                dir.display(),
                merged.display()
            );
            println!("talk to it: cargo run --release --example generate -- --model {} {talk}", merged.display());
        }
        None => println!("then talk to it: cargo run --release --example generate -- --model target/finetune-mixtral/hf {talk}"),
    }
    Ok(())
}
