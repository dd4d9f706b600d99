//! The local backend: ranks are threads of one process and share memory.
//!
//! A collective is one *round* on its group, with two meeting points:
//!
//! 1. **arrive**: each rank posts a description of its call (op, dtype, shape, arguments) and
//!    raw pointers to its input and (uninitialised) output buffers. The last rank to arrive
//!    checks that all descriptions agree. On disagreement the group is poisoned and every rank
//!    returns the same error. Waiting here can end early: on timeout, on a poisoned group, or
//!    when the job failed (a rank returned an error or panicked).
//! 2. **work**, then **finish**: each rank does its share of the data movement directly between
//!    the posted buffers (for all-reduce: rank `r` reduces chunk `r` of every input and writes it
//!    into every output, i.e. a reduce-scatter and an all-gather with no staging copy), then
//!    waits until all ranks have finished. This wait is deliberately not interruptible: other
//!    ranks are reading this rank's input and writing its output, and they always finish (the
//!    work is bounded memory traffic), so leaving early would free memory still in use.
//!
//! Point-to-point messages go through per-pair mailboxes on the group; `send` waits until its
//! message was taken, as NCCL's ungrouped send waits for its peer (see [`Comm::send`]).

use super::{group_label, lock, Backend, Collective, Comm, CommError, ReduceOp};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// The default time a rank waits for its peers before failing, overridden by the
/// `CANDLE_PARALLEL_TIMEOUT_SECS` environment variable.
pub fn default_timeout() -> Duration {
    std::env::var("CANDLE_PARALLEL_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(600))
}

/// A network link the local backend emulates, so that communication costs time on one
/// machine as it would between devices: each collective and message takes at least
/// `latency + bytes / bandwidth` for the bytes a rank sends in it (ring algorithms: an
/// all-reduce `2(n−1)/n` of its size, an all-gather or reduce-scatter `(n−1)/n` of the full
/// size), the remainder spent waiting (a sleep, not a spin: it costs no core). Set it with
/// `CANDLE_PARALLEL_LINK=gbps=25,latency_us=5` or [`crate::Launcher::link`].
///
/// ```
/// use candle_parallel::comm::local::LinkModel;
///
/// let link: LinkModel = "gbps=25,latency_us=5".parse()?;
/// // 1 MB of a 2-rank all-reduce crosses the link once: 5 µs + 320 µs.
/// let t = link.time(1_000_000);
/// assert!((t.as_secs_f64() - 325e-6).abs() < 1e-9);
/// assert!("gbps=0".parse::<LinkModel>().is_err());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    /// Bandwidth in gigabits per second.
    pub gbps: f64,
    /// Time per collective or message, in seconds, whatever its size.
    pub latency: Duration,
}

impl LinkModel {
    /// The environment variable that dials a link for every local job.
    pub const VAR: &'static str = "CANDLE_PARALLEL_LINK";

    /// How long sending `bytes` takes over the link.
    pub fn time(&self, bytes: usize) -> Duration {
        self.latency + Duration::from_secs_f64(bytes as f64 * 8.0 / (self.gbps * 1e9))
    }

    /// The link `CANDLE_PARALLEL_LINK` dials, if set (an error names a malformed value).
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(Self::VAR) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map(Some)
                .map_err(|e| candle_core::Error::msg(format!("{}={v}: {e}", Self::VAR))),
            _ => Ok(None),
        }
    }
}

impl std::str::FromStr for LinkModel {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (mut gbps, mut latency_us) = (None, 0.0);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let value = |v: &str| -> Result<f64> {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| {
                        candle_core::Error::msg(format!(
                            "link '{s}': '{v}' is not a non-negative number"
                        ))
                    })
            };
            match part.split_once('=') {
                Some(("gbps", v)) => gbps = Some(value(v)?),
                Some(("latency_us", v)) => latency_us = value(v)?,
                _ => candle_core::bail!(
                    "link '{s}': expected gbps=G[,latency_us=U] (e.g. gbps=25,latency_us=5), got '{part}'"
                ),
            }
        }
        match gbps {
            Some(g) if g > 0.0 => Ok(Self {
                gbps: g,
                latency: Duration::from_secs_f64(latency_us * 1e-6),
            }),
            _ => candle_core::bail!("link '{s}': needs a bandwidth gbps above 0 (e.g. gbps=25)"),
        }
    }
}

/// The first failure of a job: which global rank failed, and why.
#[derive(Clone, Debug)]
pub struct Failure {
    pub rank: usize,
    pub message: String,
}

/// A link dialled for every local job of the process from now on ([`dial_link`]).
static DIALLED: Mutex<Option<Option<LinkModel>>> = Mutex::new(None);
/// Whether [`DIALLED`] is set: every collective reads this, not the lock, unless it is.
static DIAL_SET: AtomicBool = AtomicBool::new(false);

/// Dials every local job of the process, running or to come, to `link` from its next
/// collective or message on (`None`: no pacing); [`undial_link`] gives each job its own link
/// back. For measurements that compare link speeds step by step inside one job, side by side
/// (`bench_data_parallel`'s overlap table): every rank must be between steps when it changes.
pub fn dial_link(link: Option<LinkModel>) {
    *crate::comm::lock(&DIALLED) = Some(link);
    DIAL_SET.store(true, Ordering::SeqCst);
}

