//! Tensor-parallel layers against the single-device candle-nn computation, for tp = 1..=4:
//! outputs and every parameter's gradient (relative error <= 1e-5 in f32).
mod common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_parallel::checkpoint::{ParallelVarBuilder, Placement};
use candle_parallel::tensor_parallel::{self as tp_layers, TpHeads};
use candle_parallel::{ops, Comm};
use candle_parallel_models::testing::{max_rel_err, seeded};
use common::launch;
use common::slice_of;
use std::collections::BTreeMap;

const TOL: f64 = 1e-5;
const SEED: u64 = 42;

fn close(got: &Tensor, want: &Tensor, what: &str) {
    let e = max_rel_err(got, want).unwrap();
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
}

/// The full (tp = 1) parameters a builder function creates, by name.
fn full_params(
    build: &(dyn Fn(ParallelVarBuilder, &Comm) -> Result<()> + Sync),
) -> Result<BTreeMap<String, Tensor>> {
    let params = launch(1, |ctx| {
        let vb = ParallelVarBuilder::from_init(SEED, DType::F32, &Device::Cpu).trainable();
        build(vb.clone(), ctx.comm())?;
        Ok(vb.params())
    })?;
    Ok(params[0]
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect())
}

/// Runs `step` (build the layer, forward, return output and loss) on `tp` ranks; returns each
/// rank's output and its parameters' gradients (name, shard, grad).
type RankOut = (Tensor, Vec<(String, Placement, Tensor)>, Option<Tensor>);
/// Builds the layer on one rank and returns its output and loss.
type Step<'a> =
    dyn Fn(ParallelVarBuilder, &Comm, Option<&Tensor>) -> Result<(Tensor, Tensor)> + Sync + 'a;
fn run_tp(tp: usize, x: Option<&Tensor>, step: &Step) -> Result<Vec<RankOut>> {
    launch(tp, |ctx| {
        let vb = ParallelVarBuilder::from_init(SEED, DType::F32, &Device::Cpu).trainable();
        let xv = x.map(Var::from_tensor).transpose()?;
        let (y, loss) = step(vb.clone(), ctx.comm(), xv.as_ref().map(|v| v.as_tensor()))?;
        let grads = loss.backward()?;
        let pg = vb
            .params()
            .into_iter()
            .map(|p| {
                (
                    p.name,
                    p.placement,
                    grads.get(p.var.as_tensor()).expect("param grad").clone(),
                )
            })
            .collect();
        let gx = xv.map(|v| grads.get(v.as_tensor()).expect("x grad").clone());
        Ok((y, pg, gx))
    })
}

fn weights_c(dims: &[usize]) -> Tensor {
    seeded(dims, 7, DType::F32).unwrap()
}

/// candle-nn's `Linear` on the full `fc.weight` / `fc.bias`: output, gradient of the input and
/// gradients of the parameters by name, for the loss `sum(y² · c)`.
fn reference_linear(
    full: &BTreeMap<String, Tensor>,
    x: &Tensor,
    c: &Tensor,
) -> Result<(Tensor, Tensor, BTreeMap<&'static str, Tensor>)> {
    let (w, b) = (
        Var::from_tensor(&full["fc.weight"])?,
        Var::from_tensor(&full["fc.bias"])?,
    );
    let xv = Var::from_tensor(x)?;
    let y = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
        .forward(xv.as_tensor())?;
    let g = (y.sqr()? * c)?.sum_all()?.backward()?;
    let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
    let params = [("fc.weight", grad(&w)), ("fc.bias", grad(&b))].into();
    Ok((y, grad(&xv), params))
}

