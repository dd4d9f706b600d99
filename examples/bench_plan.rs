//! The planner's step times against measured ones: a small Mixtral-style model trained by
//! `mixtral train` on 4 CPU ranks over a dialled link at a dozen layouts (median of the
//! steps after the first, each layout run `--reps` times), beside `plan`'s prediction for
//! this machine (`calibrate_cpu`: the matmul, elementwise and all-reduce rates with every rank
//! busy; then one reference layout fixes the share of the matmul rate a whole step reaches). Prints the table and the rank correlation.
//! `--save FILE` keeps the measured times, `--load FILE` predicts them again without rerunning.
//!
//! ```sh
//! cargo build --release --example mixtral && cargo run --release --example bench_plan
//! ```
use candle_core::{bail, Result};
use candle_parallel_models::plan::{
    calibrate_cpu, plan_layout, Cluster, Layout, ModelShape, Workload,
};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser, Debug)]
#[command(about = "Predicted against measured step times on CPU ranks over a dialled link")]
struct Args {
    /// The dialled link (CANDLE_PARALLEL_LINK's syntax).
    #[arg(long, default_value = "gbps=10,latency_us=50")]
    link: String,
    /// Runs per layout (each gives the median of its steps after the first).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Optimizer steps per run.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Write the measured step times (JSON: layout → seconds) to this file.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Take the measured step times from a file `--save` wrote instead of measuring (to
    /// compare predictions without rerunning the layouts).
    #[arg(long)]
    load: Option<PathBuf>,
}

const LAYOUTS: &[&str] = &[
    "dp=4",
    "dp=4,zero=2",
    "dp=4,zero=3",
    "dp=2,ep=2",
    "ep=4",
    "dp=2,tp=2",
    "tp=4",
    "ep=2,tp=2",
    "dp=2,pp=2,micro-batches=2",
    "pp=2,ep=2,micro-batches=2",
    "pp=4,micro-batches=4",
    "dp=4,recompute=full",
    "dp=2,ep=2,zero=3,recompute=full",
];

