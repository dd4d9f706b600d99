//! Differentiable collectives: outputs and gradients on every rank equal those of the same
//! computation written for one process.
mod common;

use candle_core::{DType, Result, Tensor, Var};
use candle_parallel::ops;
use candle_parallel_models::testing::{max_rel_err, seeded};
use common::launch;

const TOL: f64 = 1e-5;

fn var(dims: &[usize], seed: u64) -> Result<Var> {
    Var::from_tensor(&seeded(dims, seed, DType::F32)?)
}

fn grad(grads: &candle_core::backprop::GradStore, v: &Var) -> Result<Tensor> {
    match grads.get(v.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => candle_core::bail!("no gradient for a variable"),
    }
}

fn close(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
    let e = max_rel_err(got, want)?;
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
    Ok(())
}

/// A column-parallel then row-parallel MLP (Megatron's f/g pair) equals the unsharded MLP,
/// forward and backward, for every tp.
#[test]
fn column_then_row_parallel_mlp_equals_unsharded_mlp() -> Result<()> {
    let (b, h, f) = (5, 8, 12);
    let x_full = seeded(&[b, h], 1, DType::F32)?;
    let w1_full = seeded(&[f, h], 2, DType::F32)?; // [out, in] as candle-nn's Linear
    let w2_full = seeded(&[h, f], 3, DType::F32)?;
    let c = seeded(&[b, h], 4, DType::F32)?;
    let mlp_loss = |y: &Tensor| y.sqr()?.sum_all()? + (y * &c)?.sum_all()?;

    // Single process.
    let (x, w1, w2) = (
        Var::from_tensor(&x_full)?,
        Var::from_tensor(&w1_full)?,
        Var::from_tensor(&w2_full)?,
    );
    let y_ref = x.as_tensor().matmul(&w1.t()?)?.gelu()?.matmul(&w2.t()?)?;
    let g = mlp_loss(&y_ref)?.backward()?;
    let (gx_ref, gw1_ref, gw2_ref) = (grad(&g, &x)?, grad(&g, &w1)?, grad(&g, &w2)?);

    for tp in 1..=4 {
        let shard = f / tp;
        let outs = launch(tp, |ctx| {
            let (r, comm) = (ctx.rank(), ctx.comm());
            let x = Var::from_tensor(&x_full)?;
            let w1 = Var::from_tensor(&w1_full.narrow(0, r * shard, shard)?)?;
            let w2 = Var::from_tensor(&w2_full.narrow(1, r * shard, shard)?)?;
            let xin = ops::copy_to_group(x.as_tensor(), comm)?;
            let partial = xin.matmul(&w1.t()?)?.gelu()?.matmul(&w2.t()?)?;
            let y = ops::reduce_from_group(&partial, comm)?;
            let g = mlp_loss(&y)?.backward()?;
            Ok((y, grad(&g, &x)?, grad(&g, &w1)?, grad(&g, &w2)?))
        })?;
        for (r, (y, gx, gw1, gw2)) in outs.iter().enumerate() {
            let what = |t: &str| format!("tp={tp} rank {r} {t}");
            close(y, &y_ref, &what("output"))?;
            close(gx, &gx_ref, &what("grad x"))?;
            close(
                gw1,
                &gw1_ref.narrow(0, r * shard, shard)?,
                &what("grad w1 shard"),
            )?;
            close(
                gw2,
                &gw2_ref.narrow(1, r * shard, shard)?,
                &what("grad w2 shard"),
            )?;
        }
    }
    Ok(())
}

/// gather_from_group: each rank's slice is gathered; the replicated loss counts once, so each
/// rank's gradient is its slice of the full gradient.
#[test]
fn gather_from_group_backward_keeps_own_slice() -> Result<()> {
    for n in 2..=4 {
        for dim in [0, 1] {
            let parts: Vec<Tensor> = (0..n)
                .map(|r| seeded(&[3, 2], 10 + r as u64, DType::F32))
                .collect::<Result<_>>()?;
            let mut cdims = [3, 2];
            cdims[dim] *= n;
            let c = seeded(&cdims, 9, DType::F32)?;
            let loss = |y: &Tensor| (y * &c)?.sqr()?.sum_all();
            let vars: Vec<Var> = parts.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let y_ref = Tensor::cat(&ts, dim)?;
            let g = loss(&y_ref)?.backward()?;
            let outs = launch(n, |ctx| {
                let x = Var::from_tensor(&parts[ctx.rank()])?;
                let y = ops::gather_from_group(x.as_tensor(), dim, ctx.comm())?;
                let g = loss(&y)?.backward()?;
                Ok((y, grad(&g, &x)?))
            })?;
            for (r, (y, gx)) in outs.iter().enumerate() {
                close(
                    y,
                    &y_ref,
                    &format!("gather n={n} dim {dim} rank {r} output"),
                )?;
                close(
                    gx,
                    &grad(&g, &vars[r])?,
                    &format!("gather n={n} dim {dim} rank {r} grad"),
                )?;
            }
        }
    }
    Ok(())
}

