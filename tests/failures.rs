//! Never hang, never lie: disagreements and failing ranks end every rank with a clear error,
//! promptly.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_parallel::{launch, Launcher, ReduceOp};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs `f` on `n` ranks with a generous timeout (so that only the abort mechanism can end the
/// waits quickly), records each rank's error message, and returns them with the job's error.
fn run_failing<F>(n: usize, timeout: Duration, f: F) -> (Vec<Option<String>>, String, Duration)
where
    F: Fn(&candle_parallel::RankContext) -> Result<()> + Sync,
{
    let errors: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; n]);
    let start = Instant::now();
    let res = Launcher::new(n).timeout(timeout).run(|ctx| {
        let r = f(&ctx);
        if let Err(e) = &r {
            errors.lock().unwrap()[ctx.rank()] = Some(e.to_string());
        }
        r
    });
    let elapsed = start.elapsed();
    let job = res.expect_err("the job must fail").to_string();
    (errors.into_inner().unwrap(), job, elapsed)
}

fn all_contain(errors: &[Option<String>], needles: &[&str]) {
    for (r, e) in errors.iter().enumerate() {
        let e = e
            .as_ref()
            .unwrap_or_else(|| panic!("rank {r} returned no error"));
        for needle in needles {
            assert!(
                e.contains(needle),
                "rank {r}: {e:?} does not mention {needle:?}"
            );
        }
    }
}

