//! An emulator of NCCL's documented semantics over host memory, for the tests: the NCCL
//! backend's logic (`comm::nccl_engine`) runs on it with several ranks as threads, on machines
//! without GPUs. It is not a user-facing backend.
//!
//! What it reproduces, where NCCL differs from the local backend:
//! - **streams**: each thread has one stream (its compute stream), and a communicator may make
//!   more (`new_stream`); each is a worker thread that runs the enqueued work in order; a call
//!   returns once its work is enqueued, an event is done once the work before it is, and a
//!   stream made to wait for an event (`wait_event`) runs nothing after that point before it;
//! - **stream order**: work enqueued on a stream other than the calling thread's compute
//!   stream must come after a wait for everything the compute stream holds at that moment (or
//!   it could read inputs not yet written): a violation otherwise; each thread's stream calls
//!   are traced ([`HostNccl::take_trace`]) for the tests to check where the compute stream
//!   waits;
//! - **non-blocking communicators**: joining a world answers `InProgress` until every rank
//!   arrived; `async_error` reports it, and an injected background error;
//! - **point-to-point**: an ungrouped send or receive occupies its stream until the peer posts
//!   the matching call (a ring where everyone sends first deadlocks, as on GPUs); the calls of
//!   one group are posted together and progress together; sends and receives of different
//!   sizes never match (a hang);
//! - **collectives** whose ranks disagree on the operation, count, dtype or root never
//!   complete (a hang), as NCCL's do, unless the backend's own checks catch them first;
//! - **abort** releases the work waiting on the communicator, which reports failure;
//! - **misuse** that NCCL forbids is recorded, and [`HostNccl::violations`] lists it: a
//!   communicator used by two threads at once, used after its abort, or called while a
//!   previous call of its is still `InProgress`; work on a communication stream not ordered
//!   after the compute stream.
#![allow(dead_code)]

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cpu_backend::CpuDevice;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use candle_parallel::comm::nccl_engine::{Addr, NcclApi, Status};
use candle_parallel::ReduceOp;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::ThreadId;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// NCCL's semantics over host memory (see the module documentation).
pub struct HostNccl;

// ---------------------------------------------------------------------------------- streams

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct StreamState {
    jobs: VecDeque<Job>,
    enqueued: u64,
    completed: u64,
    closed: bool,
}

/// A stream: a worker thread running its jobs in order.
#[derive(Default)]
pub struct EmuStream {
    /// Unique in the process (for traces and messages).
    pub id: usize,
    state: Mutex<StreamState>,
    cv: Condvar,
    /// Per other stream (by id), the most of its work this one was made to wait for.
    waited_for: Mutex<HashMap<usize, u64>>,
}

/// What a thread did to its streams, in order ([`HostNccl::take_trace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamCall {
    /// An NCCL call's (or copy's) work enqueued on the stream.
    Work { stream: usize, what: String },
    /// The stream made to wait for the first `seq` jobs of stream `on`.
    Wait { stream: usize, on: usize, seq: u64 },
}

