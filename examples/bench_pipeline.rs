//! Pipeline schedules side by side: step time, bubble and live activations.
//!
//! ```text
//! cargo run --release --example bench_pipeline                 # p = 2, 4; m = 4, 8, 16
//! cargo run --release --example bench_pipeline -- --reps 9 --hidden 512
//! ```
//!
//! For every pipeline size p, micro-batch count m and schedule (GPipe, 1F1B, interleaved with 2
//! chunks per rank, zero-bubble), one row: the median step time over `--reps` steps (after one
//! warm-up step), the executed bubble (the share of rank-time outside actions in the last
//! step), the simulated one and, for GPipe and 1F1B, the theoretical (p − 1)/(m + p − 1), and
//! the most micro-batches whose activations a rank held at once (and their stage-boundary
//! bytes). The model is a `--layers`-deep tanh MLP, `--hidden` wide, on a `--batch`-row batch.
//!
//! `--mixtral` adds the schedules on the model path: a training step's gradients
//! (`Mixtral::batch_grads`) of an 8-layer Mixtral-style model (hidden 256, 8 experts, top-2)
//! over 8 rows of 128 tokens in 8 micro-batches, interleaved over two chunks per rank
//! (`Mixtral::new_chunks`), the others over one stage per rank.
use candle_core::{DType, Module, Result, Shape, Var};
use candle_parallel::comm::local::LinkModel;
use candle_parallel::pipeline::{run_step, split_batch, split_layers, Schedule};
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::testing::{seeded, TanhMlp};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Compare pipeline schedules: step time, bubble, live activations")]
struct Args {
    /// Pipeline sizes (ranks) to measure.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pp: Vec<usize>,
    /// Micro-batch counts to measure at each size.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    micro_batches: Vec<usize>,
    /// Timed steps per configuration; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Tanh layers of the model, split over the stages.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Width of every layer.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Rows per step (split into the micro-batches).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Link speeds of the overlap table (Gbit/s per rank; messages posted on the pipeline
    /// group's lane against sent where they are due).
    #[arg(long, value_delimiter = ',', default_value = "25,100")]
    link_gbps: Vec<f64>,
    /// Skip the overlap table.
    #[arg(long)]
    no_overlap: bool,
    /// Also time the schedules on the Mixtral model path.
    #[arg(long)]
    mixtral: bool,
}

struct Row {
    p: usize,
    m: usize,
    schedule: String,
    step_ms: f64,
    executed_bubble: f64,
    simulated_bubble: f64,
    peak_live: usize,
    peak_bytes: usize,
}

