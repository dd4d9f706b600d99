//! Data parallelism and ZeRO, measured side by side in one run:
//!
//! 1. **Training steps** of the main job's Mixtral-style model scaled up (about 100 M
//!    parameters by default) at dp 1, 2 and 4 with ZeRO stages 0 to 3: the step time
//!    (forward, backward, gradient reduction, clipping, AdamW; median over `--reps`) and the
//!    bytes each rank holds for parameters, gradients and optimizer state (counted from the
//!    tensors), next to the ZeRO paper's formula for the same Ψ.
//! 2. **The optimizer step alone** at dp 1 (stage 0) and dp 2 (stages 0 to 2: the partition
//!    updated in a copy and all-gathered from stage 1): the CPU's fused passes (the default)
//!    against candle's composite ops (`ZeroConfig::fused = false`, what GPUs run),
//!    alternating on the same gradients.
//! 3. **Memory per rank, measured**: at dp `--memory-dp` (4) and ZeRO 0 to 3, what each rank
//!    holds between steps and at its peak during a step, counted by the allocator (each
//!    allocation attributed to its rank's thread), for the whole-graph backward (every
//!    gradient at once), the unit-wise one (a layer's gradients at a time), and the unit-wise
//!    one with full recomputation; next to ZeRO's formula for the model states, and the
//!    process's peak resident set as the kernel counts it. Bars in an SVG (`--svg`).
//! 4. **The bucket all-reduce**, in place as the gradient buckets use it, at 16 to 256 MiB on
//!    2 ranks: bus bandwidth (nccl-tests' `2(n−1)/n × size / time`) against a memcpy measured
//!    in the same run, the out-of-place all-reduce, and, with `--torch PYTHON`, PyTorch's gloo
//!    (`scripts/bench_allreduce_torch.py`, 2 processes).
//!
//! ```text
//! cargo run --release --example bench_data_parallel
//! cargo run --release --example bench_data_parallel -- --torch /work/venv-torch/bin/python
//! cargo run --release --example bench_data_parallel -- --hidden 256 --layers 2 --reps 5
//! ```
use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::comm::local::LinkModel;
use candle_parallel::data_parallel::{BatchGroups, Recompute};
use candle_parallel::memory::{self, CountingAlloc};
use candle_parallel::moe::Dispatch;
use candle_parallel::zero::{MemoryReport, ZeroConfig, ZeroOptimizer};
use candle_parallel::{Launcher, MeshDim, MeshShape, ReduceOp};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig, ShardedMixtral};
use candle_parallel_models::plan::{
    plan_layout, Cluster, DeviceSpec, Layout, ModelShape, Workload,
};
use candle_parallel_models::testing::{measure_training_memory, BackwardPath, MemoryProbe};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

