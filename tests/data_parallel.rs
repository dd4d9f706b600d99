//! Data parallelism: gradients averaged over dp ∈ {1, 2, 4} in buckets equal the full batch's,
//! with and without gradient accumulation; buckets reduced in place; ZeRO's memory per rank
//! as the paper's formulas say; bad input fails on every rank.
mod common;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::checkpoint::Param;
use candle_parallel::comm::ReduceOp;
use candle_parallel::data_parallel::{
    shard_batch, BatchGroups, GradAccumulator, GradBuckets, GradSink,
};
use candle_parallel::mesh::{MeshDim, MeshShape};
use candle_parallel::tensor_parallel::column_parallel_linear;
use candle_parallel::zero::{ShardedModule, ZeroConfig, ZeroOptimizer};
use candle_parallel_models::testing::{max_rel_err, seeded, TanhMlp};
use common::{launch, Launcher};

const HIDDEN: usize = 6;
const LAYERS: usize = 5;
const BATCH: usize = 24;

fn params(model: &TanhMlp) -> Vec<Param> {
    model
        .vars()
        .into_iter()
        .enumerate()
        .map(|(i, v)| Param::replicated(format!("p{i}"), v))
        .collect()
}

fn grads_of(model: &TanhMlp, x: &Tensor, target: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let loss = (model.forward(x)? - target)?.sqr()?.mean_all()?;
    let g = loss.backward()?;
    Ok(model
        .vars()
        .iter()
        .map(|v| g.get(v.as_tensor()).cloned())
        .collect())
}

