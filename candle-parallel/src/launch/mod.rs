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
//! With the `nccl` feature the same closure runs on GPUs: as threads, rank `r` on CUDA device
//! `r` ([`Launcher::backend`] or `CANDLE_PARALLEL_BACKEND=nccl`), or as processes started by a
//! launcher ([`process`]), where [`Launcher::run`] runs this process's one rank on device
//! `LOCAL_RANK`. Code that creates its tensors on [`RankContext::device`] runs unchanged.
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
pub mod rendezvous;

use crate::comm::local::{default_timeout, LocalFabric};
use crate::comm::{lock, Comm};
use crate::mesh::{DeviceMesh, MeshShape};
use candle_core::{bail, Device, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
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

/// What the environment said of Candle's thread counts (`CANDLE_NUM_THREADS`,
/// `RAYON_NUM_THREADS`) before [`share_cores_between_ranks`] first changed it: the user's
/// choice, which wins.
pub(crate) fn user_thread_settings() -> &'static (Option<usize>, Option<usize>) {
    static USER: std::sync::OnceLock<(Option<usize>, Option<usize>)> = std::sync::OnceLock::new();
    USER.get_or_init(|| {
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        (var("CANDLE_NUM_THREADS"), var("RAYON_NUM_THREADS"))
    })
}

/// How many threads Candle's CPU work should take for each of `ranks` ranks sharing this
/// machine's logical cores: `(elementwise, matmul)`, as the user set them
/// (`CANDLE_NUM_THREADS`, `RAYON_NUM_THREADS`), else one for elementwise work (Candle runs a
/// large elementwise operation on one pool per process, one operation at a time, its threads
/// spinning while they wait: ranks would queue for it and spin on the cores they share) and,
/// where the ranks are at least as many as the cores, one for each matmul too (each rank then
/// keeps a core busy by itself; fewer ranks split the cores between their matmuls).
///
/// ```
/// let (elementwise, matmul) = candle_parallel::launch::threads_per_rank(64);
/// assert!(elementwise >= 1 && matmul >= 1);
/// ```
pub fn threads_per_rank(ranks: usize) -> (usize, usize) {
    let (elementwise, matmul) = *user_thread_settings();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (
        elementwise.unwrap_or(1),
        matmul.unwrap_or(if ranks >= cores { 1 } else { cores }),
    )
}

/// Sets Candle's CPU threads for `ranks` ranks as threads of this process
/// ([`threads_per_rank`]); measured on 2 cores, a 4-rank training step of a small
/// Mixtral-style model 1.55–1.7× faster than with Candle's defaults. Called by [`Launcher::run`] for ranks as threads (the
/// process launcher gives each process its share in its environment).
///
/// Candle reads `RAYON_NUM_THREADS` at each matmul (so each job gets its own setting; a
/// single-rank job gets the user's back), `CANDLE_NUM_THREADS` once, when it makes its
/// elementwise pool (so the first job's setting stays: one thread, which multi-rank jobs want
/// and a single-rank job after one does without). Rayon's global pool, where candle-nn's
/// softmax and norms and this crate's fused kernels run, keeps one thread per core (it is made
/// here first, if nothing made it yet). The environment is changed from the launching thread;
/// C code reading it on another thread at that moment (not Rust's own reads) could race.
pub fn share_cores_between_ranks(ranks: usize) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = lock(&LOCK);
    let user = *user_thread_settings();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Before RAYON_NUM_THREADS can say 1: the global pool as large as the machine (an error
    // means it exists already).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(user.1.unwrap_or(cores))
        .build_global();
    let restore = |k: &str, v: Option<usize>| match v {
        Some(n) => std::env::set_var(k, n.to_string()),
        None => std::env::remove_var(k),
    };
    if ranks < 2 {
        restore("RAYON_NUM_THREADS", user.1);
        return;
    }
    let (elementwise, matmul) = threads_per_rank(ranks);
    std::env::set_var("CANDLE_NUM_THREADS", elementwise.to_string());
    std::env::set_var("RAYON_NUM_THREADS", matmul.to_string());
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
    backend: Option<BackendKind>,
    /// The link the local backend emulates (`None`: `CANDLE_PARALLEL_LINK`, or none).
    link: Option<crate::comm::local::LinkModel>,
}

/// The communication backend of a job's ranks ([`Launcher::backend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// CPU tensors, ranks exchange data through shared memory (the default).
    Local,
    /// CUDA tensors, rank `r` on CUDA device `r`, NCCL (needs the `nccl` feature).
    Nccl,
}

