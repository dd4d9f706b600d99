//! Trains a small MLP split into pipeline stages over CPU ranks, with a schedule of your choice,
//! and draws the executed schedule.
//!
//! ```text
//! cargo run --release --example pipeline                       # 4 ranks, 1F1B, 8 micro-batches
//! cargo run --release --example pipeline -- --pp 4 --schedule zero-bubble --micro-batches 8
//! cargo run --release --example pipeline -- --schedule interleaved --chunks 2
//! cargo run --release --example pipeline -- --schedule pipedream
//! ```
//!
//! The model (`--layers` layers of `tanh(x Wᵀ + b)`) learns to imitate a fixed random "teacher"
//! of the same shape. Each rank builds only its stages' layers. Every step cuts the batch into
//! micro-batches and runs the schedule (`gpipe`, `1f1b`, `interleaved`, `zero-bubble`); AdamW
//! then updates each rank's layers. `pipedream` updates the weights after every micro-batch's
//! backward, which uses the weights its forward used (weight stashing), with no flush between
//! the micro-batches of a step (each step drains at its end). Rank 0 shows a progress bar and the loss, prints the
//! schedule's simulated step × rank grid, and writes the last step as `timeline.json` (open in
//! chrome://tracing or ui.perfetto.dev: one track per rank, one slice per action) and
//! `timeline.svg` (ranks × time; forward, backward, input- and weight-gradient halves and idle
//! in distinct colours).
use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var};
use candle_parallel::checkpoint::Param;
use candle_parallel::optim::{AdamW, AdamWConfig};
use candle_parallel::pipeline::{
    run_pipedream, run_step, split_batch, split_layers, Communication, Executed, Schedule,
};
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::testing::{seeded, TanhMlp};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Train an MLP with pipeline parallelism and draw the executed schedule")]
struct Args {
    /// Pipeline ranks.
    #[arg(long, default_value_t = 4)]
    pp: usize,
    /// gpipe, 1f1b, interleaved, zero-bubble or pipedream (1F1B with the weights updated after
    /// every micro-batch's backward, with weight stashing).
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 8)]
    micro_batches: usize,
    /// Model chunks per rank (the interleaved schedule).
    #[arg(long, default_value_t = 2)]
    chunks: usize,
    /// Tanh layers of the model, split over the stages.
    #[arg(long, default_value_t = 16)]
    layers: usize,
    /// Width of every layer.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Rows per step, cut into the micro-batches.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Training steps.
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Where timeline.json and timeline.svg go.
    #[arg(long, default_value = "target/pipeline")]
    out: PathBuf,
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let args = Args::parse();
    let chunks = if args.schedule == "interleaved" {
        args.chunks
    } else {
        1
    };
    // PipeDream runs 1F1B's order without a flush (its own executor, below).
    let pipedream = args.schedule == "pipedream";
    let name = if pipedream {
        "1f1b"
    } else {
        args.schedule.as_str()
    };
    let schedule = Schedule::by_name(name, args.pp, chunks, args.micro_batches)?;
    let stages = split_layers(args.layers, schedule.stages())?;
    split_batch(
        &Tensor::zeros((args.batch, 1), DType::F32, &Device::Cpu)?,
        args.micro_batches,
    )?;
    let sim = schedule.simulate()?;
    let mb_rows = args.batch / args.micro_batches;
    let timelines = Launcher::new(args.pp)
        .mesh(MeshShape::new().pp(args.pp))
        .run(|ctx| {
            let pp = ctx.mesh()?.pp().clone();
            let r = pp.rank();
            let lead = ctx.rank() == 0;
            if lead {
                println!("{sim}");
            }
            // This rank's chunks: its stages' layers only.
            let modules: Vec<TanhMlp> = (0..schedule.chunks())
                .map(|c| TanhMlp::new(stages[schedule.stage_of(r, c)].clone(), args.hidden, 1000))
                .collect::<Result<_>>()?;
            let vars: Vec<Var> = modules.iter().flat_map(TanhMlp::vars).collect();
            let params: Vec<Param> = vars
                .iter()
                .enumerate()
                .map(|(i, v)| Param::replicated(format!("stage{r}.{i}"), v.clone()))
                .collect();
            let mut opt = AdamW::new(
                params,
                AdamWConfig {
                    lr: args.lr,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )?;
            // The teacher: the same architecture with other weights, on every rank alike.
            let teacher = TanhMlp::new(0..args.layers, args.hidden, 9000)?;
            let bar = if lead {
                ProgressBar::new(args.steps as u64).with_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                        .expect("valid template"),
                )
            } else {
                ProgressBar::hidden()
            };
            let refs: Vec<&dyn Module> = modules.iter().map(|m| m as &dyn Module).collect();
            let mut last = Vec::new();
            let mut first_loss = None;
            for step in 0..args.steps {
                let x = seeded(&[args.batch, args.hidden], 77 + step as u64, DType::F32)?;
                let target = teacher.forward(&x)?.detach();
                let targets = split_batch(&target, args.micro_batches)?;
                pp.barrier()?; // a common start, so that the ranks' timelines line up
                let xs = split_batch(&x, args.micro_batches)?;
                let activation = (&Shape::from((mb_rows, args.hidden)), DType::F32);
                let mse = |mb: usize, y: &Tensor| (y - &targets[mb])?.sqr()?.mean_all();
                let out = if pipedream {
                    // One stage per rank; AdamW after every micro-batch's backward, each
                    // backward on the weights its forward used (stashed).
                    let stage = &modules[0];
                    let mut update = |_mb: usize, grads: &[Tensor]| {
                        let grads: Vec<Option<Tensor>> = grads.iter().cloned().map(Some).collect();
                        opt.step_with(&grads)
                    };
                    let out = run_pipedream(&pp, stage, &xs, activation, &mse, true, &mut update)?;
                    let loss = out.losses.iter().sum::<f32>() / out.losses.len() as f32;
                    StepSummary {
                        loss,
                        peak_live: out.peak_live,
                        executed: out.executed,
                        communication: out.communication,
                    }
                } else {
                    let out = run_step(&pp, &schedule, &refs, &vars, &xs, activation, &mse)?;
                    opt.step_with(&out.grads)?;
                    StepSummary {
                        loss: out.loss,
                        peak_live: out.peak_live,
                        executed: out.executed,
                        communication: out.communication,
                    }
                };
                first_loss.get_or_insert(out.loss);
                tracing::debug!(step, loss = out.loss, peak_live = out.peak_live, "step");
                bar.set_message(format!("loss {:.5}", out.loss));
                bar.inc(1);
                last = encode(&out.executed, &out.communication);
                if step + 1 == args.steps && lead {
                    bar.finish();
                    tracing::info!(
                        first = first_loss.unwrap_or(0.0),
                        last = out.loss,
                        peak_live = out.peak_live,
                        "trained"
                    );
                }
            }
            // Every rank's last step, to rank 0.
            let mine = serde_json::to_vec(&last).map_err(candle_core::Error::wrap)?;
            let all = pp.all_gather_bytes(&mine)?;
            all.iter()
                .map(|b| {
                    serde_json::from_slice::<Vec<(String, usize, f64, f64)>>(b)
                        .map_err(candle_core::Error::wrap)
                })
                .collect::<Result<Vec<_>>>()
        })?;
    let timelines = &timelines[0];
    candle_parallel::checkpoint::create_dir(&args.out)?;
    let json = args.out.join("timeline.json");
    let svg = args.out.join("timeline.svg");
    candle_parallel::checkpoint::write_file(&json, chrome_trace(timelines))?;
    candle_parallel::checkpoint::write_file(&svg, picture(timelines, &schedule))?;
    let (span, busy) = span_and_busy(timelines);
    let total = |what: &str| -> f64 {
        timelines
            .iter()
            .flatten()
            .filter(|t| t.0 == what)
            .map(|t| t.3 - t.2)
            .sum()
    };
    println!(
        "\nexecuted last step: {:.1} ms, bubble {:.1}% (simulated {:.1}%); messages {:.1} ms on the ranks' lanes, {:.1} ms of it waited for\ntimeline: {} (chrome://tracing, ui.perfetto.dev) and {}",
        span * 1e3,
        100.0 * (1.0 - busy / (span * timelines.len() as f64)),
        100.0 * sim.bubble_fraction(),
        total("lane") * 1e3,
        total("waited") * 1e3,
        json.display(),
        svg.display()
    );
    Ok(())
}