/// Rank `r`'s model chunks under `schedule`, the layers of `stages`.
fn rank_chunks(
    schedule: &Schedule,
    stages: &[std::ops::Range<usize>],
    r: usize,
    hidden: usize,
) -> Result<Vec<TanhMlp>> {
    (0..schedule.chunks())
        .map(|c| TanhMlp::new(stages[schedule.stage_of(r, c)].clone(), hidden, 7))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps < 1 {
        candle_core::bail!("--reps must be at least 1");
    }
    let names = ["gpipe", "1f1b", "interleaved", "zero-bubble"];
    let total = args.pp.len() * args.micro_batches.len() * names.len();
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed}]")
            .expect("valid template"),
    );
    let mut rows = Vec::new();
    for &p in &args.pp {
        for &m in &args.micro_batches {
            for name in names {
                bar.set_message(format!("{name} p={p} m={m}"));
                let schedule = Schedule::by_name(name, p, 2, m)?;
                let stages = split_layers(args.layers, schedule.stages())?;
                let mb_rows = args.batch / m;
                let x = seeded(&[args.batch, args.hidden], 1, DType::F32)?;
                let target = seeded(&[args.batch, args.hidden], 2, DType::F32)?;
                let (xs, targets) = (split_batch(&x, m)?, split_batch(&target, m)?);
                let per_rank = Launcher::new(p).mesh(MeshShape::new().pp(p)).run(|ctx| {
                    let pp = ctx.mesh()?.pp().clone();
                    let r = pp.rank();
                    let chunks = rank_chunks(&schedule, &stages, r, args.hidden)?;
                    let vars: Vec<Var> = chunks.iter().flat_map(TanhMlp::vars).collect();
                    let refs: Vec<&dyn Module> = chunks.iter().map(|c| c as &dyn Module).collect();
                    let mut times = Vec::new();
                    let mut last = None;
                    for rep in 0..=args.reps {
                        pp.barrier()?;
                        let t = Instant::now();
                        let out = run_step(
                            &pp,
                            &schedule,
                            &refs,
                            &vars,
                            &xs,
                            (&Shape::from((mb_rows, args.hidden)), DType::F32),
                            &|mb, y| (y - &targets[mb])?.sqr()?.mean_all(),
                        )?;
                        pp.barrier()?;
                        if rep > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                        last = Some(out);
                    }
                    let out = last.expect("at least one step");
                    let busy: f64 = out.executed.iter().map(|e| e.end - e.start).sum();
                    let span = out.executed.iter().map(|e| e.end).fold(0.0, f64::max);
                    Ok((times, busy, span, out.peak_live))
                })?;
                // A step lasts as long as its slowest rank.
                let reps = args.reps;
                let step = median(
                    (0..reps)
                        .map(|i| per_rank.iter().map(|r| r.0[i]).fold(0.0, f64::max))
                        .collect(),
                );
                let span = per_rank.iter().map(|r| r.2).fold(0.0, f64::max);
                let busy: f64 = per_rank.iter().map(|r| r.1).sum();
                let peak_live = per_rank.iter().map(|r| r.3).max().unwrap_or(0);
                rows.push(Row {
                    p,
                    m,
                    schedule: name.to_string(),
                    step_ms: step * 1e3,
                    executed_bubble: 1.0 - busy / (span * p as f64),
                    simulated_bubble: schedule.simulate()?.bubble_fraction(),
                    peak_live,
                    peak_bytes: peak_live * mb_rows * args.hidden * 4,
                });
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    println!(
        "{} layers, hidden {}, batch {} rows; median of {} steps; {} CPU threads\n",
        args.layers,
        args.hidden,
        args.batch,
        args.reps,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| p | m | schedule | step (ms) | vs 1F1B | bubble executed | simulated | (p−1)/(m+p−1) | peak live mb | peak boundary bytes |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.p == r.p && b.m == r.m && b.schedule == "1f1b")
            .map_or(r.step_ms, |b| b.step_ms);
        let formula = (r.p - 1) as f64 / (r.m + r.p - 1) as f64;
        let theory = if r.schedule == "gpipe" || r.schedule == "1f1b" {
            format!("{:.1}%", 100.0 * formula)
        } else {
            "–".to_string()
        };
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.1}% | {:.1}% | {} | {} | {} KiB |",
            r.p,
            r.m,
            r.schedule,
            r.step_ms,
            r.step_ms / base,
            100.0 * r.executed_bubble,
            100.0 * r.simulated_bubble,
            theory,
            r.peak_live,
            r.peak_bytes / 1024
        );
    }
    if !args.no_overlap {
        overlap_table(&args)?;
    }
    if args.mixtral {
        mixtral_table(&args)?;
    }
    Ok(())
}