/// Ends [`dial_link`]: each job paces to its own link again.
pub fn undial_link() {
    *crate::comm::lock(&DIALLED) = None;
    DIAL_SET.store(false, Ordering::SeqCst);
}

/// Shared state of one job on the local backend: its groups, its timeout, its first failure.
#[derive(Clone)]
pub struct LocalFabric {
    inner: Arc<FabricInner>,
}

struct FabricInner {
    world_size: usize,
    timeout: Duration,
    /// The link every collective and message is paced to, if dialled.
    link: Option<LinkModel>,
    failure: Mutex<Option<Failure>>,
    groups: Mutex<Vec<Weak<Group>>>,
}

impl LocalFabric {
    /// A job of `world_size` ranks whose waits give up after `timeout`.
    pub fn new(world_size: usize, timeout: Duration) -> Self {
        Self::with_link(world_size, timeout, None)
    }

    /// [`LocalFabric::new`] whose communication is paced to `link` ([`LinkModel`]).
    pub fn with_link(world_size: usize, timeout: Duration, link: Option<LinkModel>) -> Self {
        Self {
            inner: Arc::new(FabricInner {
                world_size,
                timeout,
                link,
                failure: Mutex::new(None),
                groups: Mutex::new(Vec::new()),
            }),
        }
    }

    /// One world communicator per rank, in rank order.
    pub fn world_comms(&self) -> Vec<Comm> {
        let group = self.new_group("world", (0..self.inner.world_size).collect());
        (0..self.inner.world_size)
            .map(|rank| {
                Comm::from_backend(Arc::new(LocalBackend {
                    group: group.clone(),
                    rank,
                    device: Device::Cpu,
                }))
            })
            .collect()
    }

    /// Records that global rank `rank` failed (the first failure wins) and wakes every rank
    /// waiting in any group of the job, so that they fail promptly instead of hanging.
    pub fn fail(&self, rank: usize, message: impl Into<String>) {
        {
            let mut f = lock(&self.inner.failure);
            if f.is_none() {
                *f = Some(Failure {
                    rank,
                    message: message.into(),
                });
            }
        }
        let groups: Vec<Arc<Group>> = lock(&self.inner.groups)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for g in groups {
            // Taking the lock orders this wake-up after any waiter's check of the flag.
            let _st = lock(&g.state);
            g.cv.notify_all();
        }
    }

    /// The job's first failure, if any.
    pub fn failure(&self) -> Option<Failure> {
        lock(&self.inner.failure).clone()
    }

    fn new_group(&self, label: &str, ranks: Vec<usize>) -> Arc<Group> {
        let n = ranks.len();
        let group = Arc::new(Group {
            fabric: self.clone(),
            label: group_label(label, &ranks),
            ranks,
            state: Mutex::new(State {
                call: 0,
                posts: (0..n).map(|_| None).collect(),
                arrived: 0,
                finished: 0,
                decided: None,
                poison: None,
                mail: HashMap::new(),
                posted: HashMap::new(),
                taken: HashMap::new(),
            }),
            cv: Condvar::new(),
        });
        let mut groups = lock(&self.inner.groups);
        groups.retain(|g| g.strong_count() > 0);
        groups.push(Arc::downgrade(&group));
        group
    }
}

struct Group {
    fabric: LocalFabric,
    label: String,
    /// Global ranks of the members, in group-rank order.
    ranks: Vec<usize>,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    /// Number of collective rounds completed on this group.
    call: u64,
    posts: Vec<Option<Post>>,
    arrived: usize,
    finished: usize,
    /// Set by the last rank to arrive once the posts agree.
    decided: Option<Arc<Decision>>,
    /// Set when the group failed; every later call returns it.
    poison: Option<String>,
    /// Point-to-point messages, keyed by (source, destination) group rank.
    mail: HashMap<(usize, usize), VecDeque<Tensor>>,
    /// Messages posted and taken so far per (source, destination): a sender waits until its
    /// message was taken (rendezvous, as an ungrouped `ncclSend`).
    posted: HashMap<(usize, usize), u64>,
    taken: HashMap<(usize, usize), u64>,
}

#[derive(Clone, Copy)]
struct InPtr(*const u8);
#[derive(Clone, Copy)]
struct OutPtr(*mut u8);
// SAFETY: the pointers are only dereferenced during a round's work phase, while their owners
// are held (by the finish wait) in the same round, and each output range has one writer.
unsafe impl Send for InPtr {}
unsafe impl Sync for InPtr {}
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Collective(Collective),
    Barrier,
    Split {
        color: Option<usize>,
        key: usize,
        label: String,
    },
}

/// One rank's description of its call, compared across the group before any data moves.
#[derive(Clone, Debug)]
struct Desc {
    call: Call,
    dtype: Option<DType>,
    dims: Vec<usize>,
}

