//! The NCCL backend on CUDA devices, against the local backend on the CPU. Needs a GPU and
//! `--features nccl`: CI builds these tests, a GPU machine runs them (one GPU means an NCCL
//! world of one rank; multi-rank correctness is proven on the CPU backend).
#![cfg(feature = "nccl")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::{full_gradients, ParallelVarBuilder};
use candle_parallel::comm::nccl::{NcclBackend, NcclId};
use candle_parallel::launch::{BackendKind, RankContext};
use candle_parallel::moe::Dispatch;
use candle_parallel::{ops, Launcher, MeshShape, ReduceOp};
use candle_parallel_models::llama::{Llama, LlamaConfig};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
use candle_parallel_models::testing::{
    max_rel_err, seeded, write_random_llama, write_random_mixtral,
};
use std::time::Duration;

/// Runs `f` on one rank with the local backend (CPU) and with NCCL (CUDA device 0), and
/// returns both results on the CPU.
fn on_cpu_and_gpu(
    mesh: Option<MeshShape>,
    f: impl Fn(&RankContext) -> Result<Vec<Tensor>> + Sync,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let run = |backend| {
        let mut l = Launcher::new(1).backend(backend);
        if let Some(m) = mesh {
            l = l.mesh(m);
        }
        l.run(|ctx| {
            let out = f(&ctx)?;
            for t in &out {
                assert_eq!(
                    t.device().location(),
                    ctx.device().location(),
                    "output device"
                );
            }
            out.iter().map(|t| t.to_device(&Device::Cpu)).collect()
        })
        .map(|mut v| v.remove(0))
    };
    Ok((run(BackendKind::Local)?, run(BackendKind::Nccl)?))
}

fn assert_bitwise(cpu: &[Tensor], gpu: &[Tensor], what: &str) -> Result<()> {
    assert_eq!(cpu.len(), gpu.len(), "{what}: number of outputs");
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        assert_eq!(c.dims(), g.dims(), "{what} #{i}: shape");
        assert_eq!(c.dtype(), g.dtype(), "{what} #{i}: dtype");
        let c = c.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(c, g, "{what} #{i}");
    }
    Ok(())
}

fn assert_close(cpu: &[Tensor], gpu: &[Tensor], tol: f64, what: &str) -> Result<()> {
    assert_eq!(cpu.len(), gpu.len(), "{what}: number of outputs");
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        let e = max_rel_err(c, g)?;
        assert!(
            e <= tol,
            "{what}: output #{i} differs from the CPU by {e:e}"
        );
    }
    Ok(())
}

#[test]
fn every_operation_matches_the_cpu_backend() -> Result<()> {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (cpu, gpu) = on_cpu_and_gpu(None, |ctx| {
            let c = ctx.comm();
            let x = seeded(&[3, 4, 6], 7, dtype)?.to_device(ctx.device())?;
            // A view with an offset and a transposed one: the backend makes them contiguous.
            let view = x.narrow(0, 1, 2)?;
            let t = x.transpose(1, 2)?;
            let mut out = Vec::new();
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
                out.push(c.all_reduce(&x, op)?);
                out.push(c.reduce_scatter(&x, 1, op)?);
            }
            for dim in 0..3 {
                out.push(c.all_gather(&x, dim)?);
                out.push(c.reduce_scatter(&x, dim, ReduceOp::Sum)?);
            }
            out.push(c.all_reduce(&view, ReduceOp::Sum)?);
            out.push(c.all_gather(&t, 2)?);
            out.push(c.all_to_all(&x, &[3], &[3])?);
            out.push(c.broadcast(&x, 0)?);
            // Differentiable forms.
            out.push(ops::reduce_from_group(&x, c)?);
            out.push(ops::gather_from_group(&x, 2, c)?);
            out.push(ops::scatter_to_group(&x, 2, c)?);
            out.push(ops::all_to_all(&x, &[3], &[3], c)?);
            // Group management.
            c.barrier()?;
            let sub = c.split(Some(0), 0)?.expect("member of color 0");
            assert_eq!((sub.rank(), sub.size()), (0, 1));
            out.push(sub.all_reduce(&x, ReduceOp::Max)?);
            assert!(c.split(None, 0)?.is_none());
            assert_eq!(c.exchange_split_sizes(&[5])?, vec![5]);
            assert_eq!(c.all_gather_bytes(b"abc")?, vec![b"abc".to_vec()]);
            // Empty tensors pass through.
            let empty = Tensor::zeros((0, 4), dtype, ctx.device())?;
            out.push(c.all_reduce(&empty, ReduceOp::Sum)?);
            out.push(c.all_to_all(&empty, &[0], &[0])?);
            Ok(out)
        })?;
        assert_bitwise(&cpu, &gpu, &format!("{dtype:?}"))?;
    }
    Ok(())
}

