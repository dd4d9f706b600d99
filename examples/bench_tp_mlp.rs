//! Tensor-parallel MLP (column → gelu → row) forward + backward at tp = 2 against the same MLP
//! unsharded, on the same cores, measured side by side in one run.
//!
//! ```text
//! cargo run --release --example bench_tp_mlp
//! cargo run --release --example bench_tp_mlp -- --hidden 1024 --ffn 4096 --tokens 256 --iters 5
//! ```
//!
//! The unsharded MLP runs on one rank and uses every core for its matmuls; the tp ranks share
//! the same cores, so the ratio shows the overhead of sharding and communication (on one
//! machine it cannot show a speed-up: the work is the same, split over the same cores).
use candle_core::{DType, Device, Module, Result, Var};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::tensor_parallel::{column_parallel_linear, row_parallel_linear};
use candle_parallel::Launcher;
use candle_parallel_models::testing::seeded;
use clap::Parser;
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Hidden size of the MLP.
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// Intermediate size of the MLP.
    #[arg(long, default_value_t = 8192)]
    ffn: usize,
    /// batch × sequence.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Tensor-parallel size to compare with tp = 1.
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Timed iterations per configuration (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

/// Median seconds of one forward + backward at tensor-parallel size `tp`.
fn time_mlp(a: &Args, tp: usize) -> Result<f64> {
    let times = Launcher::new(tp).run(|ctx| {
        let vb = ParallelVarBuilder::from_init(1, DType::F32, &Device::Cpu).trainable();
        let up = column_parallel_linear(a.hidden, a.ffn, vb.pp("up"), ctx.comm())?;
        let down = row_parallel_linear(a.ffn, a.hidden, vb.pp("down"), ctx.comm())?;
        let x = Var::from_tensor(&seeded(&[a.tokens, a.hidden], 2, DType::F32)?)?;
        let mut times = Vec::new();
        for i in 0..=a.iters {
            ctx.comm().barrier()?;
            let t = Instant::now();
            let y = down.forward(&up.forward(x.as_tensor())?.gelu()?)?;
            std::hint::black_box(y.sqr()?.sum_all()?.backward()?);
            ctx.comm().barrier()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    })?;
    Ok(times.into_iter().fold(0.0, f64::max))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let flops = 3.0 * 2.0 * 2.0 * (a.tokens * a.hidden * a.ffn) as f64; // fwd + 2× for bwd
                                                                        // Interleave the two so that drift on a shared machine hits both.
    let (mut t1, mut tn) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        t1.push(time_mlp(&a, 1)?);
        tn.push(time_mlp(&a, a.tp)?);
    }
    let (t1, tn) = (
        t1.into_iter().fold(f64::MAX, f64::min),
        tn.into_iter().fold(f64::MAX, f64::min),
    );
    println!(
        "MLP hidden {} ffn {} tokens {}, forward + backward, {} threads of rayon per process",
        a.hidden,
        a.ffn,
        a.tokens,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| layout | time (ms) | GFLOP/s | time / unsharded |");
    println!("|---|---:|---:|---:|");
    println!(
        "| unsharded (tp = 1, candle-nn `Linear`) | {:.1} | {:.1} | 1.00 |",
        t1 * 1e3,
        flops / t1 / 1e9
    );
    println!(
        "| tensor parallel tp = {} (column → row) | {:.1} | {:.1} | {:.2} |",
        a.tp,
        tn * 1e3,
        flops / tn / 1e9,
        tn / t1
    );
    Ok(())
}