impl EmuStream {
    fn start() -> Arc<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let s = Arc::new(Self {
            id: NEXT.fetch_add(1, Ordering::SeqCst),
            ..Self::default()
        });
        // The worker holds the stream weakly: a stream nobody holds any more (a dropped
        // communicator's) ends its worker once its queue is empty.
        let w: Weak<Self> = Arc::downgrade(&s);
        std::thread::Builder::new()
            .name("emulated-stream".into())
            .spawn(move || loop {
                let Some(me) = w.upgrade() else { return };
                let job = {
                    let mut st = lock(&me.state);
                    loop {
                        if let Some(j) = st.jobs.pop_front() {
                            break Some(j);
                        }
                        if st.closed {
                            return;
                        }
                        let (g, t) = me
                            .cv
                            .wait_timeout(st, std::time::Duration::from_millis(50))
                            .unwrap_or_else(|e| e.into_inner());
                        st = g;
                        if t.timed_out() {
                            break None; // let go of the stream, look again
                        }
                    }
                };
                let Some(job) = job else { continue };
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                    violation(format!("an emulated stream job panicked: {p:?}"));
                }
                lock(&me.state).completed += 1;
                me.cv.notify_all();
            })
            .expect("cannot start an emulated stream");
        s
    }

    /// Enqueues an NCCL call's work: traced, and checked to come after the calling thread's
    /// compute stream's work when it goes on another stream.
    fn enqueue_work(self: &Arc<Self>, what: &str, job: Job) -> u64 {
        let compute = this_stream();
        if compute.id != self.id {
            let waited = lock(&self.waited_for)
                .get(&compute.id)
                .copied()
                .unwrap_or(0);
            let pending = compute.enqueued();
            if waited < pending {
                violation(format!(
                    "{what} enqueued on stream {} after waiting for {waited} of the {pending} jobs of the compute stream {}: its inputs may not be written yet",
                    self.id, compute.id
                ));
            }
        }
        trace(StreamCall::Work {
            stream: self.id,
            what: what.to_string(),
        });
        self.enqueue(job)
    }

    fn enqueue(&self, job: Job) -> u64 {
        let mut st = lock(&self.state);
        st.jobs.push_back(job);
        st.enqueued += 1;
        self.cv.notify_all();
        st.enqueued
    }

    fn completed(&self) -> u64 {
        lock(&self.state).completed
    }

    fn wait_for(&self, seq: u64) {
        let mut st = lock(&self.state);
        while st.completed < seq {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn enqueued(&self) -> u64 {
        lock(&self.state).enqueued
    }
}

/// Closes the thread's stream when the thread ends (its worker finishes the queue and exits).
struct StreamOwner(Arc<EmuStream>);

impl Drop for StreamOwner {
    fn drop(&mut self) {
        lock(&self.0.state).closed = true;
        self.0.cv.notify_all();
    }
}

/// A buffer allocated (or filled) in the compute stream's order: a job on it, which another
/// stream using the buffer must wait for.
fn allocated_on_compute() {
    this_stream().enqueue(Box::new(|| {}));
}

fn trace(call: StreamCall) {
    TRACE.with(|t| t.borrow_mut().push(call));
}

thread_local! {
    static STREAM: StreamOwner = StreamOwner(EmuStream::start());
    /// This thread's stream calls ([`HostNccl::take_trace`]).
    static TRACE: RefCell<Vec<StreamCall>> = const { RefCell::new(Vec::new()) };
    /// Depth of `group_start`, the calls collected in the open group and their stream.
    static GROUP: RefCell<(usize, Vec<P2pOp>, Option<Arc<EmuStream>>)> =
        const { RefCell::new((0, Vec::new(), None)) };
}

fn this_stream() -> Arc<EmuStream> {
    STREAM.with(|s| s.0.clone())
}

// ------------------------------------------------------------------------ communicators

/// Every communicator ever made, by handle.
fn comms() -> &'static Mutex<Vec<Arc<EmuComm>>> {
    static COMMS: OnceLock<Mutex<Vec<Arc<EmuComm>>>> = OnceLock::new();
    COMMS.get_or_init(Default::default)
}

fn comm(handle: usize) -> Arc<EmuComm> {
    lock(comms())[handle].clone()
}

fn violation(msg: String) {
    lock(violations()).push(msg);
}

fn violations() -> &'static Mutex<Vec<String>> {
    static V: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

/// The members of one communicator.
struct Group {
    size: usize,
    state: Mutex<GroupState>,
    cv: Condvar,
}

#[derive(Default)]
struct GroupState {
    joined: usize,
    /// Collective number → each rank's posted call.
    colls: HashMap<u64, Slot>,
    /// (source, destination) → posted sends and receives, in order.
    sends: HashMap<(usize, usize), VecDeque<Post>>,
    recvs: HashMap<(usize, usize), VecDeque<Post>>,
    /// Posts whose transfer is done.
    done: HashSet<u64>,
}