#[test]
fn gradients_of_differentiable_collectives_match_the_cpu() -> Result<()> {
    let (cpu, gpu) = on_cpu_and_gpu(None, |ctx| {
        let c = ctx.comm();
        let w = candle_core::Var::from_tensor(
            &seeded(&[4, 6], 3, DType::F32)?.to_device(ctx.device())?,
        )?;
        let y = ops::gather_from_group(&ops::copy_to_group(w.as_tensor(), c)?, 1, c)?;
        let y = ops::reduce_scatter_to_group(&y.sqr()?, 0, c)?;
        let grads = y.sum_all()?.backward()?;
        Ok(vec![y, grads.get(&w).expect("gradient of w").clone()])
    })?;
    assert_close(&cpu, &gpu, 1e-6, "collectives and their gradient")
}

#[test]
fn a_cpu_tensor_on_an_nccl_communicator_is_a_clear_error() -> Result<()> {
    let err = Launcher::new(1)
        .backend(BackendKind::Nccl)
        .run(|ctx| {
            let x = Tensor::ones(4, DType::F32, &Device::Cpu)?;
            ctx.comm().all_reduce(&x, ReduceOp::Sum).map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("nccl") && err.contains("CPU"), "{err}");
    Ok(())
}

/// Runs last in name order: the init thread of the missing world stays blocked in NCCL.
#[test]
fn world_that_never_fills_is_an_error_not_a_hang() -> Result<()> {
    let device = Device::new_cuda(0)?;
    let id = NcclId::new()?;
    assert_eq!(
        NcclId::from_bytes(&id.to_bytes())?.to_bytes(),
        id.to_bytes()
    );
    assert!(NcclId::from_bytes(&[0; 5]).is_err());
    let started = std::time::Instant::now();
    let err = NcclBackend::new(&device, 0, 2, &id, Duration::from_secs(3))
        .err()
        .expect("a world of 2 with one rank cannot form")
        .to_string();
    assert!(err.contains("joined within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// The abort path on a real non-blocking communicator: another thread aborts while this one
/// keeps enqueuing; the calls end in an `Aborted` error (no crash, no hang), and `check` (which
/// waits for the device first) reports it. A fresh communicator works afterwards.
#[test]
fn an_abort_from_another_thread_ends_calls_in_flight_cleanly() -> Result<()> {
    let device = Device::new_cuda(0)?;
    let backend = NcclBackend::new(&device, 0, 1, &NcclId::new()?, Duration::from_secs(30))?;
    let comm = candle_parallel::Comm::from_backend(backend.clone());
    let x = Tensor::ones(1 << 20, DType::F32, &device)?;
    // Enqueued work is waited for by check.
    for _ in 0..50 {
        comm.all_reduce(&x, ReduceOp::Sum)?;
    }
    backend.check()?;
    let started = std::time::Instant::now();
    let err = std::thread::scope(|s| {
        let aborter = comm.clone();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            aborter.abort("stop from another thread");
        });
        loop {
            if let Err(e) = comm.all_reduce(&x, ReduceOp::Sum) {
                break e.to_string();
            }
        }
    });
    assert!(err.contains("stop from another thread"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let checked = backend.check().unwrap_err().to_string();
    assert!(checked.contains("stop from another thread"), "{checked}");
    let again = NcclBackend::new(&device, 0, 1, &NcclId::new()?, Duration::from_secs(30))?;
    let y = candle_parallel::Comm::from_backend(again).all_reduce(&x, ReduceOp::Sum)?;
    assert_eq!(y.sum_all()?.to_scalar::<f32>()?, (1 << 20) as f32);
    Ok(())
}

/// A grouped send and receive to itself (the one point-to-point pair a world of one has), and
/// the checked mode's pairwise comparison of the two sides, on a real communicator.
#[test]
fn send_recv_to_self_and_checked_arguments_work_on_the_gpu() -> Result<()> {
    let device = Device::new_cuda(0)?;
    let backend = NcclBackend::new(&device, 0, 1, &NcclId::new()?, Duration::from_secs(30))?
        .with_checked_arguments(true);
    let comm = candle_parallel::Comm::from_backend(backend);
    let x = seeded(&[3, 4], 9, DType::F32)?.to_device(&device)?;
    let y = comm.send_recv(&x, 0, 0, (3, 4), DType::F32)?;
    assert_eq!(
        y.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?,
        x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?
    );
    let e = comm
        .send_recv(&x, 0, 0, (4, 3), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 0 sent F32[3, 4] but rank 0 expects F32[4, 3]"),
        "{e}"
    );
    Ok(())
}

#[test]
fn llama_logits_and_gradients_on_cuda_match_the_cpu() -> Result<()> {
    let cfg = LlamaConfig::tiny();
    let dir = std::env::temp_dir().join(format!("cp-nccl-llama-{}", std::process::id()));
    write_random_llama(&dir, &cfg, 3)?;
    let (cpu, gpu) = on_cpu_and_gpu(None, |ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, ctx.device())?.trainable();
        let model = Llama::new(&cfg, vb.clone(), ctx.comm())?;
        let ids = Tensor::new(&[[1u32, 17, 256, 3, 99, 200, 5]], ctx.device())?;
        let logits = model.forward(&ids, 0, None)?;
        let grads = logits.sqr()?.mean_all()?.backward()?;
        let mut out = vec![logits];
        out.extend(
            full_gradients(&vb.params(), &grads, ctx.comm())?
                .into_iter()
                .map(|(_, g)| g),
        );
        Ok(out)
    })?;
    assert_close(&cpu, &gpu, 1e-4, "llama")?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn mixtral_with_both_dispatchers_on_cuda_matches_the_cpu() -> Result<()> {
    let cfg = MixtralConfig::tiny();
    let dir = std::env::temp_dir().join(format!("cp-nccl-mixtral-{}", std::process::id()));
    write_random_mixtral(&dir, &cfg, 5)?;
    for dispatch in [Dispatch::AllToAll, Dispatch::AllReduce] {
        let (cpu, gpu) = on_cpu_and_gpu(Some(MeshShape::new().ep(1).tp(1)), |ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, ctx.device())?.trainable();
            let model = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), dispatch)?;
            let ids = Tensor::new(&[[1u32, 17, 56, 3, 99, 20, 5, 8]], ctx.device())?;
            let l = model.losses(&ids, true)?;
            let grads = l.loss.backward()?;
            let mut out = vec![l.ce_loss, l.aux_loss];
            out.extend(
                full_gradients(&vb.params(), &grads, mesh.tp())?
                    .into_iter()
                    .map(|(_, g)| g),
            );
            Ok(out)
        })?;
        assert_close(&cpu, &gpu, 1e-4, &format!("mixtral {dispatch:?}"))?;
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// A process started as rank 0 of a world of one: `Launcher::run` joins through the TCP
/// rendezvous and NCCL on CUDA device `LOCAL_RANK`.
#[test]
fn a_rank_process_runs_its_rank_on_nccl() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let out = std::process::Command::new(common::probe_path())
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .args(["--launcher", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("launcher ran rank 0; sum of ranks 0"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