#[test]
fn mismatched_shapes_fail_every_rank_with_both_shapes() {
    let (errors, job, elapsed) = run_failing(3, Duration::from_secs(60), |ctx| {
        let dims = if ctx.rank() == 1 { (3, 2) } else { (2, 3) };
        let x = Tensor::zeros(dims, DType::F32, &Device::Cpu)?;
        ctx.comm().all_reduce(&x, ReduceOp::Sum)?;
        Ok(())
    });
    all_contain(
        &errors,
        &[
            "all_reduce",
            "world[0,1,2]",
            "rank 0: all_reduce(sum) F32[2, 3]",
            "rank 1: all_reduce(sum) F32[3, 2]",
        ],
    );
    assert!(job.contains("disagree"), "{job}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn mismatched_dtypes_fail_every_rank() {
    let (errors, _, elapsed) = run_failing(2, Duration::from_secs(60), |ctx| {
        let dtype = if ctx.rank() == 0 {
            DType::F32
        } else {
            DType::BF16
        };
        ctx.comm()
            .all_gather(&Tensor::zeros(4, dtype, &Device::Cpu)?, 0)?;
        Ok(())
    });
    all_contain(&errors, &["F32[4]", "BF16[4]"]);
    assert!(elapsed < Duration::from_secs(5));
}

#[test]
fn mismatched_op_order_fails_every_rank_naming_both_ops() {
    let (errors, _, elapsed) = run_failing(2, Duration::from_secs(60), |ctx| {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let c = ctx.comm();
        if ctx.rank() == 0 {
            c.all_reduce(&x, ReduceOp::Sum)?;
            c.all_gather(&x, 0)?;
        } else {
            c.all_gather(&x, 0)?;
            c.all_reduce(&x, ReduceOp::Sum)?;
        }
        Ok(())
    });
    all_contain(
        &errors,
        &["call #0", "all_reduce(sum)", "all_gather(dim=0)"],
    );
    assert!(elapsed < Duration::from_secs(5));
}

#[test]
fn a_later_mismatch_reports_its_call_number() {
    let (errors, _, _) = run_failing(2, Duration::from_secs(60), |ctx| {
        let c = ctx.comm();
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        c.all_reduce(&x, ReduceOp::Sum)?;
        c.barrier()?;
        let op = if ctx.rank() == 0 {
            ReduceOp::Max
        } else {
            ReduceOp::Min
        };
        c.all_reduce(&x, op)?;
        Ok(())
    });
    all_contain(&errors, &["call #2", "all_reduce(max)", "all_reduce(min)"]);
}

#[test]
fn a_rank_that_returns_an_error_ends_every_other_rank() {
    let (errors, job, elapsed) = run_failing(3, Duration::from_secs(60), |ctx| {
        if ctx.rank() == 1 {
            std::thread::sleep(Duration::from_millis(100));
            bail!("out of tokens")
        }
        ctx.comm()
            .all_reduce(&Tensor::zeros(4, DType::F32, &Device::Cpu)?, ReduceOp::Sum)?;
        Ok(())
    });
    assert!(
        job.starts_with("rank 1 failed: out of tokens\n") || job == "rank 1 failed: out of tokens",
        "{job}"
    );
    for r in [0, 2] {
        let e = errors[r].as_ref().unwrap();
        assert!(
            e.contains("rank 1 failed: out of tokens") && e.contains("aborted"),
            "{e}"
        );
    }
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn a_rank_that_panics_ends_every_other_rank() {
    let (errors, job, elapsed) = run_failing(4, Duration::from_secs(60), |ctx| {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        ctx.comm().all_reduce(&x, ReduceOp::Sum)?;
        if ctx.rank() == 2 {
            panic!("index out of bounds in rank 2's data loader");
        }
        ctx.comm().all_gather(&x, 0)?;
        Ok(())
    });
    assert!(
        job.starts_with("rank 2 failed: panicked: index out of bounds"),
        "{job}"
    );
    for r in [0, 1, 3] {
        let e = errors[r].as_ref().unwrap();
        assert!(
            e.contains("all_gather") && e.contains("rank 2 failed"),
            "{e}"
        );
    }
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn a_rank_that_never_arrives_times_out_naming_it() {
    // Margins wide enough for a loaded machine: the two prompt ranks meet well within the
    // timeout, the late one misses it by seconds.
    let (errors, _, elapsed) = run_failing(3, Duration::from_secs(2), |ctx| {
        if ctx.rank() == 2 {
            std::thread::sleep(Duration::from_secs(4));
        }
        ctx.comm().barrier()?;
        Ok(())
    });
    let e0 = errors[0].as_ref().unwrap();
    assert!(
        e0.contains("timed out") && e0.contains("[2] never arrived"),
        "{e0}"
    );
    // The late rank finds the group failed when it finally arrives.
    let e2 = errors[2].as_ref().unwrap();
    assert!(e2.contains("aborted") && e2.contains("timed out"), "{e2}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn calls_after_a_failure_keep_failing() {
    let outs = Mutex::new(Vec::new());
    let _ = Launcher::new(2)
        .timeout(Duration::from_secs(60))
        .run(|ctx| {
            let x = Tensor::zeros(ctx.rank() + 1, DType::F32, &Device::Cpu)?;
            let first = ctx.comm().all_reduce(&x, ReduceOp::Sum).is_err();
            // A rank that ignores the error must not get a result from a broken group.
            let later = ctx.comm().barrier();
            outs.lock()
                .unwrap()
                .push((first, later.map_err(|e| e.to_string())));
            Ok(())
        });
    let outs = outs.into_inner().unwrap();
    assert_eq!(outs.len(), 2);
    for (first, later) in outs {
        assert!(first);
        let e = later.unwrap_err();
        assert!(
            e.contains("barrier") && e.contains("aborted") && e.contains("disagree"),
            "{e}"
        );
    }
}

#[test]
fn all_to_all_with_wrong_recv_splits_fails_every_rank() {
    let (errors, _, _) = run_failing(2, Duration::from_secs(60), |ctx| {
        let x = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
        // Both send [1, 2]; rank 1 wrongly expects 1 row (not 2) from rank 0.
        let recv = if ctx.rank() == 0 { [1, 1] } else { [1, 2] };
        ctx.comm().all_to_all(&x, &[1, 2], &recv)?;
        Ok(())
    });
    all_contain(
        &errors,
        &[
            "rank 1 expects 1 rows from rank 0 but rank 0 sends it 2",
            "exchange_split_sizes",
        ],
    );
}

#[test]
fn all_to_all_whose_splits_do_not_cover_the_rows_fails() {
    let (errors, _, _) = run_failing(2, Duration::from_secs(60), |ctx| {
        let x = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?;
        ctx.comm().all_to_all(&x, &[1, 1], &[1, 1])?;
        Ok(())
    });
    all_contain(&errors, &["add up to 2 rows but the tensor has 3 rows"]);
}

#[test]
fn reduce_scatter_of_an_indivisible_dim_fails_every_rank() {
    let (errors, _, _) = run_failing(3, Duration::from_secs(60), |ctx| {
        let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
        ctx.comm().reduce_scatter(&x, 0, ReduceOp::Sum)?;
        Ok(())
    });
    all_contain(&errors, &["not divisible by the group size 3"]);
}

#[test]
fn broadcast_from_a_root_outside_the_group_fails() {
    let (errors, _, _) = run_failing(2, Duration::from_secs(60), |ctx| {
        ctx.comm()
            .broadcast(&Tensor::zeros(2, DType::F32, &Device::Cpu)?, 5)?;
        Ok(())
    });
    all_contain(&errors, &["root 5 is not a rank of this group of 2 ranks"]);
}

#[test]
fn recv_of_the_wrong_shape_fails_both_sides() {
    let (errors, _, elapsed) = run_failing(2, Duration::from_secs(60), |ctx| {
        let c = ctx.comm();
        if ctx.rank() == 0 {
            c.send(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, 1)?;
            c.barrier()?; // learns of the mismatch here
        } else {
            c.recv(0, (3, 3), DType::F32)?;
        }
        Ok(())
    });
    all_contain(
        &errors,
        &["rank 0 sent F32[2, 3] but rank 1 expects F32[3, 3]"],
    );
    assert!(elapsed < Duration::from_secs(5));
}

#[test]
fn empty_worlds_and_bad_peers_are_clear_errors() {
    let e = launch(0, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    let e = launch(1, |ctx| {
        ctx.comm()
            .send(&Tensor::zeros(1, DType::F32, &Device::Cpu)?, 3)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("destination 3 is not a rank of this group of 1"),
        "{e}"
    );
}

#[test]
fn backend_names_parse_and_unknown_ones_are_clear_errors() {
    use candle_parallel::launch::BackendKind;
    assert_eq!("local".parse::<BackendKind>().unwrap(), BackendKind::Local);
    assert_eq!(" nccl ".parse::<BackendKind>().unwrap(), BackendKind::Nccl);
    let e = "gpu".parse::<BackendKind>().unwrap_err().to_string();
    assert!(e.contains("unknown backend \"gpu\": use local"), "{e}");
}

/// Without the `nccl` feature, asking for NCCL says how to get it instead of running on the CPU.
#[cfg(not(feature = "nccl"))]
#[test]
fn the_nccl_backend_without_the_feature_is_a_clear_error() {
    let e = Launcher::new(2)
        .backend(candle_parallel::launch::BackendKind::Nccl)
        .run(|_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("build with --features nccl"), "{e}");
}
