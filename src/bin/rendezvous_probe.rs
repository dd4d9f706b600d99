//! A rank process for the multi-process launcher tests: reads the torchrun variables, joins the
//! rendezvous, and writes what rank 0 handed out to `--out DIR/rank-R.txt`.
//!
//! `--fail-rank R` makes rank R exit with status 3 before the rendezvous; `--timeout-ms`
//! bounds the rendezvous. `--launcher N` instead runs `Launcher::new(N)` (which joins the job
//! through NCCL) and prints the rank it ran and an all-reduce of the ranks.
use candle_parallel::launch::process::{rendezvous, ProcessEnv};
use std::time::Duration;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(n) = arg("--launcher").and_then(|n| n.parse::<usize>().ok()) {
        let out = candle_parallel::Launcher::new(n).run(|ctx| {
            let r = candle_core::Tensor::new(&[ctx.rank() as f32], ctx.device())?;
            let sum = ctx.comm().all_reduce(&r, candle_parallel::ReduceOp::Sum)?;
            Ok((ctx.rank(), sum.to_vec1::<f32>()?[0]))
        })?;
        for (rank, sum) in out {
            println!("launcher ran rank {rank}; sum of ranks {sum}");
        }
        return Ok(());
    }
    let Some(env) = ProcessEnv::from_env()? else {
        candle_core::bail!("rendezvous_probe: RANK is not set (start it with a launcher)")
    };
    if arg("--fail-rank").and_then(|r| r.parse::<usize>().ok()) == Some(env.rank) {
        eprintln!("rank {} failing on purpose", env.rank);
        std::process::exit(3);
    }
    let timeout = Duration::from_millis(
        arg("--timeout-ms")
            .and_then(|t| t.parse().ok())
            .unwrap_or(5000),
    );
    let blob = format!("unique-id-from-rank-0-of-{}", env.world_size);
    let got = rendezvous(&env, (env.rank == 0).then_some(blob.as_bytes()), timeout)?;
    println!(
        "rank {} of {} got {}",
        env.rank,
        env.world_size,
        String::from_utf8_lossy(&got)
    );
    if let Some(dir) = arg("--out") {
        std::fs::write(
            std::path::Path::new(&dir).join(format!("rank-{}.txt", env.rank)),
            &got,
        )?;
    }
    Ok(())
}
