//! A tour of candle-parallel on CPU ranks (threads), no downloads, no flags needed:
//!
//! ```text
//! cargo run --release --example quickstart                      # 4 ranks: ep=2 × tp=2
//! cargo run --release --example quickstart -- --mesh dp=2,tp=2 --log-dir logs
//! ```
//!
//! Every rank (1) builds the device mesh, (2) runs a tensor-parallel MLP over its tp group
//! (column-parallel then row-parallel, Megatron's conjugate collectives) and checks its output
//! and gradients against the same MLP on one device, and (3) routes tokens to "experts" on the
//! ranks of its ep group with the differentiable all-to-all and checks the result and the
//! gradient. It exits with an error if any check fails.
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_parallel::{ops, Launcher, MeshDim, MeshShape};
use candle_parallel_models::testing::{max_rel_err, seeded};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "candle-parallel quickstart: mesh, tensor-parallel MLP, expert routing")]
struct Args {
    /// Mesh layout; the world size is the product of the sizes.
    #[arg(long, default_value = "ep=2,tp=2")]
    mesh: String,
    /// Write one log file per rank into this directory (rank-R_ep-E_tp-T.log).
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
}

const HIDDEN: usize = 64;
const FFN: usize = 256;
const TOKENS: usize = 16;
const TOL: f64 = 1e-5;

struct Report {
    rank: usize,
    coords: String,
    tp_group: Vec<usize>,
    ep_group: Vec<usize>,
    mlp_err: f64,
    routing_err: f64,
}

fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var) -> Result<Tensor> {
    grads
        .get(v.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::msg("missing gradient"))
}

