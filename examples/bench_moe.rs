//! MoE throughput: 8 experts, top-2, hidden 1024, ffn 3584, 2048 tokens (8 × 256).
//!
//! ```text
//! cargo run --release --example bench_moe
//! ```
//!
//! Measured side by side in one run, on the same threads:
//! - our MoE layer alone, forward and forward + backward (gate gradient included), at ep = 1
//!   and ep = 2 (all-to-all between two ranks sharing the cores);
//! - a one-layer Mixtral (embedding, attention, sparse MoE block, head) forward, ours against
//!   candle-transformers' on the same checkpoint: its sparse MoE block is not public, so the
//!   comparison is the smallest model that contains it; it has no gate gradient, so forward only.
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::moe::{moe_layer, Dispatch, RouterConfig};
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
use candle_parallel_models::testing::{seeded, write_random_mixtral};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long, default_value = "target/bench-moe")]
    dir: PathBuf,
}

const B: usize = 8;
const S: usize = 256;
const H: usize = 1024;
const F: usize = 3584;
const E: usize = 8;
const K: usize = 2;

fn config() -> MixtralConfig {
    MixtralConfig {
        hidden_size: H,
        intermediate_size: F,
        vocab_size: 256,
        num_hidden_layers: 1,
        num_attention_heads: 8,
        // Grouped KV heads as in Mixtral (candle-transformers' attention also needs them: with
        // one query head per KV head its prefill matmul meets a strided value tensor).
        num_key_value_heads: 4,
        num_local_experts: E,
        num_experts_per_tok: K,
        max_position_embeddings: 4096,
        sliding_window: Some(4096),
        ..MixtralConfig::tiny()
    }
}

/// Fastest of `iters` timings of `f`, after one warm-up.
fn best(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = f64::MAX;
    for _ in 0..iters {
        let s = Instant::now();
        f()?;
        t = t.min(s.elapsed().as_secs_f64());
    }
    Ok(t)
}

fn moe_layer_times(ep: usize, iters: usize) -> Result<(f64, f64)> {
    let tokens = B * S;
    let times = Launcher::new(ep).mesh(MeshShape::new().ep(ep)).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
        let layer = moe_layer(
            H,
            F,
            RouterConfig::mixtral(E, K),
            Dispatch::AllToAll,
            vb.pp("moe"),
            mesh.ep(),
            mesh.tp(),
        )?;
        // Each ep rank takes its share of the tokens.
        let x = Var::from_tensor(&seeded(
            &[tokens / ep, H],
            1 + mesh.ep().rank() as u64,
            DType::F32,
        )?)?;
        let fwd = best(iters, || {
            mesh.ep().barrier()?;
            std::hint::black_box(layer.forward(x.as_tensor(), false)?);
            mesh.ep().barrier()
        })?;
        let both = best(iters, || {
            mesh.ep().barrier()?;
            let o = layer.forward(x.as_tensor(), true)?;
            std::hint::black_box(o.output.sqr()?.sum_all()?.backward()?);
            mesh.ep().barrier()
        })?;
        Ok((fwd, both))
    })?;
    Ok(times[0])
}

fn main() -> Result<()> {
    let a = Args::parse();
    let tokens = (B * S) as f64;
    if !a.dir.join("config.json").exists() {
        eprintln!(
            "creating a random one-layer Mixtral checkpoint in {} (once)",
            a.dir.display()
        );
        write_random_mixtral(&a.dir, &config(), 0)?;
    }
    let cfg = config();
    let ids = Tensor::new(
        (0..B * S).map(|i| (i * 7 % 256) as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )?
    .reshape((B, S))?;

    let (f1, b1) = moe_layer_times(1, a.iters)?;
    let (f2, b2) = moe_layer_times(2, a.iters)?;

    let ours = Launcher::new(1).run(|ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(&a.dir, DType::F32, &Device::Cpu)?;
        let m = Mixtral::new(&cfg, vb, ctx.comm(), ctx.comm(), Dispatch::AllToAll)?;
        best(a.iters, || {
            m.forward_shard(&ids, 0, None, false).map(|_| ())
        })
    })?[0];
    let theirs = {
        use candle_transformers::models::mixtral as ct;
        let mut json = serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?;
        json["use_flash_attn"] = serde_json::json!(false);
        let ct_cfg: ct::Config = serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[a.dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )?
        };
        // Its model keeps a KV cache across calls and cannot clear it: a fresh one per run
        // (built outside the timed region).
        let mut t = f64::MAX;
        for i in 0..=a.iters {
            let mut m = ct::Model::new(&ct_cfg, vb.clone())?;
            let s = Instant::now();
            std::hint::black_box(m.forward(&ids, 0)?);
            if i > 0 {
                t = t.min(s.elapsed().as_secs_f64());
            }
        }
        t
    };

    println!(
        "MoE: {E} experts, top-{K}, hidden {H}, ffn {F}, {} tokens, f32, one run",
        B * S
    );
    println!("| what | time (ms) | tokens/s | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| our MoE layer, forward, ep=1 | {:.0} | {:.0} | |",
        f1 * 1e3,
        tokens / f1
    );
    println!(
        "| our MoE layer, forward + backward, ep=1 | {:.0} | {:.0} | {:.2} × forward |",
        b1 * 1e3,
        tokens / b1,
        b1 / f1
    );
    println!(
        "| our MoE layer, forward, ep=2 (all-to-all, same cores) | {:.0} | {:.0} | {:.2} × ep=1 |",
        f2 * 1e3,
        tokens / f2,
        f2 / f1
    );
    println!(
        "| our MoE layer, forward + backward, ep=2 | {:.0} | {:.0} | {:.2} × ep=1 |",
        b2 * 1e3,
        tokens / b2,
        b2 / b1
    );
    println!(
        "| 1-layer Mixtral forward, candle-transformers | {:.0} | {:.0} | 1.00 |",
        theirs * 1e3,
        tokens / theirs
    );
    println!("| 1-layer Mixtral forward, ours (ep=1, tp=1) | {:.0} | {:.0} | {:.2} × candle-transformers |", ours * 1e3, tokens / ours, ours / theirs);
    Ok(())
}
