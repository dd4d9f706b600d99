//! Every collective of the local backend against a serial reference computed from all ranks'
//! inputs, for world sizes 1..=4, several dtypes and several dims.
mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_parallel::ReduceOp;
use candle_parallel_models::testing::seeded;
use common::{launch, Launcher};

const DTYPES: [DType; 6] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::U32,
    DType::I64,
];

/// Rank `r`'s input: seeded values, scaled to small integers for integer dtypes.
fn input(dims: &[usize], rank: usize, salt: u64, dtype: DType) -> Result<Tensor> {
    let x = seeded(dims, rank as u64 * 1000 + salt, DType::F32)?;
    match dtype {
        DType::U32 => ((x + 1.0)? * 50.0)?.round()?.to_dtype(dtype),
        DType::I64 => (x * 50.0)?.round()?.to_dtype(dtype),
        _ => x.to_dtype(dtype),
    }
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let g = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(g, w, "{what}");
    Ok(())
}

/// The reduction of all ranks' inputs in rank order, accumulated as the backend does (16-bit
/// floats in f32, rounded once), so results must match bit for bit.
fn reference_reduce(inputs: &[Tensor], op: ReduceOp) -> Result<Tensor> {
    let dtype = inputs[0].dtype();
    let acc_dtype = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let mut acc = inputs[0].to_dtype(acc_dtype)?;
    for x in &inputs[1..] {
        let x = x.to_dtype(acc_dtype)?;
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => (acc + x)?,
            ReduceOp::Max => acc.maximum(&x)?,
            ReduceOp::Min => acc.minimum(&x)?,
        };
    }
    if op == ReduceOp::Avg {
        let n = Tensor::full(inputs.len() as f64, acc.dims(), &Device::Cpu)?.to_dtype(acc_dtype)?;
        acc = acc.div(&n)?;
    }
    acc.to_dtype(dtype)
}

