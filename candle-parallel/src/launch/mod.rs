//! Starting N ranks.
//!
//! Ranks as processes (torchrun's environment variables, a TCP rendezvous, a launcher that
//! starts the ranks of a node) are in [`process`].
//!
//! [`launch`] runs a closure on N ranks as threads of this process (CPU devices, the local
//! backend): no flags, no environment, no network. It returns every rank's result in rank
//! order, or the first failure with the rank that raised it. A rank that returns an error or
//! panics fails the job: every other rank's pending and later collectives return an error
//! naming it, so the job ends promptly instead of hanging.
//!
//! ```
//! use candle_parallel::launch::Launcher;
//! use candle_parallel::mesh::{MeshDim, MeshShape};
//! use std::time::Duration;
//!
//! let coords = Launcher::new(4)
//!     .mesh(MeshShape::new().ep(2).tp(2))
//!     .timeout(Duration::from_secs(30))
//!     .run(|ctx| {
//!         let mesh = ctx.mesh()?;
//!         Ok((mesh.coord(MeshDim::Ep), mesh.coord(MeshDim::Tp)))
//!     })?;
//! assert_eq!(coords, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod process;

use crate::comm::local::{default_timeout, LocalFabric};
use crate::comm::Comm;
use crate::mesh::{DeviceMesh, MeshShape};
use candle_core::{bail, Device, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

/// What a rank's closure gets: who it is, its device and its communicators.
pub struct RankContext {
    rank: usize,
    world_size: usize,
    device: Device,
    comm: Comm,
    mesh: Option<DeviceMesh>,
}

impl RankContext {
    /// This rank's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The device this rank computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The world communicator.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// The device mesh, when the launcher was given one ([`Launcher::mesh`]).
    pub fn mesh(&self) -> Result<&DeviceMesh> {
        match &self.mesh {
            Some(m) => Ok(m),
            None => bail!("this job has no device mesh: build it with Launcher::mesh(shape)"),
        }
    }
}

/// Runs `f` on `world_size` ranks as threads, with the default settings of [`Launcher`].
pub fn launch<T, F>(world_size: usize, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(RankContext) -> Result<T> + Sync,
{
    Launcher::new(world_size).run(f)
}

/// Settings for starting ranks as threads.
#[derive(Clone, Debug)]
pub struct Launcher {
    world_size: usize,
    timeout: Duration,
    mesh: Option<MeshShape>,
    log_dir: Option<PathBuf>,
}

impl Launcher {
    /// `world_size` ranks, the default timeout (`CANDLE_PARALLEL_TIMEOUT_SECS` or 600 s), no
    /// mesh and no log files.
    pub fn new(world_size: usize) -> Self {
        Self {
            world_size,
            timeout: default_timeout(),
            mesh: None,
            log_dir: None,
        }
    }

    /// How long a rank waits for its peers in a collective before the job fails.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds this device mesh on every rank before the closure runs ([`RankContext::mesh`]).
    pub fn mesh(mut self, shape: MeshShape) -> Self {
        self.mesh = Some(shape);
        self
    }

    /// Writes each rank's log events to `dir/rank-R[_DIM-C...].log` (named by the rank and
    /// its mesh coordinates). Events reach files once [`crate::logging::init`] was called.
    pub fn log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.log_dir = Some(dir.into());
        self
    }

    /// Runs `f` on every rank and returns their results in rank order, or the first failure:
    /// `rank R failed: ...`.
    pub fn run<T, F>(&self, f: F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        if self.world_size == 0 {
            bail!("cannot launch 0 ranks: the world size must be at least 1")
        }
        if let Some(shape) = &self.mesh {
            shape.check(self.world_size)?;
        }
        let fabric = LocalFabric::new(self.world_size, self.timeout);
        let comms = fabric.world_comms();
        let results: Vec<Option<T>> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    let (f, fabric) = (&f, &fabric);
                    let spawned = std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(scope, move || {
                            let out =
                                catch_unwind(AssertUnwindSafe(|| self.run_rank(rank, comm, f)));
                            match out {
                                Ok(Ok(v)) => Some(v),
                                Ok(Err(e)) => {
                                    fabric.fail(rank, message_of(&e));
                                    None
                                }
                                Err(panic) => {
                                    fabric.fail(
                                        rank,
                                        format!("panicked: {}", panic_message(&*panic)),
                                    );
                                    None
                                }
                            }
                        });
                    if let Err(e) = &spawned {
                        fabric.fail(rank, format!("could not start its thread: {e}"));
                    }
                    spawned
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.ok().and_then(|h| h.join().ok().flatten()))
                .collect()
        });
        if let Some(failure) = fabric.failure() {
            bail!("rank {} failed: {}", failure.rank, failure.message)
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("no failure recorded"))
            .collect())
    }

    fn run_rank<T, F>(&self, rank: usize, comm: Comm, f: &F) -> Result<T>
    where
        F: Fn(RankContext) -> Result<T>,
    {
        let span = tracing::info_span!(
            "rank",
            rank,
            dp = tracing::field::Empty,
            pp = tracing::field::Empty,
            ep = tracing::field::Empty,
            tp = tracing::field::Empty
        );
        let _entered = span.enter();
        let mesh = match &self.mesh {
            Some(shape) => {
                let mesh = DeviceMesh::new(&comm, *shape)?;
                for d in shape.named_dims() {
                    span.record(d.name(), mesh.coord(d));
                }
                Some(mesh)
            }
            None => None,
        };
        let _log = match &self.log_dir {
            Some(dir) => {
                let name = mesh
                    .as_ref()
                    .map_or_else(|| format!("rank-{rank}"), DeviceMesh::rank_name);
                let guard = crate::logging::log_to_file(dir, &name).map_err(|e| {
                    candle_core::Error::msg(format!(
                        "rank {rank}: cannot create its log file in {}: {e}",
                        dir.display()
                    ))
                })?;
                Some(guard)
            }
            None => None,
        };
        match &self.mesh {
            Some(shape) => {
                tracing::debug!(world_size = self.world_size, mesh = %shape, "rank started")
            }
            None => tracing::debug!(world_size = self.world_size, "rank started"),
        }
        f(RankContext {
            rank,
            world_size: self.world_size,
            device: Device::Cpu,
            comm,
            mesh,
        })
    }
}

/// The error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set:
/// the failure is reported once, to every rank, and should read as one line.
fn message_of(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => message_of(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", message_of(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), message_of(inner))
        }
        e => e.to_string(),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}
