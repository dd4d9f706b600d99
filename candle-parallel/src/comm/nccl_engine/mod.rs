//! The NCCL backend's logic, over the narrow interface [`NcclApi`].
//!
//! `comm::nccl` (feature `nccl`) runs it on CUDA devices with NCCL itself; the integration
//! tests run it on host memory with an emulator of NCCL's documented semantics, at several
//! ranks, on machines without GPUs. It is not a user-facing backend of its own.
//!
//! What it promises (the same as the local backend):
//! - every operation is enqueued on a device stream and returns at once (the host waits only
//!   where a value is needed on the host: barrier, split, the argument checks). A group of
//!   more than one rank enqueues on a communication stream of its own (PyTorch's NCCL stream;
//!   `CANDLE_PARALLEL_NCCL_STREAM=0` keeps the compute stream): each operation first waits, on
//!   the device, for the work enqueued on the compute stream of its tensors' device so far,
//!   and the compute stream waits for it right after (a blocking call) or where the caller
//!   waits for its [`Work`](super::Work) ([`Comm::start`](super::Comm::start) and the
//!   `*_async` calls), so that compute and communication overlap in between;
//! - nothing hangs: NCCL has no timeout, so a watchdog thread follows each operation with an
//!   event and aborts the communicator when one is not done within the timeout or NCCL reports
//!   an error; every later call fails with [`CommError::Aborted`] and the reason;
//! - communicators are non-blocking (`blocking = 0`): no NCCL call waits for peers on the
//!   host, so an abort (the watchdog's, or a failing peer thread's) never races a call in flight;
//!   every call on a communicator, the abort included, holds its lock for one short call;
//! - `send` is rendezvous-style, as an ungrouped `ncclSend` is: it may wait until the peer
//!   posts the matching `recv`; `exchange` groups any sends and receives (`ncclGroupStart` /
//!   `ncclGroupEnd`), so a ring or a pipeline step never deadlocks.

pub mod api;
mod watchdog;

pub use api::{Addr, NcclApi, Status};

use super::{
    group_label, lock, regroup_for_scatter, regroup_gathered, Backend, Collective, CommError,
    ReduceOp,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Result, Shape, Tensor};
use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use watchdog::{watchdog, Pending, Watched};

/// The 128-byte id that the ranks of a new NCCL world share: rank 0 makes it, the others
/// receive its [`NcclId::to_bytes`] (over the rendezvous).
#[derive(Clone, Copy)]
pub struct NcclId([u8; 128]);

impl NcclId {
    /// A fresh id from the implementation `A` (rank 0 only).
    pub fn generate<A: NcclApi>() -> Result<Self> {
        A::unique_id().map(Self)
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The id from the bytes rank 0 sent.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let id: [u8; 128] = bytes.try_into().map_err(|_| {
            candle_core::Error::msg(format!(
                "an NCCL unique id has 128 bytes, got {}: the rendezvous blob is not an NCCL id",
                bytes.len()
            ))
        })?;
        Ok(Self(id))
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8; 128] {
        &self.0
    }

    /// A short fingerprint: the communicators of one world share it.
    fn world(&self) -> u64 {
        // FNV-1a: enough to tell the worlds of one process apart.
        self.0.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// Aborts every communicator of this process in the world of `id` (split groups included)
/// with `reason`: when one rank of a job whose ranks are threads fails, its peers stop waiting
/// for it. Other worlds in the process are left alone.
pub fn abort_world(id: &NcclId, reason: &str) {
    watchdog().abort_world(id.world(), reason);
}

/// What the communicators of one rank in one world (its own and those split from it) share.
#[derive(Clone)]
struct Lineage {
    world: u64,
    timeout: Duration,
    /// The first failure of any of them: what [`EngineBackend::check`] reports.
    rank_failure: Arc<Mutex<Option<String>>>,
}

/// One communicator, shared by the backend handle and the watchdog.
struct Shared<A: NcclApi> {
    /// `None` once aborted. Held only for the length of one non-blocking NCCL call (or the
    /// calls of one group), by issuers, the watchdog and abort alike: NCCL forbids using a
    /// communicator from two threads at once.
    comm: Mutex<Option<A::Comm>>,
    /// Serialises this communicator's operations (a call and its wait for `InProgress`).
    issue: Mutex<()>,
    failure: Mutex<Option<String>>,
    /// When an abort started, until it finished (the watchdog escalates a stuck one).
    aborting: Mutex<Option<Instant>>,
    label: String,
    global_rank: usize,
    calls: AtomicU64,
    lineage: Lineage,
}

impl<A: NcclApi> Shared<A> {
    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Calls `f` on the communicator and, while it reports [`Status::InProgress`], polls it
    /// (releasing the lock in between, so that an abort gets in) until it is done, failed,
    /// aborted, or the timeout passed.
    fn call(&self, f: impl FnOnce(A::Comm) -> Status) -> std::result::Result<(), CallError> {
        let start = Instant::now();
        let mut backoff = Backoff::default();
        let live = || -> std::result::Result<A::Comm, CallError> {
            // A failure recorded by an abort still on its way counts as the abort.
            match (*lock(&self.comm), self.failure()) {
                (Some(c), None) => Ok(c),
                _ => Err(CallError::Aborted),
            }
        };
        let mut status = {
            let c = lock(&self.comm);
            match (*c, self.failure()) {
                (Some(c), None) => f(c),
                _ => return Err(CallError::Aborted),
            }
        };
        loop {
            match status {
                Status::Success => return Ok(()),
                Status::Failed(e) => return Err(CallError::Failed(e)),
                Status::InProgress => {
                    if start.elapsed() > self.lineage.timeout {
                        return Err(CallError::Failed(format!(
                            "still in progress after {:.0}s: a peer never joined",
                            self.lineage.timeout.as_secs_f64()
                        )));
                    }
                    backoff.wait();
                    live()?;
                    let c = lock(&self.comm);
                    let Some(c) = *c else {
                        return Err(CallError::Aborted);
                    };
                    status = A::async_error(c);
                }
            }
        }
    }
}

enum CallError {
    Aborted,
    Failed(String),
}

impl<A: NcclApi> Watched for Shared<A> {
    fn record_failure(&self, reason: &str) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            tracing::error!(group = %self.label, rank = self.global_rank, "aborting the NCCL communicator: {reason}");
            lock(&self.lineage.rank_failure).get_or_insert_with(|| reason.to_string());
            *f = Some(reason.to_string());
        }
    }

    fn abort_now(&self) {
        *lock(&self.aborting) = Some(Instant::now());
        // Taking the handle waits for a call in flight (one short non-blocking call).
        let taken = lock(&self.comm).take();
        if let Some(c) = taken {
            A::abort(c);
        }
        *lock(&self.aborting) = None;
    }

    fn abort_pending_since(&self) -> Option<Instant> {
        *lock(&self.aborting)
    }

