//! An nccl-tests-style table for the communicator: all-reduce, all-gather, reduce-scatter and
//! all-to-all at several world sizes and message sizes.
//!
//! ```text
//! cargo run --release --example bench_collectives
//! cargo run --release --example bench_collectives -- --ranks 2 --max-bytes 16777216
//! # NCCL on GPUs, one rank per GPU:
//! cargo run --release --features nccl --example bench_collectives -- --backend nccl --ranks 1,8
//! ```
//!
//! Columns follow nccl-tests: `size` is the per-rank buffer for all-reduce, the gathered output
//! for all-gather, the full input for reduce-scatter and the per-rank send buffer for
//! all-to-all; `algbw = size / time`; `busbw = algbw × factor`, with factor `2(n−1)/n` for
//! all-reduce and `(n−1)/n` for the others. A copy of the largest size, measured in the same
//! run, is printed as the ceiling to compare busbw with: a single-thread memcpy for the local
//! backend, a device-to-device copy on GPU 0 for NCCL. (With one rank busbw is 0 by definition;
//! algbw then measures the backend's own overhead.)
use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::launch::BackendKind;
use candle_parallel::{Comm, Launcher, ReduceOp};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Collective bandwidth of the candle-parallel communicator")]
struct Args {
    /// `local` (CPU threads) or `nccl` (one GPU per rank; needs `--features nccl`).
    #[arg(long, default_value = "local")]
    backend: BackendKind,
    /// World sizes to measure, comma separated [default: 2,4 for local, 1 for nccl].
    #[arg(long, value_delimiter = ',')]
    ranks: Option<Vec<usize>>,
    /// Smallest message in bytes.
    #[arg(long, default_value_t = 4 << 10)]
    min_bytes: usize,
    /// Largest message in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_bytes: usize,
    /// Each size is this many times the previous one.
    #[arg(long, default_value_t = 4)]
    step_factor: usize,
    /// Operations to measure, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all_reduce,all_gather,reduce_scatter,all_to_all"
    )]
    ops: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
}

impl Op {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "all_reduce" => Self::AllReduce,
            "all_gather" => Self::AllGather,
            "reduce_scatter" => Self::ReduceScatter,
            "all_to_all" => Self::AllToAll,
            other => candle_core::bail!(
                "unknown op '{other}': use all_reduce, all_gather, reduce_scatter or all_to_all"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
            Self::AllToAll => "all_to_all",
        }
    }

    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Self::AllReduce => 2.0 * (n - 1.0) / n,
            _ => (n - 1.0) / n,
        }
    }

    /// This rank's input for a message of `elems` f32 elements (nccl-tests' size convention).
    fn input(self, elems: usize, n: usize, device: &Device) -> Result<Tensor> {
        let len = match self {
            Self::AllGather => elems / n,
            _ => elems,
        };
        Tensor::ones(len, DType::F32, device)
    }

    fn run(self, comm: &Comm, x: &Tensor, splits: &[usize]) -> Result<Tensor> {
        match self {
            Self::AllReduce => comm.all_reduce(x, ReduceOp::Sum),
            Self::AllGather => comm.all_gather(x, 0),
            Self::ReduceScatter => comm.reduce_scatter(x, 0, ReduceOp::Sum),
            Self::AllToAll => comm.all_to_all(x, splits, splits),
        }
    }
}

struct Row {
    op: Op,
    ranks: usize,
    bytes: usize,
    iters: usize,
    secs: f64,
}

/// Iterations for a message: enough to move ~1 GiB, at least 3, at most 200.
fn iterations(bytes: usize) -> usize {
    ((1usize << 30) / bytes.max(1)).clamp(3, 200)
}

/// A device-to-device copy of `bytes` on GPU 0 into a fresh buffer (as every collective
/// returns one), as the NCCL ceiling: median of 20 copies, each timed between device syncs.
fn device_copy_gbps(bytes: usize) -> Result<f64> {
    let secs = Launcher::new(1).backend(BackendKind::Nccl).run(|ctx| {
        let x = Tensor::ones(bytes / 4, DType::F32, ctx.device())?;
        x.copy()?; // warm up the allocator
        ctx.device().synchronize()?;
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let y = x.copy()?;
            ctx.device().synchronize()?;
            times.push(t.elapsed().as_secs_f64());
            drop(y);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    })?;
    Ok(bytes as f64 / secs[0] / 1e9)
}

fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // warm up: fault the pages in
    let reps = iterations(bytes).min(20);
    let t = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The same copy into a freshly allocated buffer each time, as every collective must do (a
/// Candle op returns a new tensor): includes the page faults of first touch.
fn fresh_memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let reps = iterations(bytes).min(20);
    let t = Instant::now();
    for _ in 0..reps {
        let mut dst: Vec<u8> = Vec::with_capacity(bytes);
        dst.extend_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
    }
    (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ops: Vec<Op> = args
        .ops
        .iter()
        .map(|s| Op::parse(s))
        .collect::<Result<_>>()?;
    if args.step_factor < 2 || args.min_bytes < 4 || args.min_bytes > args.max_bytes {
        candle_core::bail!("need --step-factor >= 2 and 4 <= --min-bytes <= --max-bytes");
    }
    let mut sizes = vec![];
    let mut b = args.min_bytes;
    while b <= args.max_bytes {
        sizes.push(b);
        b *= args.step_factor;
    }
    let ranks = args.ranks.clone().unwrap_or(match args.backend {
        BackendKind::Local => vec![2, 4],
        BackendKind::Nccl => vec![1],
    });
    let total = (ranks.len() * ops.len() * sizes.len()) as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed}]")
            .expect("valid template"),
    );
    let mut rows = Vec::new();
    for &n in &ranks {
        for &op in &ops {
            for &bytes in &sizes {
                // Round to a multiple of n elements so every op divides evenly.
                let elems = (bytes / 4).div_ceil(n) * n;
                let iters = iterations(bytes);
                bar.set_message(format!("{} n={n} {}", op.name(), human(bytes)));
                let secs = Launcher::new(n).backend(args.backend).run(|ctx| {
                    let comm = ctx.comm();
                    let x = op.input(elems, n, ctx.device())?;
                    let splits = vec![elems / n; n];
                    op.run(comm, &x, &splits)?; // warm-up
                    comm.barrier()?;
                    let t = Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(op.run(comm, &x, &splits)?);
                    }
                    comm.barrier()?; // on GPUs this also waits for the enqueued operations
                    Ok(t.elapsed().as_secs_f64() / iters as f64)
                })?;
                // The slowest rank defines the collective's time.
                let secs = secs.into_iter().fold(0.0, f64::max);
                rows.push(Row {
                    op,
                    ranks: n,
                    bytes: elems * 4,
                    iters,
                    secs,
                });
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let largest = *sizes.last().unwrap();
    let (ceiling, ceiling_note) = match args.backend {
        BackendKind::Local => {
            let ceiling = memcpy_gbps(largest);
            let fresh = fresh_memcpy_gbps(largest);
            let note = format!(
                "single-thread memcpy of {}: {ceiling:.2} GB/s into a reused buffer (the ceiling \
                 busbw is compared with), {fresh:.2} GB/s into a fresh buffer",
                human(largest)
            );
            (ceiling, note)
        }
        BackendKind::Nccl => {
            let ceiling = device_copy_gbps(largest)?;
            let note = format!(
                "device-to-device copy of {} on GPU 0: {ceiling:.2} GB/s (the ceiling busbw is \
                 compared with)",
                human(largest)
            );
            (ceiling, note)
        }
    };
    println!("backend: {:?}\n", args.backend);

    println!(
        "| op | ranks | size | iters | time (µs) | algbw (GB/s) | busbw (GB/s) | busbw / memcpy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let algbw = r.bytes as f64 / r.secs / 1e9;
        let busbw = algbw * r.op.bus_factor(r.ranks);
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} |",
            r.op.name(),
            r.ranks,
            human(r.bytes),
            r.iters,
            r.secs * 1e6,
            algbw,
            busbw,
            busbw / ceiling
        );
    }
    println!("\n{ceiling_note}");
    Ok(())
}
