//! The NCCL backend: communicators over CUDA devices (cargo feature `nccl`).
//!
//! Every operation is enqueued on the CUDA stream of the tensor it moves and returns at once:
//! the host waits only where the algorithm needs a value on the host (barrier, the split sizes
//! of a ragged all-to-all, [`Comm::split`](super::Comm::split)).
//!
//! NCCL itself never times out: a rank that never arrives leaves its peers' kernels spinning.
//! A watchdog thread (one per process) therefore follows every enqueued operation with a CUDA
//! event. When one is not done within the timeout, or NCCL reports an asynchronous error, the
//! watchdog aborts the communicator (`ncclCommAbort`), which ends the spinning kernels; every
//! later call on it returns [`CommError::Aborted`] with the reason (the operation, its call
//! number, the rank and NCCL's own message). A rank whose host thread was blocked on such an
//! operation resumes with undefined values, so [`NcclBackend::check`] (and the launcher, at the
//! end of a rank) turns a past abort into an error.
//!
//! Set `CANDLE_PARALLEL_CHECK_COLLECTIVES=1` to have every collective first compare its
//! operation, dtype and shape across the group (one small all-gather and a host wait): a
//! mismatch becomes [`CommError::Mismatch`] naming the ranks and their shapes, instead of the
//! hang or garbage NCCL would give.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use candle_parallel::comm::nccl::{NcclBackend, NcclId};
//! use candle_parallel::comm::{Comm, ReduceOp};
//! use std::time::Duration;
//!
//! // A world of one: rank 0 makes the id (in a real job every rank receives it, see
//! // `launch::process::rendezvous`).
//! let device = Device::new_cuda(0)?;
//! let id = NcclId::new()?;
//! let comm = Comm::from_backend(NcclBackend::new(&device, 0, 1, &id, Duration::from_secs(60))?);
//! let x = Tensor::new(&[1f32, 2.0], &device)?;
//! assert_eq!(comm.all_reduce(&x, ReduceOp::Sum)?.to_vec1::<f32>()?, [1.0, 2.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::{
    group_label, lock, regroup_for_scatter, regroup_gathered, Backend, Collective, CommError,
    ReduceOp,
};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nccl::sys;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::ffi::{c_void, CStr};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The 128-byte id that the ranks of a new NCCL world share: rank 0 makes it with
/// [`NcclId::new`], the others receive its [`NcclId::to_bytes`] (over the rendezvous).
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl NcclId {
    /// A fresh id (rank 0 only).
    pub fn new() -> Result<Self> {
        let mut id = MaybeUninit::uninit();
        // SAFETY: ncclGetUniqueId fills the id it is given.
        let res = unsafe { sys::ncclGetUniqueId(id.as_mut_ptr()) };
        nccl_result(res, std::ptr::null_mut()).map_err(|e| {
            candle_core::Error::msg(format!("ncclGetUniqueId failed: {e}. Is a GPU visible?"))
        })?;
        // SAFETY: initialised by the successful call above.
        Ok(Self(unsafe { id.assume_init() }))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    /// A short fingerprint of the id: the communicators of one world share it.
    fn world(&self) -> u64 {
        // FNV-1a: enough to tell the worlds of one process apart.
        self.to_bytes().iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The id from the bytes rank 0 sent.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            candle_core::bail!(
                "an NCCL unique id has 128 bytes, got {}: the rendezvous blob is not an NCCL id",
                bytes.len()
            )
        }
        for (d, &b) in internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        Ok(Self(sys::ncclUniqueId { internal }))
    }
}

/// NCCL's name for a result code and, given a communicator, its last error message.
fn nccl_result(res: sys::ncclResult_t, comm: sys::ncclComm_t) -> std::result::Result<(), String> {
    if matches!(
        res,
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
    ) {
        return Ok(());
    }
    // SAFETY: NCCL returns static, NUL-terminated strings.
    let name = unsafe { CStr::from_ptr(sys::ncclGetErrorString(res)) }
        .to_string_lossy()
        .into_owned();
    let last = unsafe { CStr::from_ptr(sys::ncclGetLastError(comm)) }
        .to_string_lossy()
        .into_owned();
    Err(if last.is_empty() {
        format!("NCCL error {res:?}: {name}")
    } else {
        format!("NCCL error {res:?}: {name} ({last})")
    })
}

