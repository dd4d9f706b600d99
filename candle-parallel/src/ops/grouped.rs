//! [`grouped_swiglu`]: every local expert's SwiGLU MLP over its rows as one op, as Megatron's
//! grouped GEMM and torch's `_grouped_mm` run an MoE layer's experts. The rows are gathered
//! once into one buffer grouped by expert; each expert's matmuls run on its contiguous slice;
//! the backward computes every input and weight gradient directly, scattering the rows'
//! gradient into the source once. Per expert, Candle's own graph would record a gather, three
//! linears, the SwiGLU and a slice of a concatenation, and its backward would sum a full-size
//! zero-padded gradient of the source per expert: with 128 small experts those passes cost as
//! much as a third of the matmuls.
//!
//! What it keeps for the backward is each expert's gate and up projections (which the SwiGLU's
//! backward needs anyway): the gathered rows and the SwiGLU output are made again there (the
//! selective recomputation of Megatron's `moe_act` and of the dispatch's permutation).

use super::linear::{weight_grad, Linear};
use super::swiglu::{swiglu, swiglu_vjp};
use candle_core::{bail, Result, Tensor};

/// One expert's weights: the gate and up projections `[ffn, hidden]` and the down projection
/// `[hidden, ffn]` (candle-nn's `Linear` layout).
pub(crate) struct SwigluWeights {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// The rows `rows` of `src` (`[t, hidden]`), `counts[e]` of them for expert `e` in order,
/// through each expert's `down(silu(gate x) · up x)`: `[rows.len(), hidden]`, the output rows
/// following `rows`. Differentiable into `src` and every weight (weight gradients deferred
/// under [`super::defer_weight_grads`], as [`super::linear`]'s).
pub(crate) fn grouped_swiglu(
    src: &Tensor,
    rows: &[u32],
    counts: &[usize],
    experts: &[SwigluWeights],
) -> Result<Tensor> {
    if counts.len() != experts.len() || counts.iter().sum::<usize>() != rows.len() {
        bail!(
            "grouped_swiglu: {} counts summing to {} for {} experts and {} rows",
            counts.len(),
            counts.iter().sum::<usize>(),
            experts.len(),
            rows.len()
        )
    }
    let (_, hidden) = src.dims2()?;
    let idx = Tensor::new(rows, src.device())?;
    let x = src.detach().index_select(&idx, 0)?;
    // The experts with rows, and what their backward needs.
    let mut used: Vec<(usize, usize, &SwigluWeights)> = Vec::new();
    let (mut outs, mut kept) = (Vec::new(), Vec::new());
    let mut at = 0;
    for (w, &n) in experts.iter().zip(counts) {
        if n > 0 {
            let xe = x.narrow(0, at, n)?;
            let a = xe.apply_op2(&w.gate.detach().contiguous()?, Linear)?;
            let b = xe.apply_op2(&w.up.detach().contiguous()?, Linear)?;
            let h = swiglu(&a, &b)?;
            outs.push(h.apply_op2(&w.down.detach().contiguous()?, Linear)?);
            kept.push((a, b));
            used.push((at, n, w));
        }
        at += n;
    }
    drop(x);
    let value = match outs.is_empty() {
        true => Tensor::zeros((0, hidden), src.dtype(), src.device())?,
        false => Tensor::cat(&outs, 0)?,
    };
    drop(outs);
    let mut inputs: Vec<&Tensor> = vec![src];
    for (_, _, w) in &used {
        inputs.extend([&w.gate, &w.up, &w.down]);
    }
    // The weights themselves, to whom a deferred gradient belongs.
    let originals: Vec<Tensor> = inputs[1..].iter().map(|t| (*t).clone()).collect();
    let spans: Vec<(usize, usize)> = used.iter().map(|&(at, n, _)| (at, n)).collect();
    super::checkpoint::attach_many("grouped_swiglu", value, &inputs, move |ins, g| {
        let src = &ins[0];
        let x = src.index_select(&idx, 0)?;
        let g = g.detach().contiguous()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; ins.len()];
        let mut dxs = Vec::with_capacity(spans.len());
        for (j, (&(at, n), (a, b))) in spans.iter().zip(&kept).enumerate() {
            let (gate, up, down) = (
                ins[1 + 3 * j].contiguous()?,
                ins[2 + 3 * j].contiguous()?,
                ins[3 + 3 * j].contiguous()?,
            );
            let (xe, ge) = (x.narrow(0, at, n)?, g.narrow(0, at, n)?);
            let h = swiglu(a, b)?;
            let dh = ge.matmul(&down)?;
            grads[3 + 3 * j] = weight_grad(&originals[3 * j + 2], &h, &ge)?;
            drop(h);
            let (da, db) = swiglu_vjp(a, b, &dh)?;
            dxs.push((db.matmul(&up)? + da.matmul(&gate)?)?);
            grads[2 + 3 * j] = weight_grad(&originals[3 * j + 1], &xe, &db)?;
            grads[1 + 3 * j] = weight_grad(&originals[3 * j], &xe, &da)?;
        }
        let dsrc = match dxs.is_empty() {
            true => src.zeros_like()?,
            false => src
                .zeros_like()?
                .index_add(&idx, &Tensor::cat(&dxs, 0)?, 0)?,
        };
        grads[0] = Some(dsrc);
        Ok(grads)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{defer_weight_grads, linear, swiglu};
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Values and every gradient equal the per-expert graph's (gather, three linears, SwiGLU,
    /// concatenation), experts without rows included; under `defer_weight_grads` the weight
    /// gradients wait and then equal the same.
    #[test]
    fn grouped_swiglu_equals_the_per_expert_graph() -> Result<()> {
        let dev = Device::Cpu;
        let (t, h, f) = (6, 5, 4);
        let src = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, h), &dev)?)?;
        let vars: Vec<[Var; 3]> = (0..3)
            .map(|_| -> Result<[Var; 3]> {
                Ok([
                    Var::from_tensor(&Tensor::randn(0f32, 0.5, (f, h), &dev)?)?,
                    Var::from_tensor(&Tensor::randn(0f32, 0.5, (f, h), &dev)?)?,
                    Var::from_tensor(&Tensor::randn(0f32, 0.5, (h, f), &dev)?)?,
                ])
            })
            .collect::<Result<_>>()?;
        let weights: Vec<SwigluWeights> = vars
            .iter()
            .map(|[g, u, d]| SwigluWeights {
                gate: g.as_tensor().clone(),
                up: u.as_tensor().clone(),
                down: d.as_tensor().clone(),
            })
            .collect();
        // Expert 1 gets no rows; token 2 goes to two experts.
        let (rows, counts) = ([0u32, 2, 5, 2, 1, 3, 4], [3usize, 0, 4]);
        let upstream = Tensor::randn(0f32, 1.0, (rows.len(), h), &dev)?;
        let got = grouped_swiglu(src.as_tensor(), &rows, &counts, &weights)?;
        let mut outs = Vec::new();
        let mut at = 0;
        for (w, &n) in weights.iter().zip(&counts) {
            if n > 0 {
                let idx = Tensor::new(&rows[at..at + n], &dev)?;
                let x = src.as_tensor().index_select(&idx, 0)?;
                let a = linear(&x, &w.gate)?;
                let b = linear(&x, &w.up)?;
                outs.push(linear(&swiglu(&a, &b)?, &w.down)?);
            }
            at += n;
        }
        let want = Tensor::cat(&outs, 0)?;
        assert!(max_diff(&got, &want) < 1e-6);
        let loss = |y: &Tensor| (y * &upstream)?.sum_all();
        let (g_got, g_want) = (loss(&got)?.backward()?, loss(&want)?.backward()?);
        let every = std::iter::once(&src).chain(vars.iter().flatten());
        for (i, v) in every.enumerate() {
            match (g_got.get(v.as_tensor()), g_want.get(v.as_tensor())) {
                (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-5, "input {i}"),
                (None, None) => assert!((4..7).contains(&i), "input {i} has no gradient"),
                (a, b) => panic!("input {i}: {:?} vs {:?}", a.is_some(), b.is_some()),
            }
        }
        // Deferred: the input gradient now, the weights' later, the same values.
        let again = grouped_swiglu(src.as_tensor(), &rows, &counts, &weights)?;
        let (store, deferred) = defer_weight_grads(|| loss(&again)?.backward())?;
        assert_eq!(deferred.len(), 6, "two experts' three weights");
        let dsrc = store.get(src.as_tensor()).expect("the input's gradient");
        assert!(max_diff(dsrc, g_want.get(src.as_tensor()).unwrap()) < 1e-5);
        for (w, dw) in deferred.compute()? {
            assert!(store.get(&w).is_none());
            assert!(max_diff(&dw, g_want.get(&w).unwrap()) < 1e-5);
        }
        Ok(())
    }
}