struct Slot {
    posts: Vec<Option<CollPost>>,
    /// Ranks done reading the inputs (a rank writes its output only after all are: NCCL
    /// allows an output to be the input itself, an in-place all-reduce).
    read: usize,
    finished: usize,
    left: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum CollKind {
    AllReduce {
        count: usize,
        dtype: DType,
        op: ReduceOp,
    },
    AllGather {
        bytes: usize,
    },
    ReduceScatter {
        count: usize,
        dtype: DType,
        op: ReduceOp,
    },
    Broadcast {
        bytes: usize,
        root: usize,
    },
}

#[derive(Clone, Copy)]
struct CollPost {
    kind: CollKind,
    send: Addr,
}

#[derive(Clone, Copy)]
struct Post {
    id: u64,
    addr: Addr,
    bytes: usize,
}

/// One rank's communicator.
pub struct EmuComm {
    /// Its group and its rank there.
    group: Mutex<Option<(Arc<Group>, usize)>>,
    aborted: AtomicBool,
    /// A background error (see [`HostNccl::inject_async_error`]).
    injected: Mutex<Option<String>>,
    creator: ThreadId,
    /// Calls in flight on it: NCCL allows one thread at a time.
    in_use: AtomicBool,
    /// Collectives run so far (in stream order).
    colls: AtomicU64,
    /// A call of this communicator answered `InProgress` and was not yet polled to an end.
    in_progress: AtomicBool,
    /// Polls left before the call in progress is done; calls made so far.
    polls_left: AtomicU64,
    calls: AtomicU64,
}

impl EmuComm {
    fn create(group: Option<(Arc<Group>, usize)>) -> usize {
        let c = Arc::new(Self {
            group: Mutex::new(group),
            aborted: AtomicBool::new(false),
            injected: Mutex::new(None),
            creator: std::thread::current().id(),
            in_use: AtomicBool::new(false),
            colls: AtomicU64::new(0),
            in_progress: AtomicBool::new(false),
            polls_left: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        });
        let mut all = lock(comms());
        all.push(c);
        all.len() - 1
    }

    fn group(&self) -> Option<(Arc<Group>, usize)> {
        lock(&self.group).clone()
    }

    /// Marks the communicator in use by this call; records NCCL's forbidden uses.
    fn enter(self: &Arc<Self>, handle: usize, what: &str, may_poll: bool) -> InUse {
        if self.in_use.swap(true, Ordering::SeqCst) {
            violation(format!(
                "communicator {handle}: {what} while another thread is inside a call on it"
            ));
        }
        if self.aborted.load(Ordering::SeqCst) {
            violation(format!("communicator {handle}: {what} after its abort"));
        }
        if !may_poll && self.in_progress.load(Ordering::SeqCst) {
            violation(format!(
                "communicator {handle}: {what} while its previous call is still in progress"
            ));
        }
        // Calls take time in NCCL too: a call that overlaps another is then caught reliably.
        std::thread::sleep(std::time::Duration::from_micros(50));
        InUse(self.clone())
    }
}

struct InUse(Arc<EmuComm>);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.in_use.store(false, Ordering::SeqCst);
    }
}

fn next_post_id() -> u64 {
    static ID: AtomicU64 = AtomicU64::new(1);
    ID.fetch_add(1, Ordering::SeqCst)
}

/// Worlds being joined, by id.
fn worlds() -> &'static Mutex<HashMap<[u8; 128], Arc<Group>>> {
    static W: OnceLock<Mutex<HashMap<[u8; 128], Arc<Group>>>> = OnceLock::new();
    W.get_or_init(Default::default)
}

impl HostNccl {
    /// Makes the communicators this thread created report `msg` as a background error (as
    /// NCCL does when a peer's connection is lost).
    pub fn inject_async_error(msg: &str) {
        let me = std::thread::current().id();
        for c in lock(comms()).iter().filter(|c| c.creator == me) {
            *lock(&c.injected) = Some(msg.to_string());
        }
    }

    /// NCCL rules broken so far, by any test in this process.
    pub fn violations() -> Vec<String> {
        lock(violations()).clone()
    }

    /// [`HostNccl::violations`], cleared (so that one broken rule fails one test).
    pub fn take_violations() -> Vec<String> {
        std::mem::take(&mut *lock(violations()))
    }

    /// This thread's stream calls since the last take, in order.
    pub fn take_trace() -> Vec<StreamCall> {
        TRACE.with(|t| std::mem::take(&mut *t.borrow_mut()))
    }

    /// The id of this thread's (compute) stream.
    pub fn compute_stream() -> usize {
        this_stream().id
    }
}

// ------------------------------------------------------------------------- the work

/// Host memory as a byte slice.
///
/// # Safety
/// `addr..addr + len` lies in a live buffer.
unsafe fn bytes<'a>(addr: Addr, len: usize) -> &'a [u8] {
    std::slice::from_raw_parts(addr as *const u8, len)
}

unsafe fn bytes_mut<'a>(addr: Addr, len: usize) -> &'a mut [u8] {
    std::slice::from_raw_parts_mut(addr as *mut u8, len)
}

