//! Ranks as processes on loopback: the rendezvous, the launcher, a rank that dies, a rank that
//! never starts, and bad environment variables.
mod common;

use candle_parallel::launch::process::{spawn_ranks, NodePlan};
use common::probe_path;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cp-proc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn plan(nproc: usize) -> NodePlan {
    NodePlan {
        nproc,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
    }
}

fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["--out".to_string(), out.display().to_string()];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn four_processes_meet_and_share_rank_zeros_blob() {
    let out = tmp("ok");
    spawn_ranks(&probe_path(), &args(&out, &[]), &plan(4)).unwrap();
    for r in 0..4 {
        let got = std::fs::read_to_string(out.join(format!("rank-{r}.txt"))).unwrap();
        assert_eq!(got, "unique-id-from-rank-0-of-4", "rank {r}");
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_rank_that_dies_stops_the_others_promptly() {
    let out = tmp("dies");
    let start = Instant::now();
    // The others would wait 60 s for the missing rank: only the launcher can end them sooner.
    let e = spawn_ranks(
        &probe_path(),
        &args(&out, &["--fail-rank", "2", "--timeout-ms", "60000"]),
        &plan(4),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rank 2 exited with exit status: 3") && e.contains("stopped"),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn what_a_rank_leaves_running_does_not_keep_the_launcher_waiting() {
    for (fail, what) in [
        (&["--fail-rank", "1"][..], "failed"),
        (&[][..], "succeeded"),
    ] {
        let out = tmp("orphans");
        let start = Instant::now();
        // Every rank starts a 30 s sleep that holds its output pipes.
        let mut extra = vec!["--leave-child", "30"];
        extra.extend_from_slice(fail);
        let result = spawn_ranks(&probe_path(), &args(&out, &extra), &plan(2));
        assert_eq!(result.is_err(), !fail.is_empty(), "{what}: {result:?}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            start.elapsed()
        );
        std::fs::remove_dir_all(out).unwrap();
    }
}

/// Starts ranks `ranks` of a world of `world` by hand (so that one can be left out).
fn start(
    ranks: &[usize],
    world: usize,
    port: u16,
    timeout_ms: u64,
) -> Vec<(usize, std::process::Output)> {
    let children: Vec<_> = ranks
        .iter()
        .map(|&r| {
            let child = Command::new(probe_path())
                .args(["--timeout-ms", &timeout_ms.to_string()])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .output_async();
            (r, child)
        })
        .collect();
    children
        .into_iter()
        .map(|(r, c)| (r, c.wait_with_output().unwrap()))
        .collect()
}

trait OutputAsync {
    fn output_async(&mut self) -> std::process::Child;
}

impl OutputAsync for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_rank_that_never_starts_is_named_by_the_timeout() {
    let start_at = Instant::now();
    let outs = start(&[0, 1], 3, free_port(), 1500);
    assert!(
        start_at.elapsed() < Duration::from_secs(8),
        "took {:?}",
        start_at.elapsed()
    );
    for (r, o) in outs {
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "rank {r} should fail");
        if r == 0 {
            assert!(
                err.contains("rank(s) [2] did not show up within 1.5s"),
                "rank 0: {err}"
            );
        } else {
            assert!(err.contains("got no answer from rank 0"), "rank {r}: {err}");
        }
    }
}

#[test]
fn bad_environment_variables_are_clear_errors() {
    let run = |vars: &[(&str, &str)]| {
        let mut c = Command::new(probe_path());
        for v in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ] {
            c.env_remove(v);
        }
        for (k, v) in vars {
            c.env(k, v);
        }
        String::from_utf8_lossy(&c.output().unwrap().stderr).to_string()
    };
    let e = run(&[("RANK", "5"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1234")]);
    assert!(e.contains("RANK=5 is not a rank of WORLD_SIZE=2"), "{e}");
    let e = run(&[("RANK", "0"), ("MASTER_PORT", "1234")]);
    assert!(e.contains("RANK is set but WORLD_SIZE is not"), "{e}");
    let e = run(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")]);
    assert!(e.contains("MASTER_PORT=99999 is not a port"), "{e}");
    let e = run(&[]);
    assert!(e.contains("RANK is not set"), "{e}");
}

/// `Launcher::run` in a process started as a rank: the world size must match, and without the
/// `nccl` feature the process says that it needs it (with it, tests/nccl.rs runs the job).
#[test]
fn a_launcher_inside_a_rank_process_checks_the_world_and_the_backend() {
    let run = |world: &str, n: &str| {
        let out = Command::new(probe_path())
            .env("RANK", "0")
            .env("WORLD_SIZE", world)
            .env("LOCAL_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", free_port().to_string())
            .args(["--launcher", n])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run("2", "3");
    assert!(
        e.contains("rank 0 of WORLD_SIZE=2 but the job needs 3 ranks"),
        "{e}"
    );
    if !cfg!(feature = "nccl") {
        let e = run("1", "1");
        assert!(
            e.contains("need the NCCL backend: build with --features nccl"),
            "{e}"
        );
    }
}
