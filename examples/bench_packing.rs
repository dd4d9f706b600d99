//! Packing against padding: `finetune_mixtral` on the same data with `--pack` and without,
//! side by side (alternating runs), on two data sets: the main job's addition problems written
//! as prompt/completion rows (all short), and the chat conversations of varied lengths in
//! `examples/data/chat-sums.parquet`. For each: the share of the batch that is padding, the
//! examples per step, and the tokens of examples (not padding) trained on per second (the
//! median over a run's steps after the first, then over `--reps` runs).
//!
//! ```sh
//! cargo build --release --example finetune_mixtral && cargo run --release --example bench_packing
//! ```
use candle_core::{bail, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser, Debug)]
#[command(about = "Tokens per second and padding with and without --pack")]
struct Args {
    /// Runs per data set and mode.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Optimizer steps per run.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// The layout (finetune_mixtral's --mesh).
    #[arg(long, default_value = "ep=2,tp=2")]
    mesh: String,
}

/// One run's figures: the median example tokens per second after the first step, and the
/// mean padding share.
struct Run {
    tokens_per_sec: f64,
    padding: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run(exe: &Path, a: &Args, dir: &Path, data: &Path, seq_len: usize, pack: bool) -> Result<Run> {
    let out = dir.join(if pack { "packed" } else { "padded" });
    let _ = std::fs::remove_dir_all(&out);
    let steps = a.steps.to_string();
    let mut cmd = Command::new(exe);
    cmd.args(["--model", &dir.join("model").to_string_lossy()])
        .args(["--out", &out.to_string_lossy()])
        .args(["--data", &data.to_string_lossy()])
        .args(["--seq-len", &seq_len.to_string()])
        .args(["--batch-size", &a.batch_size.to_string()])
        .args(["--steps", &steps, "--eval-every", &steps, "--mesh", &a.mesh])
        .env("RUST_LOG", "warn");
    if pack {
        cmd.arg("--pack");
    }
    let o = cmd.output()?;
    if !o.status.success() {
        bail!(
            "finetune_mixtral failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let (mut tps, mut pad) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).map_err(candle_core::Error::wrap)?;
        if let (Some(t), Some(p), Some(s)) = (
            v["example_tokens_per_sec"].as_f64(),
            v["padding_share"].as_f64(),
            v["step"].as_u64(),
        ) {
            pad.push(p);
            if s > 1 {
                tps.push(t);
            }
        }
    }
    if tps.is_empty() {
        bail!("no steps after the first in {}", out.display())
    }
    Ok(Run {
        tokens_per_sec: median(&mut tps),
        padding: pad.iter().sum::<f64>() / pad.len() as f64,
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.reps == 0 || a.steps < 2 {
        bail!("--reps must be at least 1 and --steps at least 2 (the first step is left out)")
    }
    let exe = std::env::current_exe()?.with_file_name("finetune_mixtral");
    if !exe.exists() {
        bail!(
            "{} is missing: cargo build --release --example finetune_mixtral first",
            exe.display()
        )
    }
    let dir = PathBuf::from("target/bench-packing");
    std::fs::create_dir_all(&dir)?;
    // The main job's problems as prompt/completion rows.
    let addition = dir.join("addition.jsonl");
    let rows: Vec<String> = (0..100)
        .map(|i| {
            let (x, y) = (i / 10, i % 10);
            format!(
                r#"{{"prompt": "{x} + {y} =", "completion": " {}"}}"#,
                (x + y) % 10
            )
        })
        .collect();
    std::fs::write(&addition, rows.join("\n"))?;
    let chat = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/chat-sums.parquet");
    println!(
        "\n--pack against padding: finetune_mixtral --mesh {}, {} sequences a step, {} steps, medians over {} alternating runs\n",
        a.mesh, a.batch_size, a.steps, a.reps
    );
    println!("| data | --seq-len | padding (padded) | padding (packed) | example tokens/s padded | packed | packed / padded |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, data, seq_len) in [
        ("addition, prompt/completion (10 tokens)", &addition, 64),
        ("chat-sums.parquet (42-246 tokens)", &chat, 256),
    ] {
        let (mut t0, mut t1, mut p0, mut p1) = (vec![], vec![], vec![], vec![]);
        for _ in 0..a.reps {
            let padded = run(&exe, &a, &dir, data, seq_len, false)?;
            let packed = run(&exe, &a, &dir, data, seq_len, true)?;
            t0.push(padded.tokens_per_sec);
            p0.push(padded.padding);
            t1.push(packed.tokens_per_sec);
            p1.push(packed.padding);
        }
        let (t0, t1) = (median(&mut t0), median(&mut t1));
        println!(
            "| {name} | {seq_len} | {:.1}% | {:.1}% | {t0:.0} | {t1:.0} | {:.2}× |",
            100.0 * median(&mut p0),
            100.0 * median(&mut p1),
            t1 / t0
        );
    }
    Ok(())
}
