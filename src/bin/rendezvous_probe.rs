//! A rank process for the multi-process launcher tests: reads the torchrun variables, joins the
//! rendezvous, and writes what rank 0 handed out to `--out DIR/rank-R.txt`.
//!
//! `--fail-rank R` makes rank R exit with status 3 before the rendezvous; `--timeout-ms`
//! bounds the rendezvous.
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