/// scatter_to_group: each rank keeps a slice of a replicated tensor and computes its own loss;
/// the gradient of the replicated input is the gradient of the sum of all ranks' losses.
#[test]
fn scatter_to_group_backward_gathers() -> Result<()> {
    for n in 2..=4 {
        let x_full = seeded(&[2, 3 * n], 20, DType::F32)?;
        let cs: Vec<Tensor> = (0..n)
            .map(|r| seeded(&[2, 3], 30 + r as u64, DType::F32))
            .collect::<Result<_>>()?;
        let x = Var::from_tensor(&x_full)?;
        let mut total = Tensor::zeros((), DType::F32, x_full.device())?;
        for (r, c) in cs.iter().enumerate() {
            total = (total + (x.as_tensor().narrow(1, 3 * r, 3)?.sqr()? * c)?.sum_all()?)?;
        }
        let gx_ref = grad(&total.backward()?, &x)?;
        let outs = launch(n, |ctx| {
            let x = Var::from_tensor(&x_full)?;
            let y = ops::scatter_to_group(x.as_tensor(), 1, ctx.comm())?;
            let g = (y.sqr()? * &cs[ctx.rank()])?.sum_all()?.backward()?;
            Ok((y, grad(&g, &x)?))
        })?;
        for (r, (y, gx)) in outs.iter().enumerate() {
            close(
                y,
                &x_full.narrow(1, 3 * r, 3)?,
                &format!("scatter n={n} rank {r} output"),
            )?;
            close(gx, &gx_ref, &format!("scatter n={n} rank {r} grad"))?;
        }
    }
    Ok(())
}

/// reduce_scatter_to_group (sequence parallel after a row layer): the sum of the ranks'
/// partial results, scattered; gradients are gathered back.
#[test]
fn reduce_scatter_to_group_backward_all_gathers() -> Result<()> {
    for n in 2..=4 {
        let parts: Vec<Tensor> = (0..n)
            .map(|r| seeded(&[2 * n, 3], 40 + r as u64, DType::F32))
            .collect::<Result<_>>()?;
        let cs: Vec<Tensor> = (0..n)
            .map(|r| seeded(&[2, 3], 50 + r as u64, DType::F32))
            .collect::<Result<_>>()?;
        let vars: Vec<Var> = parts.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let mut s = vars[0].as_tensor().clone();
        for v in &vars[1..] {
            s = (s + v.as_tensor())?;
        }
        let mut total = Tensor::zeros((), DType::F32, s.device())?;
        let mut ys = Vec::new();
        for (r, c) in cs.iter().enumerate() {
            let y = s.narrow(0, 2 * r, 2)?;
            total = (total + (y.sqr()? * c)?.sum_all()?)?;
            ys.push(y);
        }
        let g = total.backward()?;
        let outs = launch(n, |ctx| {
            let x = Var::from_tensor(&parts[ctx.rank()])?;
            let y = ops::reduce_scatter_to_group(x.as_tensor(), 0, ctx.comm())?;
            let g = (y.sqr()? * &cs[ctx.rank()])?.sum_all()?.backward()?;
            Ok((y, grad(&g, &x)?))
        })?;
        for (r, (y, gx)) in outs.iter().enumerate() {
            close(y, &ys[r], &format!("reduce_scatter n={n} rank {r} output"))?;
            close(
                gx,
                &grad(&g, &vars[r])?,
                &format!("reduce_scatter n={n} rank {r} grad"),
            )?;
        }
    }
    Ok(())
}

/// all_gather_to_group (sequence parallel before a column layer): every rank uses the whole
/// gathered sequence differently; each rank's gradient sums every rank's use of its part.
#[test]
fn all_gather_to_group_backward_reduce_scatters() -> Result<()> {
    for n in 2..=4 {
        let parts: Vec<Tensor> = (0..n)
            .map(|r| seeded(&[2, 3], 60 + r as u64, DType::F32))
            .collect::<Result<_>>()?;
        let cs: Vec<Tensor> = (0..n)
            .map(|r| seeded(&[2 * n, 3], 70 + r as u64, DType::F32))
            .collect::<Result<_>>()?;
        let vars: Vec<Var> = parts.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let y_ref = Tensor::cat(&ts, 0)?;
        let mut total = Tensor::zeros((), DType::F32, y_ref.device())?;
        for c in &cs {
            total = (total + (y_ref.sqr()? * c)?.sum_all()?)?;
        }
        let g = total.backward()?;
        let outs = launch(n, |ctx| {
            let x = Var::from_tensor(&parts[ctx.rank()])?;
            let y = ops::all_gather_to_group(x.as_tensor(), 0, ctx.comm())?;
            let g = (y.sqr()? * &cs[ctx.rank()])?.sum_all()?.backward()?;
            Ok((y, grad(&g, &x)?))
        })?;
        for (r, (y, gx)) in outs.iter().enumerate() {
            close(y, &y_ref, &format!("all_gather n={n} rank {r} output"))?;
            close(
                gx,
                &grad(&g, &vars[r])?,
                &format!("all_gather n={n} rank {r} grad"),
            )?;
        }
    }
    Ok(())
}