/// One NCCL communicator, shared by the backend handle and the watchdog.
struct Shared {
    /// Null once aborted: no call may use it after that.
    comm: AtomicPtr<sys::ncclComm>,
    /// NCCL communicators are not thread-safe: calls are issued one at a time.
    issue: Mutex<()>,
    /// When the call being issued started (a call stuck inside NCCL is aborted too).
    busy_since: Mutex<Option<Instant>>,
    failure: Mutex<Option<String>>,
    label: String,
    global_rank: usize,
    calls: AtomicU64,
    lineage: Lineage,
}

/// What the communicators of one rank in one world (its own and those split from it) share.
#[derive(Clone)]
struct Lineage {
    /// The world's fingerprint (see [`abort_world`]).
    world: u64,
    timeout: Duration,
    /// The first failure of any of them: what [`NcclBackend::check`] reports.
    rank_failure: Arc<Mutex<Option<String>>>,
}

// SAFETY: the raw communicator is only used under `issue` (or aborted once, atomically).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Records `reason` (the first one wins) and aborts the communicator, which ends any of
    /// its kernels still waiting for a peer.
    fn abort(&self, reason: String) {
        {
            let mut f = lock(&self.failure);
            if f.is_none() {
                tracing::error!(group = %self.label, rank = self.global_rank, "aborting the NCCL communicator: {reason}");
                lock(&self.lineage.rank_failure).get_or_insert_with(|| reason.clone());
                *f = Some(reason);
            }
        }
        let p = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` was a live communicator and is no longer reachable from `self`.
            unsafe { sys::ncclCommAbort(p) };
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Abort rather than destroy: destroy may wait for peers, and every enqueued operation
        // has completed by now (the watchdog holds the communicator until they have).
        let p = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: last owner of a live communicator.
            unsafe { sys::ncclCommAbort(p) };
        }
    }
}

/// An enqueued operation the watchdog follows.
struct Pending {
    shared: Arc<Shared>,
    event: CudaEvent,
    what: String,
    since: Instant,
}

#[derive(Default)]
struct Watchdog {
    pending: Mutex<Vec<Pending>>,
    comms: Mutex<Vec<Weak<Shared>>>,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || w.run())
            .expect("cannot start the NCCL watchdog thread");
        w
    })
}

impl Watchdog {
    fn run(&self) {
        let mut last_error_poll = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let done: Vec<Pending> = {
                let mut pending = lock(&self.pending);
                let all = std::mem::take(&mut *pending);
                let (keep, done): (Vec<_>, Vec<_>) = all.into_iter().partition(|p| {
                    let _ = p.event.context().bind_to_thread();
                    match p.event.try_is_complete() {
                        Ok(true) => false,
                        Ok(false) if p.since.elapsed() > p.shared.lineage.timeout => {
                            p.shared.abort(format!(
                                "{} timed out after {:.1}s on rank {}: a peer never arrived or is stuck. If they are only slow, raise the timeout (Launcher::timeout or CANDLE_PARALLEL_TIMEOUT_SECS)",
                                p.what,
                                p.since.elapsed().as_secs_f64(),
                                p.shared.global_rank
                            ));
                            false
                        }
                        Ok(false) => true,
                        Err(e) => {
                            p.shared.abort(format!(
                                "{} failed on rank {}: CUDA error {e:?}",
                                p.what, p.shared.global_rank
                            ));
                            false
                        }
                    }
                });
                *pending = keep;
                done
            };
            // Dropping may release the last handle of a communicator: outside the lock.
            drop(done);
            if last_error_poll.elapsed() >= Duration::from_millis(100) {
                last_error_poll = Instant::now();
                self.poll_async_errors();
            }
        }
    }

    /// Asks NCCL for errors it found in the background (a peer's connection lost, ...), and
    /// aborts communicators whose calls are stuck inside NCCL itself.
    fn poll_async_errors(&self) {
        let comms: Vec<Arc<Shared>> = {
            let mut comms = lock(&self.comms);
            comms.retain(|w| w.strong_count() > 0);
            comms.iter().filter_map(Weak::upgrade).collect()
        };
        for s in comms {
            match s.issue.try_lock() {
                Ok(guard) => {
                    let p = s.comm.load(Ordering::SeqCst);
                    if p.is_null() {
                        continue;
                    }
                    let mut state = sys::ncclResult_t::ncclSuccess;
                    // SAFETY: live communicator, and no call is being issued on it.
                    let res = unsafe { sys::ncclCommGetAsyncError(p, &mut state) };
                    let err = nccl_result(res, p).and_then(|()| nccl_result(state, p));
                    if let Err(e) = err {
                        drop(guard);
                        s.abort(format!(
                            "NCCL reported an error on rank {}: {e}",
                            s.global_rank
                        ));
                    }
                }
                Err(_) => {
                    let since = *lock(&s.busy_since);
                    if since.is_some_and(|t| t.elapsed() > s.lineage.timeout) {
                        // The issuing thread is stuck inside NCCL (peers never joined a group
                        // call): NCCL's abort is the only way to release it.
                        s.abort(format!(
                            "a call on rank {} waited more than {:.0}s inside NCCL for its peers",
                            s.global_rank,
                            s.lineage.timeout.as_secs_f64()
                        ));
                    }
                }
            }
        }
    }
}

/// Aborts every communicator of this process that belongs to the world of `id` (split groups
/// included) with `reason`: when one rank of a job whose ranks are threads fails, its peers
/// stop waiting for it. Other worlds in the process are left alone.
pub fn abort_world(id: &NcclId, reason: &str) {
    let world = id.world();
    let comms: Vec<Arc<Shared>> = lock(&watchdog().comms)
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|c| c.lineage.world == world)
        .collect();
    for c in comms {
        c.abort(reason.to_string());
    }
}

/// One rank of one NCCL communicator. Built with [`NcclBackend::new`] (a new world) or by
/// [`Comm::split`](super::Comm::split); wrap it in a [`Comm`](super::Comm) with
/// [`Comm::from_backend`](super::Comm::from_backend).
pub struct NcclBackend {
    shared: Arc<Shared>,
    rank: usize,
    size: usize,
    ranks: Vec<usize>,
    device: Device,
    check_args: bool,
}

impl NcclBackend {
    /// Joins rank `rank` of a new NCCL world of `world_size` ranks, all holding the same `id`,
    /// on `device` (a CUDA device). Returns once every rank has joined, or fails after
    /// `timeout` naming this rank; the same `timeout` bounds every later operation.
    pub fn new(
        device: &Device,
        rank: usize,
        world_size: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<Arc<Self>> {
        let cuda = cuda_device(device, "NcclBackend::new")?;
        if rank >= world_size {
            candle_core::bail!("NCCL world: rank {rank} is not a rank of a world of {world_size}")
        }
        let ctx = cuda.cuda_stream().context().clone();
        let id = *id;
        let (tx, rx) = std::sync::mpsc::channel();
        // ncclCommInitRank blocks until every rank joined and cannot be interrupted: run it
        // aside so that a missing rank ends in an error here, not in a hang.
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let res = ctx
                    .bind_to_thread()
                    .map_err(|e| format!("cannot bind the CUDA context: {e:?}"))
                    .and_then(|()| {
                        let mut comm = std::ptr::null_mut();
                        // SAFETY: `comm` receives the new communicator.
                        let r = unsafe {
                            sys::ncclCommInitRank(&mut comm, world_size as i32, id.0, rank as i32)
                        };
                        nccl_result(r, comm).map(|()| comm as usize)
                    });
                let _ = tx.send(res);
            })?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(comm)) => comm as sys::ncclComm_t,
            Ok(Err(e)) => candle_core::bail!(
                "rank {rank}: joining the NCCL world of {world_size} failed: {e}"
            ),
            Err(_) => candle_core::bail!(
                "rank {rank}: not every rank of the NCCL world of {world_size} joined within {:.0}s; check that all ranks were started with the same unique id",
                timeout.as_secs_f64()
            ),
        };
        tracing::debug!(rank, world_size, "NCCL communicator ready");
        Ok(Self::wrap(
            comm,
            group_label("world", &(0..world_size).collect::<Vec<_>>()),
            rank,
            (0..world_size).collect(),
            device.clone(),
            Lineage {
                world: id.world(),
                timeout,
                rank_failure: Arc::default(),
            },
        ))
    }

    fn wrap(
        comm: sys::ncclComm_t,
        label: String,
        rank: usize,
        ranks: Vec<usize>,
        device: Device,
        lineage: Lineage,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            comm: AtomicPtr::new(comm),
            issue: Mutex::new(()),
            busy_since: Mutex::new(None),
            failure: Mutex::new(None),
            label,
            global_rank: ranks[rank],
            calls: AtomicU64::new(0),
            lineage,
        });
        lock(&watchdog().comms).push(Arc::downgrade(&shared));
        let check_args = std::env::var("CANDLE_PARALLEL_CHECK_COLLECTIVES")
            .is_ok_and(|v| !v.is_empty() && v != "0");
        Arc::new(Self {
            shared,
            rank,
            size: ranks.len(),
            ranks,
            device,
            check_args,
        })
    }

    /// Fails when this communicator, or any other of this rank in the same world (split groups
    /// included), was aborted (a timeout, an NCCL error or a peer's failure): values computed
    /// since then are not to be trusted.
    pub fn check(&self) -> Result<()> {
        let failure = lock(&self.shared.lineage.rank_failure).clone();
        match failure {
            Some(reason) => Err(self.aborted("check", reason)),
            None => Ok(()),
        }
    }

    fn aborted(&self, op: &str, reason: String) -> candle_core::Error {
        CommError::Aborted {
            op: op.to_string(),
            group: self.shared.label.clone(),
            rank: self.shared.global_rank,
            reason,
        }
        .into()
    }

    fn invalid(&self, op: &str, msg: String) -> candle_core::Error {
        CommError::Invalid {
            op: op.to_string(),
            group: self.shared.label.clone(),
            rank: self.shared.global_rank,
            msg,
        }
        .into()
    }

    /// Issues NCCL calls on `stream` (`f` gets the raw communicator), then hands the work to
    /// the watchdog. Any NCCL error aborts the communicator: its peers would wait forever.
    fn issue<R>(
        &self,
        what: &str,
        stream: &CudaStream,
        f: impl FnOnce(sys::ncclComm_t) -> std::result::Result<R, String>,
    ) -> Result<R> {
        let call = self.shared.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let desc = format!("{what} (call #{call} on group {})", self.shared.label);
        let out = {
            let _guard = lock(&self.shared.issue);
            let comm = self.shared.comm.load(Ordering::SeqCst);
            if comm.is_null() {
                let reason = self.shared.failure().unwrap_or_default();
                return Err(self.aborted(what, reason));
            }
            stream.context().bind_to_thread().map_err(|e| {
                candle_core::Error::msg(format!("{desc}: cannot bind the CUDA context: {e:?}"))
            })?;
            *lock(&self.shared.busy_since) = Some(Instant::now());
            let out = f(comm);
            *lock(&self.shared.busy_since) = None;
            out
        };
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let reason = format!("{desc} failed on rank {}: {e}", self.shared.global_rank);
                self.shared.abort(reason.clone());
                return Err(self.aborted(what, reason));
            }
        };
        let event = stream.record_event(None).map_err(|e| {
            candle_core::Error::msg(format!("{desc}: cannot record a CUDA event: {e:?}"))
        })?;
        lock(&watchdog().pending).push(Pending {
            shared: self.shared.clone(),
            event,
            what: desc,
            since: Instant::now(),
        });
        Ok(out)
    }

    /// Every rank's `values` (the same length on every rank), in group-rank order; waits on
    /// the host for the result.
    fn gather_i64(&self, what: &str, values: &[i64]) -> Result<Vec<i64>> {
        let dev = cuda_device(&self.device, what)?;
        let stream = dev.cuda_stream();
        let host_err = |e| candle_core::Error::msg(format!("{what}: CUDA error {e:?}"));
        let send = stream.clone_htod(values).map_err(host_err)?;
        let mut all = stream
            .alloc_zeros::<i64>(values.len() * self.size)
            .map_err(host_err)?;
        self.issue(what, &stream, |c| {
            let (s, _gs) = send.device_ptr(&stream);
            let (r, _gr) = all.device_ptr_mut(&stream);
            // SAFETY: both buffers are live and sized for the gather.
            let res = unsafe {
                sys::ncclAllGather(
                    s as _,
                    r as _,
                    values.len(),
                    sys::ncclDataType_t::ncclInt64,
                    c,
                    stream.cu_stream() as _,
                )
            };
            nccl_result(res, c)
        })?;
        let all = stream.clone_dtoh(&all).map_err(host_err)?;
        self.check()?;
        Ok(all)
    }

    /// With `CANDLE_PARALLEL_CHECK_COLLECTIVES` set: compares `what` (an operation code and
    /// its arguments) across the group and fails on every rank when they differ.
    fn check_same(&self, op: &str, what: &[i64], shown: &str) -> Result<()> {
        if !self.check_args || self.size == 1 {
            return Ok(());
        }
        const N: usize = 16;
        let mut mine = [i64::MIN; N];
        for (d, &v) in mine.iter_mut().zip(what) {
            *d = v;
        }
        let all = self.gather_i64("argument check", &mine)?;
        // Every rank sees the same table, so every rank reaches the same verdict.
        if all.chunks(N).all(|c| c == &all[..N]) {
            return Ok(());
        }
        let per_rank = self
            .ranks
            .iter()
            .zip(all.chunks(N))
            .map(|(r, c)| {
                let c: Vec<i64> = c.iter().copied().take_while(|&v| v != i64::MIN).collect();
                format!("rank {r}: {c:?}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(CommError::Mismatch {
            op: op.to_string(),
            call: self.shared.calls.load(Ordering::SeqCst),
            group: self.shared.label.clone(),
            details: format!(
                "ranks disagree on the operation or its arguments ({shown} on rank {}); per rank (op code, dtype, rank count, dims...): {per_rank}",
                self.shared.global_rank
            ),
        }
        .into())
    }
}

fn cuda_device<'a>(device: &'a Device, op: &str) -> Result<&'a CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        other => candle_core::bail!(
            "{op}: the NCCL backend moves CUDA tensors, got a tensor on {other:?}: create it on the communicator's device (Comm::device)"
        ),
    }
}

/// The device pointer (bytes) of a storage, with the guard that records the use on `stream`.
macro_rules! with_ptr {
    ($storage:expr, $stream:expr, $method:ident, |$p:ident, $g:ident| $body:expr) => {
        match $storage {
            CudaStorageSlice::U8(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::U32(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::I16(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::I32(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::I64(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::BF16(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::F16(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::F32(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::F64(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::F8E4M3(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
            CudaStorageSlice::F6E2M3(s)
            | CudaStorageSlice::F6E3M2(s)
            | CudaStorageSlice::F4(s)
            | CudaStorageSlice::F8E8M0(s) => {
                let ($p, $g) = s.$method($stream);
                $body
            }
        }
    };
}

/// The device address of a buffer for reading on `stream`; the guard records the use.
fn read_ptr<'a>(s: &'a CudaStorageSlice, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    with_ptr!(s, stream, device_ptr, |p, g| (p, g))
}

/// The device address of a buffer for writing on `stream`; the guard records the use.
fn write_ptr<'a>(s: &'a mut CudaStorageSlice, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    with_ptr!(s, stream, device_ptr_mut, |p, g| (p, g))
}

/// NCCL's type for reductions over `dtype`.
fn reduce_type(dtype: DType) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Some(match dtype {
        DType::U8 => T::ncclUint8,
        DType::U32 => T::ncclUint32,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        _ => return None,
    })
}

fn reduce_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
    }
}

fn op_code(op: &Collective) -> i64 {
    match op {
        Collective::AllReduce { op } => 10 + *op as i64,
        Collective::AllGather { dim } => 100 + *dim as i64,
        Collective::ReduceScatter { dim, op } => 200 + 10 * *dim as i64 + *op as i64,
        Collective::AllToAll { .. } => 300,
        Collective::Broadcast { root } => 400 + *root as i64,
    }
}

const BYTES: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;

impl NcclBackend {
    /// Ragged all-to-all as grouped send/recv; the part a rank keeps is a device copy.
    fn all_to_all(
        &self,
        stream: &CudaStream,
        in_ptr: u64,
        out: u64,
        row_bytes: usize,
        send: &[usize],
        recv: &[usize],
    ) -> Result<()> {
        let me = self.rank;
        let offsets = |splits: &[usize]| -> Vec<usize> {
            splits
                .iter()
                .scan(0, |acc, &c| {
                    let o = *acc;
                    *acc += c;
                    Some(o * row_bytes)
                })
                .collect()
        };
        let (so, ro) = (offsets(send), offsets(recv));
        self.issue("all_to_all", stream, |c| {
            let s = stream.cu_stream() as sys::cudaStream_t;
            // SAFETY: offsets and counts stay within the buffers (checked by the caller).
            unsafe {
                nccl_result(sys::ncclGroupStart(), c)?;
                let mut first_err = Ok(());
                for j in 0..self.size {
                    if j == me {
                        continue;
                    }
                    if send[j] > 0 {
                        let r = sys::ncclSend(
                            (in_ptr as usize + so[j]) as _,
                            send[j] * row_bytes,
                            BYTES,
                            j as i32,
                            c,
                            s,
                        );
                        first_err = first_err.and(nccl_result(r, c));
                    }
                    if recv[j] > 0 {
                        let r = sys::ncclRecv(
                            (out as usize + ro[j]) as _,
                            recv[j] * row_bytes,
                            BYTES,
                            j as i32,
                            c,
                            s,
                        );
                        first_err = first_err.and(nccl_result(r, c));
                    }
                }
                let end = nccl_result(sys::ncclGroupEnd(), c);
                first_err.and(end)?;
            }
            Ok(())
        })?;
        if send[me] > 0 {
            let bytes = send[me] * row_bytes;
            // SAFETY: both ranges lie inside live buffers ordered on `stream`.
            unsafe {
                candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(
                    (out as usize + ro[me]) as u64,
                    (in_ptr as usize + so[me]) as u64,
                    bytes,
                    stream.cu_stream(),
                )
            }
            .map_err(|e| candle_core::Error::msg(format!("all_to_all local copy: {e:?}")))?;
        }
        Ok(())
    }
}

impl Backend for NcclBackend {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    fn label(&self) -> &str {
        &self.shared.label
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn collective_cuda(
        &self,
        op: &Collective,
        input: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let name = op.name();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(self.invalid(
                name,
                format!(
                    "the input must be contiguous (shape {:?}, stride {:?}): call .contiguous()",
                    layout.dims(),
                    layout.stride()
                ),
            ));
        };
        let dims = layout.dims();
        let n = self.size;
        let dtype = input.dtype();
        let dev = &input.device;
        let stream = dev.cuda_stream();
        let mut fingerprint = vec![op_code(op), dtype as i64, dims.len() as i64];
        fingerprint.extend(dims.iter().map(|&d| d as i64));
        if let Collective::AllToAll { send_splits, .. } = op {
            fingerprint.push(send_splits.len() as i64);
        }
        self.check_same(name, &fingerprint, &format!("{op} on {dtype:?} {dims:?}"))?;
        let Some(out_dims) = op.output_dims(dims, n) else {
            return Err(self.invalid(
                name,
                format!("{op} cannot apply to a tensor of shape {dims:?} in a group of {n}"),
            ));
        };
        let esz = dtype.size_in_bytes();
        let len = end - start;
        let out_shape = Shape::from(out_dims.clone());
        // SAFETY: every byte of the output is written below before anyone reads it.
        let mut out = unsafe { dev.alloc_uninit(&out_shape, dtype) }?;
        if len == 0 && out_shape.elem_count() == 0 {
            return Ok((out, out_shape));
        }
        let needs_reduce = |rop: ReduceOp| {
            reduce_type(dtype).map(|t| (t, reduce_op(rop))).ok_or_else(|| {
                candle_core::Error::from(CommError::Unsupported {
                    backend: "nccl",
                    what: format!("{op} on {dtype:?} tensors (NCCL reduces u8, u32, i32, i64, f16, bf16, f32, f64)"),
                })
            })
        };
        let s = stream.cu_stream() as sys::cudaStream_t;
        let in_off = start * esz;
        let outer: usize = dims
            .iter()
            .take(match op {
                Collective::AllGather { dim } | Collective::ReduceScatter { dim, .. } => *dim,
                _ => 0,
            })
            .product();
        // SAFETY (every NCCL call below): the addresses point into live buffers of the sizes
        // passed, ordered on `stream` by the guards.
        match op {
            Collective::AllReduce { op: rop } => {
                let (t, r) = needs_reduce(*rop)?;
                let (ip, _g) = read_ptr(&input.slice, &stream);
                let (op_, _h) = write_ptr(&mut out.slice, &stream);
                let ip = (ip as usize + in_off) as *const c_void;
                self.issue(name, &stream, |c| {
                    let res = unsafe { sys::ncclAllReduce(ip, op_ as _, len, t, r, c, s) };
                    nccl_result(res, c)
                })?;
            }
            Collective::Broadcast { root } => {
                if *root >= n {
                    return Err(self.invalid(
                        name,
                        format!("root {root} is not a rank of this group of {n}"),
                    ));
                }
                let (ip, _g) = read_ptr(&input.slice, &stream);
                let (op_, _h) = write_ptr(&mut out.slice, &stream);
                let ip = (ip as usize + in_off) as *const c_void;
                let root = *root as i32;
                self.issue(name, &stream, |c| {
                    let res =
                        unsafe { sys::ncclBroadcast(ip, op_ as _, len * esz, BYTES, root, c, s) };
                    nccl_result(res, c)
                })?;
            }
            Collective::AllGather { .. } => {
                // NCCL gathers along the flat buffer; other dims are regrouped afterwards.
                let mut tmp = match outer {
                    1 => None,
                    _ => Some(unsafe { dev.alloc_uninit(&Shape::from(len * n), dtype) }?),
                };
                {
                    let (ip, _g) = read_ptr(&input.slice, &stream);
                    let dst = tmp.as_mut().map_or(&mut out.slice, |t| &mut t.slice);
                    let (op_, _h) = write_ptr(dst, &stream);
                    let ip = (ip as usize + in_off) as *const c_void;
                    self.issue(name, &stream, |c| {
                        let res =
                            unsafe { sys::ncclAllGather(ip, op_ as _, len * esz, BYTES, c, s) };
                        nccl_result(res, c)
                    })?;
                }
                if let Some(tmp) = tmp {
                    regroup_gathered(&tmp, &mut out, n, outer, len / outer)?;
                }
            }
            Collective::ReduceScatter { op: rop, .. } => {
                let (t, r) = needs_reduce(*rop)?;
                let out_len = out_shape.elem_count();
                // NCCL scatters contiguous chunks: [outer, n * c] is regrouped to [n, outer, c].
                let tmp = match outer {
                    1 => None,
                    _ => {
                        let mut tmp = unsafe { dev.alloc_uninit(&Shape::from(len), dtype) }?;
                        regroup_for_scatter(input, start, &mut tmp, n, outer, len / outer / n)?;
                        Some(tmp)
                    }
                };
                let (src, src_off) = match &tmp {
                    Some(t) => (&t.slice, 0),
                    None => (&input.slice, in_off),
                };
                let (ip, _g) = read_ptr(src, &stream);
                let (op_, _h) = write_ptr(&mut out.slice, &stream);
                let ip = (ip as usize + src_off) as *const c_void;
                self.issue(name, &stream, |c| {
                    let res = unsafe { sys::ncclReduceScatter(ip, op_ as _, out_len, t, r, c, s) };
                    nccl_result(res, c)
                })?;
            }
            Collective::AllToAll {
                send_splits,
                recv_splits,
            } => {
                if send_splits.len() != n || recv_splits.len() != n {
                    return Err(self.invalid(name, format!(
                        "send_splits ({}) and recv_splits ({}) need one entry per rank of this group of {n}",
                        send_splits.len(), recv_splits.len()
                    )));
                }
                let rows = dims.first().copied().unwrap_or(1);
                if send_splits.iter().sum::<usize>() != rows {
                    return Err(self.invalid(name, format!(
                        "send_splits {send_splits:?} sum to {} but the input has {rows} rows (shape {dims:?})",
                        send_splits.iter().sum::<usize>()
                    )));
                }
                let row_bytes = dims.iter().skip(1).product::<usize>() * esz;
                let (ip, _g) = read_ptr(&input.slice, &stream);
                let (op_, _h) = write_ptr(&mut out.slice, &stream);
                let ip = ip + in_off as u64;
                self.all_to_all(&stream, ip, op_, row_bytes, send_splits, recv_splits)?;
            }
        }
        Ok((out, out_shape))
    }

    fn send(&self, x: &Tensor, dst: usize) -> Result<()> {
        if dst >= self.size {
            return Err(self.invalid(
                "send",
                format!(
                    "destination {dst} is not a rank of this group of {}",
                    self.size
                ),
            ));
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(self.invalid(
                "send",
                format!(
                    "the NCCL backend sends CUDA tensors, got one on {:?}",
                    x.device()
                ),
            ));
        };
        let stream = cs.device.cuda_stream();
        let off = layout.start_offset() * x.dtype().size_in_bytes();
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        self.check_same("send", &[1000, self.rank as i64, dst as i64], "send")?;
        let (p, _g) = read_ptr(&cs.slice, &stream);
        let p = (p as usize + off) as *const c_void;
        let s = stream.cu_stream() as sys::cudaStream_t;
        self.issue("send", &stream, |c| {
            // SAFETY: `bytes` bytes from `p` lie inside the tensor, ordered on `stream`.
            let res = unsafe { sys::ncclSend(p, bytes, BYTES, dst as i32, c, s) };
            nccl_result(res, c)
        })
    }

    fn recv(&self, src: usize, shape: &Shape, dtype: DType) -> Result<Tensor> {
        if src >= self.size {
            return Err(self.invalid(
                "recv",
                format!("source {src} is not a rank of this group of {}", self.size),
            ));
        }
        let dev = cuda_device(&self.device, "recv")?;
        let stream = dev.cuda_stream();
        // SAFETY: filled by the receive before any use (ordered on `stream`).
        let mut out = unsafe { dev.alloc_uninit(shape, dtype) }?;
        let bytes = shape.elem_count() * dtype.size_in_bytes();
        if bytes > 0 {
            let (p, _g) = write_ptr(&mut out.slice, &stream);
            let s = stream.cu_stream() as sys::cudaStream_t;
            self.issue("recv", &stream, |c| {
                // SAFETY: the fresh buffer holds `bytes` bytes, ordered on `stream`.
                let res = unsafe { sys::ncclRecv(p as _, bytes, BYTES, src as i32, c, s) };
                nccl_result(res, c)
            })?;
        }
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            shape.clone(),
            BackpropOp::none(),
            false,
        ))
    }

    fn barrier(&self) -> Result<()> {
        self.gather_i64("barrier", &[0]).map(|_| ())
    }

    fn split(
        &self,
        color: Option<usize>,
        key: usize,
        label: &str,
    ) -> Result<Option<Arc<dyn Backend>>> {
        // Every rank learns every (color, key) first: the new group's global ranks.
        let all = self.gather_i64("split", &[color.map_or(-1, |c| c as i64), key as i64])?;
        let dev = cuda_device(&self.device, "split")?;
        let stream = dev.cuda_stream();
        let mut new = std::ptr::null_mut();
        let c_color = color.map_or(-1, |c| c as i32); // NCCL_SPLIT_NOCOLOR
        self.issue("split", &stream, |c| {
            nccl_result(
                unsafe {
                    sys::ncclCommSplit(c, c_color, key as i32, &mut new, std::ptr::null_mut())
                },
                c,
            )
        })?;
        let Some(color) = color else { return Ok(None) };
        let mut members: Vec<(i64, usize, usize)> = all
            .chunks(2)
            .enumerate()
            .filter(|(_, ck)| ck[0] == color as i64)
            .map(|(r, ck)| (ck[1], r, self.ranks[r]))
            .collect();
        members.sort();
        let ranks: Vec<usize> = members.iter().map(|m| m.2).collect();
        let rank = members
            .iter()
            .position(|m| m.1 == self.rank)
            .expect("this rank is a member");
        if new.is_null() {
            candle_core::bail!(
                "split: NCCL returned no communicator for color {color} on rank {}",
                self.shared.global_rank
            )
        }
        let label = group_label(label, &ranks);
        let b: Arc<dyn Backend> = Self::wrap(
            new,
            label,
            rank,
            ranks,
            self.device.clone(),
            self.shared.lineage.clone(),
        );
        Ok(Some(b))
    }

    fn abort(&self, reason: &str) {
        self.shared.abort(format!(
            "rank {} aborted: {reason}",
            self.shared.global_rank
        ));
    }
}