#[test]
fn column_parallel_linear_equals_candle_nn_linear() -> Result<()> {
    let (i, o) = (6, 12);
    let full =
        full_params(&|vb, c| tp_layers::column_parallel_linear(i, o, vb.pp("fc"), c).map(|_| ()))?;
    let x = seeded(&[2, 3, i], 1, DType::F32)?;
    let c = weights_c(&[2, 3, o]);
    let (y_ref, gx_ref, grads_ref) = reference_linear(&full, &x, &c)?;
    for gather in [true, false] {
        for tp in 1..=4 {
            let outs = run_tp(tp, Some(&x), &|vb, comm, x| {
                let layer = tp_layers::column_parallel_linear(i, o, vb.pp("fc"), comm)?
                    .with_gather_output(gather);
                let y = layer.forward(x.unwrap())?;
                let c_local = if gather {
                    c.clone()
                } else {
                    slice_of(
                        &c,
                        Placement::Split {
                            dim: 2,
                            rank: comm.rank(),
                            parts: comm.size(),
                        },
                    )?
                };
                let loss = (y.sqr()? * c_local)?.sum_all()?;
                Ok((y, loss))
            })?;
            for (r, (y, pg, gx)) in outs.iter().enumerate() {
                let what = format!("column gather={gather} tp={tp} rank {r}");
                let want = if gather {
                    y_ref.clone()
                } else {
                    slice_of(
                        &y_ref,
                        Placement::Split {
                            dim: 2,
                            rank: r,
                            parts: tp,
                        },
                    )?
                };
                close(y, &want, &format!("{what} output"));
                close(gx.as_ref().unwrap(), &gx_ref, &format!("{what} grad x"));
                assert_eq!(pg.len(), 2);
                for (name, shard, grad) in pg {
                    close(
                        grad,
                        &slice_of(&grads_ref[name.as_str()], *shard)?,
                        &format!("{what} grad {name}"),
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn row_parallel_linear_equals_candle_nn_linear() -> Result<()> {
    let (i, o) = (12, 5);
    let full =
        full_params(&|vb, c| tp_layers::row_parallel_linear(i, o, vb.pp("fc"), c).map(|_| ()))?;
    let x = seeded(&[4, i], 2, DType::F32)?;
    let c = weights_c(&[4, o]);
    let (y_ref, gx_ref, grads_ref) = reference_linear(&full, &x, &c)?;
    for tp in 1..=4 {
        // A replicated input: the layer scatters it itself.
        let outs = run_tp(tp, Some(&x), &|vb, comm, x| {
            let layer = tp_layers::row_parallel_linear(i, o, vb.pp("fc"), comm)?
                .with_input_is_parallel(false);
            let y = layer.forward(x.unwrap())?;
            let loss = (y.sqr()? * &c)?.sum_all()?;
            Ok((y, loss))
        })?;
        for (r, (y, pg, gx)) in outs.iter().enumerate() {
            let what = format!("row tp={tp} rank {r}");
            close(y, &y_ref, &format!("{what} output"));
            close(gx.as_ref().unwrap(), &gx_ref, &format!("{what} grad x"));
            for (name, shard, grad) in pg {
                close(
                    grad,
                    &slice_of(&grads_ref[name.as_str()], *shard)?,
                    &format!("{what} grad {name}"),
                );
            }
        }
    }
    Ok(())
}

/// RMSNorm → column → gelu → row with Megatron sequence parallelism: the activations outside
/// the MLP stay split along the sequence; outputs and all gradients equal the unsharded block.
#[test]
fn sequence_parallel_block_equals_unsharded_block() -> Result<()> {
    let (h, f, seq) = (8, 24, 12);
    let build = |vb: ParallelVarBuilder,
                 c: &Comm|
     -> Result<(
        Tensor,
        tp_layers::ColumnParallelLinear,
        tp_layers::RowParallelLinear,
    )> {
        let norm = vb.pp("norm").get(
            h,
            "weight",
            Placement::Replicated,
            candle_nn::Init::Uniform { lo: 0.5, up: 1.5 },
        )?;
        let up = tp_layers::column_parallel_linear(h, f, vb.pp("up"), c)?;
        let down = tp_layers::row_parallel_linear(f, h, vb.pp("down"), c)?;
        Ok((norm, up, down))
    };
    let full = full_params(&|vb, c| build(vb, c).map(|_| ()))?;
    let x = seeded(&[2, seq, h], 3, DType::F32)?;
    let c = weights_c(&[2, seq, h]);
    let vars: BTreeMap<String, Var> = full
        .iter()
        .map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap()))
        .collect();
    let xv = Var::from_tensor(&x)?;
    let n = ops::rms_norm(xv.as_tensor(), vars["norm.weight"].as_tensor(), 1e-5)?;
    let up = candle_nn::Linear::new(
        vars["up.weight"].as_tensor().clone(),
        Some(vars["up.bias"].as_tensor().clone()),
    );
    let down = candle_nn::Linear::new(
        vars["down.weight"].as_tensor().clone(),
        Some(vars["down.bias"].as_tensor().clone()),
    );
    let y_ref = down.forward(&up.forward(&n)?.gelu()?)?;
    let g = (y_ref.sqr()? * &c)?.sum_all()?.backward()?;
    for tp in [1, 2, 3, 4] {
        let outs = launch(tp, |ctx| {
            let comm = ctx.comm();
            let vb = ParallelVarBuilder::from_init(SEED, DType::F32, &Device::Cpu).trainable();
            let (norm, up, down) = build(vb.clone(), comm)?;
            let (up, down) = (
                up.with_sequence_parallel(Some(1)),
                down.with_sequence_parallel(Some(1)),
            );
            let chunk = seq / tp;
            let xr = Var::from_tensor(&x.narrow(1, comm.rank() * chunk, chunk)?)?;
            let nr = ops::rms_norm(
                xr.as_tensor(),
                &tp_layers::sequence_parallel_weight(&norm, comm)?,
                1e-5,
            )?;
            let y = down.forward(&up.forward(&nr)?.gelu()?)?;
            let loss = ops::reduce_from_group(
                &(y.sqr()? * c.narrow(1, comm.rank() * chunk, chunk)?)?.sum_all()?,
                comm,
            )?;
            let grads = loss.backward()?;
            let pg: Vec<(String, Placement, Tensor)> = vb
                .params()
                .into_iter()
                .map(|p| {
                    (
                        p.name,
                        p.placement,
                        grads.get(p.var.as_tensor()).unwrap().clone(),
                    )
                })
                .collect();
            Ok((y, grads.get(xr.as_tensor()).unwrap().clone(), pg))
        })?;
        for (r, (y, gx, pg)) in outs.iter().enumerate() {
            let what = format!("sequence parallel tp={tp} rank {r}");
            let chunk = seq / tp;
            close(
                y,
                &y_ref.narrow(1, r * chunk, chunk)?,
                &format!("{what} output"),
            );
            close(
                gx,
                &g.get(xv.as_tensor()).unwrap().narrow(1, r * chunk, chunk)?,
                &format!("{what} grad x"),
            );
            assert_eq!(pg.len(), 5);
            for (name, shard, grad) in pg {
                close(
                    grad,
                    &slice_of(g.get(vars[name].as_tensor()).unwrap(), *shard)?,
                    &format!("{what} grad {name}"),
                );
            }
        }
    }
    Ok(())
}

#[test]
fn vocab_parallel_embedding_with_padding_equals_candle_nn_embedding() -> Result<()> {
    let (vocab, hidden) = (257, 6);
    let full = full_params(&|vb, c| {
        tp_layers::vocab_parallel_embedding(vocab, hidden, vb.pp("emb"), c).map(|_| ())
    })?;
    // Ids at every rank boundary for tp 2..4, and the ends of the vocabulary.
    let ids = Tensor::new(
        &[[0u32, 64, 65, 85, 86, 128], [129, 171, 172, 255, 256, 3]],
        &Device::Cpu,
    )?;
    let w = Var::from_tensor(&full["emb.weight"])?;
    let y_ref = candle_nn::Embedding::new(w.as_tensor().clone(), hidden).forward(&ids)?;
    let c = weights_c(&[2, 6, hidden]);
    let g = (y_ref.sqr()? * &c)?.sum_all()?.backward()?;
    let gw = g.get(w.as_tensor()).unwrap();
    for tp in 1..=4 {
        let outs = run_tp(tp, None, &|vb, comm, _| {
            let emb = tp_layers::vocab_parallel_embedding(vocab, hidden, vb.pp("emb"), comm)?;
            let y = emb.forward(&ids)?;
            let loss = (y.sqr()? * &c)?.sum_all()?;
            Ok((y, loss))
        })?;
        for (r, (y, pg, _)) in outs.iter().enumerate() {
            let what = format!("embedding vocab={vocab} tp={tp} rank {r}");
            close(y, &y_ref, &format!("{what} output"));
            let (name, shard, grad) = &pg[0];
            assert_eq!(name, "emb.weight");
            close(grad, &slice_of(gw, *shard)?, &format!("{what} grad"));
        }
    }
    Ok(())
}

#[test]
fn vocab_parallel_cross_entropy_equals_full_softmax_cross_entropy() -> Result<()> {
    let vocab = 257;
    let logits = (seeded(&[7, vocab], 5, DType::F32)? * 4.0)?;
    let targets = Tensor::new(&[0i64, 256, 128, 129, -100, 85, 172], &Device::Cpu)?;
    let keep: Vec<u32> = vec![0, 1, 2, 3, 5, 6];
    let keep = Tensor::new(keep.as_slice(), &Device::Cpu)?;
    let lv = Var::from_tensor(&logits)?;
    let loss_ref = candle_nn::loss::cross_entropy(
        &lv.as_tensor().index_select(&keep, 0)?,
        &targets.index_select(&keep, 0)?.to_dtype(DType::U32)?,
    )?;
    let g_ref = loss_ref.backward()?.get(lv.as_tensor()).unwrap().clone();
    for tp in 1..=4 {
        let outs = launch(tp, |ctx| {
            let shard = Placement::SplitPadded {
                dim: 1,
                rank: ctx.rank(),
                parts: tp,
            };
            let local = Var::from_tensor(&slice_of(&logits, shard)?)?;
            let loss = tp_layers::vocab_parallel_cross_entropy(
                local.as_tensor(),
                &targets,
                vocab,
                ctx.comm(),
                Some(-100),
            )?;
            let g = loss.backward()?.get(local.as_tensor()).unwrap().clone();
            Ok((loss, g, shard))
        })?;
        for (r, (loss, g, shard)) in outs.iter().enumerate() {
            let what = format!("cross-entropy vocab={vocab} tp={tp} rank {r}");
            close(loss, &loss_ref, &format!("{what} loss"));
            // Padding columns get no gradient; real columns get softmax − one-hot.
            close(g, &slice_of(&g_ref, *shard)?, &format!("{what} grad"));
        }
    }
    Ok(())
}

#[test]
fn bad_configurations_fail_at_construction() {
    let err = |f: &(dyn Fn(ParallelVarBuilder, &Comm) -> Result<()> + Sync), tp: usize| -> String {
        launch(tp, |ctx| {
            f(
                ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu),
                ctx.comm(),
            )
        })
        .unwrap_err()
        .to_string()
    };
    let e = err(
        &|vb, c| tp_layers::column_parallel_linear(8, 10, vb.pp("q"), c).map(|_| ()),
        4,
    );
    assert!(e.contains("column_parallel_linear q.weight: out_dim 10 is not divisible by the tensor-parallel size 4"), "{e}");
    let e = err(
        &|vb, c| tp_layers::row_parallel_linear_no_bias(6, 8, vb.pp("o"), c).map(|_| ()),
        4,
    );
    assert!(
        e.contains("row_parallel_linear o.weight: in_dim 6 is not divisible"),
        "{e}"
    );
    let e = err(&|_, c| TpHeads::new(6, 6, 8, c).map(|_| ()), 4);
    assert!(
        e.contains("6 query heads cannot be split over tensor-parallel size 4"),
        "{e}"
    );
    let e = err(&|_, c| TpHeads::new(12, 6, 8, c).map(|_| ()), 4);
    assert!(
        e.contains("6 key/value heads cannot be split over tensor-parallel size 4"),
        "{e}"
    );
    let e = err(&|_, c| TpHeads::new(6, 2, 8, c).map(|_| ()), 3);
    assert!(e.contains("not a multiple of it"), "{e}");
    let e = launch(2, |ctx| {
        let x = Tensor::zeros((3, 10), DType::F32, &Device::Cpu)?;
        tp_layers::vocab_parallel_cross_entropy(
            &x,
            &Tensor::zeros(3, DType::U32, &Device::Cpu)?,
            30,
            ctx.comm(),
            None,
        )
        .map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("expects logits with 15 columns"), "{e}");
}

#[test]
fn gqa_replicated_kv_projection_sums_gradients_over_replicas() -> Result<()> {
    // 4 query heads, 1 KV head, tp 2: both ranks hold the KV head; its weight gradient on each
    // rank must be the total, so the copies stay identical after an optimizer step.
    let (hidden, hd) = (8, 2);
    let full = full_params(&|vb, c| {
        let heads = TpHeads::new(4, 1, hd, c)?;
        heads
            .kv_projection(hidden, false, vb.pp("k"), c)
            .map(|_| ())
    })?;
    let x = seeded(&[3, hidden], 8, DType::F32)?;
    let w = Var::from_tensor(&full["k.weight"])?;
    // Each rank's query heads use the KV head with a different weighting.
    let cs: Vec<Tensor> = (0..2)
        .map(|r| seeded(&[3, hd], 20 + r, DType::F32))
        .collect::<Result<_>>()?;
    let k = x.matmul(&w.as_tensor().t()?)?;
    let total = ((k.sqr()? * &cs[0])?.sum_all()? + (k.sqr()? * &cs[1])?.sum_all()?)?;
    let gw_ref = total.backward()?.get(w.as_tensor()).unwrap().clone();
    let outs = run_tp(2, None, &|vb, comm, _| {
        let heads = TpHeads::new(4, 1, hd, comm)?;
        let k = heads
            .kv_projection(hidden, false, vb.pp("k"), comm)?
            .forward(&x)?;
        let loss = (k.sqr()? * &cs[comm.rank()])?.sum_all()?;
        Ok((k, loss))
    })?;
    for (r, (_, pg, _)) in outs.iter().enumerate() {
        close(&pg[0].2, &gw_ref, &format!("replicated kv rank {r}"));
    }
    Ok(())
}

/// Dropout keyed per layer agrees across the replicas of a tp group; keyed with the tp rank
/// (sequence-parallel activations) it differs; its gradient is the same mask, scaled.
#[test]
fn keyed_dropout_agrees_across_replicas_and_trains() -> Result<()> {
    let x = seeded(&[16, 32], 4, DType::F32)?;
    let outs = launch(2, |ctx| {
        let xv = Var::from_tensor(&x)?;
        let replicated = ops::dropout(xv.as_tensor(), 0.25, 99)?;
        let split = ops::dropout(&x, 0.25, 99 ^ (ctx.rank() as u64 + 1) << 32)?;
        let g = replicated
            .sum_all()?
            .backward()?
            .get(xv.as_tensor())
            .unwrap()
            .clone();
        Ok((replicated, split, g))
    })?;
    assert_eq!(outs[0].0.to_vec2::<f32>()?, outs[1].0.to_vec2::<f32>()?);
    assert_ne!(outs[0].1.to_vec2::<f32>()?, outs[1].1.to_vec2::<f32>()?);
    // The gradient of sum(dropout(x)) is the scaled mask: 0 where dropped, 1/(1−p) elsewhere.
    let (y, g) = (outs[0].0.to_vec2::<f32>()?, outs[0].2.to_vec2::<f32>()?);
    let xs = x.to_vec2::<f32>()?;
    for ((yr, gr), xr) in y.iter().zip(&g).zip(&xs) {
        for ((yv, gv), xv) in yr.iter().zip(gr).zip(xr) {
            assert!((yv - xv * gv).abs() < 1e-6 && (*gv == 0.0 || (gv - 4.0 / 3.0).abs() < 1e-6));
        }
    }
    let dropped = g.iter().flatten().filter(|v| **v == 0.0).count() as f64 / 512.0;
    assert!(
        (0.15..0.35).contains(&dropped),
        "dropped fraction {dropped}"
    );
    Ok(())
}

#[test]
fn external_communication_leaves_the_collectives_to_the_caller() -> Result<()> {
    launch(2, |ctx| {
        let tp = ctx.comm();
        let vb = ParallelVarBuilder::from_init(4, DType::F32, &Device::Cpu);
        let x = seeded(&[3, 4], 5, DType::F32)?;
        let up = tp_layers::column_parallel_linear_no_bias(4, 6, vb.pp("up"), tp)?;
        let down = tp_layers::row_parallel_linear_no_bias(6, 4, vb.pp("down"), tp)?;
        let want = down.forward(&up.forward(&x)?)?;
        // The same layers without their collectives: the caller reduces the partial outputs.
        let (up, down) = (
            up.with_external_communication(true),
            down.with_external_communication(true),
        );
        let partial = down.forward(&up.forward(&x)?)?;
        let got = tp.all_reduce(&partial, candle_parallel::ReduceOp::Sum)?;
        assert!(max_rel_err(&got, &want)? < 1e-6);
        // A row-parallel bias belongs after the reduction: refused.
        let biased =
            tp_layers::row_parallel_linear(6, 4, vb.pp("b"), tp)?.with_external_communication(true);
        let err = biased
            .forward(&partial.narrow(1, 0, 3)?.contiguous()?)
            .unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
        Ok(())
    })?;
    Ok(())
}