    fn timeout(&self) -> Duration {
        self.lineage.timeout
    }

    fn global_rank(&self) -> usize {
        self.global_rank
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn world(&self) -> u64 {
        self.lineage.world
    }

    fn lineage(&self) -> usize {
        Arc::as_ptr(&self.lineage.rank_failure) as usize
    }

    fn poll_async_error(&self) -> Option<String> {
        // A call in flight holds the communicator: skip this round rather than wait for it.
        let c = self.comm.try_lock().ok()?;
        match A::async_error((*c)?) {
            Status::Failed(e) => Some(e),
            _ => None,
        }
    }
}

impl<A: NcclApi> Drop for Shared<A> {
    fn drop(&mut self) {
        // Every enqueued operation has completed by now (the watchdog holds the communicator
        // until they have): a normal teardown finalizes and destroys; a failed communicator is
        // aborted. Off this thread, which may be the watchdog's.
        let Some(c) = lock(&self.comm).take() else {
            return;
        };
        let failed = self.failure().is_some();
        let timeout = self.lineage.timeout;
        let spawned = std::thread::Builder::new()
            .name("nccl-teardown".into())
            .spawn(move || release::<A>(c, failed, timeout));
        if let Err(e) = spawned {
            tracing::error!("cannot start a thread to release an NCCL communicator: {e}");
        }
    }
}

/// `ncclCommFinalize` (polled to its end, within `timeout`) then `ncclCommDestroy`; abort
/// when the communicator failed or finalizing does not end.
fn release<A: NcclApi>(c: A::Comm, failed: bool, timeout: Duration) {
    if failed {
        return A::abort(c);
    }
    let start = Instant::now();
    let mut backoff = Backoff::default();
    let mut status = A::finalize(c);
    while status == Status::InProgress && start.elapsed() < timeout {
        backoff.wait();
        status = A::async_error(c);
    }
    match status {
        Status::Success => A::destroy(c),
        _ => A::abort(c),
    }
}

/// One rank of one NCCL communicator over the implementation `A`. Built with
/// [`EngineBackend::new`] (a new world) or by [`Comm::split`](super::Comm::split).
pub struct EngineBackend<A: NcclApi> {
    shared: Arc<Shared<A>>,
    rank: usize,
    size: usize,
    ranks: Vec<usize>,
    device: Device,
    /// Compare arguments across ranks first (the same on every rank of the group).
    check_args: AtomicBool,
    /// The group's communication stream, made by its first operation (`None`: it enqueues on
    /// the compute stream, a group of one rank or `CANDLE_PARALLEL_NCCL_STREAM=0`).
    comm_stream: OnceLock<Option<A::Stream>>,
}

/// An open asynchronous scope: the communicator (its address) and the done event (an
/// `A::Event`) of its last operation since.
type AsyncScope = (usize, Option<Box<dyn Any>>);

thread_local! {
    /// The asynchronous scopes open on this thread ([`Backend::begin_async`]), innermost last:
    /// their done events the compute stream waits for only where the caller waits for the work.
    static ASYNC_SCOPES: RefCell<Vec<AsyncScope>> = const { RefCell::new(Vec::new()) };
}

/// Whether groups may enqueue on a communication stream of their own
/// (`CANDLE_PARALLEL_NCCL_STREAM`, on unless `0`).
fn comm_streams_enabled() -> bool {
    std::env::var("CANDLE_PARALLEL_NCCL_STREAM").map_or(true, |v| v != "0")
}

/// What the compute stream waits for before it uses an asynchronous operation's results: the
/// done event of the operations started in one [`Backend::begin_async`] scope. Dropped without
/// [`Fence::wait`](super::lane::Fence::wait), it still orders the compute stream after them.
struct StreamFence<A: NcclApi> {
    compute: A::Stream,
    done: Option<A::Event>,
    /// The communication stream, alive until the compute stream waited for it (dropping the
    /// last one would end cudarc's multi-stream mode, in which buffers wait for its work).
    _comm: A::Stream,
}

impl<A: NcclApi> super::lane::Fence for StreamFence<A> {
    fn wait(mut self: Box<Self>) -> Result<()> {
        match self.done.take() {
            Some(done) => A::wait_event(&self.compute, &done),
            None => Ok(()),
        }
    }
}

impl<A: NcclApi> Drop for StreamFence<A> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            if let Err(e) = A::wait_event(&self.compute, &done) {
                tracing::warn!("ordering the compute stream after dropped communication: {e}");
            }
        }
    }
}

/// Tags of the argument-check messages of point-to-point calls.
const P2P_HEADER: i64 = 0x5032_5048; // "P2PH"
const VERDICT_OK: i64 = 0x5032_504f; // "P2PO"
const VERDICT_BAD: i64 = 0x5032_5042; // "P2PB"
const CHECK_LEN: usize = 16;
/// Dims a check message describes (after the tag, dtype, rank count and element count).
const DESCRIBED_DIMS: usize = CHECK_LEN - 4;

/// A tensor's description in a check message: tag, dtype, number of dims, element count, and
/// the first [`DESCRIBED_DIMS`] dims (zero-padded).
fn describe(tag: i64, dtype: DType, dims: &[usize]) -> Vec<i64> {
    let mut m = vec![0i64; CHECK_LEN];
    m[0] = tag;
    m[1] = dtype as i64;
    m[2] = dims.len() as i64;
    m[3] = dims.iter().product::<usize>() as i64;
    for (d, &v) in m[4..].iter_mut().zip(dims) {
        *d = v as i64;
    }
    m
}

/// A description as `F32[2, 3]`.
fn shown(m: &[i64]) -> String {
    let dtype = DTYPES
        .iter()
        .find(|d| **d as i64 == m[1])
        .map_or_else(|| format!("dtype#{}", m[1]), |d| format!("{d:?}"));
    let n = m[2].max(0) as usize;
    let dims: Vec<String> = m[4..4 + n.min(DESCRIBED_DIMS)]
        .iter()
        .map(|d| d.to_string())
        .collect();
    let more = if n > DESCRIBED_DIMS { ", ..." } else { "" };
    format!("{dtype}[{}{more}]", dims.join(", "))
}