fn storage_bytes(s: &CpuStorage) -> Vec<u8> {
    macro_rules! raw {
        ($v:expr) => {{
            let v = $v;
            // SAFETY: plain old data, viewed as bytes.
            unsafe { bytes(v.as_ptr() as Addr, std::mem::size_of_val(&v[..])) }.to_vec()
        }};
    }
    match s {
        CpuStorage::U8(v) => v.clone(),
        CpuStorage::U32(v) => raw!(v),
        CpuStorage::I16(v) => raw!(v),
        CpuStorage::I32(v) => raw!(v),
        CpuStorage::I64(v) => raw!(v),
        CpuStorage::BF16(v) => raw!(v),
        CpuStorage::F16(v) => raw!(v),
        CpuStorage::F32(v) => raw!(v),
        CpuStorage::F64(v) => raw!(v),
        other => panic!("emulator: no reduction for {:?}", other.dtype()),
    }
}

/// Reduces `count` elements from each address, with candle on the CPU: in rank order, 16-bit
/// floats accumulated in f32, as the local backend does (NCCL's own rounding depends on its
/// algorithm; the emulator is about semantics, and matching the local backend bit for bit
/// lets the same tests run on both).
fn reduce(inputs: &[Addr], count: usize, dtype: DType, op: ReduceOp) -> Vec<u8> {
    let esz = dtype.size_in_bytes();
    let acc_dtype = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let load = |a: Addr| {
        // SAFETY: each input holds `count` elements (the collective matched).
        Tensor::from_raw_buffer(
            unsafe { bytes(a, count * esz) },
            dtype,
            &[count],
            &Device::Cpu,
        )
        .and_then(|t| t.to_dtype(acc_dtype))
        .expect("emulator: input")
    };
    let mut acc = load(inputs[0]);
    for &a in &inputs[1..] {
        let x = load(a);
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => acc + x,
            ReduceOp::Max => acc.maximum(&x),
            ReduceOp::Min => acc.minimum(&x),
        }
        .expect("emulator: reduction");
    }
    if op == ReduceOp::Avg {
        let n = Tensor::full(inputs.len() as f64, count, &Device::Cpu)
            .and_then(|n| n.to_dtype(acc_dtype))
            .expect("emulator: count");
        acc = acc.div(&n).expect("emulator: average");
    }
    let out = acc.to_dtype(dtype).expect("emulator: dtype");
    let (s, _) = out.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => storage_bytes(c),
        _ => unreachable!("CPU tensor"),
    }
}