fn main() -> Result<()> {
    candle_parallel::logging::init();
    let args = Args::parse();
    let shape: MeshShape = args.mesh.parse()?;
    let world = shape.world_size();
    if !FFN.is_multiple_of(shape.size(MeshDim::Tp)) {
        candle_core::bail!(
            "tp={} must divide the MLP width {FFN}",
            shape.size(MeshDim::Tp)
        );
    }
    let mut launcher = Launcher::new(world).mesh(shape);
    if let Some(dir) = &args.log_dir {
        launcher = launcher.log_dir(dir);
    }

    // The full weights; each tp rank takes its slice (shard = slice of the unsharded init).
    let w1 = seeded(&[FFN, HIDDEN], 1, DType::F32)?; // [out, in], as candle-nn's Linear
    let w2 = seeded(&[HIDDEN, FFN], 2, DType::F32)?;

    let reports = launcher.run(|ctx| {
        let mesh = ctx.mesh()?;
        let (tp, ep) = (mesh.tp(), mesh.ep());

        // (2) Tensor-parallel MLP: y = gelu(x W1ᵀ) W2ᵀ with W1 split by rows (column-parallel)
        // and W2 by columns (row-parallel). Each data-parallel / expert replica has its own x.
        let x_full = seeded(
            &[TOKENS, HIDDEN],
            100 + mesh.coord(MeshDim::Dp) as u64,
            DType::F32,
        )?;
        let shard = FFN / tp.size();
        let x = Var::from_tensor(&x_full)?;
        let w1_r = Var::from_tensor(&w1.narrow(0, tp.rank() * shard, shard)?)?;
        let w2_r = Var::from_tensor(&w2.narrow(1, tp.rank() * shard, shard)?)?;
        let h = ops::copy_to_group(x.as_tensor(), tp)?
            .matmul(&w1_r.t()?)?
            .gelu()?;
        let y = ops::reduce_from_group(&h.matmul(&w2_r.t()?)?, tp)?;
        let g = y.sqr()?.sum_all()?.backward()?;

        let (xs, w1s, w2s) = (
            Var::from_tensor(&x_full)?,
            Var::from_tensor(&w1)?,
            Var::from_tensor(&w2)?,
        );
        let y_ref = xs
            .as_tensor()
            .matmul(&w1s.t()?)?
            .gelu()?
            .matmul(&w2s.t()?)?;
        let g_ref = y_ref.sqr()?.sum_all()?.backward()?;
        let mlp_err = [
            max_rel_err(&y, &y_ref)?,
            max_rel_err(&grad_of(&g, &x)?, &grad_of(&g_ref, &xs)?)?,
            max_rel_err(
                &grad_of(&g, &w1_r)?,
                &grad_of(&g_ref, &w1s)?.narrow(0, tp.rank() * shard, shard)?,
            )?,
            max_rel_err(
                &grad_of(&g, &w2_r)?,
                &grad_of(&g_ref, &w2s)?.narrow(1, tp.rank() * shard, shard)?,
            )?,
        ]
        .into_iter()
        .fold(0.0, f64::max);

        // (3) Expert routing: token t of this rank goes to the expert on ep rank
        // (t + rank) % ep; the expert scales it by (its ep rank + 1); the result comes back.
        let n_ep = ep.size();
        let tokens = seeded(&[TOKENS, HIDDEN], 200 + ctx.rank() as u64, DType::F32)?;
        let dest: Vec<usize> = (0..TOKENS).map(|t| (t + ctx.rank()) % n_ep).collect();
        // Permute the tokens so that each destination's tokens are contiguous.
        let mut order: Vec<u32> = (0..TOKENS as u32).collect();
        order.sort_by_key(|&t| dest[t as usize]);
        let send: Vec<usize> = (0..n_ep)
            .map(|e| dest.iter().filter(|&&d| d == e).count())
            .collect();
        let recv = ep.exchange_split_sizes(&send)?;
        let xt = Var::from_tensor(&tokens)?;
        let idx = Tensor::new(order.as_slice(), &Device::Cpu)?;
        let permuted = xt.as_tensor().index_select(&idx, 0)?;
        let at_expert = ops::all_to_all(&permuted, &send, &recv, ep)?;
        let processed = (at_expert * (ep.rank() + 1) as f64)?;
        let back = ops::all_to_all(&processed, &recv, &send, ep)?;
        let g = back.sqr()?.sum_all()?.backward()?;

        let scale: Vec<f32> = order
            .iter()
            .map(|&t| (dest[t as usize] + 1) as f32)
            .collect();
        let scale = Tensor::new(scale.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
        let want = permuted.detach().broadcast_mul(&scale)?;
        // d/dx of sum((s·x)²) is 2·s²·x, in token order.
        let s_tok: Vec<f32> = (0..TOKENS).map(|t| (dest[t] + 1) as f32).collect();
        let s_tok = Tensor::new(s_tok.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
        let want_grad = tokens.broadcast_mul(&s_tok.sqr()?)?.affine(2.0, 0.0)?;
        let routing_err =
            max_rel_err(&back, &want)?.max(max_rel_err(&grad_of(&g, &xt)?, &want_grad)?);

        tracing::info!(mlp_err, routing_err, "checks done");
        let coords: Vec<String> = mesh
            .shape()
            .named_dims()
            .iter()
            .map(|d| format!("{d}={}", mesh.coord(*d)))
            .collect();
        Ok(Report {
            rank: ctx.rank(),
            coords: coords.join(" "),
            tp_group: tp.ranks().to_vec(),
            ep_group: ep.ranks().to_vec(),
            mlp_err,
            routing_err,
        })
    })?;

    println!("mesh {shape} on {world} CPU ranks (threads)\n");
    println!(
        "| rank | coords | tp group | ep group | TP MLP max rel err | expert routing max rel err |"
    );
    println!("|---:|---|---|---|---:|---:|");
    for r in &reports {
        println!(
            "| {} | {} | {:?} | {:?} | {:.1e} | {:.1e} |",
            r.rank, r.coords, r.tp_group, r.ep_group, r.mlp_err, r.routing_err
        );
    }
    let worst = reports
        .iter()
        .map(|r| r.mlp_err.max(r.routing_err))
        .fold(0.0, f64::max);
    if worst > TOL {
        candle_core::bail!("a parallel result differs from the single-device one by {worst:e}");
    }
    println!(
        "\nall ranks match the single-device computation (max rel err {worst:.1e} <= {TOL:e})"
    );
    Ok(())
}