impl Desc {
    fn op_name(&self) -> &'static str {
        match &self.call {
            Call::Collective(c) => c.name(),
            Call::Barrier => "barrier",
            Call::Split { .. } => "split",
        }
    }

    fn describe(&self) -> String {
        let call = match &self.call {
            Call::Collective(c) => c.to_string(),
            Call::Barrier => "barrier".to_string(),
            Call::Split { color, key, label } => {
                format!("split(color={color:?}, key={key}, label={label})")
            }
        };
        match self.dtype {
            Some(dt) => format!("{call} {dt:?}{:?}", self.dims),
            None => call,
        }
    }

    /// What must be identical on every rank. For all-to-all the splits and the number of rows
    /// legitimately differ; for split the color and key do.
    fn agreement_key(&self) -> String {
        match &self.call {
            Call::Collective(Collective::AllToAll { .. }) => format!(
                "all_to_all {:?}[_, {:?}]",
                self.dtype,
                self.dims.get(1..).unwrap_or(&[])
            ),
            Call::Split { label, .. } => format!("split {label}"),
            _ => self.describe(),
        }
    }
}

struct Post {
    desc: Desc,
    input: InPtr,
    output: OutPtr,
}

/// What every rank of a round needs once all have arrived and agreed.
struct Decision {
    descs: Vec<Desc>,
    inputs: Vec<InPtr>,
    outputs: Vec<OutPtr>,
    /// For split: each member's new handle.
    split: Vec<Option<LocalBackend>>,
    /// Set if any rank's work panicked: then no rank may trust its output.
    work_failed: AtomicBool,
}

