//! The dialled link of the local backend (`CANDLE_PARALLEL_LINK`, `Launcher::link`): every
//! collective and message takes at least the time the link needs for the bytes a rank sends,
//! and computes the same values.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_parallel::comm::local::LinkModel;
use candle_parallel::{Launcher, ReduceOp};
use std::time::{Duration, Instant};

#[test]
fn a_dialled_link_paces_collectives_and_messages_and_changes_no_value() -> Result<()> {
    let link: LinkModel = "gbps=1,latency_us=2000".parse()?;
    let n = 1 << 20; // 4 MiB of f32
    let run = |link: Option<LinkModel>| {
        let mut l = Launcher::new(2);
        if let Some(link) = link {
            l = l.link(link);
        }
        l.run(|ctx| {
            let x = (Tensor::ones(n, DType::F32, &Device::Cpu)? * (ctx.rank() + 1) as f64)?;
            let t = Instant::now();
            let sum = ctx.comm().all_reduce(&x, ReduceOp::Sum)?;
            let reduce = t.elapsed();
            let t = Instant::now();
            let peer = 1 - ctx.rank();
            let got = ctx
                .comm()
                .exchange(&[(&x, peer)], &[(peer, &Shape::from(n), DType::F32)])?;
            let exchange = t.elapsed();
            Ok((
                sum.max(0)?.to_scalar::<f32>()?,
                got[0].max(0)?.to_scalar::<f32>()?,
                reduce,
                exchange,
            ))
        })
    };
    let paced = run(Some(link))?;
    let free = run(None)?;
    for (rank, ((s, g, reduce, exchange), (s0, g0, ..))) in paced.iter().zip(&free).enumerate() {
        assert_eq!((s, g), (s0, g0), "rank {rank}: the link changed a value");
        assert_eq!(*s, 3.0);
        // A 2-rank all-reduce sends half its 4 MiB twice: 4 MiB over 1 Gb/s, plus the latency.
        let due = link.time(4 * n);
        assert!(
            *reduce >= due,
            "rank {rank}: all-reduce took {reduce:?}, the link needs {due:?}"
        );
        let due = link.time(4 * n);
        assert!(
            *exchange >= due,
            "rank {rank}: exchange took {exchange:?}, the link needs {due:?}"
        );
    }
    Ok(())
}

#[test]
fn a_malformed_link_is_refused_naming_what_to_write() {
    for bad in ["gbps=0", "gbps=-1", "latency_us=5", "gbps=ten", "mbps=100"] {
        let e = bad.parse::<LinkModel>().unwrap_err().to_string();
        assert!(e.contains(bad) && e.contains("gbps"), "{bad}: {e}");
    }
    let l: LinkModel = "gbps=25".parse().unwrap();
    assert_eq!(l.latency, Duration::ZERO);
}