/// The schedules on the model path (`--mixtral`): the median training step of a Mixtral-style
/// model's gradients, slowest rank, per pipeline size and schedule.
fn mixtral_table(args: &Args) -> Result<()> {
    use candle_parallel::checkpoint::ParallelVarBuilder;
    use candle_parallel::moe::Dispatch;
    use candle_parallel::pipeline::ScheduleKind;
    use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
    let cfg = MixtralConfig {
        hidden_size: 256,
        intermediate_size: 512,
        vocab_size: 4096,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        num_local_experts: 8,
        num_experts_per_tok: 2,
        max_position_embeddings: 512,
        ..MixtralConfig::tiny()
    };
    let (rows, seq, m) = (8usize, 128usize, 8usize);
    let ids: Vec<Vec<u32>> = (0..rows)
        .map(|i| {
            (0..seq)
                .map(|j| ((i * 131 + j * 31) % 4096) as u32)
                .collect()
        })
        .collect();
    let kinds = [
        ScheduleKind::GPipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZeroBubble,
    ];
    let mut table = Vec::new();
    for &p in &args.pp {
        for kind in kinds {
            let per_rank = Launcher::new(p).mesh(MeshShape::new().pp(p)).run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb = ParallelVarBuilder::from_init(3, DType::F32, ctx.device()).trainable();
                let chunks = candle_parallel::pipeline::rank_chunks(
                    cfg.num_hidden_layers,
                    p,
                    kind.default_chunks(),
                    mesh.pp().rank(),
                )?;
                let (ep, tp) = (mesh.ep(), mesh.tp());
                let mut model =
                    Mixtral::new_chunks(&cfg, vb.clone(), ep, tp, Dispatch::AllReduce, &chunks)?;
                model.set_schedule(kind)?;
                let vars: Vec<Var> = vb.params().iter().map(|p| p.var.clone()).collect();
                let batch = candle_core::Tensor::new(ids.clone(), ctx.device())?;
                let mut times = Vec::new();
                for rep in 0..=args.reps {
                    mesh.pp().barrier()?;
                    let t = Instant::now();
                    model.batch_grads(&vars, &batch, None, m, mesh.pp())?;
                    mesh.pp().barrier()?;
                    if rep > 0 {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                Ok(times)
            })?;
            let step = median(
                (0..args.reps)
                    .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
                    .collect(),
            );
            table.push((p, kind, step));
        }
    }
    println!(
        "\nThe model path: Mixtral-style, 8 layers, hidden 256, 8 experts (top-2), {rows} × {seq} tokens in {m} micro-batches; median of {} steps\n",
        args.reps
    );
    println!("| p | schedule | step (ms) | vs 1F1B | simulated bubble |");
    println!("|---:|---|---:|---:|---:|");
    for &(p, kind, step) in &table {
        let base = table
            .iter()
            .find(|t| t.0 == p && t.1 == ScheduleKind::OneFOneB)
            .map_or(step, |t| t.2);
        let sim = Schedule::by_name(&kind.to_string(), p, kind.default_chunks(), m)?
            .simulate()?
            .bubble_fraction();
        println!(
            "| {p} | {kind} | {:.0} | {:.2} | {:.1}% |",
            step * 1e3,
            step / base,
            100.0 * sim
        );
    }
    Ok(())
}

/// One mode's medians: the step, the pipeline messages' time on the communication lane (or
/// where they were exchanged) and the part of it the ranks waited for (exposed), in seconds,
/// each a mean over the ranks.
#[derive(Clone, Copy, Debug)]
struct OverlapTimes {
    step: f64,
    communication: f64,
    exposed: f64,
}

