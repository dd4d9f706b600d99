//! Inspect, reshard and export checkpoints.
//!
//! ```text
//! cargo run --release --example checkpoint -- random --to DIR     # a small random HF model
//! cargo run --release --example checkpoint -- inspect DIR            # cheap checks + summary
//! cargo run --release --example checkpoint -- verify DIR             # every byte vs its CRC-32C
//! cargo run --release --example checkpoint -- reshard --from DIR --to OUT --mesh tp=4
//! cargo run --release --example checkpoint -- export --from DIR --to HF_DIR [--max-file-size 2GB]
//! ```
//!
//! `DIR` is a distributed checkpoint (`checkpoint.json`) or, for `inspect` and `reshard`, a
//! Hugging Face model directory. `reshard` loads the model named by the config (Llama-style
//! today) under the new layout, each rank reading only the overlapping bytes, and saves a new
//! distributed checkpoint; optimizer state is carried along when the source has it. `export`
//! writes HF safetensors (split into files of at most `--max-file-size`, with an index) and
//! `config.json`.
use candle_core::{DType, Device, Result};
use candle_parallel::checkpoint::{
    check_checkpoint, export_hf, hf_safetensors_files, read_metadata, save_checkpoint,
    verify_checkpoint, ParallelVarBuilder, SaveOptions, ShardedTensor, COMPLETE_FILE,
    METADATA_FILE,
};
use candle_parallel::optim::{AdamW, AdamWConfig};
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::llama::{Llama, LlamaConfig};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// The tokenizer files a checkpoint carries along.
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

