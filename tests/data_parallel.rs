//! Data parallelism: gradients averaged over dp ∈ {1, 2, 4} in buckets equal the full batch's,
//! with and without gradient accumulation; bad input fails on every rank.
mod common;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_parallel::checkpoint::Param;
use candle_parallel::data_parallel::{shard_batch, GradAccumulator, GradBuckets};
use candle_parallel_models::testing::{max_rel_err, seeded, TanhMlp};
use common::launch;

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