/// Checks that the posts of one round are compatible; the error lists each rank's call.
fn validate(descs: &[Desc], ranks: &[usize]) -> std::result::Result<(), String> {
    let n = descs.len();
    let listing = || {
        descs
            .iter()
            .zip(ranks)
            .map(|(d, r)| format!("rank {r}: {}", d.describe()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let key0 = descs[0].agreement_key();
    if descs.iter().any(|d| d.agreement_key() != key0) {
        return Err(format!(
            "ranks disagree on the operation or its arguments ({}). Every rank of a group \
             must issue the same calls, in the same order, with matching shapes and dtypes",
            listing()
        ));
    }
    let Call::Collective(op) = &descs[0].call else {
        return Ok(());
    };
    let dims = &descs[0].dims;
    match op {
        Collective::AllGather { dim } | Collective::ReduceScatter { dim, .. }
            if *dim >= dims.len() =>
        {
            return Err(format!("dim {dim} is out of range for shape {dims:?}"));
        }
        Collective::ReduceScatter { dim, .. } if !dims[*dim].is_multiple_of(n) => {
            return Err(format!(
                "dimension {dim} of shape {dims:?} has size {}, which is not divisible by the \
                 group size {n}: pad it to a multiple of {n}",
                dims[*dim]
            ));
        }
        Collective::Broadcast { root } if *root >= n => {
            return Err(format!(
                "root {root} is not a rank of this group of {n} ranks"
            ));
        }
        Collective::AllToAll { .. } => {
            for (i, d) in descs.iter().enumerate() {
                let Call::Collective(Collective::AllToAll {
                    send_splits,
                    recv_splits,
                }) = &d.call
                else {
                    unreachable!("agreement keys are equal")
                };
                if d.dims.is_empty() {
                    return Err(format!(
                        "rank {}: all_to_all needs a tensor with at least one dimension",
                        ranks[i]
                    ));
                }
                if send_splits.len() != n || recv_splits.len() != n {
                    return Err(format!(
                        "rank {}: send_splits {send_splits:?} and recv_splits {recv_splits:?} \
                         must each have one entry per rank ({n})",
                        ranks[i]
                    ));
                }
                let rows: usize = send_splits.iter().sum();
                if rows != d.dims[0] {
                    return Err(format!(
                        "rank {}: send_splits {send_splits:?} add up to {rows} rows but the \
                         tensor has {} rows (shape {:?})",
                        ranks[i], d.dims[0], d.dims
                    ));
                }
            }
            for (i, d) in descs.iter().enumerate() {
                let Call::Collective(Collective::AllToAll { recv_splits, .. }) = &d.call else {
                    unreachable!()
                };
                for (j, dj) in descs.iter().enumerate() {
                    let Call::Collective(Collective::AllToAll { send_splits, .. }) = &dj.call
                    else {
                        unreachable!()
                    };
                    if recv_splits[j] != send_splits[i] {
                        return Err(format!(
                            "rank {} expects {} rows from rank {} but rank {} sends it {}: \
                             use Comm::exchange_split_sizes to compute recv_splits",
                            ranks[i], recv_splits[j], ranks[j], ranks[j], send_splits[i]
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// One rank's handle on one group of the local backend.
#[derive(Clone)]
pub struct LocalBackend {
    group: Arc<Group>,
    rank: usize,
    device: Device,
}

impl LocalBackend {
    fn n(&self) -> usize {
        self.group.ranks.len()
    }

    fn global(&self) -> usize {
        self.group.ranks[self.rank]
    }

    fn aborted(&self, op: &str, reason: String) -> candle_core::Error {
        CommError::Aborted {
            op: op.to_string(),
            group: self.group.label.clone(),
            rank: self.global(),
            reason,
        }
        .into()
    }

    fn check_peer(&self, op: &str, peer: usize, role: &str) -> Result<()> {
        if peer >= self.n() {
            return Err(self.invalid(
                op,
                format!("{role} {peer} is not a rank of this group of {}", self.n()),
            ));
        }
        Ok(())
    }

    /// Leaves a private copy of `x` in `dst`'s mailbox; returns its ticket, or `None` for a
    /// zero-element message (nothing travels: the receiver does not wait for it either).
    fn post(&self, x: &Tensor, dst: usize) -> Result<Option<u64>> {
        if x.elem_count() == 0 {
            return Ok(None);
        }
        // The message is a private copy: the sender may change or drop `x` afterwards.
        let msg = x.detach().force_contiguous()?;
        let mut st = lock(&self.group.state);
        self.check_alive(&mut st, "send")?;
        st.mail.entry((self.rank, dst)).or_default().push_back(msg);
        let posted = st.posted.entry((self.rank, dst)).or_default();
        *posted += 1;
        let ticket = *posted;
        self.group.cv.notify_all();
        Ok(Some(ticket))
    }

    /// Waits until `dst` took this rank's message number `ticket`.
    fn wait_taken(&self, op: &str, dst: usize, ticket: u64) -> Result<()> {
        self.wait(op, dst, |st| {
            st.taken.get(&(self.rank, dst)).copied().unwrap_or(0) >= ticket
        })
    }

    /// Waits until `ready` holds, the group fails, or the timeout (naming `peer`).
    fn wait(&self, op: &str, peer: usize, ready: impl FnMut(&mut State) -> bool) -> Result<()> {
        let st = lock(&self.group.state);
        let peer = self.group.ranks[peer];
        self.wait_on(st, op, 0, ready, |_| vec![peer]).map(drop)
    }

    /// Waits on the held group state until `ready` holds; fails when the group fails, or at
    /// the timeout naming the global ranks `missing` gives, poisoning the group.
    fn wait_on<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        op: &str,
        call: u64,
        mut ready: impl FnMut(&mut State) -> bool,
        missing: impl Fn(&State) -> Vec<usize>,
    ) -> Result<MutexGuard<'a, State>> {
        let g = &*self.group;
        let timeout = g.fabric.inner.timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if ready(&mut st) {
                return Ok(st);
            }
            self.check_alive(&mut st, op)?;
            let now = Instant::now();
            if now >= deadline {
                let e = CommError::Timeout {
                    op: op.into(),
                    call,
                    group: g.label.clone(),
                    rank: self.global(),
                    secs: timeout.as_secs_f64(),
                    missing: missing(&st),
                };
                st.poison = Some(e.to_string());
                g.cv.notify_all();
                return Err(e.into());
            }
            st =
                g.cv.wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
    }

    /// Takes the next message from `src`, which must have `shape` and `dtype`.
    fn take(&self, src: usize, shape: &Shape, dtype: DType) -> Result<Tensor> {
        let g = &*self.group;
        if shape.elem_count() == 0 {
            return Tensor::zeros(shape, dtype, &Device::Cpu);
        }
        let mut msg = None;
        self.wait("recv", src, |st| {
            msg = st
                .mail
                .get_mut(&(src, self.rank))
                .and_then(|q| q.pop_front());
            if msg.is_some() {
                *st.taken.entry((src, self.rank)).or_default() += 1;
            }
            msg.is_some()
        })?;
        g.cv.notify_all();
        let t = msg.expect("a message was taken");
        if t.dims() != shape.dims() || t.dtype() != dtype {
            let e = CommError::Mismatch {
                op: "send/recv".into(),
                call: 0,
                group: g.label.clone(),
                details: format!(
                    "rank {} sent {:?}{:?} but rank {} expects {dtype:?}{:?}",
                    g.ranks[src],
                    t.dtype(),
                    t.dims(),
                    self.global(),
                    shape.dims()
                ),
            };
            lock(&g.state).poison = Some(e.to_string());
            g.cv.notify_all();
            return Err(e.into());
        }
        Ok(t)
    }

    /// Fails if the group or the job has failed; poisons the group on a job failure so that
    /// no later round can start with a rank missing.
    fn check_alive(&self, st: &mut State, op: &str) -> Result<()> {
        if let Some(p) = &st.poison {
            return Err(self.aborted(op, p.clone()));
        }
        if let Some(f) = self.group.fabric.failure() {
            let reason = format!("rank {} failed: {}", f.rank, f.message);
            st.poison = Some(reason.clone());
            self.group.cv.notify_all();
            return Err(self.aborted(op, reason));
        }
        Ok(())
    }

    fn invalid(&self, op: &str, msg: String) -> candle_core::Error {
        CommError::Invalid {
            op: op.to_string(),
            group: self.group.label.clone(),
            rank: self.global(),
            msg,
        }
        .into()
    }

    /// Runs one round: arrive, agree, `work` on the decision, finish.
    fn round<R>(
        &self,
        desc: Desc,
        input: InPtr,
        output: OutPtr,
        work: impl FnOnce(&Decision) -> R,
    ) -> Result<R> {
        let g = &*self.group;
        let n = self.n();
        let op = desc.op_name();
        let mut st = lock(&g.state);
        self.check_alive(&mut st, op)?;
        if st.posts[self.rank].is_some() {
            return Err(self.invalid(
                op,
                "this rank is already inside a call on this group (the same communicator \
                 used from two threads at once?)"
                    .into(),
            ));
        }
        let call = st.call;
        st.posts[self.rank] = Some(Post {
            desc,
            input,
            output,
        });
        st.arrived += 1;
        if st.arrived == n {
            let posts: Vec<&Post> = st.posts.iter().map(|p| p.as_ref().unwrap()).collect();
            let descs: Vec<Desc> = posts.iter().map(|p| p.desc.clone()).collect();
            let inputs: Vec<InPtr> = posts.iter().map(|p| p.input).collect();
            let outputs: Vec<OutPtr> = posts.iter().map(|p| p.output).collect();
            if let Err(details) = validate(&descs, &g.ranks) {
                let e = CommError::Mismatch {
                    op: op.to_string(),
                    call,
                    group: g.label.clone(),
                    details,
                };
                st.poison = Some(e.to_string());
                g.cv.notify_all();
                return Err(e.into());
            }
            let split = match &descs[0].call {
                Call::Split { label, .. } => self.make_split(&descs, label),
                _ => Vec::new(),
            };
            st.decided = Some(Arc::new(Decision {
                inputs,
                outputs,
                descs,
                split,
                work_failed: AtomicBool::new(false),
            }));
            g.cv.notify_all();
        } else {
            st = self.wait_on(
                st,
                op,
                call,
                |st| st.decided.is_some(),
                |st| {
                    (0..n)
                        .filter(|&i| st.posts[i].is_none())
                        .map(|i| g.ranks[i])
                        .collect()
                },
            )?;
        }
        let decision = st.decided.clone().expect("decided");
        drop(st);

        let out = catch_unwind(AssertUnwindSafe(|| work(&decision)));
        if out.is_err() {
            decision.work_failed.store(true, Ordering::SeqCst);
        }

        let mut st = lock(&g.state);
        st.finished += 1;
        if st.finished == n {
            st.posts.iter_mut().for_each(|p| *p = None);
            st.arrived = 0;
            st.finished = 0;
            st.decided = None;
            st.call += 1;
            g.cv.notify_all();
        } else {
            while st.call == call {
                st = g.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        if decision.work_failed.load(Ordering::SeqCst) {
            let reason =
                format!("a rank's data movement panicked in {op} (a bug in candle-parallel)");
            st.poison.get_or_insert(reason.clone());
            return Err(self.aborted(op, reason));
        }
        drop(st);
        Ok(out.expect("checked above"))
    }

    fn make_split(&self, descs: &[Desc], label: &str) -> Vec<Option<LocalBackend>> {
        let mut colors: Vec<usize> = descs
            .iter()
            .filter_map(|d| match d.call {
                Call::Split { color, .. } => color,
                _ => None,
            })
            .collect();
        colors.sort_unstable();
        colors.dedup();
        let mut out: Vec<Option<LocalBackend>> = vec![None; descs.len()];
        for color in colors {
            let mut members: Vec<(usize, usize)> = descs
                .iter()
                .enumerate()
                .filter_map(|(i, d)| match d.call {
                    Call::Split {
                        color: Some(c),
                        key,
                        ..
                    } if c == color => Some((key, i)),
                    _ => None,
                })
                .collect();
            members.sort_unstable();
            let ranks = members.iter().map(|&(_, i)| self.group.ranks[i]).collect();
            let group = self.group.fabric.new_group(label, ranks);
            for (new_rank, &(_, i)) in members.iter().enumerate() {
                out[i] = Some(LocalBackend {
                    group: group.clone(),
                    rank: new_rank,
                    device: Device::Cpu,
                });
            }
        }
        out
    }

    /// With a dialled link, waits until `start` plus the link's time for `bytes` (what this
    /// rank sends in the operation just done). A group of one rank sends nothing.
    fn pace(&self, start: std::time::Instant, bytes: usize) {
        let dialled = match DIAL_SET.load(Ordering::SeqCst) {
            true => *crate::comm::lock(&DIALLED),
            false => None,
        };
        let Some(link) = dialled.unwrap_or(self.group.fabric.inner.link) else {
            return;
        };
        if self.n() < 2 {
            return;
        }
        let due = link.time(bytes);
        let spent = start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }

    fn collective_typed<T: Elem>(
        &self,
        op: &Collective,
        input: &[T],
        dims: &[usize],
        dtype: DType,
    ) -> Result<(Vec<T>, Shape)> {
        let out_dims = op.output_dims(dims, self.n());
        // An impossible output shape fails the group-wide check, so no work touches `out`.
        let out_len = out_dims.as_ref().map_or(0, |d| d.iter().product());
        let mut out: Vec<T> = Vec::with_capacity(out_len);
        let desc = Desc {
            call: Call::Collective(op.clone()),
            dtype: Some(dtype),
            dims: dims.to_vec(),
        };
        let (me, n) = (self.rank, self.n());
        self.round(
            desc,
            InPtr(input.as_ptr().cast()),
            OutPtr(out.as_mut_ptr().cast()),
            // SAFETY: the round validated that all posts agree (same dtype, compatible shapes),
            // so every pointer refers to a live buffer of `T` of the length its desc implies.
            |d| unsafe { move_data::<T>(op, d, me, n) },
        )?;
        // SAFETY: a completed round wrote every element of this rank's output.
        unsafe { out.set_len(out_len) };
        Ok((out, Shape::from(out_dims.unwrap_or_default())))
    }

    /// An all-reduce whose input and output are `buf`: each rank reduces its own chunk of
    /// every rank's buffer, reading that chunk (block by block) before writing it, and no
    /// other rank touches it, so the aliasing is safe.
    fn all_reduce_in_place_typed<T: Elem>(
        &self,
        op: ReduceOp,
        buf: &mut [T],
        dims: &[usize],
        dtype: DType,
    ) -> Result<()> {
        let collective = Collective::AllReduce { op };
        let desc = Desc {
            call: Call::Collective(collective.clone()),
            dtype: Some(dtype),
            dims: dims.to_vec(),
        };
        let (me, n) = (self.rank, self.n());
        // One pointer for both roles: a second borrow would invalidate the first.
        let p = buf.as_mut_ptr();
        self.round(
            desc,
            InPtr(p.cast_const().cast()),
            OutPtr(p.cast()),
            // SAFETY: as in `collective_typed`; an all-reduce reads and writes only the
            // chunk this rank owns, of every buffer.
            |d| unsafe { move_data::<T>(&collective, d, me, n) },
        )
    }
}

/// Element types the local backend moves and reduces.
trait Elem: Copy + Send + Sync + 'static {
    /// The type reductions accumulate in (f32 for the 16-bit floats).
    type Acc: Copy;
    fn acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;
    fn add(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn max(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn min(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn div(a: Self::Acc, n: usize) -> Self::Acc;
}

macro_rules! elem_float {
    ($t:ty, $acc:ty, $to:expr, $from:expr) => {
        impl Elem for $t {
            type Acc = $acc;
            #[inline(always)]
            fn acc(self) -> $acc {
                $to(self)
            }
            #[inline(always)]
            fn from_acc(a: $acc) -> Self {
                $from(a)
            }
            #[inline(always)]
            fn add(a: $acc, b: $acc) -> $acc {
                a + b
            }
            #[inline(always)]
            fn max(a: $acc, b: $acc) -> $acc {
                a.max(b)
            }
            #[inline(always)]
            fn min(a: $acc, b: $acc) -> $acc {
                a.min(b)
            }
            #[inline(always)]
            fn div(a: $acc, n: usize) -> $acc {
                a / n as $acc
            }
        }
    };
}
elem_float!(f32, f32, |x| x, |x| x);
elem_float!(f64, f64, |x| x, |x| x);
elem_float!(f16, f32, f16::to_f32, f16::from_f32);
elem_float!(bf16, f32, bf16::to_f32, bf16::from_f32);

macro_rules! elem_int {
    ($t:ty) => {
        impl Elem for $t {
            type Acc = $t;
            #[inline(always)]
            fn acc(self) -> $t {
                self
            }
            #[inline(always)]
            fn from_acc(a: $t) -> Self {
                a
            }
            #[inline(always)]
            fn add(a: $t, b: $t) -> $t {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn max(a: $t, b: $t) -> $t {
                a.max(b)
            }
            #[inline(always)]
            fn min(a: $t, b: $t) -> $t {
                a.min(b)
            }
            #[inline(always)]
            fn div(a: $t, n: usize) -> $t {
                a / n as $t
            }
        }
    };
}
elem_int!(u8);
elem_int!(u32);
elem_int!(i16);
elem_int!(i32);
elem_int!(i64);

/// Elements reduced per block: small enough for the accumulators to stay in L1.
const BLOCK: usize = 2048;

#[inline(always)]
fn combine<T: Elem>(acc: &mut [T::Acc], src: &[T], f: impl Fn(T::Acc, T::Acc) -> T::Acc) {
    for (a, x) in acc.iter_mut().zip(src) {
        *a = f(*a, x.acc());
    }
}

/// Reduces `srcs[0][i] op srcs[1][i] op ...` (in rank order, so every rank and every run gets
/// the same bits) for `i in 0..len`, writing the result to every pointer in `dsts`.
///
/// # Safety
/// Each `srcs[j]` must be valid for `len` reads and each `dsts[j]` for `len` writes, with no
/// other writer of those ranges.
unsafe fn reduce_into<T: Elem>(op: ReduceOp, srcs: &[*const T], len: usize, dsts: &[*mut T]) {
    let n = srcs.len();
    let mut acc: Vec<T::Acc> = Vec::with_capacity(BLOCK);
    let mut tmp: Vec<T> = Vec::with_capacity(BLOCK);
    let mut start = 0;
    while start < len {
        let m = BLOCK.min(len - start);
        let first = std::slice::from_raw_parts(srcs[0].add(start), m);
        acc.clear();
        acc.extend(first.iter().map(|x| x.acc()));
        for src in &srcs[1..] {
            let s = std::slice::from_raw_parts(src.add(start), m);
            // One monomorphised loop per op, so that it inlines and vectorises.
            match op {
                ReduceOp::Sum | ReduceOp::Avg => combine(&mut acc, s, T::add),
                ReduceOp::Max => combine(&mut acc, s, T::max),
                ReduceOp::Min => combine(&mut acc, s, T::min),
            }
        }
        tmp.clear();
        if op == ReduceOp::Avg {
            tmp.extend(acc.iter().map(|&a| T::from_acc(T::div(a, n))));
        } else {
            tmp.extend(acc.iter().map(|&a| T::from_acc(a)));
        }
        for dst in dsts {
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(start), m);
        }
        start += m;
    }
}

/// This rank's share of the data movement of a validated round.
///
/// # Safety
/// `d` must come from a round whose posts were validated for `op` with element type `T`.
unsafe fn move_data<T: Elem>(op: &Collective, d: &Decision, me: usize, n: usize) {
    let ins: Vec<*const T> = d.inputs.iter().map(|p| p.0.cast()).collect();
    let outs: Vec<*mut T> = d.outputs.iter().map(|p| p.0.cast()).collect();
    let dims = &d.descs[me].dims;
    let len: usize = dims.iter().product();
    match op {
        Collective::AllReduce { op } => {
            // Rank `me` owns chunk `me` of the buffer: it reduces it and writes it everywhere.
            let (s, e) = (me * len / n, (me + 1) * len / n);
            let srcs: Vec<*const T> = ins.iter().map(|p| p.add(s)).collect();
            let dsts: Vec<*mut T> = outs.iter().map(|p| p.add(s)).collect();
            reduce_into(*op, &srcs, e - s, &dsts);
        }
        Collective::AllGather { dim } => {
            // Rank `me` writes its input into slot `me` of every output.
            let outer: usize = dims[..*dim].iter().product();
            let inner: usize = dims[*dim..].iter().product();
            for out in &outs {
                for o in 0..outer {
                    std::ptr::copy_nonoverlapping(
                        ins[me].add(o * inner),
                        out.add((o * n + me) * inner),
                        inner,
                    );
                }
            }
        }
        Collective::ReduceScatter { dim, op } => {
            // Rank `me` reduces chunk `me` of every input into its own output.
            let outer: usize = dims[..*dim].iter().product();
            let full: usize = dims[*dim..].iter().product();
            let block = full / n;
            for o in 0..outer {
                let srcs: Vec<*const T> =
                    ins.iter().map(|p| p.add(o * full + me * block)).collect();
                reduce_into(*op, &srcs, block, &[outs[me].add(o * block)]);
            }
        }
        Collective::AllToAll { .. } => {
            // Rank `me` pulls its rows from every peer, in rank order.
            let row: usize = dims[1..].iter().product();
            let mut written = 0;
            for (j, src) in ins.iter().enumerate() {
                let Call::Collective(Collective::AllToAll { send_splits, .. }) = &d.descs[j].call
                else {
                    unreachable!("validated")
                };
                let offset: usize = send_splits[..me].iter().sum();
                let count = send_splits[me] * row;
                std::ptr::copy_nonoverlapping(src.add(offset * row), outs[me].add(written), count);
                written += count;
            }
        }
        Collective::Broadcast { root } => {
            std::ptr::copy_nonoverlapping(ins[*root], outs[me], len);
        }
    }
}

/// The bytes rank `me` sends in collective `op` on an input of `input_bytes` in a group of
/// `n`, by the ring algorithms NCCL uses for large messages.
fn wire_bytes(op: &Collective, input_bytes: usize, n: usize, me: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let b = input_bytes as f64;
    let n_f = n as f64;
    (match op {
        Collective::AllReduce { .. } => 2.0 * (n_f - 1.0) / n_f * b,
        // Each rank's input reaches the n − 1 others.
        Collective::AllGather { .. } => (n_f - 1.0) * b,
        Collective::ReduceScatter { .. } => (n_f - 1.0) / n_f * b,
        Collective::AllToAll { send_splits, .. } => {
            let rows: usize = send_splits.iter().sum();
            if rows == 0 {
                0.0
            } else {
                // Rows to itself stay.
                b * (rows.saturating_sub(send_splits.get(me).copied().unwrap_or(0)) as f64)
                    / rows as f64
            }
        }
        Collective::Broadcast { .. } => b,
    }) as usize
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.n()
    }

    fn ranks(&self) -> &[usize] {
        &self.group.ranks
    }

    fn label(&self) -> &str {
        &self.group.label
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
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(self.invalid(
                op.name(),
                format!(
                    "the input must be contiguous (shape {:?}, stride {:?}): call .contiguous()",
                    layout.dims(),
                    layout.stride()
                ),
            ));
        };
        let dims = layout.dims();
        let begun = std::time::Instant::now();
        let bytes = wire_bytes(
            op,
            (end - start) * input.dtype().size_in_bytes(),
            self.n(),
            self.rank,
        );
        macro_rules! run {
            ($variant:ident, $v:expr) => {{
                let (o, s) = self.collective_typed(op, &$v[start..end], dims, input.dtype())?;
                self.pace(begun, bytes);
                Ok((CpuStorage::$variant(o), s))
            }};
        }
        match input {
            CpuStorage::U8(v) => run!(U8, v),
            CpuStorage::U32(v) => run!(U32, v),
            CpuStorage::I16(v) => run!(I16, v),
            CpuStorage::I32(v) => run!(I32, v),
            CpuStorage::I64(v) => run!(I64, v),
            CpuStorage::BF16(v) => run!(BF16, v),
            CpuStorage::F16(v) => run!(F16, v),
            CpuStorage::F32(v) => run!(F32, v),
            CpuStorage::F64(v) => run!(F64, v),
            other => Err(CommError::Unsupported {
                backend: "local",
                what: format!("{op} on dtype {:?}", other.dtype()),
            }
            .into()),
        }
    }

    fn all_reduce_in_place_cpu(
        &self,
        op: ReduceOp,
        storage: &mut CpuStorage,
        layout: &Layout,
    ) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(self.invalid(
                "all_reduce",
                format!(
                    "the buffer must be contiguous (shape {:?}, stride {:?})",
                    layout.dims(),
                    layout.stride()
                ),
            ));
        };
        let dims = layout.dims();
        let dtype = storage.dtype();
        let begun = std::time::Instant::now();
        let all_reduce = Collective::AllReduce { op };
        let bytes = wire_bytes(
            &all_reduce,
            (end - start) * dtype.size_in_bytes(),
            self.n(),
            self.rank,
        );
        macro_rules! run {
            ($v:expr) => {{
                let r = self.all_reduce_in_place_typed(op, &mut $v[start..end], dims, dtype);
                if r.is_ok() {
                    self.pace(begun, bytes);
                }
                r
            }};
        }
        match storage {
            CpuStorage::U8(v) => run!(v),
            CpuStorage::U32(v) => run!(v),
            CpuStorage::I16(v) => run!(v),
            CpuStorage::I32(v) => run!(v),
            CpuStorage::I64(v) => run!(v),
            CpuStorage::BF16(v) => run!(v),
            CpuStorage::F16(v) => run!(v),
            CpuStorage::F32(v) => run!(v),
            CpuStorage::F64(v) => run!(v),
            other => Err(CommError::Unsupported {
                backend: "local",
                what: format!("all_reduce on dtype {:?}", other.dtype()),
            }
            .into()),
        }
    }

    fn send(&self, x: &Tensor, dst: usize) -> Result<()> {
        self.check_peer("send", dst, "destination")?;
        if dst == self.rank {
            return Err(self.invalid(
                "send",
                "a rank cannot send to itself: send waits for the matching recv, which this rank can only post afterwards. Use Comm::send_recv".to_string(),
            ));
        }
        let begun = std::time::Instant::now();
        if let Some(ticket) = self.post(x, dst)? {
            self.wait_taken("send", dst, ticket)?;
        }
        self.pace(begun, x.elem_count() * x.dtype().size_in_bytes());
        Ok(())
    }

    fn recv(&self, src: usize, shape: &Shape, dtype: DType) -> Result<Tensor> {
        self.check_peer("recv", src, "source")?;
        if src == self.rank {
            return Err(self.invalid(
                "recv",
                "a rank cannot receive from itself with recv: use Comm::send_recv".to_string(),
            ));
        }
        let begun = std::time::Instant::now();
        let t = self.take(src, shape, dtype)?;
        self.pace(begun, shape.elem_count() * dtype.size_in_bytes());
        Ok(t)
    }

    fn exchange(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<Vec<Tensor>> {
        for (_, dst) in sends {
            self.check_peer("exchange", *dst, "destination")?;
        }
        for (src, _, _) in recvs {
            self.check_peer("exchange", *src, "source")?;
        }
        // What crosses the link: the larger of what this rank sends and what it receives.
        let begun = std::time::Instant::now();
        let sent: usize = sends
            .iter()
            .map(|(x, _)| x.elem_count() * x.dtype().size_in_bytes())
            .sum();
        let received: usize = recvs
            .iter()
            .map(|(_, s, d)| s.elem_count() * d.size_in_bytes())
            .sum();
        // Post every send, then receive, then wait for the peers to take ours: the group
        // progresses together.
        let tickets: Vec<(usize, Option<u64>)> = sends
            .iter()
            .map(|(x, dst)| Ok((*dst, self.post(x, *dst)?)))
            .collect::<Result<_>>()?;
        let got = recvs
            .iter()
            .map(|(src, shape, dtype)| self.take(*src, shape, *dtype))
            .collect::<Result<Vec<_>>>()?;
        for (dst, ticket) in tickets {
            if let Some(ticket) = ticket {
                self.wait_taken("exchange", dst, ticket)?;
            }
        }
        if !sends.is_empty() || !recvs.is_empty() {
            self.pace(begun, sent.max(received));
        }
        Ok(got)
    }

    fn barrier(&self) -> Result<()> {
        let desc = Desc {
            call: Call::Barrier,
            dtype: None,
            dims: Vec::new(),
        };
        let null = (InPtr(std::ptr::null()), OutPtr(std::ptr::null_mut()));
        self.round(desc, null.0, null.1, |_| ())
    }

    fn split(
        &self,
        color: Option<usize>,
        key: usize,
        label: &str,
    ) -> Result<Option<Arc<dyn Backend>>> {
        let desc = Desc {
            call: Call::Split {
                color,
                key,
                label: label.to_string(),
            },
            dtype: None,
            dims: Vec::new(),
        };
        let me = self.rank;
        let null = (InPtr(std::ptr::null()), OutPtr(std::ptr::null_mut()));
        let handle = self.round(desc, null.0, null.1, |d| d.split[me].clone())?;
        Ok(handle.map(|h| Arc::new(h) as Arc<dyn Backend>))
    }

    fn abort(&self, reason: &str) {
        self.group.fabric.fail(self.global(), reason);
    }
}