/// Rows rank `i` sends to rank `j` (zero for some pairs).
fn split(i: usize, j: usize) -> usize {
    (2 * i + j + 1) % 3
}

/// all_to_all: tokens routed across ranks and back through the inverse route in backward.
#[test]
fn all_to_all_backward_is_the_inverse_all_to_all() -> Result<()> {
    for n in 2..=4 {
        let rows = |i: usize| (0..n).map(|j| split(i, j)).sum::<usize>();
        let parts: Vec<Tensor> = (0..n)
            .map(|i| seeded(&[rows(i), 4], 80 + i as u64, DType::F32))
            .collect::<Result<_>>()?;
        let recv_rows = |r: usize| (0..n).map(|j| split(j, r)).sum::<usize>();
        let cs: Vec<Tensor> = (0..n)
            .map(|r| seeded(&[recv_rows(r), 4], 90 + r as u64, DType::F32))
            .collect::<Result<_>>()?;
        let vars: Vec<Var> = parts.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let mut total = Tensor::zeros((), DType::F32, parts[0].device())?;
        let mut ys = Vec::new();
        for (r, c) in cs.iter().enumerate() {
            let mut pieces = Vec::new();
            for (j, v) in vars.iter().enumerate() {
                let offset: usize = (0..r).map(|k| split(j, k)).sum();
                pieces.push(v.as_tensor().narrow(0, offset, split(j, r))?);
            }
            let y = Tensor::cat(&pieces, 0)?;
            total = (total + (y.sqr()? * c)?.sum_all()?)?;
            ys.push(y);
        }
        let g = total.backward()?;
        let outs = launch(n, |ctx| {
            let i = ctx.rank();
            let x = Var::from_tensor(&parts[i])?;
            let send: Vec<usize> = (0..n).map(|j| split(i, j)).collect();
            let recv = ctx.comm().exchange_split_sizes(&send)?;
            let y = ops::all_to_all(x.as_tensor(), &send, &recv, ctx.comm())?;
            let g = (y.sqr()? * &cs[i])?.sum_all()?.backward()?;
            Ok((y, grad(&g, &x)?))
        })?;
        for (r, (y, gx)) in outs.iter().enumerate() {
            close(y, &ys[r], &format!("all_to_all n={n} rank {r} output"))?;
            close(
                gx,
                &grad(&g, &vars[r])?,
                &format!("all_to_all n={n} rank {r} grad"),
            )?;
        }
    }
    Ok(())
}

#[test]
fn scatter_of_an_indivisible_dim_is_a_clear_error() {
    let e = launch(3, |ctx| {
        let x = seeded(&[2, 4], 1, DType::F32)?;
        ops::scatter_to_group(&x, 1, ctx.comm()).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("dim 1 of shape [2, 4] has size 4, which is not divisible by the group size 3"),
        "{e}"
    );
}

/// The same forward with var() helper, to exercise bf16 through the differentiable path.
#[test]
fn differentiable_ops_work_in_bf16() -> Result<()> {
    let outs = launch(2, |ctx| {
        let x = var(&[4, 2], 5 + ctx.rank() as u64)?;
        let xb = x.as_tensor().to_dtype(DType::BF16)?;
        let y = ops::gather_from_group(&xb, 0, ctx.comm())?;
        let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        Ok((y.dtype(), grad(&g, &x)?.to_vec2::<f32>()?))
    })?;
    for (dtype, g) in outs {
        assert_eq!(dtype, DType::BF16);
        assert_eq!(g, vec![vec![1.0; 2]; 4]);
    }
    Ok(())
}

/// A recomputed region (`ops::checkpoint`) inside a split backward (zero-bubble's
/// `defer_weight_grads`): the weight gradients of its matmuls wait for the weight step too,
/// attributed to the real weights (not the recomputation's stand-ins), and equal the gradients
/// of the plain graph.
#[test]
fn checkpointed_matmuls_defer_their_weight_gradients_to_the_real_weights() -> candle_core::Result<()>
{
    use candle_core::{Device, Tensor, Var};
    use candle_parallel::ops;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu)?)?;
    let f = |t: &[Tensor]| ops::linear(&t[0].tanh()?, &t[1])?.sqr();
    let plain = f(&[x.as_tensor().clone(), w.as_tensor().clone()])?
        .sum_all()?
        .backward()?;
    let (store, deferred) = ops::defer_weight_grads(|| {
        ops::checkpoint("tanh_linear", &[x.as_tensor(), w.as_tensor()], f)?
            .sum_all()?
            .backward()
    })?;
    assert!(store.get(w.as_tensor()).is_none(), "not deferred");
    let later = deferred.compute()?;
    assert_eq!(later.len(), 1);
    assert_eq!(
        later[0].0.id(),
        w.as_tensor().id(),
        "attributed to a stand-in"
    );
    let same = |a: &Tensor, b: &Tensor| -> candle_core::Result<bool> {
        Ok(a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?)
    };
    assert!(same(&later[0].1, plain.get(w.as_tensor()).unwrap())?);
    assert!(same(
        store.get(x.as_tensor()).unwrap(),
        plain.get(x.as_tensor()).unwrap()
    )?);
    Ok(())
}
