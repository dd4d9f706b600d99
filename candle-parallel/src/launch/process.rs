//! Ranks as processes, possibly on several machines (the torchrun convention).
//!
//! - [`ProcessEnv::from_env`] reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`.
//! - [`rendezvous`]: rank 0 listens at `MASTER_ADDR:MASTER_PORT` and hands every other rank a
//!   byte string (the NCCL unique id) once all have checked in: a rank that does not show up
//!   within the timeout is an error that names it, on every rank that is there; connections
//!   that are not ranks of the job are dropped, and `CANDLE_PARALLEL_RENDEZVOUS_SECRET` keeps
//!   the id to the processes that know it (what it trusts: [`super::rendezvous`]).
//! - [`spawn_ranks`]: starts the local ranks of one node as child processes with those
//!   variables set, prefixes their output with the rank, and stops all of them as soon as one
//!   fails.
//!
//! Multi-node: run one launcher per node with the same `--master-addr`/`--master-port`, the
//! node's `--node-rank` and `--nnodes`.

pub use super::rendezvous::{rendezvous, rendezvous_with_secret, MAX_BLOB, SECRET_VAR};
use candle_core::{bail, Result};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// This process's place in a multi-process job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl ProcessEnv {
    /// The job description from the environment; `None` when `RANK` is not set (not started
    /// by a launcher). A partial or malformed set of variables is an error naming the variable.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(rank) = var("RANK") else {
            return Ok(None);
        };
        let num = |name: &str, v: Option<String>| -> Result<usize> {
            match v {
                None => bail!("RANK is set but {name} is not: a launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| candle_core::Error::msg(format!("{name}={v} is not a non-negative integer"))),
            }
        };
        let rank = num("RANK", Some(rank))?;
        let world_size = num("WORLD_SIZE", var("WORLD_SIZE"))?;
        let local_rank = num("LOCAL_RANK", var("LOCAL_RANK").or(Some(rank.to_string())))?;
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = num("MASTER_PORT", var("MASTER_PORT"))?;
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} is not a rank of WORLD_SIZE={world_size}")
        }
        let master_port = u16::try_from(master_port).map_err(|_| {
            candle_core::Error::msg(format!("MASTER_PORT={master_port} is not a port"))
        })?;
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    pub(crate) fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// False when this process is a rank other than 0 of a multi-process job: the process that
/// writes a job's files and reports (every process computes; one speaks).
pub fn is_lead() -> Result<bool> {
    Ok(ProcessEnv::from_env()?.is_none_or(|e| e.rank == 0))
}

/// How to start the ranks of one node.
#[derive(Clone, Debug)]
pub struct NodePlan {
    /// Processes on this node.
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// 0: pick a free port (single node only).
    pub master_port: u16,
}

/// Starts `program args...` once per local rank with the rank variables set, forwards each
/// line of their output prefixed with `[rank R]`, and waits. As soon as one rank fails, the
/// others are killed and the error names the rank and its exit status.
pub fn spawn_ranks(program: &std::path::Path, args: &[String], plan: &NodePlan) -> Result<()> {
    if plan.nproc == 0 || plan.nnodes == 0 || plan.node_rank >= plan.nnodes {
        bail!("launch: need nproc ≥ 1 and node_rank < nnodes (got {plan:?})")
    }
    let port = if plan.master_port == 0 {
        if plan.nnodes > 1 {
            bail!("launch: with several nodes, give every launcher the same --master-port")
        }
        TcpListener::bind((plan.master_addr.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| {
                candle_core::Error::msg(format!(
                    "launch: no free port on {}: {e}",
                    plan.master_addr
                ))
            })?
    } else {
        plan.master_port
    };
    let world = plan.nproc * plan.nnodes;
    // Each process's share of the node's cores for Candle's pools (unless the environment
    // says): by default every process would make pools as large as the machine.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = (cores / plan.nproc).max(1).to_string();
    // The user's settings, not what a local job of this process may have set since.
    let user = *super::user_thread_settings();
    let mut children: Vec<(usize, Child)> = Vec::new();
    // Output forwarders report when their pipe closes; a pipe held open by a process a rank
    // left behind must not keep the launcher waiting.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut forwarders = 0usize;
    for local in 0..plan.nproc {
        let rank = plan.node_rank * plan.nproc + local;
        let mut command = Command::new(program);
        // Each rank leads a process group of its own, so that stopping it also stops the
        // processes it started.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let spawned = command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env(
                "CANDLE_NUM_THREADS",
                user.0.map_or(share.clone(), |n| n.to_string()),
            )
            .env(
                "RAYON_NUM_THREADS",
                user.1.map_or(share.clone(), |n| n.to_string()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for (_, c) in children.iter_mut() {
                    stop_group(c);
                    let _ = c.wait();
                }
                bail!(
                    "launch: cannot start rank {rank} ({}): {e}",
                    program.display()
                )
            }
        };
        for (pipe, to_err) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                false,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                true,
            ),
        ] {
            if let Some(p) = pipe {
                let done = done_tx.clone();
                forwarders += 1;
                std::thread::spawn(move || {
                    for line in BufReader::new(p).lines().map_while(|l| l.ok()) {
                        if to_err {
                            eprintln!("[rank {rank}] {line}");
                        } else {
                            println!("[rank {rank}] {line}");
                        }
                    }
                    let _ = done.send(());
                });
            }
        }
        children.push((rank, child));
    }
    let mut failure: Option<String> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, mut child) = children.remove(i);
                    // Whatever the rank started and left running goes with it.
                    stop_group(&mut child);
                    if !status.success() && failure.is_none() {
                        failure = Some(format!("rank {rank} exited with {status}"));
                        for (_, c) in children.iter_mut() {
                            stop_group(c);
                        }
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    failure.get_or_insert(format!("cannot wait for rank {}: {e}", children[i].0));
                    stop_group(&mut children[i].1);
                    i += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The ranks are gone: let their last output through, but only briefly (a process that left
    // its group may still hold a pipe).
    drop(done_tx);
    let drain = Instant::now() + Duration::from_secs(2);
    for _ in 0..forwarders {
        if done_rx
            .recv_timeout(drain.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    match failure {
        Some(f) => bail!("launch: {f}; the other ranks were stopped"),
        None => Ok(()),
    }
}

/// Stops `child` and every process of its process group (it leads one, see `spawn_ranks`).
fn stop_group(child: &mut Child) {
    #[cfg(unix)]
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals the process group `pid`; it touches no
        // memory of ours.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}