fn main() -> Result<()> {
    let a = Args::parse();
    if a.reps == 0 || a.steps < 2 {
        bail!("--reps must be at least 1 and --steps at least 2 (the first step is not timed)")
    }
    let dir = std::env::temp_dir().join(format!("cp-bench-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = r#"{"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 768,
        "vocab_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 512}"#;
    let (rows, seq) = (8, 128);
    std::fs::write(dir.join("config.json"), config)?;
    let batch: Vec<Vec<u32>> = (0..rows)
        .map(|i| {
            (0..seq)
                .map(|j| ((i * 131 + j * 31) % 4096) as u32)
                .collect()
        })
        .collect();
    std::fs::write(
        dir.join("batch.json"),
        serde_json::json!({ "batch": batch }).to_string(),
    )?;
    let exe = std::env::current_exe()?;
    let mixtral = exe.with_file_name("mixtral");
    if a.load.is_none() && !mixtral.exists() {
        bail!(
            "{} is missing: cargo build --release --example mixtral first",
            mixtral.display()
        )
    }
    std::env::set_var("CANDLE_PARALLEL_LINK", &a.link);
    let model = ModelShape::from_config_str(config)?;
    let mut device = calibrate_cpu(4)?;
    let work = Workload {
        global_batch: rows,
        seq,
        dtype_bytes: 4,
        lora_rank: None,
    };
    let measured: Vec<f64> = match &a.load {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| candle_core::Error::msg(format!("{}: {e}", file.display())))?;
            let saved: std::collections::HashMap<String, f64> = serde_json::from_str(&text)
                .map_err(|e| candle_core::Error::msg(format!("{}: {e}", file.display())))?;
            LAYOUTS
                .iter()
                .map(|l| match saved.get(*l) {
                    Some(&t) => Ok(t),
                    None => bail!("{}: no measured time for layout {l}", file.display()),
                })
                .collect::<Result<_>>()?
        }
        None => {
            let mut measured = Vec::new();
            for l in LAYOUTS {
                let t = measure(&mixtral, &dir, l, a.reps, a.steps)?;
                eprintln!("{l}: {t:.3} s");
                measured.push(t);
            }
            measured
        }
    };
    if let Some(file) = &a.save {
        let map: serde_json::Map<String, serde_json::Value> = LAYOUTS
            .iter()
            .zip(&measured)
            .map(|(l, t)| (l.to_string(), serde_json::json!(t)))
            .collect();
        std::fs::write(file, serde_json::Value::Object(map).to_string())?;
    }
    // One reference (the first layout) fixes the share of the matmul rate a whole step reaches.
    let predict = |device: &candle_parallel_models::plan::DeviceSpec, l: &str| {
        let cluster = Cluster::new(device.clone(), 4, 4)?;
        Ok::<_, candle_core::Error>(plan_layout(&model, &work, &cluster, &Layout::parse(l)?)?.time)
    };
    // (A fixed point: what the backward hides depends on the compute.) The share only scales
    // the matmuls: the rest of the compute (what the cores move besides) is the compute at an
    // endless matmul rate.
    for _ in 0..50 {
        let raw = predict(&device, LAYOUTS[0])?;
        let rest = raw.step - raw.compute;
        let endless = predict(
            &candle_parallel_models::plan::DeviceSpec {
                achievable: f64::INFINITY,
                ..device.clone()
            },
            LAYOUTS[0],
        )?
        .compute;
        let matmuls = raw.compute - endless;
        let target = measured[0] - rest - endless;
        if target <= 0.0 || matmuls <= 0.0 {
            bail!("the reference layout measured {:.3} s, no more than its predicted communication, optimizer step and work besides matmuls ({:.3} s)", measured[0], rest + endless)
        }
        device.achievable *= matmuls / target;
    }
    let plans: Vec<candle_parallel_models::plan::TimePlan> = LAYOUTS
        .iter()
        .map(|l| predict(&device, l))
        .collect::<Result<_>>()?;
    let predicted: Vec<f64> = plans.iter().map(|p| p.step).collect();
    println!(
        "\nStep time on 4 CPU ranks over a dialled link ({}), {} × {} tokens per step, f32; measured: median over {} runs of each run's median step after the first; predicted: `plan` for this machine (calibrated with 4 ranks busy: matmuls {:.1} GFLOP/s, elementwise {:.1} GB/s, the local all-reduce {:.1} GB/s per rank; the matmuls of a whole step reaching {:.0}% of that rate, fixed on the first row)\n",
        a.link,
        rows,
        seq,
        a.reps,
        device.peak_flops_32 / 1e9,
        device.memory_bw / 1e9,
        device.collective_bw / 1e9,
        100.0 * device.achievable
    );
    println!("| layout | measured s | predicted s | predicted / measured | compute | communication | bubble | optimizer |\n|---|---:|---:|---:|---:|---:|---:|---:|");
    for ((l, m), p) in LAYOUTS.iter().zip(&measured).zip(&plans) {
        println!(
            "| {l} | {m:.3} | {:.3} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} |",
            p.step,
            p.step / m,
            p.compute,
            p.tp_comm + p.ep_comm + p.dp_comm + p.pp_comm,
            p.bubble,
            p.optimizer
        );
    }
    let within = measured
        .iter()
        .zip(&predicted)
        .skip(1)
        .filter(|(m, p)| ((*p - *m) / *m).abs() <= 0.25)
        .count();
    println!(
        "\nSpearman rank correlation {:.2} over {} layouts; {within} of {} predictions (the reference aside) within 25%.",
        spearman(&measured, &predicted),
        LAYOUTS.len(),
        LAYOUTS.len() - 1
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The median over `reps` runs of layout `l` of each run's median step time after the first.
fn measure(mixtral: &Path, dir: &Path, l: &str, reps: usize, steps: usize) -> Result<f64> {
    let layout = Layout::parse(l)?;
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let out = Command::new(mixtral)
            .args(["train", "--config"])
            .arg(dir.join("config.json"))
            .arg("--batch")
            .arg(dir.join("batch.json"))
            .args(["--steps", &steps.to_string()])
            .args([
                "--dp",
                &layout.dp.to_string(),
                "--pp",
                &layout.pp.to_string(),
            ])
            .args([
                "--ep",
                &layout.ep.to_string(),
                "--tp",
                &layout.tp.to_string(),
            ])
            .args(["--zero", &layout.zero.to_string()])
            .args(["--recompute", &layout.recompute.to_string()])
            .args(["--micro-batches", &layout.micro_batches.to_string()])
            .args([
                "--out",
                &PathBuf::from(dir)
                    .join("out.safetensors")
                    .display()
                    .to_string(),
            ])
            .env("RUST_LOG", "info")
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("mixtral train with {l} failed:\n{log}")
        }
        // Rank 0's steps: tokens per second of each; the step time is the batch over it.
        let mut times: Vec<f64> = log
            .lines()
            .filter(|line| line.contains("rank=0 ") && line.contains("tokens_per_sec="))
            .filter_map(|line| {
                line.split("tokens_per_sec=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .map(|tps| (8 * 128) as f64 / tps)
            .skip(1)
            .collect();
        if times.is_empty() {
            bail!("mixtral train with {l} logged no step times:\n{log}")
        }
        runs.push(median(&mut times));
    }
    Ok(median(&mut runs))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Spearman's rank correlation of two equally long series (tied values share their mean rank).
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let ranks = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    };
    // Pearson's correlation of the ranks.
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let (va, vb): (f64, f64) = (
        ra.iter().map(|x| (x - ma).powi(2)).sum(),
        rb.iter().map(|y| (y - mb).powi(2)).sum(),
    );
    cov / (va * vb).sqrt().max(f64::MIN_POSITIVE)
}