impl BackendKind {
    /// `CANDLE_PARALLEL_BACKEND` (`local` or `nccl`); `Local` when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("CANDLE_PARALLEL_BACKEND") {
            Err(_) => Ok(Self::Local),
            Ok(v) => v.parse(),
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "" | "local" => Ok(Self::Local),
            "nccl" => Ok(Self::Nccl),
            other => {
                bail!("unknown backend {other:?}: use local (CPU threads) or nccl (CUDA devices)")
            }
        }
    }
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
            backend: None,
            link: None,
        }
    }

    /// The local backend paces every collective and message to `link`, as if the ranks were
    /// devices that far apart ([`crate::comm::local::LinkModel`]; default: the
    /// `CANDLE_PARALLEL_LINK` environment variable, or no pacing).
    pub fn link(mut self, link: crate::comm::local::LinkModel) -> Self {
        self.link = Some(link);
        self
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

    /// Which backend the ranks use; the default is `CANDLE_PARALLEL_BACKEND` (`local` or
    /// `nccl`), else [`BackendKind::Local`]. Ranks started as processes by a launcher use NCCL
    /// unless the backend is explicitly `Local`: such a launcher runs its ranks as threads of
    /// this process even inside a multi-process job (for a helper computation).
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Runs `f` on every rank and returns their results in rank order, or the first failure:
    /// `rank R failed: ...`.
    ///
    /// When this process was started as one rank of a multi-process job (`RANK` is set, see
    /// [`process`]) and the backend is not explicitly `Local`, it runs that rank alone, on CUDA
    /// device `LOCAL_RANK` with the NCCL backend, and returns its one result; `WORLD_SIZE` must
    /// equal the launcher's world size.
    pub fn run<T, F>(&self, f: F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        self.check_sizes()?;
        let env = match self.backend {
            // Explicitly local: threads even inside a multi-process job (a helper computation).
            Some(BackendKind::Local) => None,
            _ => process::ProcessEnv::from_env()?,
        };
        if let Some(env) = env {
            if env.world_size != self.world_size {
                bail!(
                    "this process is rank {} of WORLD_SIZE={} but the job needs {} ranks: start it with --nproc {} (times the number of nodes)",
                    env.rank,
                    env.world_size,
                    self.world_size,
                    self.world_size
                )
            }
            return self.run_process(&env, &f).map(|v| vec![v]);
        }
        let backend = match self.backend {
            Some(b) => b,
            None => BackendKind::from_env()?,
        };
        match backend {
            BackendKind::Local => {
                share_cores_between_ranks(self.world_size);
                let link = match self.link {
                    Some(l) => Some(l),
                    None => crate::comm::local::LinkModel::from_env()?,
                };
                let fabric = LocalFabric::with_link(self.world_size, self.timeout, link);
                let comms = fabric.world_comms();
                let comms: Vec<_> = comms.into_iter().map(Some).map(Mutex::new).collect();
                let results = self.run_threads(
                    &f,
                    |rank| {
                        let comm = lock(&comms[rank]).take().expect("one comm per rank");
                        Ok((comm, Device::Cpu))
                    },
                    |rank, msg| fabric.fail(rank, msg),
                );
                if let Some(failure) = fabric.failure() {
                    bail!("rank {} failed: {}", failure.rank, failure.message)
                }
                Ok(results
                    .into_iter()
                    .map(|r| r.expect("no failure recorded"))
                    .collect())
            }
            BackendKind::Nccl => self.run_nccl_threads(&f),
        }
    }

    #[cfg(feature = "nccl")]
    fn run_nccl_threads<T, F>(&self, f: &F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        use crate::comm::nccl::CudaNccl;
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        // Checked up front: a rank without a GPU would leave the others waiting to join.
        let gpus = CudaContext::device_count()
            .map_err(|e| candle_core::Error::msg(format!("cannot count the CUDA devices: {e:?}")))?
            as usize;
        if gpus < self.world_size {
            bail!(
                "the NCCL backend with threads runs one rank per GPU: {} ranks need {} GPUs, this machine has {gpus}. Use fewer ranks, or processes on several machines (launch::process)",
                self.world_size,
                self.world_size
            )
        }
        self.run_on_engine::<CudaNccl, T, F>(
            |rank| {
                Device::new_cuda(rank).map_err(|e| {
                    candle_core::Error::msg(format!(
                        "rank {rank} runs on CUDA device {rank}, which is not usable: {e}. The NCCL backend with threads needs one GPU per rank"
                    ))
                })
            },
            f,
        )
    }

    /// Runs `f` on every rank as threads over the NCCL backend's logic with the NCCL
    /// implementation `A`, rank `r` on `device(r)`: how the tests run the backend on an
    /// emulator of NCCL's semantics. Fails like [`Launcher::run`]; a rank whose communicators
    /// were aborted fails even if its closure returned.
    #[doc(hidden)]
    pub fn run_on_engine<A, T, F>(
        &self,
        device: impl Fn(usize) -> Result<Device> + Sync,
        f: &F,
    ) -> Result<Vec<T>>
    where
        A: crate::comm::nccl_engine::NcclApi,
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        use crate::comm::nccl_engine::{abort_world, EngineBackend, NcclId};
        self.check_sizes()?;
        let id = NcclId::generate::<A>()?;
        let first: Mutex<Option<(usize, String)>> = Mutex::new(None);
        let worlds: Vec<Mutex<Option<std::sync::Arc<EngineBackend<A>>>>> =
            (0..self.world_size).map(|_| Mutex::new(None)).collect();
        let results = self.run_threads(
            f,
            |rank| {
                let device = device(rank)?;
                let backend =
                    EngineBackend::<A>::new(&device, rank, self.world_size, &id, self.timeout)?;
                *lock(&worlds[rank]) = Some(backend.clone());
                Ok((Comm::from_backend(backend), device))
            },
            |rank, msg| {
                let mut first = lock(&first);
                if first.is_none() {
                    *first = Some((rank, msg.clone()));
                    // Peers blocked in NCCL would otherwise wait for this rank until the timeout.
                    abort_world(&id, &format!("rank {rank} failed: {msg}"));
                }
            },
        );
        if let Some((rank, msg)) = lock(&first).take() {
            bail!("rank {rank} failed: {msg}")
        }
        // A value computed after a communicator was aborted is not to be trusted.
        for (rank, world) in worlds.iter().enumerate() {
            if let Some(world) = lock(world).as_ref() {
                world
                    .check()
                    .map_err(|e| candle_core::Error::msg(format!("rank {rank} failed: {e}")))?;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("no failure recorded"))
            .collect())
    }

    #[cfg(not(feature = "nccl"))]
    fn run_nccl_threads<T, F>(&self, _: &F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        bail!("the NCCL backend was asked for, but this program was built without it: build with --features nccl (and CUDA), or use the default local backend (unset CANDLE_PARALLEL_BACKEND)")
    }

    #[cfg(feature = "nccl")]
    fn run_process<T, F>(&self, env: &process::ProcessEnv, f: &F) -> Result<T>
    where
        F: Fn(RankContext) -> Result<T>,
    {
        use crate::comm::nccl::{NcclBackend, NcclId};
        use crate::comm::Backend;
        let rank = env.rank;
        let device = Device::new_cuda(env.local_rank).map_err(|e| {
            candle_core::Error::msg(format!(
                "rank {rank}: CUDA device LOCAL_RANK={} is not usable: {e}",
                env.local_rank
            ))
        })?;
        let id = if rank == 0 {
            let id = NcclId::new()?;
            process::rendezvous(env, Some(&id.to_bytes()), self.timeout)?;
            id
        } else {
            NcclId::from_bytes(&process::rendezvous(env, None, self.timeout)?)?
        };
        let backend = NcclBackend::new(&device, rank, env.world_size, &id, self.timeout)?;
        let comm = Comm::from_backend(backend.clone());
        let out = self.run_rank(rank, comm, device, f);
        let out = match out {
            // A value computed after the communicator was aborted is not to be trusted.
            Ok(v) => backend.check().map(|()| v),
            Err(e) => {
                backend.abort(&message_of(&e));
                Err(e)
            }
        };
        out.map_err(|e| candle_core::Error::msg(format!("rank {rank} failed: {}", message_of(&e))))
    }

    #[cfg(not(feature = "nccl"))]
    fn run_process<T, F>(&self, env: &process::ProcessEnv, _: &F) -> Result<T>
    where
        F: Fn(RankContext) -> Result<T>,
    {
        bail!(
            "this process was started as rank {} of {} (RANK is set), but ranks as processes need the NCCL backend: build with --features nccl. Without it, run the program directly: its ranks run as threads",
            env.rank,
            env.world_size
        )
    }

    /// At least one rank, and as many as the mesh has.
    fn check_sizes(&self) -> Result<()> {
        if self.world_size == 0 {
            bail!("cannot launch 0 ranks: the world size must be at least 1")
        }
        if let Some(shape) = &self.mesh {
            shape.check(self.world_size)?;
        }
        Ok(())
    }

    /// Runs every rank on its own thread; `setup` makes a rank's communicator and device,
    /// `fail` reports a rank's error or panic (and must make the other ranks stop waiting).
    fn run_threads<T, F>(
        &self,
        f: &F,
        setup: impl Fn(usize) -> Result<(Comm, Device)> + Sync,
        fail: impl Fn(usize, String) + Sync,
    ) -> Vec<Option<T>>
    where
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.world_size)
                .map(|rank| {
                    let (setup, fail) = (&setup, &fail);
                    let spawned = std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(scope, move || {
                            // Everything this thread allocates counts as the rank's.
                            crate::memory::set_thread_rank(Some(rank));
                            let out = catch_unwind(AssertUnwindSafe(|| {
                                let (comm, device) = setup(rank)?;
                                self.run_rank(rank, comm, device, f)
                            }));
                            match out {
                                Ok(Ok(v)) => Some(v),
                                Ok(Err(e)) => {
                                    fail(rank, message_of(&e));
                                    None
                                }
                                Err(panic) => {
                                    fail(rank, format!("panicked: {}", panic_message(&*panic)));
                                    None
                                }
                            }
                        });
                    if let Err(e) = &spawned {
                        fail(rank, format!("could not start its thread: {e}"));
                    }
                    spawned
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.ok().and_then(|h| h.join().ok().flatten()))
                .collect()
        })
    }

    fn run_rank<T, F>(&self, rank: usize, comm: Comm, device: Device, f: &F) -> Result<T>
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
        let _console = crate::logging::enter_rank(rank);
        crate::memory::set_thread_rank(Some(rank));
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
            device,
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