/// The medians of `schedule`'s steps with the pipeline messages overlapped (posted on the lane,
/// waited for where consumed) and not (each tick's exchange done where it is due), alternating
/// step by step, over `link`: (overlapped, not).
fn overlap_steps(
    args: &Args,
    schedule: &Schedule,
    link: Option<LinkModel>,
) -> Result<(OverlapTimes, OverlapTimes)> {
    let (p, m) = (schedule.ranks(), schedule.micro_batches());
    let stages = split_layers(args.layers, schedule.stages())?;
    let mb_rows = args.batch / m;
    let x = seeded(&[args.batch, args.hidden], 1, DType::F32)?;
    let target = seeded(&[args.batch, args.hidden], 2, DType::F32)?;
    let (xs, targets) = (split_batch(&x, m)?, split_batch(&target, m)?);
    let mut launcher = Launcher::new(p).mesh(MeshShape::new().pp(p));
    if let Some(link) = link {
        launcher = launcher.link(link);
    }
    let per_rank = launcher.run(|ctx| {
        let pp = ctx.mesh()?.pp().clone();
        let r = pp.rank();
        let chunks = rank_chunks(schedule, &stages, r, args.hidden)?;
        let vars: Vec<Var> = chunks.iter().flat_map(TanhMlp::vars).collect();
        let refs: Vec<&dyn Module> = chunks.iter().map(|c| c as &dyn Module).collect();
        // Per mode: (step, communication, exposed) of each step.
        let mut times = [Vec::new(), Vec::new()];
        for rep in 0..=2 * args.reps {
            let on = rep % 2 == 0;
            pp.barrier()?;
            if r == 0 {
                candle_parallel::comm::set_overlap_p2p(on);
            }
            pp.barrier()?;
            let t = Instant::now();
            let out = run_step(
                &pp,
                schedule,
                &refs,
                &vars,
                &xs,
                (&Shape::from((mb_rows, args.hidden)), DType::F32),
                &|mb, y| (y - &targets[mb])?.sqr()?.mean_all(),
            )?;
            pp.barrier()?;
            if rep > 0 {
                times[usize::from(!on)].push((
                    t.elapsed().as_secs_f64(),
                    out.communication.lane_seconds(),
                    out.communication.exposed_seconds(),
                ));
            }
        }
        candle_parallel::comm::set_overlap_p2p(false);
        Ok(times)
    })?;
    // Each step's figures as the mean over the ranks, then the median over the steps.
    let mode = |i: usize| {
        let steps = per_rank[0][i].len();
        let of = |k: usize| {
            median(
                (0..steps)
                    .map(|s| {
                        per_rank
                            .iter()
                            .map(|r| [r[i][s].0, r[i][s].1, r[i][s].2][k])
                            .sum::<f64>()
                            / per_rank.len() as f64
                    })
                    .collect(),
            )
        };
        OverlapTimes {
            step: median(per_rank[0][i].iter().map(|t| t.0).collect()),
            communication: of(1),
            exposed: of(2),
        }
    };
    Ok((mode(0), mode(1)))
}

/// Step time with the pipeline's messages overlapped and not, at the largest `--pp` and
/// `--micro-batches`, for 1F1B and zero-bubble, with no dialled link and at each `--link-gbps`.
fn overlap_table(args: &Args) -> Result<()> {
    let p = args.pp.iter().copied().max().unwrap_or(2);
    let m = args.micro_batches.iter().copied().max().unwrap_or(8);
    let mut links: Vec<Option<f64>> = vec![None];
    links.extend(args.link_gbps.iter().map(|&g| Some(g)));
    let mut rows = Vec::new();
    for name in ["1f1b", "zero-bubble"] {
        let schedule = Schedule::by_name(name, p, 1, m)?;
        for &gbps in &links {
            let link = match gbps {
                Some(g) => Some(format!("gbps={g},latency_us=5").parse::<LinkModel>()?),
                None => None,
            };
            let (on, off) = overlap_steps(args, &schedule, link)?;
            rows.push((name, gbps, on, off));
        }
    }
    println!(
        "\nPipeline messages overlapped (posted on the lane, waited for where consumed) and not, p = {p}, m = {m}, messages of {} KiB; medians of {} steps, the two alternating:\n",
        args.batch / m * args.hidden * 4 / 1024,
        args.reps
    );
    println!("| schedule | link | step, not overlapped (ms) | step, overlapped (ms) | overlapped / not | communication (ms) | waited, not overlapped (ms) | waited, overlapped (ms) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, gbps, on, off) in rows {
        let link = gbps.map_or("none (memory)".to_string(), |g| format!("{g} Gbit/s"));
        println!(
            "| {name} | {link} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.1} |",
            off.step * 1e3,
            on.step * 1e3,
            on.step / off.step,
            on.communication * 1e3,
            off.exposed * 1e3,
            on.exposed * 1e3,
        );
    }
    println!("\n(communication: the messages' time on the lane, overlapped; waited: where a rank stood waiting for a message instead of computing, which holds the exposed communication and the wait for the stage that sends it (the bubble); means over the ranks)");
    Ok(())
}