/// What a step reports, whichever executor ran it.
struct StepSummary {
    loss: f32,
    peak_live: usize,
    executed: Vec<Executed>,
    communication: Communication,
}

/// (action, stage, start s, end s) per executed action, then the communication lane's
/// exchanges (`lane`) and the waits for a message (`waited`).
fn encode(executed: &[Executed], comm: &Communication) -> Vec<(String, usize, f64, f64)> {
    let actions = executed
        .iter()
        .map(|e| (e.action.to_string(), e.stage, e.start, e.end));
    let lane = comm
        .lane
        .iter()
        .map(|&(a, b)| ("lane".to_string(), 0, a, b));
    let waited = comm
        .waited
        .iter()
        .map(|&(a, b)| ("waited".to_string(), 0, a, b));
    actions.chain(lane).chain(waited).collect()
}

/// Whether a timeline entry is a model action (not communication).
fn is_action(name: &str) -> bool {
    !matches!(name, "lane" | "waited")
}

fn span_and_busy(timelines: &[Vec<(String, usize, f64, f64)>]) -> (f64, f64) {
    let actions = || timelines.iter().flatten().filter(|t| is_action(&t.0));
    let span = actions().map(|t| t.3).fold(0.0, f64::max);
    let busy = actions().map(|t| t.3 - t.2).sum();
    (span, busy)
}

