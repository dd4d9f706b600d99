//! The NCCL backend's logic (`comm::nccl_engine`) at world sizes 2–4, on the emulator of
//! NCCL's semantics (`tests/common/nccl_emulator.rs`): what a single GPU cannot show. Each
//! test names the defect of the first NCCL backend it guards against.
//!
//! The whole multi-rank suite (collectives, MoE, models) also runs on the emulator with
//! `CANDLE_PARALLEL_TEST_BACKEND=nccl-emulator` (CI does).
mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::comm::nccl_engine::{abort_world, EngineBackend, NcclId};
use candle_parallel::{launch, Comm, Launcher, ReduceOp};
use candle_parallel_models::testing::seeded;
use common::nccl_emulator::HostNccl;
use std::time::{Duration, Instant};

/// Runs `f(rank, comm)` on `n` threads, each with an emulated NCCL communicator (argument
/// checks on when `checked`). A rank that fails aborts the world, as the launcher does.
fn world<T: Send>(
    n: usize,
    checked: bool,
    timeout: Duration,
    f: impl Fn(usize, &Comm) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    let id = NcclId::generate::<HostNccl>().unwrap();
    let out = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (f, id) = (&f, &id);
                s.spawn(move || {
                    let b = EngineBackend::<HostNccl>::new(&Device::Cpu, rank, n, id, timeout)?
                        .with_checked_arguments(checked);
                    let out = f(rank, &Comm::from_backend(b.clone()));
                    if let Err(e) = &out {
                        abort_world(id, &format!("rank {rank} failed: {e}"));
                    }
                    out.and_then(|v| b.check().map(|()| v))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_no_violations();
    out
}

/// NCCL's rules were kept (by every test of this binary so far).
fn assert_no_violations() {
    let v = HostNccl::violations();
    assert!(v.is_empty(), "NCCL usage rules broken: {v:#?}");
}

fn err_of<T>(r: &Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Every collective, at every world size 2–4, equals the local backend's result bit for bit
/// (regrouping along every dim, ragged all-to-all, split groups included).
#[test]
fn every_collective_at_world_sizes_2_to_4_matches_the_local_backend() -> Result<()> {
    for n in 2..=4 {
        let job = |comm: &Comm, rank: usize| -> Result<Vec<Tensor>> {
            let x = seeded(&[4, 6, 4], rank as u64 + 1, DType::F32)?;
            let mut out = vec![
                comm.all_reduce(&x, ReduceOp::Sum)?,
                comm.all_reduce(&x.to_dtype(DType::BF16)?, ReduceOp::Avg)?,
                comm.all_reduce(&x, ReduceOp::Max)?,
                comm.broadcast(&x, n - 1)?,
            ];
            for dim in 0..3 {
                out.push(comm.all_gather(&x, dim)?);
                let big = Tensor::cat(&vec![x.clone(); n], dim)?;
                out.push(comm.reduce_scatter(&big, dim, ReduceOp::Sum)?);
            }
            // Uneven rows per peer, and an empty part.
            let send: Vec<usize> = (0..n).map(|j| (rank + 2 * j) % 3).collect();
            let recv = comm.exchange_split_sizes(&send)?;
            let rows = send.iter().sum::<usize>();
            let t = seeded(&[rows, 3], 50 + rank as u64, DType::F32)?;
            out.push(comm.all_to_all(&t, &send, &recv)?);
            // Split into odd and even ranks, ordered backwards.
            let sub = comm.split(Some(rank % 2), n - rank)?.expect("a member");
            out.push(sub.all_reduce(&x, ReduceOp::Sum)?);
            out.push(sub.all_gather(&Tensor::new(&[rank as f32], &Device::Cpu)?, 0)?);
            Ok(out)
        };
        let local = launch(n, |ctx| job(ctx.comm(), ctx.rank()))?;
        let emulated = world(n, false, Duration::from_secs(30), |r, c| job(c, r));
        for (rank, (l, e)) in local.iter().zip(emulated).enumerate() {
            let e = e?;
            assert_eq!(l.len(), e.len());
            for (i, (a, b)) in l.iter().zip(&e).enumerate() {
                assert_eq!(a.dims(), b.dims(), "n={n} rank {rank} output {i}");
                let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                assert_eq!(a, b, "n={n} rank {rank} output {i}");
            }
        }
    }
    Ok(())
}

/// Bug 1: an abort from another thread (a failing peer thread, the watchdog) must not free a
/// communicator a rank thread is inside, and must release that rank at once. The emulator
/// records any NCCL call made while another thread is inside one on the same communicator.
#[test]
fn an_abort_from_another_thread_releases_a_waiting_rank_without_racing_its_calls() {
    for round in 0..5 {
        let start = Instant::now();
        let err = Launcher::new(3)
            .timeout(Duration::from_secs(60))
            .run_on_engine::<HostNccl, (), _>(|_| Ok(Device::Cpu), &|ctx| {
                let c = ctx.comm();
                let x = Tensor::ones(1000, DType::F32, &Device::Cpu)?;
                for _ in 0..20 {
                    c.all_reduce(&x, ReduceOp::Sum)?;
                }
                if ctx.rank() == 1 {
                    std::thread::sleep(Duration::from_millis(10 * round));
                    candle_core::bail!("rank 1 gives up");
                }
                // Ranks 0 and 2 wait for rank 1, which never comes.
                loop {
                    c.all_reduce(&x, ReduceOp::Sum)?;
                }
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1 gives up"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "released by the abort, not by the 60 s timeout: {:?}",
            start.elapsed()
        );
    }
    assert_no_violations();
}

/// Bug 2: `send` under checked arguments ran a group-wide gather that `recv` never joined (a
/// hang). Now the sender's shape travels to the receiver; a mismatch fails both sides.
#[test]
fn checked_send_and_recv_work_and_a_mismatch_fails_both_sides_naming_both_shapes() {
    let outs = world(2, true, Duration::from_secs(30), |rank, c| {
        if rank == 0 {
            c.send(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?, 1)?;
            Ok(vec![])
        } else {
            c.recv(0, 2, DType::F32)?.to_vec1::<f32>()
        }
    });
    assert_eq!(outs[1].as_ref().unwrap(), &vec![1.0, 2.0]);
    let start = Instant::now();
    let outs = world(2, true, Duration::from_secs(30), |rank, c| {
        if rank == 0 {
            c.send(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, 1)
        } else {
            c.recv(0, (3, 3), DType::F32).map(|_| ())
        }
    });
    for o in &outs {
        let e = err_of(o);
        assert!(
            e.contains("rank 0 sent F32[2, 3] but rank 1 expects F32[3, 3]"),
            "{e}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(10), "no hang");
}

/// Bug 3: checked mode rejected valid ragged all-to-alls (the row count differs per rank) and
/// never compared a rank's `recv_splits` with its peers' `send_splits`.
#[test]
fn checked_ragged_all_to_all_passes_and_inconsistent_splits_fail_on_every_rank() {
    let outs = world(3, true, Duration::from_secs(30), |rank, c| {
        let send: Vec<usize> = (0..3).map(|j| (rank + j) % 3).collect();
        let recv = c.exchange_split_sizes(&send)?;
        let x = Tensor::ones((send.iter().sum::<usize>(), 2), DType::F32, &Device::Cpu)?;
        Ok(c.all_to_all(&x, &send, &recv)?.dims().to_vec())
    });
    for o in &outs {
        assert!(o.is_ok(), "{}", err_of(o));
    }
    let outs = world(2, true, Duration::from_secs(30), |rank, c| {
        // Rank 0 sends 2 rows to rank 1, which expects 1.
        let (send, recv) = if rank == 0 {
            (vec![1, 2], vec![1, 1])
        } else {
            (vec![1, 1], vec![1, 1])
        };
        let x = Tensor::ones((send.iter().sum::<usize>(), 2), DType::F32, &Device::Cpu)?;
        c.all_to_all(&x, &send, &recv).map(|_| ())
    });
    for o in &outs {
        let e = err_of(o);
        assert!(
            e.contains("rank 0 sends 2 rows to rank 1 but rank 1 expects 1"),
            "{e}"
        );
    }
}

/// Bug 4: the rows a rank keeps were copied with `send_splits[me]` into room sized by
/// `recv_splits[me]`: an out-of-bounds write. Now an error, checked mode or not.
#[test]
fn all_to_all_rejects_a_kept_part_that_does_not_fit_without_checked_mode() {
    let outs = world(2, false, Duration::from_secs(5), |rank, c| {
        let (send, recv) = ([3usize, 1], [1usize, 1]);
        let x = Tensor::ones((4, 2), DType::F32, &Device::Cpu)?;
        let _ = rank;
        c.all_to_all(&x, &send, &recv).map(|_| ())
    });
    let e = err_of(&outs[0]);
    assert!(
        e.contains("send_splits[0] = 3 rows but recv_splits[0] = 1"),
        "{e}"
    );
}

/// Bug 5: NCCL's ungrouped send waits for its peer, the old thread backend buffered: a ring of
/// sends passed on the CPU and hung on GPUs. Both now fail it (timeout); `send_recv` is the
/// grouped form that works. Zero-element messages issue nothing on either side (the old
/// backend issued a zero-byte send whose receive it skipped, leaving it unmatched).
#[test]
fn rings_need_send_recv_and_zero_element_messages_leave_nothing_unmatched() {
    let outs = world(3, false, Duration::from_secs(2), |rank, c| {
        c.send(&Tensor::new(&[rank as f32], &Device::Cpu)?, (rank + 1) % 3)?;
        c.recv((rank + 2) % 3, 1, DType::F32).map(|_| ())
    });
    assert!(
        err_of(&outs[0]).contains("timed out"),
        "{}",
        err_of(&outs[0])
    );
    for checked in [false, true] {
        let outs = world(3, checked, Duration::from_secs(30), |rank, c| {
            let x = Tensor::new(&[rank as f32, 1.0], &Device::Cpu)?;
            let y = c.send_recv(&x, (rank + 1) % 3, (rank + 2) % 3, 2, DType::F32)?;
            // An empty message, then a real one on the same pair.
            let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu)?;
            if rank == 0 {
                c.send(&empty, 1)?;
                c.send(&y, 1)?;
            } else if rank == 1 {
                assert_eq!(c.recv(0, (0, 4), DType::F32)?.dims(), &[0, 4]);
                return c.recv(0, 2, DType::F32)?.to_vec1::<f32>();
            }
            y.to_vec1::<f32>()
        });
        // Rank 0 received rank 2's tensor and passed it on to rank 1.
        assert_eq!(
            outs[1].as_ref().unwrap(),
            &vec![2.0, 1.0],
            "checked {checked}"
        );
        assert_eq!(outs[2].as_ref().unwrap(), &vec![1.0, 1.0]);
    }
}

/// Bug 6: packed dtypes (fractions of a byte) moved nothing; a collective's peers that
/// disagree hang in NCCL, so the watchdog must end it (unchecked) or the check must name it.
#[test]
fn packed_dtypes_are_rejected_and_mismatched_collectives_end_in_errors() {
    let outs = world(2, false, Duration::from_secs(5), |rank, c| {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        c.send_recv(&x, 1 - rank, 1 - rank, 8, DType::F4)
            .map(|_| ())
    });
    let e = err_of(&outs[0]);
    assert!(
        e.contains("F4 packs values into fractions of a byte"),
        "{e}"
    );
    // Unchecked: NCCL (and the emulator) hang; the watchdog's timeout ends it.
    let start = Instant::now();
    let outs = world(2, false, Duration::from_secs(1), |rank, c| {
        let x = Tensor::ones(4 + rank, DType::F32, &Device::Cpu)?;
        c.all_reduce(&x, ReduceOp::Sum).map(|_| ())
    });
    for o in &outs {
        assert!(err_of(o).contains("timed out"), "{}", err_of(o));
    }
    assert!(start.elapsed() < Duration::from_secs(15));
    // Checked: both ranks name the shapes at once.
    let outs = world(2, true, Duration::from_secs(30), |rank, c| {
        let x = Tensor::ones(4 + rank, DType::F32, &Device::Cpu)?;
        c.all_reduce(&x, ReduceOp::Sum).map(|_| ())
    });
    for o in &outs {
        let e = err_of(o);
        assert!(
            e.contains("ranks disagree") && e.contains("rank 1: [10, 7, 1, 5]"),
            "{e}"
        );
    }
}

/// An error NCCL finds in the background (a lost connection) surfaces through
/// `ncclCommGetAsyncError`: the watchdog aborts, the next call fails with NCCL's message.
#[test]
fn an_asynchronous_nccl_error_aborts_the_communicator_with_its_message() {
    let outs = world(2, false, Duration::from_secs(30), |rank, c| -> Result<()> {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        c.all_reduce(&x, ReduceOp::Sum)?;
        if rank == 0 {
            HostNccl::inject_async_error("peer connection lost");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                c.all_reduce(&x, ReduceOp::Sum)?;
                std::thread::sleep(Duration::from_millis(20));
            }
            candle_core::bail!("the background error never surfaced");
        }
        // Rank 1 keeps going until the failing rank 0 aborts the world.
        loop {
            c.all_reduce(&x, ReduceOp::Sum)?;
        }
    });
    let e = err_of(&outs[0]);
    assert!(e.contains("peer connection lost"), "{e}");
    assert!(err_of(&outs[1]).contains("aborted"), "{}", err_of(&outs[1]));
}

/// A rank that never joins the world is an error after the timeout, not a hang.
#[test]
fn a_world_that_never_fills_is_an_error() {
    let id = NcclId::generate::<HostNccl>().unwrap();
    let start = Instant::now();
    let e = EngineBackend::<HostNccl>::new(&Device::Cpu, 0, 2, &id, Duration::from_millis(300))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not every rank joined"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Checked mode's point-to-point protocol always runs both of its exchanges on both sides, so
/// ranks that call different operations (a `send` against a `send_recv`, a receiver that
/// expects more dims than a message describes) get errors on both sides, not a hang.
#[test]
fn checked_point_to_point_fails_both_sides_whatever_the_disagreement() {
    let start = Instant::now();
    let outs = world(2, true, Duration::from_secs(20), |rank, c| {
        let x = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        if rank == 0 {
            c.send(&x, 1)
        } else {
            c.send_recv(&x, 0, 0, 3, DType::F32).map(|_| ())
        }
    });
    for o in &outs {
        let e = err_of(o);
        assert!(e.contains("send/recv"), "{e}");
    }
    let outs = world(2, true, Duration::from_secs(20), |rank, c| {
        let dims = [1usize; 14];
        if rank == 0 {
            c.send(&Tensor::ones(&dims[..13], DType::F32, &Device::Cpu)?, 1)
        } else {
            c.recv(0, &dims[..], DType::F32).map(|_| ())
        }
    });
    for o in &outs {
        let e = err_of(o);
        assert!(
            e.contains(
                "rank 0 sent F32[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...] but rank 1 expects"
            ),
            "{e}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(15), "no hang");
}

/// A group of sends and receives with several peers (what a pipeline stage does at each step:
/// activations forward, gradients back), two messages per pair kept in order, checked or not.
#[test]
fn grouped_exchanges_with_both_neighbours_deliver_in_order() {
    for checked in [false, true] {
        let outs = world(4, checked, Duration::from_secs(30), |rank, c| {
            let n = 4;
            let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
            let a = Tensor::new(&[rank as f32, 1.0], &Device::Cpu)?;
            let b = Tensor::new(&[rank as f32, 2.0], &Device::Cpu)?;
            let two = candle_core::Shape::from(2);
            let got = c.exchange(
                &[(&a, next), (&b, next), (&a, prev)],
                &[
                    (prev, &two, DType::F32),
                    (prev, &two, DType::F32),
                    (next, &two, DType::F32),
                ],
            )?;
            got.iter()
                .map(|t| t.to_vec1::<f32>())
                .collect::<Result<Vec<_>>>()
        });
        for (rank, o) in outs.into_iter().enumerate() {
            let (next, prev) = ((rank + 1) % 4, (rank + 3) % 4);
            assert_eq!(
                o.unwrap(),
                vec![
                    vec![prev as f32, 1.0],
                    vec![prev as f32, 2.0],
                    vec![next as f32, 1.0]
                ],
                "rank {rank}, checked {checked}"
            );
        }
    }
}

/// The second stream: a group of several ranks enqueues on a communication stream of its own,
/// each operation first waiting (on the device) for the compute stream's work so far; a
/// blocking call has the compute stream wait for it at once, an asynchronous one
/// (`Comm::all_reduce_async`) only where its `Work` is waited for, or dropped — so that
/// compute enqueued in between overlaps it. Every rank of the whole emulated suite is checked
/// against the same rule (work on the communication stream after the compute stream's).
#[test]
fn overlapped_work_goes_on_the_communication_stream_and_compute_waits_only_for_its_result() {
    use common::nccl_emulator::StreamCall;
    let out = world(2, false, Duration::from_secs(60), |rank, comm| {
        HostNccl::take_trace();
        let compute = HostNccl::compute_stream();
        let x = Tensor::new(&[rank as f32 + 1.0, 2.0], &Device::Cpu)?;
        let work = comm.all_reduce_async(&x, ReduceOp::Sum);
        let started = HostNccl::take_trace();
        let y = comm.all_reduce(&x, ReduceOp::Sum)?;
        let blocking = HostNccl::take_trace();
        let r = work.wait()?;
        let waited = HostNccl::take_trace();
        drop(comm.all_reduce_async(&x, ReduceOp::Max));
        let dropped = HostNccl::take_trace();
        Ok((
            compute,
            started,
            blocking,
            waited,
            dropped,
            r.to_vec1::<f32>()?,
            y.to_vec1::<f32>()?,
        ))
    });
    for (rank, r) in out.into_iter().enumerate() {
        let (compute, started, blocking, waited, dropped, r, y) = r.unwrap();
        assert_eq!((r, y), (vec![3.0, 4.0], vec![3.0, 4.0]), "rank {rank}");
        // The asynchronous all-reduce: on another stream, after a wait for the compute stream.
        let work_at = |t: &[StreamCall], what: &str| {
            t.iter()
                .position(|c| matches!(c, StreamCall::Work { what: w, .. } if w == what))
        };
        let i = work_at(&started, "all_reduce").expect("the all-reduce was enqueued");
        let StreamCall::Work {
            stream: comm_stream,
            ..
        } = started[i].clone()
        else {
            unreachable!()
        };
        assert_ne!(
            comm_stream, compute,
            "rank {rank}: enqueued on the compute stream"
        );
        let waits = |t: &[StreamCall], stream: usize, on: usize| -> Vec<u64> {
            t.iter()
                .filter_map(|c| match c {
                    StreamCall::Wait {
                        stream: s,
                        on: o,
                        seq,
                    } if *s == stream && *o == on => Some(*seq),
                    _ => None,
                })
                .collect()
        };
        assert!(
            started[..i].iter().any(
                |c| matches!(c, StreamCall::Wait { stream, on, .. } if *stream == comm_stream && *on == compute)
            ),
            "rank {rank}: the communication stream did not wait for the compute stream first: {started:?}"
        );
        assert!(
            waits(&started, compute, comm_stream).is_empty(),
            "rank {rank}: the compute stream waits for an operation nobody waited for yet: {started:?}"
        );
        // The blocking all-reduce: the same stream (the group's order), then the compute
        // stream waits for it at once.
        let j = work_at(&blocking, "all_reduce").expect("the blocking all-reduce");
        assert!(matches!(&blocking[j], StreamCall::Work { stream, .. } if *stream == comm_stream));
        let after = waits(&blocking[j..], compute, comm_stream);
        assert_eq!(after.len(), 1, "rank {rank}: {blocking:?}");
        // Waiting for the asynchronous work: the compute stream waits for its done event.
        assert_eq!(
            waits(&waited, compute, comm_stream).len(),
            1,
            "rank {rank}: {waited:?}"
        );
        assert!(
            waited.iter().all(|c| matches!(c, StreamCall::Wait { .. })),
            "{waited:?}"
        );
        // A dropped work still orders the compute stream after it.
        let k = work_at(&dropped, "all_reduce").expect("the dropped all-reduce");
        assert_eq!(
            waits(&dropped[k..], compute, comm_stream).len(),
            1,
            "{dropped:?}"
        );
    }
    assert_no_violations();
}
