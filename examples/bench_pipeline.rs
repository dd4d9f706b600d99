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
use candle_core::{DType, Module, Result, Shape, Var};
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
                    let chunks: Vec<TanhMlp> = (0..schedule.chunks())
                        .map(|c| {
                            TanhMlp::new(stages[schedule.stage_of(r, c)].clone(), args.hidden, 7)
                        })
                        .collect::<Result<_>>()?;
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
    Ok(())
}