#[derive(Parser, Debug)]
#[command(about = "Inspect, reshard and export candle-parallel checkpoints")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a small random Llama-style model in Hugging Face layout, to try the other commands.
    Random {
        /// Directory for the new Hugging Face model.
        #[arg(long)]
        to: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print every tensor: dtype, shape, how it is split and its size.
    Inspect {
        /// A distributed checkpoint or a Hugging Face model directory.
        dir: PathBuf,
    },
    /// Read a distributed checkpoint whole and check every byte against its CRC-32C.
    Verify {
        /// The distributed checkpoint to read.
        dir: PathBuf,
    },
    /// Save the checkpoint again under another layout.
    Reshard {
        /// The distributed checkpoint to read.
        #[arg(long)]
        from: PathBuf,
        /// Directory for the resharded checkpoint (must not exist).
        #[arg(long)]
        to: PathBuf,
        /// The new layout, e.g. `tp=4` or `dp=2,tp=2` (the model is split over tp).
        #[arg(long)]
        mesh: String,
        /// The dtype to store (default: f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Write the model tensors as a Hugging Face checkpoint.
    Export {
        /// The distributed checkpoint to read.
        #[arg(long)]
        from: PathBuf,
        /// Directory for the Hugging Face model.
        #[arg(long)]
        to: PathBuf,
        /// Split into files of at most this size (e.g. `2GB`, `500MB`, or bytes).
        #[arg(long)]
        max_file_size: Option<String>,
    },
}

fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1u64 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    match num.parse::<f64>() {
        Ok(n) if n > 0.0 => Ok((n * mult as f64) as u64),
        _ => candle_core::bail!(
            "--max-file-size '{s}': expected a size such as 2GB, 500MB or 1048576"
        ),
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

fn inspect(dir: &Path) -> Result<()> {
    // A distributed checkpoint, complete or not (an interrupted save may have left only
    // temporary rank files).
    let distributed = dir.join(METADATA_FILE).exists()
        || dir.join(COMPLETE_FILE).exists()
        || candle_parallel::checkpoint::read_dir(dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("rank-"));
    if distributed {
        // Cheap checks first: files present, headers matching the metadata.
        let meta = check_checkpoint(dir)?;
        println!(
            "distributed checkpoint {} (format {}): step {}, {} ranks, mesh {}",
            dir.display(),
            meta.format_version,
            meta.step,
            meta.world_size,
            if meta.mesh.is_empty() {
                "-"
            } else {
                &meta.mesh
            }
        );
        println!(
            "{:<60} {:>5} {:>18} {:>12}  split",
            "tensor", "dtype", "shape", "size"
        );
        let mut total = 0u64;
        for (name, t) in &meta.tensors {
            let size = t.size_in_bytes()?;
            total += size;
            let regions = t.pieces.iter().filter(|p| p.region.is_some()).count();
            let split = match t.pieces.iter().find_map(|p| p.split.map(|s| s.0)) {
                None if regions > 0 => {
                    let ranks: std::collections::BTreeSet<usize> =
                        t.pieces.iter().map(|p| p.rank).collect();
                    format!(
                        "{regions} boxes from {} ranks (ZeRO partitions)",
                        ranks.len()
                    )
                }
                None => format!("replicated on {} ranks", t.pieces.len()),
                Some(dim) => {
                    let ranges: Vec<String> = t
                        .pieces
                        .iter()
                        .map(|p| {
                            p.split.map_or("all".into(), |(_, s, l)| {
                                format!("r{}:{}..{}", p.rank, s, s + l)
                            })
                        })
                        .collect();
                    format!("dim {dim}: {}", ranges.join(" "))
                }
            };
            println!(
                "{name:<60} {:>5} {:>18} {:>12}  {split}",
                t.dtype,
                format!("{:?}", t.dims),
                human(size)
            );
        }
        println!("{} tensors, {}", meta.tensors.len(), human(total));
    } else {
        let files = hf_safetensors_files(dir)?;
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        println!(
            "Hugging Face checkpoint {} ({} files)",
            dir.display(),
            files.len()
        );
        let mut total = 0u64;
        for (name, v) in &tensors {
            total += v.data().len() as u64;
            println!(
                "{name:<60} {:>5?} {:>18} {:>12}",
                v.dtype(),
                format!("{:?}", v.shape()),
                human(v.data().len() as u64)
            );
        }
        println!("{} tensors, {}", tensors.len(), human(total));
    }
    Ok(())
}

fn reshard(from: &Path, to: &Path, mesh: &str, dtype: &str) -> Result<()> {
    let mesh: MeshShape = mesh.parse()?;
    let dtype: DType = dtype
        .parse()
        .map_err(|_| candle_core::Error::msg(format!("--dtype '{dtype}': use f32, bf16 or f16")))?;
    let distributed = from.join(METADATA_FILE).exists();
    let (cfg, step) = if distributed {
        let meta = read_metadata(from)?;
        let cfg: LlamaConfig = serde_json::from_value(meta.config.clone()).map_err(|e| {
            candle_core::Error::msg(format!(
                "{}: the config is not a Llama config ({e})",
                from.display()
            ))
        })?;
        (cfg, meta.step)
    } else {
        (LlamaConfig::from_file(&from.join("config.json"))?, 0)
    };
    cfg.check()?;
    // Tokenizer files travel with the checkpoint (written before its completion marker).
    let mut files = Vec::new();
    for name in TOKENIZER_FILES {
        let path = from.join(name);
        if path.is_file() {
            files.push((
                name.to_string(),
                candle_parallel::checkpoint::read_file(&path)?,
            ));
        }
    }
    let reads = Launcher::new(mesh.world_size()).mesh(mesh).run(|ctx| {
        let vb = if distributed {
            ParallelVarBuilder::from_checkpoint(from, dtype, &Device::Cpu)?
        } else {
            ParallelVarBuilder::from_hf_dir(from, dtype, &Device::Cpu)?
        }
        .trainable();
        Llama::new(&cfg, vb.clone(), ctx.mesh()?.tp())?;
        let mut tensors: Vec<ShardedTensor> = vb.params().iter().map(ShardedTensor::from).collect();
        if vb.contains("optimizer.step") {
            let mut opt = AdamW::new(vb.params(), AdamWConfig::default())?;
            opt.load_state(&vb)?;
            tensors.extend(opt.state()?);
        }
        let opts = SaveOptions {
            step,
            mesh: mesh.to_string(),
            config: serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?,
            files: files.clone(),
            interrupt_at: None,
        };
        save_checkpoint(to, &tensors, &opts, ctx.comm())?;
        Ok(vb.bytes_read())
    })?;
    for (r, b) in reads.iter().enumerate() {
        println!("rank {r}: read {}", human(*b));
    }
    println!("saved {} under mesh {mesh}", to.display());
    Ok(())
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    match Args::parse().command {
        Command::Random { to, seed } => {
            candle_parallel_models::testing::write_random_llama(&to, &LlamaConfig::tiny(), seed)?;
            println!("wrote a random Llama-style model to {}", to.display());
            Ok(())
        }
        Command::Inspect { dir } => inspect(&dir),
        Command::Verify { dir } => {
            let (bytes, unchecked) = verify_checkpoint(&dir)?;
            println!("{}: {} verified", dir.display(), human(bytes));
            if unchecked > 0 {
                println!(
                    "{unchecked} pieces have no checksums (written before checksums): not verified"
                );
            }
            Ok(())
        }
        Command::Reshard {
            from,
            to,
            mesh,
            dtype,
        } => reshard(&from, &to, &mesh, &dtype),
        Command::Export {
            from,
            to,
            max_file_size,
        } => {
            let max = max_file_size.as_deref().map(parse_size).transpose()?;
            for f in export_hf(&from, &to, max)? {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
    }
}