/// Waits on the group until `ready`, or the communicator is aborted (returns false).
fn wait_until<'a>(
    g: &'a Group,
    me: &EmuComm,
    mut st: MutexGuard<'a, GroupState>,
    mut ready: impl FnMut(&mut GroupState) -> bool,
) -> (MutexGuard<'a, GroupState>, bool) {
    loop {
        if ready(&mut st) {
            return (st, true);
        }
        if me.aborted.load(Ordering::SeqCst) {
            return (st, false);
        }
        st =
            g.cv.wait_timeout(st, std::time::Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
    }
}

/// A collective on the stream: meets the peers' calls of the same number, then computes this
/// rank's output from their inputs. Calls that disagree never complete.
fn run_collective(me: Arc<EmuComm>, kind: CollKind, send: Addr, recv: Addr) {
    let Some((g, rank)) = me.group() else { return };
    let seq = me.colls.fetch_add(1, Ordering::SeqCst);
    let n = g.size;
    let mut st = lock(&g.state);
    st.colls
        .entry(seq)
        .or_insert_with(|| Slot {
            posts: vec![None; n],
            read: 0,
            finished: 0,
            left: 0,
        })
        .posts[rank] = Some(CollPost { kind, send });
    g.cv.notify_all();
    let (mut st, ok) = wait_until(&g, &me, st, |st| {
        let posts = &st.colls[&seq].posts;
        posts.iter().all(|p| p.is_some_and(|p| p.kind == kind))
    });
    if !ok {
        // Aborted before every peer came: withdraw, so that no one reads this buffer later.
        if let Some(slot) = st.colls.get_mut(&seq) {
            slot.posts[rank] = None;
        }
        return;
    }
    let inputs: Vec<Addr> = st.colls[&seq]
        .posts
        .iter()
        .map(|p| p.unwrap().send)
        .collect();
    drop(st);
    // SAFETY: every peer's input stays live until all have finished (below), and the output
    // is this rank's own buffer of the size the engine allocated.
    let out: Vec<u8> = unsafe {
        match kind {
            CollKind::AllReduce { count, dtype, op } => reduce(&inputs, count, dtype, op),
            CollKind::AllGather { bytes: b } => inputs
                .iter()
                .flat_map(|&a| bytes(a, b).iter().copied())
                .collect(),
            CollKind::ReduceScatter { count, dtype, op } => {
                let off = (rank * count * dtype.size_in_bytes()) as Addr;
                let chunks: Vec<Addr> = inputs.iter().map(|a| a + off).collect();
                reduce(&chunks, count, dtype, op)
            }
            CollKind::Broadcast { bytes: b, root } => bytes(inputs[root], b).to_vec(),
        }
    };
    // Every rank has read every input before any writes its output (which may be its input).
    let mut st = lock(&g.state);
    st.colls.get_mut(&seq).unwrap().read += 1;
    g.cv.notify_all();
    while st.colls[&seq].read < n {
        st = g.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    drop(st);
    // SAFETY: as above.
    unsafe { bytes_mut(recv, out.len()).copy_from_slice(&out) };
    // Peers read this rank's input: leave only once every rank is done (bounded work).
    let mut st = lock(&g.state);
    st.colls.get_mut(&seq).unwrap().finished += 1;
    g.cv.notify_all();
    while st.colls[&seq].finished < n {
        st = g.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    let slot = st.colls.get_mut(&seq).unwrap();
    slot.left += 1;
    if slot.left == n {
        st.colls.remove(&seq);
    }
    g.cv.notify_all();
}

#[derive(Clone, Copy)]
struct P2pOp {
    comm: usize,
    send: bool,
    addr: Addr,
    bytes: usize,
    peer: usize,
}

/// Moves what can be moved: the first send and receive of each pair, when their sizes agree.
fn match_p2p(st: &mut GroupState) {
    let keys: Vec<(usize, usize)> = st.sends.keys().copied().collect();
    for k in keys {
        while let (Some(s), Some(r)) = (
            st.sends.get(&k).and_then(|q| q.front()).copied(),
            st.recvs.get(&k).and_then(|q| q.front()).copied(),
        ) {
            if s.bytes != r.bytes {
                break; // never matches: NCCL would hang
            }
            // SAFETY: both posts are live until they are marked done.
            unsafe { bytes_mut(r.addr, r.bytes).copy_from_slice(bytes(s.addr, s.bytes)) };
            st.sends.get_mut(&k).unwrap().pop_front();
            st.recvs.get_mut(&k).unwrap().pop_front();
            st.done.insert(s.id);
            st.done.insert(r.id);
        }
    }
}

/// Posts a group of point-to-point calls together and waits until every one has moved.
fn run_p2p(ops: Vec<P2pOp>) {
    let Some(first) = ops.first() else { return };
    let me = comm(first.comm);
    let Some((g, rank)) = me.group() else { return };
    let mut st = lock(&g.state);
    let mut mine = Vec::new();
    for op in &ops {
        let post = Post {
            id: next_post_id(),
            addr: op.addr,
            bytes: op.bytes,
        };
        mine.push((post.id, op.send, op.peer));
        let key = if op.send {
            (rank, op.peer)
        } else {
            (op.peer, rank)
        };
        let q = if op.send {
            &mut st.sends
        } else {
            &mut st.recvs
        };
        q.entry(key).or_default().push_back(post);
    }
    match_p2p(&mut st);
    g.cv.notify_all();
    let (mut st, ok) = wait_until(&g, &me, st, |st| {
        mine.iter().all(|(id, _, _)| st.done.contains(id))
    });
    if !ok {
        // Withdraw what did not move: no peer may touch this memory later.
        for (id, send, peer) in &mine {
            let key = if *send { (rank, *peer) } else { (*peer, rank) };
            let q = if *send { &mut st.sends } else { &mut st.recvs };
            if let Some(q) = q.get_mut(&key) {
                q.retain(|p| p.id != *id);
            }
        }
    }
    for (id, _, _) in &mine {
        st.done.remove(id);
    }
    g.cv.notify_all();
}

// ------------------------------------------------------------------------- the API

fn enqueue_p2p(op: P2pOp, stream: &Arc<EmuStream>) -> Status {
    let grouped = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.0 > 0 {
            g.1.push(op);
            match &g.2 {
                Some(s) if s.id != stream.id => violation(format!(
                    "one NCCL group's calls on two streams ({} and {})",
                    s.id, stream.id
                )),
                _ => g.2 = Some(stream.clone()),
            }
            true
        } else {
            false
        }
    });
    if grouped {
        return Status::Success;
    }
    stream.enqueue_work("p2p", Box::new(move || run_p2p(vec![op])));
    enqueued(&comm(op.comm))
}

fn enqueue_collective(
    handle: usize,
    what: &str,
    kind: CollKind,
    send: Addr,
    recv: Addr,
    stream: &Arc<EmuStream>,
) -> Status {
    let me = comm(handle);
    let _in = me.enter(handle, what, false);
    if GROUP.with(|g| g.borrow().0 > 0) {
        return Status::Failed("emulator: collectives inside a group are not emulated".into());
    }
    let c = me.clone();
    stream.enqueue_work(what, Box::new(move || run_collective(c, kind, send, recv)));
    enqueued(&me)
}

/// What a call that enqueued its work answers: every third one `InProgress` for two polls (as a
/// non-blocking NCCL call answers while it connects to peers), so that callers must poll.
fn enqueued(c: &EmuComm) -> Status {
    if c.calls.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
        c.polls_left.store(2, Ordering::SeqCst);
        c.in_progress.store(true, Ordering::SeqCst);
        return Status::InProgress;
    }
    Status::Success
}