#[test]
fn all_reduce_matches_serial_reduction() -> Result<()> {
    let dims = [3, 5, 7];
    for n in 1..=4 {
        for dtype in DTYPES {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
                let inputs: Vec<Tensor> = (0..n)
                    .map(|r| input(&dims, r, 1, dtype))
                    .collect::<Result<_>>()?;
                let want = reference_reduce(&inputs, op)?;
                let outs = launch(n, |ctx| ctx.comm().all_reduce(&inputs[ctx.rank()], op))?;
                for (r, out) in outs.iter().enumerate() {
                    assert_same(
                        out,
                        &want,
                        &format!("all_reduce {op} n={n} {dtype:?} rank {r}"),
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn all_reduce_of_a_large_tensor_splits_work_evenly() -> Result<()> {
    // Larger than one reduction block, length not divisible by the world size.
    let len = 3 * 2048 + 17;
    for n in [2, 3, 4] {
        let inputs: Vec<Tensor> = (0..n)
            .map(|r| input(&[len], r, 2, DType::F32))
            .collect::<Result<_>>()?;
        let want = reference_reduce(&inputs, ReduceOp::Sum)?;
        let outs = launch(n, |ctx| {
            ctx.comm().all_reduce(&inputs[ctx.rank()], ReduceOp::Sum)
        })?;
        for out in &outs {
            assert_same(out, &want, &format!("large all_reduce n={n}"))?;
        }
    }
    Ok(())
}

#[test]
fn all_gather_matches_concatenation_along_each_dim() -> Result<()> {
    let dims = [2, 3, 4];
    for n in 1..=4 {
        for dtype in DTYPES {
            let inputs: Vec<Tensor> = (0..n)
                .map(|r| input(&dims, r, 3, dtype))
                .collect::<Result<_>>()?;
            for dim in 0..3 {
                let want = Tensor::cat(&inputs, dim)?;
                let outs = launch(n, |ctx| ctx.comm().all_gather(&inputs[ctx.rank()], dim))?;
                for (r, out) in outs.iter().enumerate() {
                    assert_same(
                        out,
                        &want,
                        &format!("all_gather dim {dim} n={n} {dtype:?} rank {r}"),
                    )?;
                }
            }
        }
        // Negative dims resolve as in candle.
        let inputs: Vec<Tensor> = (0..n)
            .map(|r| input(&dims, r, 4, DType::F32))
            .collect::<Result<_>>()?;
        let outs = launch(n, |ctx| {
            ctx.comm().all_gather(&inputs[ctx.rank()], D::Minus1)
        })?;
        assert_same(&outs[0], &Tensor::cat(&inputs, 2)?, "all_gather D::Minus1")?;
    }
    Ok(())
}

#[test]
fn reduce_scatter_matches_reduced_chunks() -> Result<()> {
    for n in 1..=4 {
        let dims = [2 * n, 3, n];
        for dtype in DTYPES {
            let inputs: Vec<Tensor> = (0..n)
                .map(|r| input(&dims, r, 5, dtype))
                .collect::<Result<_>>()?;
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                let full = reference_reduce(&inputs, op)?;
                for dim in [0, 2] {
                    let chunk = dims[dim] / n;
                    let outs = launch(n, |ctx| {
                        ctx.comm().reduce_scatter(&inputs[ctx.rank()], dim, op)
                    })?;
                    for (r, out) in outs.iter().enumerate() {
                        let want = full.narrow(dim, r * chunk, chunk)?;
                        assert_same(
                            out,
                            &want,
                            &format!("reduce_scatter {op} dim {dim} n={n} {dtype:?} rank {r}"),
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Rows rank `i` sends to rank `j` in the ragged tests (zero for some pairs).
fn split(i: usize, j: usize) -> usize {
    (i + 2 * j) % 3
}

#[test]
fn ragged_all_to_all_matches_row_routing() -> Result<()> {
    for n in 1..=4 {
        for dtype in DTYPES {
            let inputs: Vec<Tensor> = (0..n)
                .map(|i| input(&[(0..n).map(|j| split(i, j)).sum(), 2, 3], i, 6, dtype))
                .collect::<Result<_>>()?;
            let outs = launch(n, |ctx| {
                let i = ctx.rank();
                let send: Vec<usize> = (0..n).map(|j| split(i, j)).collect();
                let recv = ctx.comm().exchange_split_sizes(&send)?;
                assert_eq!(recv, (0..n).map(|j| split(j, i)).collect::<Vec<_>>());
                ctx.comm().all_to_all(&inputs[i], &send, &recv)
            })?;
            for (r, out) in outs.iter().enumerate() {
                let mut parts = Vec::new();
                for (j, x) in inputs.iter().enumerate() {
                    let offset: usize = (0..r).map(|k| split(j, k)).sum();
                    parts.push(x.narrow(0, offset, split(j, r))?);
                }
                let want = Tensor::cat(&parts, 0)?;
                assert_same(out, &want, &format!("all_to_all n={n} {dtype:?} rank {r}"))?;
            }
        }
    }
    Ok(())
}

#[test]
fn broadcast_copies_the_root_tensor() -> Result<()> {
    for n in 1..=4 {
        for dtype in DTYPES {
            for root in 0..n {
                let inputs: Vec<Tensor> = (0..n)
                    .map(|r| input(&[4, 3], r, 7, dtype))
                    .collect::<Result<_>>()?;
                let outs = launch(n, |ctx| ctx.comm().broadcast(&inputs[ctx.rank()], root))?;
                for out in &outs {
                    assert_same(
                        out,
                        &inputs[root],
                        &format!("broadcast root {root} n={n} {dtype:?}"),
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn send_recv_around_a_ring_and_to_self() -> Result<()> {
    for n in 1..=4 {
        for dtype in [DType::F32, DType::BF16, DType::I64] {
            let inputs: Vec<Tensor> = (0..n)
                .map(|r| input(&[2, 5], r, 8, dtype))
                .collect::<Result<_>>()?;
            let outs = launch(n, |ctx| {
                let (r, c) = (ctx.rank(), ctx.comm());
                let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
                // Every rank sends and receives at once: grouped, so the ring cannot deadlock
                // (with n = 1 a rank sends to itself).
                let a = c.send_recv(&inputs[r], next, prev, (2, 5), dtype)?;
                let twice = (inputs[r].to_dtype(DType::F32)? * 2.0)?.to_dtype(dtype)?;
                let b = c.send_recv(&twice, next, prev, (2, 5), dtype)?;
                Ok((a, b))
            })?;
            for (r, (a, b)) in outs.iter().enumerate() {
                let src = &inputs[(r + n - 1) % n];
                assert_same(a, src, &format!("ring n={n} {dtype:?} rank {r}"))?;
                let twice = (src.to_dtype(DType::F32)? * 2.0)?.to_dtype(dtype)?;
                assert_same(
                    b,
                    &twice,
                    &format!("ring second message n={n} {dtype:?} rank {r}"),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn send_then_recv_in_matching_order_delivers_messages_in_order() -> Result<()> {
    let outs = launch(2, |ctx| {
        let c = ctx.comm();
        let x = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        if ctx.rank() == 0 {
            // Two messages in flight on the same pair arrive in order.
            c.send(&x, 1)?;
            c.send(&(&x * 10.0)?, 1)?;
            Ok(c.recv(1, 3, DType::F32)?.to_vec1::<f32>()?)
        } else {
            let a = c.recv(0, 3, DType::F32)?;
            let b = c.recv(0, 3, DType::F32)?;
            c.send(&(a + b)?, 0)?;
            Ok(Vec::new())
        }
    })?;
    assert_eq!(outs[0], vec![11.0, 22.0, 33.0]);
    Ok(())
}

#[test]
fn a_ring_where_every_rank_sends_first_deadlocks_on_every_backend() {
    // Sends are rendezvous-style, as NCCL's ungrouped ones: this code hangs on GPUs, so it
    // must fail here too (the timeout reports it) rather than pass thanks to buffering.
    let err = Launcher::new(3)
        .timeout(std::time::Duration::from_secs(2))
        .run(|ctx| {
            let (r, n, c) = (ctx.rank(), ctx.world_size(), ctx.comm());
            c.send(&Tensor::new(&[r as f32], &Device::Cpu)?, (r + 1) % n)?;
            c.recv((r + n - 1) % n, 1, DType::F32)
        })
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("timed out"), "{err}");
}

#[test]
fn outputs_never_alias_inputs() -> Result<()> {
    // A result turned into a Var and updated in place must not change another rank's data.
    let outs = launch(2, |ctx| {
        let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let y = ctx.comm().all_reduce(&x, ReduceOp::Sum)?;
        ctx.comm().barrier()?;
        if ctx.rank() == 0 {
            let v = candle_core::Var::from_tensor(&y)?;
            v.set(&Tensor::new(&[9f32, 9.0], &Device::Cpu)?)?;
        }
        ctx.comm().barrier()?;
        Ok((x.to_vec1::<f32>()?, y.to_vec1::<f32>()?))
    })?;
    assert_eq!(outs[1], (vec![1.0, 2.0], vec![2.0, 4.0]));
    Ok(())
}

#[test]
fn non_contiguous_inputs_are_handled() -> Result<()> {
    let inputs: Vec<Tensor> = (0..3)
        .map(|r| input(&[4, 6], r, 9, DType::F32))
        .collect::<Result<_>>()?;
    let outs = launch(3, |ctx| {
        let x = inputs[ctx.rank()].t()?; // strided view
        assert!(!x.is_contiguous());
        ctx.comm().all_gather(&x, 0)
    })?;
    let t: Vec<Tensor> = inputs.iter().map(|x| x.t()).collect::<Result<_>>()?;
    assert_same(
        &outs[2],
        &Tensor::cat(&t, 0)?,
        "all_gather of transposed inputs",
    )?;
    Ok(())
}

#[test]
fn split_forms_groups_by_color_ordered_by_key() -> Result<()> {
    let outs = launch(5, |ctx| {
        let r = ctx.rank();
        // Even ranks form one group in reverse order; rank 4 opts out with None.
        let color = if r == 4 { None } else { Some(r % 2) };
        let sub = ctx.comm().split(color, 10 - r)?;
        match sub {
            None => Ok(None),
            Some(sub) => {
                let x = Tensor::new(&[r as f32], &Device::Cpu)?;
                let gathered = sub.all_gather(&x, 0)?.to_vec1::<f32>()?;
                Ok(Some((sub.rank(), sub.ranks().to_vec(), gathered)))
            }
        }
    })?;
    assert_eq!(outs[0], Some((1, vec![2, 0], vec![2.0, 0.0])));
    assert_eq!(outs[2], Some((0, vec![2, 0], vec![2.0, 0.0])));
    assert_eq!(outs[1], Some((1, vec![3, 1], vec![3.0, 1.0])));
    assert_eq!(outs[4], None);
    Ok(())
}

#[test]
fn barrier_waits_for_every_rank() -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let arrived = AtomicUsize::new(0);
    let seen = Launcher::new(4).run(|ctx| {
        std::thread::sleep(std::time::Duration::from_millis(20 * ctx.rank() as u64));
        arrived.fetch_add(1, Ordering::SeqCst);
        ctx.comm().barrier()?;
        Ok(arrived.load(Ordering::SeqCst))
    })?;
    assert_eq!(seen, vec![4; 4]);
    Ok(())
}