impl<A: NcclApi> EngineBackend<A> {
    /// Joins rank `rank` of a new world of `world_size` ranks, all holding the same `id`, on
    /// `device`. Returns once every rank has joined, or fails after `timeout` naming this
    /// rank; the same `timeout` bounds every later operation.
    pub fn new(
        device: &Device,
        rank: usize,
        world_size: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<Arc<Self>> {
        if rank >= world_size {
            candle_core::bail!("NCCL world: rank {rank} is not a rank of a world of {world_size}")
        }
        let stream = A::stream(device, "NcclBackend::new")?;
        A::bind(&stream)?;
        let (comm, status) = A::init_rank(world_size, id.bytes(), rank, device);
        let comm = wait_ready::<A>(comm, status, timeout, id.world()).map_err(|e| {
            candle_core::Error::msg(format!(
                "rank {rank}: joining the NCCL world of {world_size} failed: {e}"
            ))
        })?;
        tracing::debug!(rank, world_size, "NCCL communicator ready");
        let backend = Self::wrap(
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
        );
        // Checked mode adds calls: every rank must agree on it, or the calls would not match.
        if world_size > 1 {
            let all =
                backend.gather_i64("agreeing on checked mode", &[backend.checked() as i64])?;
            backend
                .check_args
                .store(all.iter().any(|&c| c != 0), Ordering::SeqCst);
        }
        Ok(backend)
    }

    fn wrap(
        comm: A::Comm,
        label: String,
        rank: usize,
        ranks: Vec<usize>,
        device: Device,
        lineage: Lineage,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared::<A> {
            comm: Mutex::new(Some(comm)),
            issue: Mutex::new(()),
            failure: Mutex::new(None),
            aborting: Mutex::new(None),
            label,
            global_rank: ranks[rank],
            calls: AtomicU64::new(0),
            lineage,
        });
        let weak = Arc::downgrade(&shared);
        watchdog().register(weak);
        let check_args = std::env::var("CANDLE_PARALLEL_CHECK_COLLECTIVES")
            .is_ok_and(|v| !v.is_empty() && v != "0");
        Arc::new(Self {
            shared,
            rank,
            size: ranks.len(),
            ranks,
            device,
            check_args: AtomicBool::new(check_args),
            comm_stream: OnceLock::new(),
        })
    }

    /// The group's communication stream, made on first use; `None` where it enqueues on the
    /// compute stream (one rank: nothing to overlap, and a second stream would switch the
    /// device's buffers to event tracking for nothing).
    fn comm_stream(&self) -> Option<&A::Stream> {
        self.comm_stream
            .get_or_init(|| {
                if self.size < 2 || !comm_streams_enabled() {
                    return None;
                }
                A::new_stream(&self.device)
                    .map_err(|e| {
                        tracing::warn!(
                            "group {}: no communication stream ({e}); enqueuing on the compute stream",
                            self.shared.label
                        )
                    })
                    .ok()
            })
            .as_ref()
    }

    /// This communicator's key in [`ASYNC_SCOPES`].
    fn scope_key(&self) -> usize {
        Arc::as_ptr(&self.shared) as *const () as usize
    }

    /// The stream an operation named `what` enqueues on: the communication stream, made to
    /// wait for the compute stream's work so far (its inputs), or the compute stream.
    fn op_stream(&self, what: &str) -> Result<A::Stream> {
        match self.comm_stream() {
            Some(comm) => {
                self.after_compute(comm, what)?;
                Ok(comm.clone())
            }
            None => A::stream(&self.device, what),
        }
    }

    /// On the communication stream: `stream` waits (on the device) for everything the compute
    /// stream holds now (inputs written, buffers allocated for the operation).
    fn after_compute(&self, stream: &A::Stream, what: &str) -> Result<()> {
        if self.comm_stream().is_none() {
            return Ok(());
        }
        A::wait_event(stream, &A::record(&A::stream(&self.device, what)?)?)
    }

    /// After an operation enqueued on `stream`: the compute stream waits for it, now, or where
    /// the caller waits for the work of the asynchronous scope it belongs to.
    fn order_compute_after(&self, stream: &A::Stream, what: &str) -> Result<()> {
        if self.comm_stream().is_none() {
            return Ok(());
        }
        let done = A::record(stream)?;
        let key = self.scope_key();
        let unscoped = ASYNC_SCOPES.with(|scopes| {
            let mut scopes = scopes.borrow_mut();
            match scopes.iter_mut().rev().find(|(k, _)| *k == key) {
                Some((_, last)) => {
                    *last = Some(Box::new(done) as Box<dyn Any>);
                    None
                }
                None => Some(done),
            }
        });
        match unscoped {
            Some(done) => A::wait_event(&A::stream(&self.device, what)?, &done),
            None => Ok(()),
        }
    }

    /// Checks every collective's arguments across the group first (what
    /// `CANDLE_PARALLEL_CHECK_COLLECTIVES=1` turns on, agreed by every rank when a world is
    /// made), for this handle; every rank of the group must set the same.
    pub fn with_checked_arguments(self: Arc<Self>, on: bool) -> Arc<Self> {
        self.check_args.store(on, Ordering::SeqCst);
        self
    }

    fn checked(&self) -> bool {
        self.check_args.load(Ordering::SeqCst)
    }

    /// Waits for every operation enqueued on this rank's device stream, then fails when this
    /// communicator, or any other of this rank in the same world (split groups included), was
    /// aborted (a timeout, an NCCL error or a peer's failure): values computed since then are
    /// not to be trusted.
    pub fn check(&self) -> Result<()> {
        // Every stream of the device (Candle's compute stream is per host thread).
        let synced = A::synchronize_device(&self.device);
        let comm_synced = match self.comm_stream.get() {
            Some(Some(comm)) => A::synchronize(comm),
            _ => Ok(()),
        };
        self.not_aborted("check").and(synced).and(comm_synced)
    }