fn ready_status(c: &EmuComm) -> Status {
    if let Some(e) = lock(&c.injected).clone() {
        return Status::Failed(format!("emulated background error: {e}"));
    }
    if c.aborted.load(Ordering::SeqCst) {
        return Status::Failed("the communicator was aborted".into());
    }
    if c.polls_left.load(Ordering::SeqCst) > 0 {
        c.polls_left.fetch_sub(1, Ordering::SeqCst);
        return Status::InProgress;
    }
    match c.group() {
        Some((g, _)) if lock(&g.state).joined >= g.size => Status::Success,
        _ => Status::InProgress,
    }
}

impl NcclApi for HostNccl {
    type Comm = usize;
    type Storage = CpuStorage;
    type Stream = Arc<EmuStream>;
    type Event = (Arc<EmuStream>, u64);

    fn unique_id() -> Result<[u8; 128]> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut id = [0u8; 128];
        id[..8].copy_from_slice(&n.to_le_bytes());
        id[8..16].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
        Ok(id)
    }

    fn init_rank(
        nranks: usize,
        id: &[u8; 128],
        rank: usize,
        _: &Device,
    ) -> (Option<usize>, Status) {
        let g = lock(worlds())
            .entry(*id)
            .or_insert_with(|| {
                Arc::new(Group {
                    size: nranks,
                    state: Mutex::default(),
                    cv: Condvar::new(),
                })
            })
            .clone();
        if g.size != nranks || rank >= nranks {
            return (
                None,
                Status::Failed(format!("invalid rank {rank} of {nranks}")),
            );
        }
        lock(&g.state).joined += 1;
        g.cv.notify_all();
        let h = EmuComm::create(Some((g, rank)));
        let c = comm(h);
        let st = ready_status(&c);
        c.in_progress
            .store(st == Status::InProgress, Ordering::SeqCst);
        (Some(h), st)
    }

    fn async_error(handle: usize) -> Status {
        let c = comm(handle);
        let _in = c.enter(handle, "async_error", true);
        let st = ready_status(&c);
        if st != Status::InProgress {
            c.in_progress.store(false, Ordering::SeqCst);
        }
        st
    }

    fn abort(handle: usize) {
        let c = comm(handle);
        {
            let _in = c.enter(handle, "abort", true);
            c.aborted.store(true, Ordering::SeqCst);
        }
        if let Some((g, _)) = c.group() {
            let _st = lock(&g.state);
            g.cv.notify_all();
        }
    }

    fn group_start() -> Status {
        GROUP.with(|g| g.borrow_mut().0 += 1);
        Status::Success
    }

    fn group_end() -> Status {
        let (ops, stream) = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            g.0 -= 1;
            if g.0 == 0 {
                (std::mem::take(&mut g.1), g.2.take())
            } else {
                (Vec::new(), None)
            }
        });
        let (Some(first), Some(stream)) = (ops.first().map(|o| o.comm), stream) else {
            return Status::Success;
        };
        stream.enqueue_work("grouped p2p", Box::new(move || run_p2p(ops)));
        enqueued(&comm(first))
    }

    fn finalize(handle: usize) -> Status {
        let c = comm(handle);
        let _in = c.enter(handle, "finalize", false);
        enqueued(&c)
    }

    fn destroy(handle: usize) {
        let c = comm(handle);
        let _in = c.enter(handle, "destroy", true);
        c.aborted.store(true, Ordering::SeqCst);
    }

    fn reduces(dtype: DType) -> bool {
        matches!(
            dtype,
            DType::U8
                | DType::U32
                | DType::I32
                | DType::I64
                | DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
        )
    }

    unsafe fn all_reduce(
        c: usize,
        send: Addr,
        recv: Addr,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: &Arc<EmuStream>,
    ) -> Status {
        enqueue_collective(
            c,
            "all_reduce",
            CollKind::AllReduce { count, dtype, op },
            send,
            recv,
            stream,
        )
    }

    unsafe fn all_gather(
        c: usize,
        send: Addr,
        recv: Addr,
        bytes: usize,
        stream: &Arc<EmuStream>,
    ) -> Status {
        enqueue_collective(
            c,
            "all_gather",
            CollKind::AllGather { bytes },
            send,
            recv,
            stream,
        )
    }

    unsafe fn reduce_scatter(
        c: usize,
        send: Addr,
        recv: Addr,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: &Arc<EmuStream>,
    ) -> Status {
        enqueue_collective(
            c,
            "reduce_scatter",
            CollKind::ReduceScatter { count, dtype, op },
            send,
            recv,
            stream,
        )
    }

    unsafe fn broadcast(
        c: usize,
        send: Addr,
        recv: Addr,
        bytes: usize,
        root: usize,
        stream: &Arc<EmuStream>,
    ) -> Status {
        enqueue_collective(
            c,
            "broadcast",
            CollKind::Broadcast { bytes, root },
            send,
            recv,
            stream,
        )
    }

    unsafe fn send(
        c: usize,
        buf: Addr,
        bytes: usize,
        peer: usize,
        stream: &Arc<EmuStream>,
    ) -> Status {
        let me = comm(c);
        let _in = me.enter(c, "send", false);
        enqueue_p2p(
            P2pOp {
                comm: c,
                send: true,
                addr: buf,
                bytes,
                peer,
            },
            stream,
        )
    }

    unsafe fn recv(
        c: usize,
        buf: Addr,
        bytes: usize,
        peer: usize,
        stream: &Arc<EmuStream>,
    ) -> Status {
        let me = comm(c);
        let _in = me.enter(c, "recv", false);
        enqueue_p2p(
            P2pOp {
                comm: c,
                send: false,
                addr: buf,
                bytes,
                peer,
            },
            stream,
        )
    }

    fn stream(device: &Device, op: &str) -> Result<Arc<EmuStream>> {
        match device {
            Device::Cpu => Ok(this_stream()),
            other => candle_core::bail!("{op}: the emulator moves CPU tensors, got {other:?}"),
        }
    }

    fn new_stream(device: &Device) -> Result<Arc<EmuStream>> {
        match device {
            Device::Cpu => Ok(EmuStream::start()),
            other => {
                candle_core::bail!("new_stream: the emulator moves CPU tensors, got {other:?}")
            }
        }
    }

    fn wait_event(stream: &Arc<EmuStream>, (on, seq): &(Arc<EmuStream>, u64)) -> Result<()> {
        if on.id != stream.id {
            let mut w = lock(&stream.waited_for);
            let e = w.entry(on.id).or_insert(0);
            *e = (*e).max(*seq);
        }
        trace(StreamCall::Wait {
            stream: stream.id,
            on: on.id,
            seq: *seq,
        });
        let (on, seq) = (on.clone(), *seq);
        stream.enqueue(Box::new(move || on.wait_for(seq)));
        Ok(())
    }

    fn bind(_: &Arc<EmuStream>) -> Result<()> {
        Ok(())
    }

    fn with_storage<R>(
        t: &Tensor,
        op: &str,
        f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>,
    ) -> Result<R> {
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => f(c, l),
            _ => candle_core::bail!("{op}: the emulator moves CPU tensors"),
        }
    }

    fn on_device(_: &CpuStorage, device: &Device) -> bool {
        device.is_cpu()
    }

    fn into_tensor(s: CpuStorage, shape: Shape) -> Tensor {
        Tensor::from_storage(Storage::Cpu(s), shape, BackpropOp::none(), false)
    }

    unsafe fn alloc(_: &Device, shape: &Shape, dtype: DType) -> Result<CpuStorage> {
        // Device memory is allocated in the compute stream's order (cuMemAllocAsync): a
        // stream that writes it must wait for this job.
        allocated_on_compute();
        // Garbage, as device memory is: a result that reads an unwritten byte shows it.
        let mut s = CpuDevice.zeros_impl(shape, dtype)?;
        let bytes = shape.elem_count() * dtype.size_in_bytes();
        bytes_mut(cpu_addr_mut(&mut s), bytes).fill(0xa5);
        Ok(s)
    }

    fn read<R>(s: &CpuStorage, _: &Arc<EmuStream>, f: impl FnOnce(Addr) -> R) -> R {
        f(cpu_addr(s))
    }

    fn write<R>(s: &mut CpuStorage, _: &Arc<EmuStream>, f: impl FnOnce(Addr) -> R) -> R {
        f(cpu_addr_mut(s))
    }

    unsafe fn copy(dst: Addr, src: Addr, bytes: usize, stream: &Arc<EmuStream>) -> Result<()> {
        stream.enqueue_work(
            "copy",
            Box::new(move || unsafe {
                bytes_mut(dst, bytes).copy_from_slice(self::bytes(src, bytes))
            }),
        );
        Ok(())
    }

    fn record(stream: &Arc<EmuStream>) -> Result<(Arc<EmuStream>, u64)> {
        Ok((stream.clone(), stream.enqueued()))
    }

    fn is_done(e: &(Arc<EmuStream>, u64)) -> std::result::Result<bool, String> {
        Ok(e.0.completed() >= e.1)
    }

    fn host_wait(stream: &Arc<EmuStream>) -> Result<()> {
        stream.wait_for(stream.enqueued());
        Ok(())
    }

    fn synchronize(stream: &Arc<EmuStream>) -> Result<()> {
        Self::host_wait(stream)
    }

    fn synchronize_device(_: &Device) -> Result<()> {
        Self::host_wait(&this_stream())
    }

    fn upload_i64(_: &Device, values: &[i64]) -> Result<CpuStorage> {
        allocated_on_compute();
        CpuDevice.storage_from_slice(values)
    }

    fn download_i64(s: &CpuStorage, stream: &Arc<EmuStream>) -> Result<Vec<i64>> {
        Self::host_wait(stream)?;
        match s {
            CpuStorage::I64(v) => Ok(v.clone()),
            other => candle_core::bail!("download_i64: got {:?}", other.dtype()),
        }
    }
}

