//! The communication lane (`Comm::start` and the `*_async` methods): operations queued on a
//! group run in order on a thread of the rank's own while it computes, mixed freely with
//! blocking calls; errors reach every rank through `Work::wait`; a slow link's time hides
//! behind compute.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_parallel::comm::local::LinkModel;
use candle_parallel::{launch, Launcher, ReduceOp};
use std::time::{Duration, Instant};

#[test]
fn async_and_blocking_calls_keep_one_order_on_every_rank() -> Result<()> {
    let out = launch(3, |ctx| {
        let c = ctx.comm();
        let r = ctx.rank() as f32;
        let mut works = Vec::new();
        let mut gathered = Vec::new();
        for i in 0..20usize {
            let x = (Tensor::ones(i + 1, DType::F32, &Device::Cpu)? * (r + i as f32) as f64)?;
            works.push(c.all_reduce_async(&x, ReduceOp::Sum));
            if i % 3 == 0 {
                // A blocking call waits for the queued ones: the same order on every rank.
                gathered.push(c.all_gather(&Tensor::new(&[r + i as f32], &Device::Cpu)?, 0)?);
            }
            if i % 5 == 4 {
                // Dropped without waiting: it still runs, and the order holds.
                drop(works.pop());
            }
        }
        let in_place = Tensor::new(&[r, 1.0], &Device::Cpu)?;
        let w = c.all_reduce_in_place_async(&in_place, ReduceOp::Max);
        let scattered =
            c.reduce_scatter_async(&Tensor::arange(0f32, 6.0, &Device::Cpu)?, 0, ReduceOp::Sum);
        w.wait()?;
        let sums: Vec<f32> = works
            .into_iter()
            .map(|w| Ok(w.wait()?.to_vec1::<f32>()?[0]))
            .collect::<Result<_>>()?;
        let gathered: Vec<Vec<f32>> = gathered
            .iter()
            .map(|g| g.to_vec1::<f32>())
            .collect::<Result<_>>()?;
        Ok((
            sums,
            gathered,
            in_place.to_vec1::<f32>()?,
            scattered.wait()?.to_vec1::<f32>()?,
            ctx.rank(),
        ))
    })?;
    for (sums, gathered, in_place, scattered, rank) in out {
        let want: Vec<f32> = (0..20usize)
            .filter(|i| i % 5 != 4)
            .map(|i| 3.0 * i as f32 + 3.0)
            .collect();
        assert_eq!(sums, want, "rank {rank}");
        for (k, g) in gathered.iter().enumerate() {
            let i = (3 * k) as f32;
            assert_eq!(g, &vec![i, 1.0 + i, 2.0 + i], "rank {rank}");
        }
        assert_eq!(in_place, vec![2.0, 1.0]);
        assert_eq!(
            scattered,
            vec![3.0 * (2 * rank) as f32, 3.0 * (2 * rank + 1) as f32]
        );
    }
    Ok(())
}

#[test]
fn exchanges_on_the_lane_pass_a_ring_without_deadlock() -> Result<()> {
    let out = launch(4, |ctx| {
        let (r, n) = (ctx.rank(), ctx.world_size());
        let x = Tensor::new(&[r as f32; 3], &Device::Cpu)?;
        let w = ctx.comm().exchange_async(
            vec![(x.clone(), (r + 1) % n)],
            vec![((r + n - 1) % n, Shape::from(3), DType::F32)],
        );
        // A blocking exchange the other way, queued behind it.
        let back = ctx
            .comm()
            .send_recv(&x, (r + n - 1) % n, (r + 1) % n, 3, DType::F32)?;
        Ok((w.wait()?[0].to_vec1::<f32>()?, back.to_vec1::<f32>()?))
    })?;
    for (r, (from_prev, from_next)) in out.into_iter().enumerate() {
        assert_eq!(from_prev, vec![((r + 3) % 4) as f32; 3]);
        assert_eq!(from_next, vec![((r + 1) % 4) as f32; 3]);
    }
    Ok(())
}

#[test]
fn a_mismatch_on_the_lane_fails_every_rank_through_wait() {
    let out = Launcher::new(2)
        .timeout(Duration::from_secs(20))
        .run(|ctx| {
            let x = Tensor::zeros(ctx.rank() + 2, DType::F32, &Device::Cpu)?;
            let w = ctx.comm().all_reduce_async(&x, ReduceOp::Sum);
            Ok(w.wait().map(|_| ()).unwrap_err().to_string())
        });
    let msg = match out {
        Ok(errors) => errors.join("\n"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("all_reduce"), "{msg}");
    assert!(msg.contains("[2]") && msg.contains("[3]"), "{msg}");
}

/// A reduction on a slow dialled link overlaps a rank's compute (here a sleep, which costs no
/// core, so that the check holds on a loaded machine): the pair takes about the longer of the
/// two, not their sum. Loose bounds; the benchmarks measure it properly.
#[test]
fn a_slow_links_time_hides_behind_compute() -> Result<()> {
    let link: LinkModel = "gbps=1,latency_us=1000".parse()?;
    let n = 4 << 20; // 16 MiB of f32: a 2-rank all-reduce sends 16 MiB, ~134 ms at 1 Gb/s
    let due = link.time(4 * n);
    let compute = due;
    let times = Launcher::new(2).link(link).run(|ctx| {
        let x = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        let t = Instant::now();
        let w = ctx.comm().all_reduce_async(&x, ReduceOp::Sum);
        std::thread::sleep(compute);
        let sum = w.wait()?.max(0)?.to_scalar::<f32>()?;
        let overlapped = t.elapsed();
        let t = Instant::now();
        ctx.comm().all_reduce(&x, ReduceOp::Sum)?;
        std::thread::sleep(compute);
        Ok((sum, overlapped, t.elapsed()))
    })?;
    for (rank, (sum, overlapped, serial)) in times.into_iter().enumerate() {
        assert_eq!(sum, 2.0);
        assert!(serial >= due + compute, "rank {rank}: {serial:?}");
        assert!(
            overlapped < due + compute.mul_f64(0.7),
            "rank {rank}: reduction ({due:?}) and compute ({compute:?}) took {overlapped:?} together; serial {serial:?}"
        );
    }
    Ok(())
}