/// The kind of an entry by its printed name, and its colour.
fn kind(name: &str) -> (&'static str, &'static str) {
    match name {
        "lane" => ("communication", "#76b7b2"),
        "waited" => ("waiting for a message", "#e15759"),
        _ => match name.as_bytes().first() {
            Some(b'F') => ("forward", "#4e79a7"),
            Some(b'B') => ("backward", "#59a14f"),
            Some(b'I') => ("input gradient", "#f28e2b"),
            _ => ("weight gradient", "#b07aa1"),
        },
    }
}

/// Chrome's trace event format: one complete event ("X") per action, a thread per rank.
fn chrome_trace(timelines: &[Vec<(String, usize, f64, f64)>]) -> String {
    let mut events = Vec::new();
    for (rank, timeline) in timelines.iter().enumerate() {
        events.push(serde_json::json!({
            "name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
            "args": { "name": format!("rank {rank}") }
        }));
        events.push(serde_json::json!({
            "name": "thread_name", "ph": "M", "pid": 0, "tid": 1000 + rank,
            "args": { "name": format!("rank {rank} communication") }
        }));
        for (name, stage, start, end) in timeline {
            // Communication on a thread of its own under the rank's.
            let tid = if is_action(name) { rank } else { 1000 + rank };
            events.push(serde_json::json!({
                "name": name, "cat": kind(name).0, "ph": "X", "pid": 0, "tid": tid,
                "ts": start * 1e6, "dur": (end - start) * 1e6,
                "args": { "stage": stage }
            }));
        }
    }
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" }).to_string()
}

/// Ranks × time: a bar per action, grey where a rank is idle; under each rank, its
/// communication lane (messages moving) and, in red, where the rank waited for one.
fn picture(timelines: &[Vec<(String, usize, f64, f64)>], schedule: &Schedule) -> String {
    let (span, _) = span_and_busy(timelines);
    let (width, row, left, top) = (1000.0, 40.0, 70.0, 40.0);
    let bar = 24.0; // the actions' bar; the communication strip goes under it
    let height = top + row * timelines.len() as f64 + 50.0;
    let x = |t: f64| left + (width - left - 20.0) * t / span.max(1e-9);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{} schedule, {} ranks, {} micro-batches: executed last step ({:.1} ms)</text>"#,
        schedule.name(),
        schedule.ranks(),
        schedule.micro_batches(),
        span * 1e3
    );
    for (rank, timeline) in timelines.iter().enumerate() {
        let y = top + row * rank as f64;
        let _ = writeln!(
            s,
            r##"<text x="8" y="{}">rank {rank}</text><rect x="{left}" y="{y}" width="{}" height="{}" fill="#dddddd"/>"##,
            y + bar * 0.6,
            x(span) - left,
            bar
        );
        for (name, _, start, end) in timeline {
            let (y, height) = match name.as_str() {
                "lane" => (y + bar + 2.0, 8.0),
                "waited" => (y + bar + 4.0, 4.0),
                _ => (y, bar),
            };
            let _ = writeln!(
                s,
                r#"<rect x="{:.2}" y="{y}" width="{:.2}" height="{height}" fill="{}"><title>{name}</title></rect>"#,
                x(*start),
                (x(*end) - x(*start)).max(0.5),
                kind(name).1
            );
            if is_action(name) && x(*end) - x(*start) > 22.0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.2}" y="{}" fill="white">{name}</text>"#,
                    x(*start) + 2.0,
                    y + bar * 0.6
                );
            }
        }
    }
    let legend_y = top + row * timelines.len() as f64 + 20.0;
    for (i, (label, colour)) in [
        ("forward", "#4e79a7"),
        ("backward", "#59a14f"),
        ("input gradient", "#f28e2b"),
        ("weight gradient", "#b07aa1"),
        ("idle", "#dddddd"),
        ("messages moving", "#76b7b2"),
        ("waiting for one", "#e15759"),
    ]
    .iter()
    .enumerate()
    {
        let lx = left + 130.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{legend_y}" width="14" height="14" fill="{colour}"/><text x="{}" y="{}">{label}</text>"#,
            lx + 18.0,
            legend_y + 11.0
        );
    }
    s.push_str("</svg>\n");
    s
}