/// The address of a CPU buffer's first element.
fn cpu_addr(s: &CpuStorage) -> Addr {
    match s {
        CpuStorage::U8(v) => v.as_ptr() as Addr,
        CpuStorage::U32(v) => v.as_ptr() as Addr,
        CpuStorage::I16(v) => v.as_ptr() as Addr,
        CpuStorage::I32(v) => v.as_ptr() as Addr,
        CpuStorage::I64(v) => v.as_ptr() as Addr,
        CpuStorage::BF16(v) => v.as_ptr() as Addr,
        CpuStorage::F16(v) => v.as_ptr() as Addr,
        CpuStorage::F32(v) => v.as_ptr() as Addr,
        CpuStorage::F64(v) => v.as_ptr() as Addr,
        CpuStorage::F8E4M3(v) => v.as_ptr() as Addr,
        other => panic!("emulator: no buffer for {:?}", other.dtype()),
    }
}

/// The address of a CPU buffer's first element, for writing.
fn cpu_addr_mut(s: &mut CpuStorage) -> Addr {
    match s {
        CpuStorage::U8(v) => v.as_mut_ptr() as Addr,
        CpuStorage::U32(v) => v.as_mut_ptr() as Addr,
        CpuStorage::I16(v) => v.as_mut_ptr() as Addr,
        CpuStorage::I32(v) => v.as_mut_ptr() as Addr,
        CpuStorage::I64(v) => v.as_mut_ptr() as Addr,
        CpuStorage::BF16(v) => v.as_mut_ptr() as Addr,
        CpuStorage::F16(v) => v.as_mut_ptr() as Addr,
        CpuStorage::F32(v) => v.as_mut_ptr() as Addr,
        CpuStorage::F64(v) => v.as_mut_ptr() as Addr,
        CpuStorage::F8E4M3(v) => v.as_mut_ptr() as Addr,
        other => panic!("emulator: no buffer for {:?}", other.dtype()),
    }
}