    /// Fails when a communicator of this rank in this world was aborted (no device wait: for
    /// values the host just downloaded, which waited already).
    fn not_aborted(&self, op: &str) -> Result<()> {
        let failure = lock(&self.shared.lineage.rank_failure).clone();
        match failure {
            Some(reason) => Err(self.aborted(op, reason)),
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

    /// Fails this communicator and every other of this rank in its world, and aborts them.
    fn abort_with(&self, reason: String) {
        watchdog().abort_lineage(&*self.shared, &reason)
    }

    /// Issues NCCL calls on `stream` (`f` gets the communicator; the calls of one group go in
    /// one `f`), then hands the work to the watchdog. Any NCCL error aborts the communicator:
    /// its peers would wait forever.
    fn issue(
        &self,
        what: &str,
        stream: &A::Stream,
        f: impl FnOnce(A::Comm) -> Status,
    ) -> Result<()> {
        let call = self.shared.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let desc = format!("{what} (call #{call} on group {})", self.shared.label);
        let _serial = lock(&self.shared.issue);
        A::bind(stream)?;
        // What the compute stream enqueued since `op_stream` (buffers allocated or filled for
        // this call) comes first too.
        self.after_compute(stream, what)?;
        match self.shared.call(f) {
            Ok(()) => {}
            Err(CallError::Aborted) => {
                let reason = self.shared.failure().unwrap_or_default();
                return Err(self.aborted(what, reason));
            }
            Err(CallError::Failed(e)) => {
                let reason = format!("{desc} failed on rank {}: {e}", self.shared.global_rank);
                self.abort_with(reason.clone());
                // Part of a group may have been enqueued: host memory stays in use until then.
                let _ = A::host_wait(stream);
                return Err(self.aborted(what, reason));
            }
        }
        let event = match A::record(stream) {
            Ok(e) => e,
            Err(e) => {
                let _ = A::host_wait(stream);
                return Err(e);
            }
        };
        watchdog().follow(Pending {
            comm: self.shared.clone(),
            done: Box::new(move || A::is_done(&event)),
            what: desc,
            since: Instant::now(),
        });
        // Host memory is read as soon as the op returns: wait for it (a no-op on CUDA). A wait
        // that ends because the watchdog aborted the communicator leaves garbage behind.
        A::host_wait(stream)?;
        if let Some(reason) = self.shared.failure() {
            return Err(self.aborted(what, reason));
        }
        self.order_compute_after(stream, what)
    }

    /// Every rank's `values` (the same length on every rank), in group-rank order; waits on
    /// the host for the result.
    fn gather_i64(&self, what: &str, values: &[i64]) -> Result<Vec<i64>> {
        let stream = self.op_stream(what)?;
        let send = A::upload_i64(&self.device, values)?;
        // SAFETY: the gather below writes every element.
        let mut all = unsafe {
            A::alloc(
                &self.device,
                &Shape::from(values.len() * self.size),
                DType::I64,
            )
        }?;
        let bytes = values.len() * 8;
        A::read(&send, &stream, |s| {
            A::write(&mut all, &stream, |r| {
                self.issue(what, &stream, |c| unsafe {
                    // SAFETY: both buffers are live and sized for the gather.
                    A::all_gather(c, s, r, bytes, &stream)
                })
            })
        })?;
        let all = A::download_i64(&all, &stream)?;
        self.not_aborted(what)?;
        Ok(all)
    }

    /// Sends small i64 messages of [`CHECK_LEN`] values to peers and receives one from each
    /// of `recv`, as one group: the argument checks of point-to-point calls.
    fn exchange_i64(
        &self,
        what: &str,
        send: &[(usize, Vec<i64>)],
        recv: &[usize],
    ) -> Result<Vec<Vec<i64>>> {
        if send.is_empty() && recv.is_empty() {
            return Ok(Vec::new());
        }
        let stream = self.op_stream(what)?;
        let mut payload = vec![0i64; CHECK_LEN * send.len().max(1)];
        for (i, (_, v)) in send.iter().enumerate() {
            payload[i * CHECK_LEN..i * CHECK_LEN + v.len()].copy_from_slice(v);
        }
        let out_buf = A::upload_i64(&self.device, &payload)?;
        let mut in_buf = A::upload_i64(&self.device, &vec![0i64; CHECK_LEN * recv.len().max(1)])?;
        let bytes = CHECK_LEN * 8;
        A::read(&out_buf, &stream, |o| {
            A::write(&mut in_buf, &stream, |i| {
                self.issue(what, &stream, |c| unsafe {
                    // SAFETY: the buffers hold CHECK_LEN values per message.
                    group::<A>(|| {
                        let mut st = Status::Success;
                        for (k, (dst, _)) in send.iter().enumerate() {
                            let r = A::send(c, o + (k * bytes) as Addr, bytes, *dst, &stream);
                            st = first_failure(st, r);
                        }
                        for (k, src) in recv.iter().enumerate() {
                            let r = A::recv(c, i + (k * bytes) as Addr, bytes, *src, &stream);
                            st = first_failure(st, r);
                        }
                        st
                    })
                })
            })
        })?;
        if recv.is_empty() {
            return Ok(Vec::new());
        }
        let v = A::download_i64(&in_buf, &stream)?;
        self.not_aborted(what)?;
        Ok(v.chunks(CHECK_LEN).map(<[i64]>::to_vec).collect())
    }

    /// With checked arguments: compares `what` (an operation code and its arguments, at most
    /// [`CHECK_LEN`] values) across the group and fails on every rank when they differ.
    fn check_same(&self, op: &str, what: &[i64], shown: &str) -> Result<()> {
        let mut mine = [i64::MIN; CHECK_LEN];
        for (d, &v) in mine.iter_mut().zip(what) {
            *d = v;
        }
        let all = self.gather_i64("argument check", &mine)?;
        // Every rank sees the same table, so every rank reaches the same verdict.
        if all.chunks(CHECK_LEN).all(|c| c == &all[..CHECK_LEN]) {
            return Ok(());
        }
        let per_rank = self
            .ranks
            .iter()
            .zip(all.chunks(CHECK_LEN))
            .map(|(r, c)| {
                let c: Vec<i64> = c.iter().copied().take_while(|&v| v != i64::MIN).collect();
                format!("rank {r}: {c:?}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(self.mismatch(
            op,
            format!(
                "ranks disagree on the operation or its arguments ({shown} on rank {}); per rank (op code, dtype, rank count, dims...): {per_rank}",
                self.shared.global_rank
            ),
        ))
    }

    fn mismatch(&self, op: &str, details: String) -> candle_core::Error {
        CommError::Mismatch {
            op: op.to_string(),
            call: self.shared.calls.load(Ordering::SeqCst),
            group: self.shared.label.clone(),
            details,
        }
        .into()
    }

    /// With checked arguments, after the fingerprints agreed: every rank's send and receive
    /// splits, so that each pair's `send_splits[j]` on rank `i` equals `recv_splits[i]` on
    /// rank `j`. Every rank checks the whole table and reaches the same verdict.
    fn check_splits(&self, send: &[usize], recv: &[usize]) -> Result<()> {
        let n = self.size;
        let mine: Vec<i64> = send.iter().chain(recv).map(|&c| c as i64).collect();
        let all = self.gather_i64("all_to_all split check", &mine)?;
        let row = |r: usize| &all[r * 2 * n..(r + 1) * 2 * n];
        for i in 0..n {
            for j in 0..n {
                let sent = row(i)[j];
                let expected = row(j)[n + i];
                if sent != expected {
                    return Err(self.mismatch(
                        "all_to_all",
                        format!(
                            "rank {} sends {sent} rows to rank {} but rank {} expects {expected} from it (recv_splits must equal the peers' send_splits: use Comm::exchange_split_sizes)",
                            self.ranks[i], self.ranks[j], self.ranks[j]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What every collective checks before it issues anything: a contiguous input on this
    /// communicator's device, a dtype NCCL moves, the arguments NCCL would overrun with, and
    /// (checked mode) the same call on every rank. Returns the input's element range and the
    /// stream to enqueue on.
    fn prelude(
        &self,
        op: &Collective,
        input: &A::Storage,
        layout: &Layout,
    ) -> Result<(usize, usize, A::Stream)> {
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
        if !A::on_device(input, &self.device) {
            return Err(self.invalid(
                name,
                format!(
                    "the tensor is not on this communicator's device {:?}: create it on Comm::device (another Device instance of the same GPU has its own stream, which the communicator's work would not be ordered with)",
                    self.device.location()
                ),
            ));
        }
        let dims = layout.dims();
        let n = self.size;
        let dtype = input.dtype();
        self.check_dtype(name, dtype)?;
        // Always checked, on this rank alone (free): what would make NCCL read or write out of
        // bounds.
        if let Collective::AllToAll {
            send_splits,
            recv_splits,
        } = op
        {
            self.check_all_to_all_locally(dims, send_splits, recv_splits)?;
        }
        if let Collective::Broadcast { root } = op {
            if *root >= n {
                return Err(self.invalid(
                    name,
                    format!("root {root} is not a rank of this group of {n}"),
                ));
            }
        }
        if self.checked() && n > 1 {
            let mut fingerprint = vec![op_code(op), dtype as i64, dims.len() as i64];
            match op {
                // Row counts legitimately differ per rank: compared pairwise below.
                Collective::AllToAll { .. } => {
                    fingerprint.extend(dims.iter().skip(1).map(|&d| d as i64))
                }
                _ => fingerprint.extend(dims.iter().map(|&d| d as i64)),
            }
            if fingerprint.len() > CHECK_LEN {
                return Err(self.invalid(
                    name,
                    format!(
                        "checked mode compares at most {} dims, got {dims:?}",
                        CHECK_LEN - 3
                    ),
                ));
            }
            self.check_same(name, &fingerprint, &format!("{op} on {dtype:?} {dims:?}"))?;
            if let Collective::AllToAll {
                send_splits,
                recv_splits,
            } = op
            {
                self.check_splits(send_splits, recv_splits)?;
            }
        }
        // After the checks, whose own operations the compute stream waits for.
        let stream = self.op_stream(name)?;
        Ok((start, end, stream))
    }

    /// The part of a collective that does not depend on the storage type.
    fn collective(
        &self,
        op: &Collective,
        input: &A::Storage,
        layout: &Layout,
    ) -> Result<(A::Storage, Shape)> {
        let name = op.name();
        let (start, end, stream) = self.prelude(op, input, layout)?;
        let dims = layout.dims();
        let n = self.size;
        let dtype = input.dtype();
        let Some(out_dims) = op.output_dims(dims, n) else {
            return Err(self.invalid(
                name,
                format!("{op} cannot apply to a tensor of shape {dims:?} in a group of {n}"),
            ));
        };
        let esz = dtype.size_in_bytes();
        let len = end - start;
        let out_shape = Shape::from(out_dims);
        // SAFETY: every byte of the output is written below before anyone reads it.
        let mut out = unsafe { A::alloc(&self.device, &out_shape, dtype) }?;
        if len == 0 && out_shape.elem_count() == 0 {
            return Ok((out, out_shape));
        }
        let reduce = |rop: ReduceOp| -> Result<ReduceOp> {
            if A::reduces(dtype) {
                Ok(rop)
            } else {
                Err(CommError::Unsupported {
                    backend: "nccl",
                    what: format!("{op} on {dtype:?} tensors (NCCL reduces u8, u32, i32, i64, f16, bf16, f32, f64)"),
                }
                .into())
            }
        };
        let in_off = (start * esz) as Addr;
        let outer: usize = dims
            .iter()
            .take(match op {
                Collective::AllGather { dim } | Collective::ReduceScatter { dim, .. } => *dim,
                _ => 0,
            })
            .product();
        // SAFETY (every NCCL call below): the addresses point into live buffers of the sizes
        // passed, ordered on `stream`.
        match op {
            Collective::AllReduce { op: rop } => {
                let rop = reduce(*rop)?;
                A::read(input, &stream, |ip| {
                    A::write(&mut out, &stream, |o| {
                        self.issue(name, &stream, |c| unsafe {
                            A::all_reduce(c, ip + in_off, o, len, dtype, rop, &stream)
                        })
                    })
                })?;
            }
            Collective::Broadcast { root } => {
                A::read(input, &stream, |ip| {
                    A::write(&mut out, &stream, |o| {
                        self.issue(name, &stream, |c| unsafe {
                            A::broadcast(c, ip + in_off, o, len * esz, *root, &stream)
                        })
                    })
                })?;
            }
            Collective::AllGather { .. } => {
                // NCCL gathers along the flat buffer; other dims are regrouped afterwards.
                let mut tmp = match outer {
                    1 => None,
                    _ => Some(unsafe { A::alloc(&self.device, &Shape::from(len * n), dtype) }?),
                };
                {
                    let dst = tmp.as_mut().unwrap_or(&mut out);
                    A::read(input, &stream, |ip| {
                        A::write(dst, &stream, |o| {
                            self.issue(name, &stream, |c| unsafe {
                                A::all_gather(c, ip + in_off, o, len * esz, &stream)
                            })
                        })
                    })?;
                }
                if let Some(tmp) = tmp {
                    regroup_gathered(&tmp, &mut out, n, outer, len / outer)?;
                }
            }
            Collective::ReduceScatter { op: rop, .. } => {
                let rop = reduce(*rop)?;
                let out_len = out_shape.elem_count();
                // NCCL scatters contiguous chunks: [outer, n * c] is regrouped to [n, outer, c].
                let tmp = match outer {
                    1 => None,
                    _ => {
                        let mut tmp = unsafe { A::alloc(&self.device, &Shape::from(len), dtype) }?;
                        regroup_for_scatter(input, start, &mut tmp, n, outer, len / outer / n)?;
                        Some(tmp)
                    }
                };
                let (src, src_off) = match &tmp {
                    Some(t) => (t, 0),
                    None => (input, in_off),
                };
                A::read(src, &stream, |ip| {
                    A::write(&mut out, &stream, |o| {
                        self.issue(name, &stream, |c| unsafe {
                            A::reduce_scatter(c, ip + src_off, o, out_len, dtype, rop, &stream)
                        })
                    })
                })?;
            }
            Collective::AllToAll {
                send_splits,
                recv_splits,
            } => {
                let row_bytes = dims.iter().skip(1).product::<usize>() * esz;
                A::read(input, &stream, |ip| {
                    A::write(&mut out, &stream, |o| {
                        self.all_to_all(
                            &stream,
                            ip + in_off,
                            o,
                            row_bytes,
                            send_splits,
                            recv_splits,
                        )
                    })
                })?;
            }
        }
        Ok((out, out_shape))
    }

    /// An all-reduce whose send and receive buffers are `storage` itself (NCCL reduces in
    /// place when they are the same address): no output is allocated.
    fn all_reduce_in_place(
        &self,
        rop: ReduceOp,
        storage: &mut A::Storage,
        layout: &Layout,
    ) -> Result<()> {
        let op = Collective::AllReduce { op: rop };
        let name = op.name();
        let (start, end, stream) = self.prelude(&op, storage, layout)?;
        let dtype = storage.dtype();
        if !A::reduces(dtype) {
            return Err(CommError::Unsupported {
                backend: "nccl",
                what: format!("{op} on {dtype:?} tensors (NCCL reduces u8, u32, i32, i64, f16, bf16, f32, f64)"),
            }
            .into());
        }
        let len = end - start;
        if len == 0 {
            return Ok(());
        }
        let off = (start * dtype.size_in_bytes()) as Addr;
        // SAFETY: the address points into a live buffer of `len` elements, ordered on
        // `stream`; NCCL allows the send and receive buffers to be the same.
        A::write(storage, &stream, |p| {
            self.issue(name, &stream, |c| unsafe {
                A::all_reduce(c, p + off, p + off, len, dtype, rop, &stream)
            })
        })
    }

    /// [`Self::all_reduce_in_place`] on storage of another type than `A`'s: an error, unless
    /// the types are the same.
    fn all_reduce_in_place_any<S: Any>(
        &self,
        rop: ReduceOp,
        storage: &mut S,
        layout: &Layout,
    ) -> Result<()> {
        let Some(s) = (storage as &mut dyn Any).downcast_mut::<A::Storage>() else {
            return Err(CommError::Unsupported {
                backend: "nccl",
                what: format!(
                    "all_reduce on tensors of another device than this communicator's {:?}; create them on Comm::device",
                    self.device.location()
                ),
            }
            .into());
        };
        self.all_reduce_in_place(rop, s, layout)
    }

    fn check_dtype(&self, op: &str, dtype: DType) -> Result<()> {
        if dtype.size_in_bytes() == 0 || matches!(dtype, DType::F4 | DType::F6E2M3 | DType::F6E3M2)
        {
            return Err(self.invalid(
                op,
                format!("{dtype:?} packs values into fractions of a byte, which NCCL cannot move: convert the tensor (to_dtype) first"),
            ));
        }
        Ok(())
    }

    fn check_all_to_all_locally(
        &self,
        dims: &[usize],
        send: &[usize],
        recv: &[usize],
    ) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        if send.len() != n || recv.len() != n {
            return Err(self.invalid(
                "all_to_all",
                format!(
                    "send_splits ({}) and recv_splits ({}) need one entry per rank of this group of {n}",
                    send.len(),
                    recv.len()
                ),
            ));
        }
        let rows = dims.first().copied().unwrap_or(1);
        if send.iter().sum::<usize>() != rows {
            return Err(self.invalid(
                "all_to_all",
                format!(
                    "send_splits {send:?} sum to {} but the input has {rows} rows (shape {dims:?})",
                    send.iter().sum::<usize>()
                ),
            ));
        }
        if send[me] != recv[me] {
            return Err(self.invalid(
                "all_to_all",
                format!(
                    "this rank keeps send_splits[{me}] = {} rows but recv_splits[{me}] = {} expects a different count from itself",
                    send[me], recv[me]
                ),
            ));
        }
        Ok(())
    }

    /// Ragged all-to-all as grouped send/recv; the part a rank keeps is a device copy.
    fn all_to_all(
        &self,
        stream: &A::Stream,
        in_ptr: Addr,
        out: Addr,
        row_bytes: usize,
        send: &[usize],
        recv: &[usize],
    ) -> Result<()> {
        let me = self.rank;
        let offsets = |splits: &[usize]| -> Vec<Addr> {
            splits
                .iter()
                .scan(0, |acc, &c| {
                    let o = *acc;
                    *acc += c;
                    Some((o * row_bytes) as Addr)
                })
                .collect()
        };
        let (so, ro) = (offsets(send), offsets(recv));
        if send[me] > 0 {
            // Before the exchange, so that its done event covers this copy too; after the
            // compute stream's work (the output's allocation).
            self.after_compute(stream, "all_to_all")?;
            // SAFETY: both ranges lie inside live buffers ordered on `stream`; the counts are
            // equal (checked by the caller).
            unsafe { A::copy(out + ro[me], in_ptr + so[me], send[me] * row_bytes, stream) }?;
        }
        self.issue("all_to_all", stream, |c| unsafe {
            // SAFETY: offsets and counts stay within the buffers (checked by the caller).
            group::<A>(|| {
                let mut st = Status::Success;
                for j in 0..self.size {
                    if j == me {
                        continue;
                    }
                    if send[j] > 0 {
                        let r = A::send(c, in_ptr + so[j], send[j] * row_bytes, j, stream);
                        st = first_failure(st, r);
                    }
                    if recv[j] > 0 {
                        let r = A::recv(c, out + ro[j], recv[j] * row_bytes, j, stream);
                        st = first_failure(st, r);
                    }
                }
                st
            })
        })
    }

    /// A group of point-to-point calls: peers checked here, arguments across the pairs in
    /// checked mode (before anything local can fail, so both sides always run the check),
    /// then the payloads.
    fn p2p_checked(
        &self,
        what: &str,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<Vec<Tensor>> {
        for (_, dst) in sends {
            self.check_peer(what, *dst, "destination")?;
        }
        for (src, _, _) in recvs {
            self.check_peer(what, *src, "source")?;
        }
        self.check_p2p(sends, recvs)?;
        for (x, _) in sends {
            self.check_dtype(what, x.dtype())?;
        }
        for (_, _, dtype) in recvs {
            self.check_dtype(what, *dtype)?;
        }
        self.p2p(what, sends, recvs)
    }

    fn check_peer(&self, op: &str, peer: usize, role: &str) -> Result<()> {
        if peer >= self.size {
            return Err(self.invalid(
                op,
                format!("{role} {peer} is not a rank of this group of {}", self.size),
            ));
        }
        Ok(())
    }

    /// The payloads of a group of sends and receives. Zero-byte messages are issued on
    /// neither side (the peer skips its side too), so no operation is left unmatched.
    fn p2p(
        &self,
        what: &str,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<Vec<Tensor>> {
        let stream = self.op_stream(what)?;
        let sends: Vec<(Tensor, usize)> = sends
            .iter()
            .map(|(x, dst)| Ok((x.contiguous()?, *dst)))
            .collect::<Result<_>>()?;
        let mut outs: Vec<A::Storage> = recvs
            .iter()
            // SAFETY: filled by the receives before any use (ordered on `stream`).
            .map(|(_, shape, dtype)| unsafe { A::alloc(&self.device, shape, *dtype) })
            .collect::<Result<_>>()?;
        let run = |send_addrs: &[SendAddr], recv_addrs: &[Addr]| -> Result<()> {
            let sends: Vec<_> = send_addrs.iter().filter(|s| s.1 > 0).collect();
            let recvs: Vec<(Addr, usize, usize)> = recv_addrs
                .iter()
                .zip(recvs)
                .map(|(&p, (src, shape, dtype))| {
                    (p, shape.elem_count() * dtype.size_in_bytes(), *src)
                })
                .filter(|r| r.1 > 0)
                .collect();
            if sends.is_empty() && recvs.is_empty() {
                return Ok(());
            }
            self.issue(what, &stream, |c| unsafe {
                // SAFETY: every address and size lies in a live buffer ordered on `stream`.
                group::<A>(|| {
                    let mut st = Status::Success;
                    for &&(p, bytes, dst) in &sends {
                        st = first_failure(st, A::send(c, p, bytes, dst, &stream));
                    }
                    for &(p, bytes, src) in &recvs {
                        st = first_failure(st, A::recv(c, p, bytes, src, &stream));
                    }
                    st
                })
            })
        };
        self.with_send_addrs(what, &stream, &sends, &mut Vec::new(), &mut |send_addrs| {
            with_write_addrs::<A, _>(&mut outs, &stream, &mut Vec::new(), &mut |recv_addrs| {
                run(send_addrs, recv_addrs)
            })
        })?;
        Ok(outs
            .into_iter()
            .zip(recvs)
            .map(|(o, (_, shape, _))| A::into_tensor(o, (*shape).clone()))
            .collect())
    }

    /// Calls `f` with the (address, bytes, destination) of every tensor of `sends`, each held
    /// for reading on `stream` meanwhile.
    fn with_send_addrs(
        &self,
        what: &str,
        stream: &A::Stream,
        sends: &[(Tensor, usize)],
        acc: &mut Vec<SendAddr>,
        f: &mut dyn FnMut(&[SendAddr]) -> Result<()>,
    ) -> Result<()> {
        let Some(((x, dst), rest)) = sends.split_first() else {
            return f(acc);
        };
        A::with_storage(x, what, |s, layout| {
            if !A::on_device(s, &self.device) {
                return Err(self.invalid(
                    what,
                    format!(
                        "the tensor is not on this communicator's device {:?}: create it on Comm::device",
                        self.device.location()
                    ),
                ));
            }
            let off = (layout.start_offset() * x.dtype().size_in_bytes()) as Addr;
            let bytes = x.elem_count() * x.dtype().size_in_bytes();
            A::read(s, stream, |p| {
                acc.push((p + off, bytes, *dst));
                self.with_send_addrs(what, stream, rest, acc, f)
            })
        })
    }

    /// Checked mode: each send's header goes to its destination and each receive judges its
    /// sender; the verdicts come back. Both exchanges always happen on both sides (a failure
    /// is a verdict, never an early return that would leave a peer waiting); a mismatched pair
    /// fails on both sides, naming both shapes.
    fn check_p2p(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<()> {
        if !self.checked() {
            return Ok(());
        }
        let headers: Vec<(usize, Vec<i64>)> = sends
            .iter()
            .map(|(x, dst)| (*dst, describe(P2P_HEADER, x.dtype(), x.dims())))
            .collect();
        let srcs: Vec<usize> = recvs.iter().map(|r| r.0).collect();
        let got = self.exchange_i64("send/recv argument check", &headers, &srcs)?;
        // Each receiver's verdict: its own expectation, tagged as agreeing or not.
        let verdicts: Vec<(usize, Vec<i64>)> = recvs
            .iter()
            .zip(&got)
            .map(|((src, shape, dtype), got)| {
                let want = describe(P2P_HEADER, *dtype, shape.dims());
                let tag = if got[..] == want[..] {
                    VERDICT_OK
                } else {
                    VERDICT_BAD
                };
                (*src, describe(tag, *dtype, shape.dims()))
            })
            .collect();
        let dsts: Vec<usize> = sends.iter().map(|s| s.1).collect();
        let back = self.exchange_i64("send/recv argument verdict", &verdicts, &dsts)?;
        for ((src, v), got) in verdicts.iter().zip(&got) {
            if v[0] != VERDICT_OK {
                return Err(self.p2p_mismatch(self.ranks[*src], got, self.shared.global_rank, v));
            }
        }
        for ((dst, h), v) in headers.iter().zip(&back) {
            if v[0] != VERDICT_OK {
                return Err(self.p2p_mismatch(self.shared.global_rank, h, self.ranks[*dst], v));
            }
        }
        Ok(())
    }

    /// Both sides' view of a mismatched pair; a message that is not what the protocol expects
    /// means the two ranks called different operations (`send` against `send_recv`, say).
    fn p2p_mismatch(
        &self,
        sender: usize,
        sent: &[i64],
        receiver: usize,
        wanted: &[i64],
    ) -> candle_core::Error {
        let details = if sent[0] != P2P_HEADER || !matches!(wanted[0], VERDICT_OK | VERDICT_BAD) {
            format!(
                "rank {sender} and rank {receiver} called different point-to-point operations (a send must meet a recv, and send_recv a send_recv or the matching send and recv)"
            )
        } else {
            format!(
                "rank {sender} sent {} but rank {receiver} expects {}",
                shown(sent),
                shown(wanted)
            )
        };
        self.mismatch("send/recv", details)
    }

    /// Runs a collective on storage of another type than `A`'s: an error, unless the types
    /// are the same (the CUDA implementation gets CUDA storage, the emulator CPU storage).
    fn collective_any<S: Any>(
        &self,
        op: &Collective,
        input: &S,
        layout: &Layout,
    ) -> Result<(S, Shape)> {
        let Some(s) = (input as &dyn Any).downcast_ref::<A::Storage>() else {
            return Err(CommError::Unsupported {
                backend: "nccl",
                what: format!(
                    "{op} on {} tensors: this communicator moves tensors of {:?}; create them on Comm::device",
                    if std::any::type_name::<S>().contains("Cpu") { "CPU" } else { "CUDA" },
                    self.device.location()
                ),
            }
            .into());
        };
        let (out, shape) = self.collective(op, s, layout)?;
        let out: Box<dyn Any> = Box::new(out);
        Ok((*out.downcast::<S>().expect("the same storage type"), shape))
    }
}

/// Where a send's bytes are: address, length, destination.
type SendAddr = (Addr, usize, usize);

/// Calls `f` with the address of every buffer of `outs`, each held for writing on `stream`.
fn with_write_addrs<A: NcclApi, R>(
    outs: &mut [A::Storage],
    stream: &A::Stream,
    acc: &mut Vec<Addr>,
    f: &mut dyn FnMut(&[Addr]) -> Result<R>,
) -> Result<R> {
    let Some((o, rest)) = outs.split_first_mut() else {
        return f(acc);
    };
    A::write(o, stream, |p| {
        acc.push(p);
        with_write_addrs::<A, R>(rest, stream, acc, f)
    })
}

/// The dtypes a header may name.
const DTYPES: [DType; 9] = [
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::BF16,
    DType::F16,
    DType::F32,
    DType::F64,
];

/// The first failure of two statuses.
fn first_failure(a: Status, b: Status) -> Status {
    match (a, b) {
        (Status::Failed(e), _) | (_, Status::Failed(e)) => Status::Failed(e),
        (Status::InProgress, _) | (_, Status::InProgress) => Status::InProgress,
        _ => Status::Success,
    }
}

/// Runs `f`'s calls as one NCCL group.
fn group<A: NcclApi>(f: impl FnOnce() -> Status) -> Status {
    let start = A::group_start();
    if let Status::Failed(e) = start {
        return Status::Failed(e);
    }
    let inner = f();
    let end = A::group_end();
    match (inner, end) {
        (Status::Failed(e), _) => Status::Failed(e),
        (_, end) => end,
    }
}

/// Waits between polls of a call in progress: most finish within microseconds (an enqueue), so
/// the first polls only yield; a join that waits for peers backs off to a millisecond.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn wait(&mut self) {
        self.0 += 1;
        match self.0 {
            0..=200 => std::thread::yield_now(),
            n => std::thread::sleep(Duration::from_micros(((n - 200) as u64 * 10).min(1000))),
        }
    }
}

/// Polls a new communicator until it is ready; aborts it on failure or timeout.
fn wait_ready<A: NcclApi>(
    comm: Option<A::Comm>,
    mut status: Status,
    timeout: Duration,
    world: u64,
) -> std::result::Result<A::Comm, String> {
    let Some(comm) = comm else {
        return Err(match status {
            Status::Failed(e) => e,
            _ => "NCCL returned no communicator".to_string(),
        });
    };
    let start = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match status {
            Status::Success => return Ok(comm),
            Status::Failed(e) => {
                A::abort(comm);
                return Err(e);
            }
            Status::InProgress if watchdog().world_aborted(world) => {
                A::abort(comm);
                return Err("the job was aborted while this rank waited for its peers".into());
            }
            Status::InProgress if start.elapsed() > timeout => {
                A::abort(comm);
                return Err(format!(
                    "not every rank joined within {:.0}s; check that all ranks were started with the same unique id",
                    timeout.as_secs_f64()
                ));
            }
            Status::InProgress => {
                backoff.wait();
                status = A::async_error(comm);
            }
        }
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

impl<A: NcclApi> Backend for EngineBackend<A> {
    fn begin_async(&self) -> bool {
        if self.comm_stream().is_none() {
            return false;
        }
        ASYNC_SCOPES.with(|s| s.borrow_mut().push((self.scope_key(), None)));
        true
    }

    fn end_async(&self) -> Option<Box<dyn super::lane::Fence>> {
        let key = self.scope_key();
        let last = ASYNC_SCOPES.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().rposition(|(k, _)| *k == key)?;
            s.remove(i).1
        })?;
        let done = *last.downcast::<A::Event>().ok()?;
        let compute = match A::stream(&self.device, "end_async") {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("no compute stream to order after the communication: {e}");
                return None;
            }
        };
        Some(Box::new(StreamFence::<A> {
            compute,
            done: Some(done),
            _comm: self.comm_stream()?.clone(),
        }))
    }

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

    fn collective_cpu(
        &self,
        op: &Collective,
        input: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.collective_any(op, input, layout)
    }

    fn collective_cuda(
        &self,
        op: &Collective,
        input: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.collective_any(op, input, layout)
    }

    fn all_reduce_in_place_cpu(
        &self,
        op: ReduceOp,
        storage: &mut CpuStorage,
        layout: &Layout,
    ) -> Result<()> {
        self.all_reduce_in_place_any(op, storage, layout)
    }

    fn all_reduce_in_place_cuda(
        &self,
        op: ReduceOp,
        storage: &mut CudaStorage,
        layout: &Layout,
    ) -> Result<()> {
        self.all_reduce_in_place_any(op, storage, layout)
    }

    fn send(&self, x: &Tensor, dst: usize) -> Result<()> {
        self.check_peer("send", dst, "destination")?;
        if dst == self.rank {
            return Err(self.invalid(
                "send",
                "a rank cannot send to itself: send waits for the matching recv, which this rank can only post afterwards. Use Comm::send_recv".to_string(),
            ));
        }
        self.p2p_checked("send", &[(x, dst)], &[]).map(|_| ())
    }

    fn recv(&self, src: usize, shape: &Shape, dtype: DType) -> Result<Tensor> {
        self.check_peer("recv", src, "source")?;
        if src == self.rank {
            return Err(self.invalid(
                "recv",
                "a rank cannot receive from itself with recv: use Comm::send_recv".to_string(),
            ));
        }
        Ok(self
            .p2p_checked("recv", &[], &[(src, shape, dtype)])?
            .remove(0))
    }

    fn exchange(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<Vec<Tensor>> {
        self.p2p_checked("exchange", sends, recvs)
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
        // Each new group is a new NCCL world: its first member makes the id, every rank learns
        // every id (ncclCommSplit's non-blocking form writes the new communicator at a time the
        // caller cannot observe, so it is not used).
        let mut members: Vec<(i64, usize, usize)> = match color {
            Some(color) => all
                .chunks(2)
                .enumerate()
                .filter(|(_, ck)| ck[0] == color as i64)
                .map(|(r, ck)| (ck[1], r, self.ranks[r]))
                .collect(),
            None => Vec::new(),
        };
        members.sort();
        let leader = members.first().is_some_and(|m| m.1 == self.rank);
        let mut mine = [0i64; 16];
        if leader {
            let id = A::unique_id()?;
            for (d, c) in mine.iter_mut().zip(id.chunks(8)) {
                *d = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        let ids = self.gather_i64("split ids", &mine)?;
        let Some(color) = color else { return Ok(None) };
        let ranks: Vec<usize> = members.iter().map(|m| m.2).collect();
        let rank = members
            .iter()
            .position(|m| m.1 == self.rank)
            .expect("this rank is a member");
        let leader_id = &ids[members[0].1 * 16..(members[0].1 + 1) * 16];
        let mut id = [0u8; 128];
        for (d, v) in id.chunks_mut(8).zip(leader_id) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        let stream = A::stream(&self.device, "split")?;
        A::bind(&stream)?;
        let (new, status) = A::init_rank(ranks.len(), &id, rank, &self.device);
        let lineage = &self.shared.lineage;
        let comm = wait_ready::<A>(new, status, lineage.timeout, lineage.world).map_err(|e| {
            candle_core::Error::msg(format!(
                "split: the new communicator for color {color} on rank {} failed: {e}",
                self.shared.global_rank
            ))
        })?;
        let label = group_label(label, &ranks);
        let b: Arc<dyn Backend> = Self::wrap(
            comm,
            label,
            rank,
            ranks,
            self.device.clone(),
            self.shared.lineage.clone(),
        )
        .with_checked_arguments(self.checked());
        Ok(Some(b))
    }

    fn abort(&self, reason: &str) {
        self.abort_with(format!(
            "rank {} aborted: {reason}",
            self.shared.global_rank
        ));
    }
}