// Memory is counted per rank by the allocator itself.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Parser, Debug)]
#[command(about = "Step time and memory of ZeRO 0-3 at dp 1/2/4; bucket all-reduce bandwidth")]
struct Args {
    /// Timed repetitions (steps, or all-reduce rounds); medians are reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Data-parallel sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    dp: Vec<usize>,
    /// ZeRO stages.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3")]
    stages: Vec<u8>,
    /// Hidden size of the benchmark model.
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    /// Each expert's intermediate size.
    #[arg(long, default_value_t = 2048)]
    ffn: usize,
    /// Experts per MoE layer (top-2 routing).
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    /// Sequences per global batch (split over the replicas).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// All-reduce sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    sizes_mib: Vec<usize>,
    /// Skip the training-step and optimizer-step tables.
    #[arg(long)]
    no_steps: bool,
    /// Data-parallel size of the memory table.
    #[arg(long, default_value_t = 4)]
    memory_dp: usize,
    /// Skip the memory table.
    #[arg(long)]
    no_memory: bool,
    /// Where the memory bars are drawn.
    #[arg(long, default_value = "target/bench_data_parallel_memory.svg")]
    svg: PathBuf,
    /// Skip the overlap table (step time with gradient reduction overlapped and not, over
    /// dialled links).
    #[arg(long)]
    no_overlap: bool,
    /// Link speeds of the overlap table, Gbit/s per rank.
    #[arg(long, value_delimiter = ',', default_value = "25,100")]
    link_gbps: Vec<f64>,
    /// Data-parallel size of the overlap table.
    #[arg(long, default_value_t = 2)]
    overlap_dp: usize,
    /// A Python with torch and transformers: also time transformers' model trained by torch's
    /// AdamW (the whole step, one process) and gloo's all-reduce.
    #[arg(long)]
    torch: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn config(a: &Args) -> MixtralConfig {
    MixtralConfig {
        hidden_size: a.hidden,
        intermediate_size: a.ffn,
        vocab_size: a.vocab,
        num_hidden_layers: a.layers,
        num_local_experts: a.experts,
        max_position_embeddings: a.seq.max(64),
        sliding_window: None,
        ..MixtralConfig::tiny()
    }
}

/// Replica `rank`'s rows of the global batch (`[batch / dp, seq]` token ids).
fn replica_ids(a: &Args, cfg: &MixtralConfig, dp: usize, rank: usize) -> Result<Tensor> {
    let per = a.batch / dp;
    let ids: Vec<Vec<u32>> = (0..per)
        .map(|i| {
            let row = rank * per + i;
            (0..a.seq)
                .map(|j| ((row * 131 + j * 31) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    Tensor::new(ids, &Device::Cpu)
}

/// (median step seconds, memory of rank 0, Ψ = parameters per replica).
fn steps(a: &Args, dp: usize, stage: u8) -> Result<(f64, MemoryReport, usize)> {
    let (secs, m, psi) = timed_steps(a, dp, stage, &[(None, true)])?;
    Ok((secs[0], m, psi))
}

/// Median step seconds per mode — (the link dialled, `None` for none; overlap on) — the modes
/// alternating step by step in one job, memory of rank 0 and Ψ.
fn timed_steps(
    a: &Args,
    dp: usize,
    stage: u8,
    modes: &[(Option<LinkModel>, bool)],
) -> Result<(Vec<f64>, MemoryReport, usize)> {
    let cfg = config(a);
    let launcher = Launcher::new(dp).mesh(MeshShape::new().dp(dp));
    let out = launcher.run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = ParallelVarBuilder::from_init(1, DType::F32, &Device::Cpu).trainable();
        let zero = ZeroConfig {
            stage,
            ..Default::default()
        };
        let batch = BatchGroups::new(mesh, &[MeshDim::Dp])?;
        let (whole, sharded, mut opt) = if stage == 3 {
            let m = ShardedMixtral::new(&cfg, vb.clone(), &batch, mesh, Dispatch::AllToAll)?;
            let opt = ZeroOptimizer::new_sharded(&m.units(), vb.params(), &batch, mesh, zero)?;
            (None, Some(m), opt)
        } else {
            let m = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), Dispatch::AllToAll)?;
            let opt = ZeroOptimizer::new(vb.params(), mesh, &[MeshDim::Dp], zero)?;
            (Some(m), None, opt)
        };
        let ids = replica_ids(a, &cfg, dp, mesh.dp().rank())?;
        let mut times = vec![Vec::new(); modes.len()];
        for rep in 0..=a.reps * modes.len() {
            let mode = rep % modes.len();
            let (link, overlap) = modes[mode];
            opt.set_overlap_comm(overlap);
            if let Some(m) = &sharded {
                m.set_prefetch(overlap); // ZeRO 3: FSDP2's prefetch
            }
            ctx.comm().barrier()?;
            if ctx.rank() == 0 {
                candle_parallel::comm::local::dial_link(link);
            }
            ctx.comm().barrier()?;
            let t = Instant::now();
            // As the trainer runs it: each layer's gradients into the buckets as they come.
            match (&whole, &sharded) {
                (Some(m), _) => {
                    m.train_grads(&mut opt, &ids, None, 1, mesh.pp(), Recompute::None)?;
                }
                (_, Some(m)) => {
                    m.train_grads(&mut opt, &ids, None, 1)?;
                }
                _ => unreachable!("one of the two"),
            };
            opt.step_accumulated(Some(1.0))?;
            ctx.comm().barrier()?;
            if rep > 0 {
                times[mode].push(t.elapsed().as_secs_f64()); // the first step warms up
            }
        }
        let psi: usize = opt
            .named_params()?
            .iter()
            .map(|(t, _)| t.local.elem_count())
            .sum();
        ctx.comm().barrier()?;
        candle_parallel::comm::local::undial_link();
        let secs = times.into_iter().map(median).collect::<Vec<_>>();
        Ok((secs, opt.memory(), psi))
    })?;
    Ok(out.into_iter().next().expect("rank 0"))
}

/// The overlap table: per link speed and ZeRO stage, the step with the gradient reduction
/// after the backward and overlapped with it, against the step without a dialled link
/// (compute); communication = off − compute, exposed = on − compute.
fn overlap_table(a: &Args, style: ProgressStyle) -> Result<()> {
    let dp = a.overlap_dp;
    if dp < 2 || !a.batch.is_multiple_of(dp) {
        candle_core::bail!(
            "--overlap-dp must be at least 2 and divide --batch ({})",
            a.batch
        )
    }
    let bar = ProgressBar::new(a.stages.len() as u64).with_style(style);
    let links: Vec<LinkModel> = a
        .link_gbps
        .iter()
        .map(|g| format!("gbps={g},latency_us=5").parse())
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for &stage in &a.stages {
        bar.set_message(format!("overlap, zero={stage}"));
        // No link, then each link with overlap off and on: alternating in one job.
        let mut modes = vec![(None, true)];
        for &l in &links {
            modes.extend([(Some(l), false), (Some(l), true)]);
        }
        let t = timed_steps(a, dp, stage, &modes)?.0;
        for (i, &gbps) in a.link_gbps.iter().enumerate() {
            rows.push((gbps, stage, t[0], t[1 + 2 * i], t[2 + 2 * i]));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "\nGradient reduction overlapped with the backward (ZeRO 3: and the next layer's gather prefetched), dp {dp}, dialled link (latency 5 us); medians of {} steps per mode, every mode of a stage alternating step by step in one job; compute = the step without a dialled link, communication = off − compute, exposed = on − compute:",
        a.reps
    );
    println!(
        "\n| link Gbit/s | ZeRO | compute (s) | step, off (s) | step, on (s) | on / off | communication (s) | exposed (s) | exposed share | on / max(compute, comm) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (gbps, stage, compute, off, on) in rows {
        let comm = (off - compute).max(0.0);
        let exposed = (on - compute).max(0.0);
        println!(
            "| {gbps} | {stage} | {compute:.3} | {off:.3} | {on:.3} | {:.2}x | {comm:.3} | {exposed:.3} | {:.0}% | {:.2} |",
            on / off,
            if comm > 0.0 { 100.0 * exposed / comm } else { 0.0 },
            on / compute.max(comm)
        );
    }
    Ok(())
}

/// Median seconds of the optimizer step alone at `dp` and `stage`: fused passes, composite
/// ops (two optimizers over two copies of the model, stepping alternately on the same
/// gradients).
fn optimizer_secs(a: &Args, dp: usize, stage: u8) -> Result<(f64, f64)> {
    let cfg = config(a);
    let out = Launcher::new(dp).mesh(MeshShape::new().dp(dp)).run(|ctx| {
        let mesh = ctx.mesh()?;
        let build = |fused: bool| -> Result<(Mixtral, ZeroOptimizer)> {
            let vb = ParallelVarBuilder::from_init(1, DType::F32, &Device::Cpu).trainable();
            let m = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), Dispatch::AllToAll)?;
            let zero = ZeroConfig {
                stage,
                fused,
                ..Default::default()
            };
            Ok((
                m,
                ZeroOptimizer::new(vb.params(), mesh, &[MeshDim::Dp], zero)?,
            ))
        };
        let (model, mut fused) = build(true)?;
        let (_, mut composite) = build(false)?;
        let ids = replica_ids(a, &cfg, dp, mesh.dp().rank())?;
        let vars = fused.vars().to_vec();
        let g = model.batch_grads(&vars, &ids, None, 1, mesh.pp())?;
        let (mut tf, mut tc) = (Vec::new(), Vec::new());
        for rep in 0..=a.reps {
            for (opt, times) in [(&mut fused, &mut tf), (&mut composite, &mut tc)] {
                ctx.comm().barrier()?;
                let t = Instant::now();
                opt.step(&g.grads, Some(1.0))?;
                if rep > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        Ok((median(tf), median(tc)))
    })?;
    Ok(out[0])
}

fn memcpy_gbps(bytes: usize, reps: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    bytes as f64 / median(times) / 1e9
}

/// Median seconds per all-reduce of `bytes` on 2 ranks, in place or not.
fn all_reduce_secs(bytes: usize, reps: usize, in_place: bool) -> Result<f64> {
    let out = Launcher::new(2).run(|ctx| {
        let buf = Tensor::ones(bytes / 4, DType::F32, &Device::Cpu)?;
        let run = || -> Result<()> {
            if in_place {
                ctx.comm().all_reduce_in_place(&buf, ReduceOp::Sum)
            } else {
                ctx.comm().all_reduce(&buf, ReduceOp::Sum).map(drop)
            }
        };
        run()?; // warm up
        let mut times = Vec::new();
        for _ in 0..reps {
            ctx.comm().barrier()?;
            let t = Instant::now();
            run()?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(median(times))
    })?;
    Ok(out[0])
}

/// gloo's median seconds per all-reduce for each size (2 processes).
/// Runs `scripts/<script>` with `args` under `python` and parses the JSON line it prints last.
fn python_json(python: &PathBuf, script: &str, args: &[String]) -> Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| candle_core::Error::msg(format!("cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        candle_core::bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim().lines().last().unwrap_or(""))
        .map_err(|e| candle_core::Error::msg(format!("{}: bad output: {e}", script.display())))
}

/// transformers' `MixtralForCausalLM` of the benchmark's shape trained one step at a time by
/// torch's AdamW with clipping (`scripts/bench_train_step_torch.py`): the step's median seconds,
/// the versions and torch's thread count.
fn torch_step_secs(python: &PathBuf, a: &Args) -> Result<(f64, String)> {
    let args: Vec<String> = [
        ("--hidden", a.hidden),
        ("--ffn", a.ffn),
        ("--experts", a.experts),
        ("--layers", a.layers),
        ("--vocab", a.vocab),
        ("--batch", a.batch),
        ("--seq", a.seq),
        ("--reps", a.reps),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect();
    let json = python_json(python, "bench_train_step_torch.py", &args)?;
    let secs: Vec<f64> = json["step_s"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if secs.is_empty() {
        candle_core::bail!("bench_train_step_torch.py: no step times in {json}")
    }
    Ok((
        median(secs),
        format!(
            "torch {}, transformers {}, {} threads, {} parameters",
            json["torch"].as_str().unwrap_or("?"),
            json["transformers"].as_str().unwrap_or("?"),
            json["threads"],
            json["params"]
        ),
    ))
}

fn gloo_secs(python: &PathBuf, sizes: &[usize], reps: usize) -> Result<(Vec<f64>, String)> {
    let sizes_arg: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let json = python_json(
        python,
        "bench_allreduce_torch.py",
        &[
            "--sizes".into(),
            sizes_arg.join(","),
            "--reps".into(),
            reps.to_string(),
        ],
    )?;
    let secs = json["secs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    median(
                        r.as_array()
                            .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((secs, json["torch"].as_str().unwrap_or("?").to_string()))
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let a = Args::parse();
    if a.reps == 0 || a.dp.iter().any(|&d| d == 0 || a.batch % d != 0) {
        candle_core::bail!("--reps must be at least 1 and every --dp must divide --batch");
    }
    if let Some(s) = a.stages.iter().find(|&&s| s > 3) {
        candle_core::bail!("--stages: ZeRO stage {s} does not exist (0, 1, 2, 3)");
    }
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]")
        .map_err(candle_core::Error::wrap)?;
    if !a.no_steps {
        let runs: Vec<(usize, u8)> =
            a.dp.iter()
                .flat_map(|&d| a.stages.iter().map(move |&s| (d, s)))
                .collect();
        let bar = ProgressBar::new(runs.len() as u64).with_style(style.clone());
        let mut rows = Vec::new();
        for &(dp, stage) in &runs {
            bar.set_message(format!("dp={dp} zero={stage}"));
            rows.push((dp, stage, steps(&a, dp, stage)?));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let base = rows[0].2 .0;
        let psi = rows[0].2 .2;
        println!(
            "\nTraining steps: Mixtral-style, {} M parameters (hidden {}, ffn {}, {} experts top-2, {} layers, vocab {}), f32, global batch {} x {} tokens; median of {} steps; 2 CPU cores shared by all ranks",
            psi as f64 / 1e6, a.hidden, a.ffn, a.experts, a.layers, a.vocab, a.batch, a.seq, a.reps
        );
        println!(
            "\n| dp | ZeRO | step (s) | vs first row | params MiB | grads MiB | optimizer MiB | total MiB/rank | formula MiB |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (dp, stage, (secs, m, psi)) in &rows {
            // f32: parameters 4Ψ, gradients 4Ψ, AdamW moments 8Ψ; ÷N_d from stage 1 (state),
            // 2 (gradients) and 3 (parameters).
            let n = *dp as f64;
            let p = *psi as f64;
            let formula = if *stage >= 3 { 4.0 * p / n } else { 4.0 * p }
                + if *stage >= 2 { 4.0 * p / n } else { 4.0 * p }
                + if *stage >= 1 { 8.0 * p / n } else { 8.0 * p };
            println!(
                "| {dp} | {stage} | {secs:.3} | {:.2}x | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                secs / base,
                mib(m.param_bytes),
                mib(m.grad_bytes),
                mib(m.optimizer_bytes),
                mib(m.total()),
                formula / (1 << 20) as f64
            );
        }

        let runs: Vec<(usize, u8)> = [(1, 0), (2, 0), (2, 1), (2, 2)]
            .into_iter()
            .filter(|(d, s)| a.batch % d == 0 && a.stages.contains(s))
            .collect();
        let bar = ProgressBar::new(runs.len() as u64).with_style(style.clone());
        let mut rows = Vec::new();
        for &(dp, stage) in &runs {
            bar.set_message(format!("optimizer step, dp={dp} zero={stage}"));
            rows.push((dp, stage, optimizer_secs(&a, dp, stage)?));
            bar.inc(1);
        }
        bar.finish_and_clear();
        println!(
            "\nThe optimizer step alone (gradient norm, clipping, AdamW, gathering), {} M parameters, median of {} steps each, alternating:",
            psi as f64 / 1e6,
            a.reps
        );
        println!(
            "\n| dp | ZeRO | fused passes (ms) | candle's composite ops (ms) | fused / composite |"
        );
        println!("|---:|---:|---:|---:|---:|");
        for (dp, stage, (f, c)) in rows {
            println!(
                "| {dp} | {stage} | {:.1} | {:.1} | {:.2}x |",
                f * 1e3,
                c * 1e3,
                f / c
            );
        }
    }

    if !a.no_overlap {
        overlap_table(&a, style.clone())?;
    }

    if !a.no_memory {
        memory_table(&a, style.clone())?;
    }

    if let Some(py) = &a.torch {
        // Ours and PyTorch's whole step on one device, alternating in this run (the machine's
        // load drifts): three rounds of each, medians of their step medians.
        let (mut ours, mut theirs, mut psi, mut versions) = (vec![], vec![], 0, String::new());
        for _ in 0..3 {
            let (secs, _, p) = steps(&a, 1, 0)?;
            ours.push(secs);
            psi = p;
            let (secs, v) = torch_step_secs(py, &a)?;
            theirs.push(secs);
            versions = v;
        }
        let span = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
            format!("{lo:.3}–{hi:.3}")
        };
        let (o, t) = (median(ours.clone()), median(theirs.clone()));
        println!(
            "\nWhole training step against PyTorch, one device: forward with the load-balancing loss, backward, clipping, AdamW; batch {} x {} tokens; three alternating rounds of {} steps each, the median of the rounds' medians; {} M parameters ours; {versions}",
            a.batch, a.seq, a.reps, psi as f64 / 1e6
        );
        println!("\n| what | step (s) | rounds (s) | tokens/s | ours vs PyTorch |");
        println!("|---|---:|---:|---:|---:|");
        let tokens = (a.batch * a.seq) as f64;
        println!(
            "| ours (candle-parallel, ZeRO 0) | {o:.3} | {} | {:.0} | {:.2}x |",
            span(&ours),
            tokens / o,
            t / o
        );
        println!(
            "| transformers MixtralForCausalLM + torch.optim.AdamW | {t:.3} | {} | {:.0} | 1.00x |",
            span(&theirs),
            tokens / t
        );
    }
    let sizes: Vec<usize> = a.sizes_mib.iter().map(|m| m << 20).collect();
    let gloo = match &a.torch {
        Some(py) => Some(gloo_secs(py, &sizes, a.reps)?),
        None => None,
    };
    let bar = ProgressBar::new(sizes.len() as u64).with_style(style);
    let mut rows = Vec::new();
    for &bytes in &sizes {
        bar.set_message(format!("all-reduce {} MiB", bytes >> 20));
        let inplace = all_reduce_secs(bytes, a.reps, true)?;
        let fresh = all_reduce_secs(bytes, a.reps, false)?;
        let copy = memcpy_gbps(bytes, a.reps);
        rows.push((bytes, inplace, fresh, copy));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "\nBucket all-reduce, 2 ranks, f32 sum, busbw = size / time (2(n-1)/n = 1), median of {} rounds{}",
        a.reps,
        gloo.as_ref()
            .map(|(_, v)| format!("; gloo from torch {v}, 2 processes"))
            .unwrap_or_default()
    );
    print!("\n| size | in place GB/s | vs memcpy | out of place GB/s | memcpy GB/s |");
    if gloo.is_some() {
        print!(" gloo GB/s | in place vs gloo |");
    }
    println!();
    println!(
        "|---:|---:|---:|---:|---:|{}",
        if gloo.is_some() { "---:|---:|" } else { "" }
    );
    for (i, (bytes, inplace, fresh, copy)) in rows.iter().enumerate() {
        let bw = |s: f64| *bytes as f64 / s / 1e9;
        print!(
            "| {} MiB | {:.2} | {:.2}x | {:.2} | {:.2} |",
            bytes >> 20,
            bw(*inplace),
            bw(*inplace) / copy,
            bw(*fresh),
            copy
        );
        if let Some((g, _)) = &gloo {
            print!(" {:.2} | {:.2}x |", bw(g[i]), g[i] / inplace);
        }
        println!();
    }
    Ok(())
}

/// One memory measurement: rank 0's (step peak, persistent) bytes, Ψ, and the process's
/// peak resident set during it.
struct MemoryRow {
    stage: u8,
    path: BackwardPath,
    /// ZeRO 3: the gathered parameters freed after each layer's forward (or kept).
    reshard: bool,
    /// ZeRO 3: the next layer's parameters gathered while one computes.
    prefetch: bool,
    peak: usize,
    persistent: usize,
    load: usize,
    save: usize,
    largest: usize,
    psi: usize,
    rss_peak: Option<usize>,
    /// The step's phases and their peaks.
    phases: Vec<(String, usize)>,
    /// On a GPU: the memory in use on it after the steps.
    device_used: Option<usize>,
}

impl MemoryRow {
    /// The backward, and at ZeRO 3 whether the gathered parameters were kept.
    fn label(&self) -> String {
        match (self.reshard, self.prefetch) {
            (true, true) => self.path.to_string(),
            (true, false) => format!("{}, no prefetch", self.path),
            (false, _) => format!("{}, gathered parameters kept", self.path),
        }
    }
}

/// ZeRO's model states per rank in f32 with AdamW: 4Ψ parameters, 4Ψ gradients, 8Ψ moments.
fn zero_formula(stage: u8, psi: usize, n: usize) -> f64 {
    let (p, n) = (psi as f64, n as f64);
    match stage {
        0 => 16.0 * p,
        1 => 8.0 * p + 8.0 * p / n,
        2 => 4.0 * p + 12.0 * p / n,
        _ => 16.0 * p / n,
    }
}

fn memory_table(a: &Args, style: ProgressStyle) -> Result<()> {
    let cfg = config(a);
    let dp = a.memory_dp;
    if dp == 0 || !a.batch.is_multiple_of(dp) {
        candle_core::bail!("--memory-dp {dp} must divide --batch {}", a.batch);
    }
    let paths = [
        BackwardPath::Whole,
        BackwardPath::Units(Recompute::None),
        BackwardPath::Units(Recompute::Selective),
        BackwardPath::Units(Recompute::Full),
    ];
    let runs: Vec<(u8, BackwardPath, bool, bool)> = a
        .stages
        .iter()
        .flat_map(|&s| {
            // Stage 3's backward is unit-wise (its whole-graph backward recomputes); it also
            // runs with the gathered parameters kept from each layer's forward to its backward.
            let mut runs: Vec<(u8, BackwardPath, bool, bool)> = match s {
                3 => paths[1..].iter().map(|&p| (s, p, true, true)).collect(),
                _ => paths.iter().map(|&p| (s, p, true, true)).collect(),
            };
            if s == 3 {
                runs.push((s, paths[1], true, false));
                runs.push((s, paths[1], false, true));
            }
            runs
        })
        .collect();
    let bar = ProgressBar::new(runs.len() as u64).with_style(style);
    let mut rows = Vec::new();
    for &(stage, path, reshard, prefetch) in &runs {
        bar.set_message(format!("memory, zero={stage}, {path}"));
        let rss_reset = memory::reset_rss_peak();
        let probe = MemoryProbe {
            dp,
            pp: 1,
            ep: 1,
            tp: 1,
            schedule: candle_parallel::pipeline::ScheduleKind::OneFOneB,
            micro_batches: 1,
            stage,
            path,
            rows: a.batch / dp,
            seq: a.seq,
            steps: 2,
            bucket_bytes: candle_parallel::data_parallel::DEFAULT_BUCKET_BYTES,
            reshard_after_forward: reshard,
            prefetch,
            lora_rank: 0,
        };
        let m = measure_training_memory(&cfg, probe)?.remove(0);
        rows.push(MemoryRow {
            stage,
            path,
            reshard,
            prefetch,
            peak: m.step_peak,
            persistent: m.persistent,
            load: m.load_peak,
            save: m.save_peak,
            largest: m.largest_tensor,
            psi: m.psi,
            rss_peak: memory::rss().filter(|_| rss_reset).map(|(_, peak)| peak),
            device_used: m.device_used,
            phases: m.step_phases.clone(),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let psi = first.psi;
    let base_peak = rows
        .iter()
        .find(|r| r.stage == first.stage && r.path == BackwardPath::Units(Recompute::None))
        .map_or(first.peak, |r| r.peak);
    let base_formula = zero_formula(first.stage, psi, dp);
    println!(
        "\nMemory per rank (rank 0), dp={dp}, {} M parameters, f32, {} x {} tokens per replica, DDP's 25 MiB buckets; counted by the allocator over the second of two steps (allocations are deterministic: one run each); RSS: the whole process ({dp} ranks), the kernel's peak",
        psi as f64 / 1e6,
        a.batch / dp,
        a.seq
    );
    println!(
        "\n| ZeRO | backward | persistent MiB | formula MiB | persistent / formula | step peak MiB | predicted peak MiB | peak / predicted | peak / stage {0} unit-wise | formula / stage {0} | load peak MiB | writing the model: peak − persistent MiB | process peak RSS MiB |",
        first.stage
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut predicted = Vec::with_capacity(rows.len());
    for r in &rows {
        let f = zero_formula(r.stage, psi, dp);
        let p = predicted_peak(&cfg, a, r)?;
        predicted.push(p);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {} |",
            r.stage,
            r.label(),
            mib(r.persistent),
            f / (1 << 20) as f64,
            r.persistent as f64 / f,
            mib(r.peak),
            p / (1 << 20) as f64,
            r.peak as f64 / p,
            r.peak as f64 / base_peak as f64,
            f / base_formula,
            mib(r.load),
            mib(r.save.saturating_sub(r.persistent)),
            r.rss_peak.map_or("?".into(), |b| format!("{:.0}", mib(b)))
        );
    }
    println!(
        "\nPredicted peak: the planner's (`plan::plan_layout`: ZeRO's formula for what persists, the model's own count of its activations for the recompute mode, the buffers in flight: ZeRO 2's bucket, ZeRO 3's gathered, prefetched and gradient layers), plus every full gradient at once on the whole-graph backward (4Ψ; not the optimizer's packing of them), and at ZeRO 3 a layer's parameters less without prefetch, every layer's with the gathered parameters kept."
    );
    println!(
        "\nThe step's peak by phase (MiB; the backward from its first gradient on, the whole graph's forward and backward being one):\n\n| ZeRO | backward | forward | backward | optimizer step |\n|---:|---|---:|---:|---:|"
    );
    for r in &rows {
        let of = |name: &str| {
            r.phases
                .iter()
                .find(|p| p.0 == name)
                .map_or("–".to_string(), |p| format!("{:.1}", mib(p.1)))
        };
        let (fwd, bwd) = match r.path {
            BackwardPath::Whole => (of("forward+backward"), "(with the forward)".to_string()),
            BackwardPath::Units(_) => (of("forward"), of("backward")),
        };
        println!(
            "| {} | {} | {fwd} | {bwd} | {} |",
            r.stage,
            r.label(),
            of("optimizer")
        );
    }
    for r in rows.iter().filter(|r| r.device_used.is_some()) {
        println!(
            "ZeRO {} · {}: {:.1} MiB in use on the GPU after the steps (CUDA's count, all contexts)",
            r.stage,
            r.label(),
            mib(r.device_used.unwrap_or(0))
        );
    }
    std::fs::write(&a.svg, memory_svg(&rows, &predicted, psi, dp))
        .map_err(|e| candle_core::Error::msg(format!("cannot write {}: {e}", a.svg.display())))?;
    println!(
        "\nThe largest parameter: {:.1} MiB (writing holds about one of them, the file's 1 MiB buffer, and at ZeRO 3 one layer gathered)",
        mib(rows.iter().map(|r| r.largest).max().unwrap_or(0))
    );
    println!("\nBars: {}", a.svg.display());
    Ok(())
}

/// The step's peak the planner predicts for row `r` ([`plan_layout`]: ZeRO's formulas, the
/// model's own activation count, the buffers in flight), in bytes; for what the planner leaves
/// at its defaults: every full gradient at once on the whole-graph backward (4Ψ, its
/// activations those of no recomputation), and at ZeRO 3 the gathered parameters of every
/// layer kept or no layer prefetched (a layer's more or less).
fn predicted_peak(cfg: &MixtralConfig, a: &Args, r: &MemoryRow) -> Result<f64> {
    let recompute = match r.path {
        BackwardPath::Units(recompute) => recompute,
        BackwardPath::Whole => Recompute::None,
    };
    let dp = a.memory_dp;
    let cluster = Cluster::new(DeviceSpec::cpu(1e10, 1e12, 1e10, 1e-6, 1e10, 1e10), dp, dp)?;
    let work = Workload {
        global_batch: a.batch,
        seq: a.seq,
        dtype_bytes: 4,
        lora_rank: None,
    };
    let layout = Layout::parse(&format!("dp={dp},zero={},recompute={recompute}", r.stage))?;
    let plan = plan_layout(&ModelShape::of_mixtral(cfg), &work, &cluster, &layout)?.memory;
    // The planner's ZeRO 3 buffers are three layers' parameters (gathered, prefetched, the
    // layer's gradients).
    let layer = plan.buffers / 3.0;
    let extra = match (r.stage, r.path) {
        (3, _) if !r.reshard => (cfg.num_hidden_layers as f64 - 3.0) * layer,
        (3, _) if !r.prefetch => -layer,
        (_, BackwardPath::Whole) => 4.0 * r.psi as f64,
        _ => 0.0,
    };
    Ok(plan.peak_bytes_per_rank + extra)
}

/// Bars per stage and backward: ZeRO's formula, what persists, the step's peak and its
/// prediction (MiB).
fn memory_svg(rows: &[MemoryRow], predicted: &[f64], psi: usize, dp: usize) -> String {
    let max = rows
        .iter()
        .zip(predicted)
        .map(|(r, p)| {
            r.peak
                .max(zero_formula(r.stage, psi, dp) as usize)
                .max(*p as usize)
        })
        .max()
        .unwrap_or(1) as f64;
    let (w, row_h, left) = (720.0, 69.0, 230.0);
    let h = 40.0 + row_h * rows.len() as f64 + 40.0;
    let scale = (w - left - 90.0) / max;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<text x="10" y="20" font-size="14">Memory per rank, dp={dp}, {:.0} M parameters (MiB)</text>
"#,
        psi as f64 / 1e6
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + row_h * i as f64;
        let label = format!("ZeRO {} · {}", r.stage, r.label());
        svg += &format!(r#"<text x="10" y="{}">{label}</text>"#, y + 24.0);
        let bars = [
            (zero_formula(r.stage, psi, dp), "#9e9e9e", "formula"),
            (r.persistent as f64, "#4f81bd", "persistent"),
            (r.peak as f64, "#c0504d", "peak"),
            (predicted[i], "#f79646", "predicted peak"),
        ];
        for (j, (v, color, what)) in bars.iter().enumerate() {
            let by = y + 4.0 + 15.0 * j as f64;
            svg += &format!(
                r#"<rect x="{left}" y="{by}" width="{:.1}" height="12" fill="{color}"><title>{what}</title></rect><text x="{:.1}" y="{}">{:.0} {what}</text>"#,
                v * scale,
                left + v * scale + 4.0,
                by + 10.0,
                v / (1 << 20) as f64
            );
            svg.push('\n');
        }
    }
    svg += "</svg>\n";
    svg
}