#[test]
fn bucketed_averages_over_dp_equal_the_full_batch_gradients() -> Result<()> {
    let x = seeded(&[BATCH, HIDDEN], 1, DType::F32)?;
    let target = seeded(&[BATCH, HIDDEN], 2, DType::F32)?;
    let full = grads_of(&TanhMlp::new(0..LAYERS, HIDDEN, 3)?, &x, &target)?;
    for dp in [1, 2, 4] {
        // 64-byte buckets: several parameters per bucket and parameters larger than a bucket.
        for bucket_bytes in [64, 25 << 20] {
            for accumulate in [1, 3] {
                let outs = launch(dp, |ctx| {
                    let model = TanhMlp::new(0..LAYERS, HIDDEN, 3)?;
                    let buckets = GradBuckets::new(&params(&model), ctx.comm(), bucket_bytes)?;
                    let (xs, ts) = (
                        shard_batch(&x, ctx.comm())?,
                        shard_batch(&target, ctx.comm())?,
                    );
                    // Gradient accumulation: the shard in `accumulate` micro-batches, one sync.
                    let mut acc = GradAccumulator::default();
                    let rows = xs.dim(0)? / accumulate;
                    for k in 0..accumulate {
                        acc.add(&grads_of(
                            &model,
                            &xs.narrow(0, k * rows, rows)?,
                            &ts.narrow(0, k * rows, rows)?,
                        )?)?;
                    }
                    let mut g = acc.take()?;
                    buckets.all_reduce(&mut g)?;
                    Ok((buckets.bucket_sizes(), g))
                })?;
                for (rank, (sizes, g)) in outs.iter().enumerate() {
                    if bucket_bytes == 64 {
                        assert!(sizes.len() > 2, "dp={dp}: {sizes:?}");
                    } else {
                        assert_eq!(sizes.len(), 1);
                    }
                    for (i, (a, b)) in g.iter().zip(&full).enumerate() {
                        let e = max_rel_err(a.as_ref().unwrap(), b.as_ref().unwrap())?;
                        assert!(
                            e <= 1e-5,
                            "dp={dp} bucket {bucket_bytes} accumulate {accumulate} rank {rank} param {i}: {e:e}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn bad_data_parallel_input_is_a_clear_error_on_every_rank() -> Result<()> {
    let errs = launch(4, |ctx| {
        let e = shard_batch(
            &Tensor::zeros((10, 2), DType::F32, &Device::Cpu)?,
            ctx.comm(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("10 rows does not split over the 4"), "{e}");
        // Replicas with different parameters.
        let layers = if ctx.rank() == 3 { 2 } else { 3 };
        let model = TanhMlp::new(0..layers, HIDDEN, 3)?;
        Ok(GradBuckets::new(&params(&model), ctx.comm(), 1 << 20)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default())
    })?;
    for e in errs {
        assert!(e.contains("the replicas hold different parameters"), "{e}");
    }
    Ok(())
}

/// The result lands in the buffer itself: a view of it sees the reduced values, which equal
/// the out-of-place all-reduce's, for every op and several dtypes and group sizes.
#[test]
fn in_place_all_reduce_writes_the_result_into_the_buffer() -> Result<()> {
    for n in [1, 2, 3, 4] {
        launch(n, |ctx| {
            let r = ctx.rank() as f64;
            for dtype in [DType::F32, DType::BF16, DType::F64, DType::I64] {
                for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min, ReduceOp::Avg] {
                    if dtype == DType::I64 && op == ReduceOp::Avg {
                        continue;
                    }
                    let buf = ((Tensor::arange(0f64, 37.0, &Device::Cpu)? * (r + 1.0))? - r * 5.0)?
                        .to_dtype(dtype)?;
                    let view = buf.narrow(0, 3, 5)?;
                    let want = ctx.comm().all_reduce(&buf, op)?;
                    ctx.comm().all_reduce_in_place(&buf, op)?;
                    let f = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec1::<f64>();
                    assert_eq!(f(&buf)?, f(&want)?, "n={n} {dtype:?} {op:?}");
                    assert_eq!(
                        f(&view)?,
                        f(&want.narrow(0, 3, 5)?)?,
                        "n={n} {dtype:?} {op:?}"
                    );
                }
            }
            let strided = Tensor::zeros((4, 4), DType::F32, &Device::Cpu)?.t()?;
            let e = ctx
                .comm()
                .all_reduce_in_place(&strided, ReduceOp::Sum)
                .unwrap_err();
            assert!(e.to_string().contains("is not contiguous"), "{e}");
            Ok(())
        })?;
    }
    Ok(())
}

/// The optimizer over `vb`'s parameters: over the sharded modules `units` at stage 3.
fn zero_optimizer(
    units: &[ShardedModule],
    vb: &ParallelVarBuilder,
    batch: &BatchGroups,
    mesh: &candle_parallel::DeviceMesh,
    cfg: ZeroConfig,
) -> Result<ZeroOptimizer> {
    if cfg.stage == 3 {
        let units: Vec<&ShardedModule> = units.iter().collect();
        ZeroOptimizer::new_sharded(&units, vb.params(), batch, mesh, cfg)
    } else {
        ZeroOptimizer::new(vb.params(), mesh, &[MeshDim::Dp], cfg)
    }
}

/// Bytes held per rank for ZeRO stages 0 to 3 at dp = 1, 2, 4, f32 and bf16 parameters,
/// against the ZeRO paper's formulas: parameters Ψ·b (b bytes each); gradients 4Ψ (reduced in
/// f32), divided by N_d from stage 2; optimizer state KΨ (K = 8 for f32 moments, 12 with f32
/// master weights), divided by N_d from stage 1; at stage 3 everything divided by N_d, the f32
/// partition serving as parameters and master copy. Within 10% (bucket padding). The same
/// while a step's gradients are handed over and after the step.
#[test]
fn zero_memory_per_rank_shrinks_as_the_formulas_say() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for dp in [1, 2, 4] {
            for stage in 0..=3u8 {
                let got = Launcher::new(dp).mesh(MeshShape::new().dp(dp)).run(|ctx| {
                    let mesh = ctx.mesh()?;
                    let vb = ParallelVarBuilder::from_init(3, dtype, &Device::Cpu).trainable();
                    let batch = BatchGroups::new(mesh, &[MeshDim::Dp])?;
                    let mut x = Tensor::ones((2, 48), dtype, &Device::Cpu)?;
                    let mut units = Vec::new();
                    let mut plain = Vec::new();
                    for i in 0..4 {
                        let tp = mesh.tp().clone();
                        let build =
                            move |vb: ParallelVarBuilder| column_parallel_linear(48, 48, vb, &tp);
                        if stage == 3 {
                            units.push(ShardedModule::new(
                                &format!("fc{i}"),
                                &vb.pp(i),
                                &batch,
                                mesh,
                                build,
                            )?);
                            x = units[i].forward(&x)?.tanh()?;
                        } else {
                            plain.push(build(vb.pp(i))?);
                            x = plain[i].forward(&x)?.tanh()?;
                        }
                    }
                    let cfg = ZeroConfig {
                        stage,
                        bucket_bytes: 4096,
                        ..Default::default()
                    };
                    let mut opt = zero_optimizer(&units, &vb, &batch, mesh, cfg)?;
                    let mut grads = x.to_dtype(DType::F32)?.sum_all()?.backward()?;
                    // Handed over as a backward would (GradSink): the gradients the optimizer
                    // holds until the step, then what it keeps after it.
                    opt.add_store(&mut grads)?;
                    opt.end_micro_batch()?;
                    let during = opt.memory();
                    opt.step_accumulated(Some(1.0))?;
                    let after = opt.memory();
                    // Ψ: the model's parameters, counted from the layer shapes.
                    let psi = 4 * (48 * 48 + 48);
                    Ok((psi, during, after))
                })?;
                let (psi, m, after) = got[0];
                // The gradient buffers are kept between steps; nothing else stays.
                assert_eq!(
                    after, m,
                    "{dtype:?} dp={dp} stage {stage}: held after the step"
                );
                let n = dp as f64;
                let psi = psi as f64;
                let b = dtype.size_in_bytes() as f64;
                let k = if dtype == DType::F32 { 8.0 } else { 12.0 };
                // At stage 3 the f32 partition is the parameters and the master copy at once:
                // 4Ψ/N + 8Ψ/N, the paper's (2 + 12)Ψ/N less the 16-bit copy it then gathers.
                let want = [
                    if stage >= 3 { psi * 4.0 / n } else { psi * b },
                    if stage >= 2 { 4.0 * psi / n } else { 4.0 * psi },
                    match stage {
                        0 => k * psi,
                        1 | 2 => k * psi / n,
                        _ => 8.0 * psi / n,
                    },
                ];
                let have = [m.param_bytes, m.grad_bytes, m.optimizer_bytes];
                for (what, (h, w)) in ["parameters", "gradients", "optimizer"]
                    .iter()
                    .zip(have.iter().zip(want))
                {
                    let rel = (*h as f64 - w).abs() / w;
                    assert!(
                        rel <= 0.1,
                        "{dtype:?} dp={dp} stage {stage}: {what} {h} bytes, formula {w}"
                    );
                }
                // Every rank holds the same amount.
                assert!(got.iter().all(|(_, r, _)| *r == m), "{got:?}");
            }
        }
    }
    Ok(())
}

/// The CPU's fused optimizer step (AdamW in place, f32 parameters updated where they live at
/// stage 0, the norm in one pass) computes what candle's composite ops compute (the path GPUs
/// take), at every stage, in f32 and bf16 (master weights), at dp 1 and 2: the same norms and
/// parameters after three steps, to float rounding. Odd sizes in one bucket (so parameters
/// start at odd offsets and dp 2 pads the bucket), one weight longer than the step's 1 Mi
/// element slices.
#[test]
fn fused_optimizer_step_equals_the_composite_ops() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for dp in [1, 2] {
            for stage in 0..=3u8 {
                let got = Launcher::new(dp).mesh(MeshShape::new().dp(dp)).run(|ctx| {
                    let mesh = ctx.mesh()?;
                    let batch = BatchGroups::new(mesh, &[MeshDim::Dp])?;
                    let run = |fused: bool| -> Result<(Vec<f64>, Vec<Tensor>)> {
                        let vb = ParallelVarBuilder::from_init(5, dtype, &Device::Cpu).trainable();
                        let tp = mesh.tp().clone();
                        let dims = [(41, 1000), (1000, 1100), (1100, 39)];
                        let build = move |i: usize, vb: ParallelVarBuilder| {
                            column_parallel_linear(dims[i].0, dims[i].1, vb, &tp)
                        };
                        let mut units = Vec::new();
                        let mut plain = Vec::new();
                        for i in 0..3 {
                            if stage == 3 {
                                let build = build.clone();
                                units.push(ShardedModule::new(
                                    &format!("fc{i}"),
                                    &vb.pp(i),
                                    &batch,
                                    mesh,
                                    move |vb| build(i, vb),
                                )?);
                            } else {
                                plain.push(build(i, vb.pp(i))?);
                            }
                        }
                        let cfg = ZeroConfig {
                            stage,
                            bucket_bytes: 1 << 26,
                            fused,
                            adamw: candle_parallel::optim::AdamWConfig {
                                lr: 1e-2,
                                ..Default::default()
                            },
                            ..Default::default()
                        };
                        let mut opt = zero_optimizer(&units, &vb, &batch, mesh, cfg)?;
                        let mut norms = Vec::new();
                        for step in 0..3 {
                            let scale = 1.0 + (mesh.dp().rank() + step) as f64;
                            let mut x = (Tensor::ones((2, 41), dtype, &Device::Cpu)? * scale)?;
                            for i in 0..3 {
                                x = if stage == 3 {
                                    units[i].forward(&x)?
                                } else {
                                    plain[i].forward(&x)?
                                }
                                .tanh()?;
                            }
                            let grads = x.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
                            norms.push(opt.step(&opt.grads_of(&grads), Some(0.5))?);
                        }
                        let params = opt
                            .vars()
                            .iter()
                            .map(|v| v.as_tensor().to_dtype(DType::F32))
                            .collect::<Result<_>>()?;
                        Ok((norms, params))
                    };
                    Ok((run(true)?, run(false)?))
                })?;
                for (r, ((nf, pf), (nc, pc))) in got.iter().enumerate() {
                    let what = format!("{dtype:?} dp={dp} stage {stage} rank {r}");
                    // bf16: a last-bit difference of a master weight can round a parameter the
                    // other way, and the next steps see it.
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                    // The composite norm sums a million squares in f32 (candle's sum), the fused
                    // one in f64: some 1e-5 apart.
                    let norm_tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
                    for (a, b) in nf.iter().zip(nc) {
                        assert!(
                            (a - b).abs() <= norm_tol * b.abs(),
                            "{what}: norm {a} vs {b}"
                        );
                    }
                    assert_eq!(pf.len(), pc.len(), "{what}");
                    for (a, b) in pf.iter().zip(pc) {
                        let e = max_rel_err(a, b)?;
                        assert!(e <= tol, "{what}: parameters differ by {e:e}");
                    }
                }
            }
        }
    }
    Ok(())
}
