//! Ranks as processes, possibly on several machines (the torchrun convention).
//!
//! - [`ProcessEnv::from_env`] reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`.
//! - [`rendezvous`]: rank 0 listens at `MASTER_ADDR:MASTER_PORT` and hands every other rank a
//!   byte string (the NCCL unique id) once all have checked in: a rank that does not show up
//!   within the timeout is an error that names it, on every rank that is there.
//! - [`spawn_ranks`]: starts the local ranks of one node as child processes with those
//!   variables set, prefixes their output with the rank, and stops all of them as soon as one
//!   fails.
//!
//! Multi-node: run one launcher per node with the same `--master-addr`/`--master-port`, the
//! node's `--node-rank` and `--nnodes`.

use candle_core::{bail, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
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

    fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// False when this process is a rank other than 0 of a multi-process job: the process that
/// writes a job's files and reports (every process computes; one speaks).
pub fn is_lead() -> Result<bool> {
    Ok(ProcessEnv::from_env()?.is_none_or(|e| e.rank == 0))
}

const MAGIC: &[u8; 8] = b"cp-rdzv1";

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Every rank gets rank 0's `blob` once all `world_size` ranks have checked in (a barrier).
/// Rank 0 passes `Some(blob)`, the others `None`. Fails, naming the ranks, when some do not
/// arrive within `timeout`, when two processes claim the same rank, or when ranks disagree on
/// the world size.
pub fn rendezvous(env: &ProcessEnv, blob: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let io = |what: &str, e: std::io::Error| {
        candle_core::Error::msg(format!("rendezvous at {}: {what}: {e}", env.address()))
    };
    if env.rank == 0 {
        let Some(blob) = blob else {
            bail!("rendezvous: rank 0 must provide the blob")
        };
        let listener = TcpListener::bind(env.address()).map_err(|e| io("cannot listen", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("listener", e))?;
        let mut peers: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
        while peers.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| io("peer", e))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| io("peer", e))?;
                    let mut magic = [0u8; 8];
                    if s.read_exact(&mut magic).is_err() || &magic != MAGIC {
                        continue; // not one of ours
                    }
                    let (r, w) = (
                        read_u64(&mut s).map_err(|e| io("peer", e))? as usize,
                        read_u64(&mut s).map_err(|e| io("peer", e))? as usize,
                    );
                    if w != env.world_size {
                        bail!(
                            "rendezvous: rank {r} has WORLD_SIZE={w} but rank 0 has {}",
                            env.world_size
                        )
                    }
                    if r == 0 || r >= env.world_size || peers[r].is_some() {
                        bail!("rendezvous: a second process claims rank {r} (of {w}): check RANK of every process")
                    }
                    peers[r] = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (1..env.world_size)
                            .filter(|r| peers[*r].is_none())
                            .collect();
                        bail!(
                            "rendezvous at {}: rank(s) {missing:?} did not show up within {:.1}s",
                            env.address(),
                            timeout.as_secs_f64()
                        )
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io("accept", e)),
            }
        }
        for s in peers.iter_mut().flatten() {
            s.write_all(&(blob.len() as u64).to_le_bytes())
                .and_then(|_| s.write_all(blob))
                .map_err(|e| io("send", e))?;
        }
        Ok(blob.to_vec())
    } else {
        // Rank 0 may not be listening yet: retry until the deadline.
        let mut s = loop {
            let addrs: Vec<_> = env
                .address()
                .to_socket_addrs()
                .map_err(|e| io("bad MASTER_ADDR", e))?
                .collect();
            if let Some(s) = addrs
                .iter()
                .find_map(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).ok())
            {
                break s;
            }
            if Instant::now() >= deadline {
                bail!(
                    "rendezvous: rank {} could not reach rank 0 at {} within {:.1}s: is rank 0 running, and MASTER_ADDR/MASTER_PORT right?",
                    env.rank,
                    env.address(),
                    timeout.as_secs_f64()
                )
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        s.write_all(MAGIC)
            .and_then(|_| s.write_all(&(env.rank as u64).to_le_bytes()))
            .and_then(|_| s.write_all(&(env.world_size as u64).to_le_bytes()))
            .map_err(|e| io("send", e))?;
        s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .map_err(|e| io("socket", e))?;
        let len = read_u64(&mut s).map_err(|e| {
            candle_core::Error::msg(format!(
                "rendezvous: rank {} got no answer from rank 0 at {} ({e}): another rank did not show up, or rank 0 failed",
                env.rank,
                env.address()
            ))
        })? as usize;
        let mut blob = vec![0u8; len];
        s.read_exact(&mut blob).map_err(|e| io("receive", e))?;
        Ok(blob)
    }
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
