//! Communicators: a cheap, cloneable [`Comm`] handle for one rank of one group, over a
//! [`Backend`].
//!
//! Every operation takes and returns Candle tensors. Outputs are always fresh tensors that never
//! alias an input, so a result can be turned into a `Var` or updated in place safely.
//!
//! The default backend ([`local`]) runs the ranks as threads of one process and moves data
//! through shared memory. The GPU backend (`nccl`, cargo feature `nccl`) implements the same
//! [`Backend`] trait: the trait works on Candle's CPU *and* CUDA storage, so no layer changes
//! when the backend does.
//!
//! ```
//! use candle_core::{Tensor, Device};
//! use candle_parallel::comm::ReduceOp;
//! use candle_parallel::launch::launch;
//!
//! let sums = launch(2, |ctx| {
//!     let x = Tensor::new(&[ctx.rank() as f32 + 1.0, 10.0], &Device::Cpu)?;
//!     ctx.comm().all_reduce(&x, ReduceOp::Sum)?.to_vec1::<f32>()
//! })?;
//! assert_eq!(sums, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```
mod error;
mod lane;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
#[doc(hidden)]
pub mod nccl_engine;

pub use error::CommError;
pub use lane::{Fence, Work};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::shape::Dim;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Locks `m`, ignoring poisoning: a panic while holding one of the crate's locks leaves
/// consistent state (no code under them panics by design); keep going rather than cascading
/// the panic into every rank.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether communication lanes run (see [`set_overlap`]); `UNSET` until first read.
static OVERLAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// Turns the communication lanes on (the default) or off for the whole process: off, every
/// asynchronous operation ([`Comm::start`], the `*_async` methods, and what overlaps through
/// them: gradient buckets, ZeRO 3's prefetch, pipeline messages) runs where it is started and
/// returns finished. The numbers are the same either way; what changes is what overlaps.
/// `CANDLE_PARALLEL_OVERLAP=0` sets it off at start. For measuring overlap (and for ruling it
/// out when debugging).
pub fn set_overlap(on: bool) {
    OVERLAP.store(u8::from(on), std::sync::atomic::Ordering::Relaxed);
}

/// Whether the communication lanes run ([`set_overlap`]).
pub fn overlap() -> bool {
    match OVERLAP.load(std::sync::atomic::Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("CANDLE_PARALLEL_OVERLAP").map_or(true, |v| v.trim() != "0");
            set_overlap(on);
            on
        }
        v => v == 1,
    }
}

/// Whether pipeline messages go on the lanes (see [`set_overlap_p2p`]); `UNSET` until read.
static OVERLAP_P2P: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);

/// Posts pipeline stages' messages on the communication lanes, waited for only where an
/// action consumes them (Megatron's `overlap_p2p_comm`), or not (the default, as Megatron's):
/// each tick's exchange then runs where it is due. Off by default because on the CPU backend
/// with more ranks than cores the lane threads' hand-offs cost more than the small activation
/// messages they would hide (`bench_pipeline` measures both); with [`set_overlap`]`(false)`
/// it is off whatever this says. `CANDLE_PARALLEL_OVERLAP_P2P=1` sets it on at start. The
/// numbers are the same either way.
pub fn set_overlap_p2p(on: bool) {
    OVERLAP_P2P.store(u8::from(on), std::sync::atomic::Ordering::Relaxed);
}

/// Whether pipeline messages go on the lanes ([`set_overlap_p2p`], and [`overlap`]).
pub fn overlap_p2p() -> bool {
    let on = match OVERLAP_P2P.load(std::sync::atomic::Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("CANDLE_PARALLEL_OVERLAP_P2P").is_ok_and(|v| v.trim() == "1");
            set_overlap_p2p(on);
            on
        }
        v => v == 1,
    };
    on && overlap()
}

/// A group's name in messages, `tp[0,1]`: its label and the global ranks of its members.
pub(crate) fn group_label(label: &str, ranks: &[usize]) -> String {
    let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    format!("{label}[{}]", ranks.join(","))
}

/// How [`Comm::all_reduce`] and [`Comm::reduce_scatter`] combine the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group size (integer division for integer dtypes).
    Avg,
    Max,
    Min,
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sum => "sum",
            Self::Avg => "avg",
            Self::Max => "max",
            Self::Min => "min",
        })
    }
}

/// A collective that maps one input buffer per rank to one output buffer per rank: what a
/// [`Backend`] runs on CPU or CUDA storage.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Collective {
    AllReduce {
        op: ReduceOp,
    },
    /// Concatenates the ranks' inputs (equal shapes) along `dim`, in group-rank order.
    AllGather {
        dim: usize,
    },
    /// Reduces the inputs, then keeps the `rank`-th of `size` equal chunks along `dim`.
    ReduceScatter {
        dim: usize,
        op: ReduceOp,
    },
    /// Rank `i` sends rows `[sum(send[..j]), sum(send[..=j]))` of dim 0 to rank `j`, and
    /// receives `recv[j]` rows from rank `j`, concatenated in rank order.
    AllToAll {
        send_splits: Vec<usize>,
        recv_splits: Vec<usize>,
    },
    /// Every rank receives a copy of `root`'s input.
    Broadcast {
        root: usize,
    },
}

impl Collective {
    /// The operation's name, as used in error messages and traces.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AllReduce { .. } => "all_reduce",
            Self::AllGather { .. } => "all_gather",
            Self::ReduceScatter { .. } => "reduce_scatter",
            Self::AllToAll { .. } => "all_to_all",
            Self::Broadcast { .. } => "broadcast",
        }
    }

    /// The shape of this rank's output for an input of shape `dims` in a group of `size`.
    /// `None` when the arguments cannot be valid (the group-wide check reports why).
    pub fn output_dims(&self, dims: &[usize], size: usize) -> Option<Vec<usize>> {
        let mut out = dims.to_vec();
        match self {
            Self::AllReduce { .. } | Self::Broadcast { .. } => {}
            Self::AllGather { dim } => *out.get_mut(*dim)? *= size,
            Self::ReduceScatter { dim, .. } => {
                let d = out.get_mut(*dim)?;
                if !d.is_multiple_of(size) {
                    return None;
                }
                *d /= size;
            }
            Self::AllToAll { recv_splits, .. } => *out.first_mut()? = recv_splits.iter().sum(),
        }
        Some(out)
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AllReduce { op } => write!(f, "all_reduce({op})"),
            Self::AllGather { dim } => write!(f, "all_gather(dim={dim})"),
            Self::ReduceScatter { dim, op } => write!(f, "reduce_scatter(dim={dim}, {op})"),
            Self::AllToAll {
                send_splits,
                recv_splits,
            } => write!(f, "all_to_all(send={send_splits:?}, recv={recv_splits:?})"),
            Self::Broadcast { root } => write!(f, "broadcast(root={root})"),
        }
    }
}

/// What a communication backend implements for one rank of one group.
///
/// Ranks are numbered `0..size()` within the group; [`Backend::ranks`] maps them to global
/// ranks for messages. Every rank of a group must issue the same calls in the same order; a
/// backend reports any disagreement as an error on every rank (never a hang), and once a group
/// has failed all later calls on it fail too.
pub trait Backend: Send + Sync + 'static {
    /// Short backend name (`"local"`, `"nccl"`).
    fn name(&self) -> &'static str;
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Global ranks of the group's members, in group-rank order.
    fn ranks(&self) -> &[usize];
    /// A label for messages, such as `tp[0,1]`.
    fn label(&self) -> &str;
    /// The device whose tensors this backend moves.
    fn device(&self) -> &Device;
    /// Runs `op` on a CPU buffer. The layout is contiguous (callers make it so).
    fn collective_cpu(
        &self,
        op: &Collective,
        input: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _ = (input, layout);
        Err(CommError::Unsupported {
            backend: self.name(),
            what: format!("{op} on CPU tensors"),
        }
        .into())
    }
    /// Runs `op` on a CUDA buffer. The layout is contiguous (callers make it so).
    fn collective_cuda(
        &self,
        op: &Collective,
        input: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let _ = (input, layout);
        Err(CommError::Unsupported {
            backend: self.name(),
            what: format!("{op} on CUDA tensors"),
        }
        .into())
    }
    /// All-reduces a CPU buffer in place: afterwards `storage` holds the result where the
    /// input was. The layout is contiguous (callers make it so). The default runs
    /// [`Backend::collective_cpu`] and copies the result back; a backend that can reduce in
    /// place (no fresh output buffer, no first-touch page faults) overrides it.
    fn all_reduce_in_place_cpu(
        &self,
        op: ReduceOp,
        storage: &mut CpuStorage,
        layout: &Layout,
    ) -> Result<()> {
        let (out, shape) = self.collective_cpu(&Collective::AllReduce { op }, storage, layout)?;
        out.copy_strided_src(storage, layout.start_offset(), &Layout::contiguous(shape))
    }
    /// [`Backend::all_reduce_in_place_cpu`] on a CUDA buffer.
    fn all_reduce_in_place_cuda(
        &self,
        op: ReduceOp,
        storage: &mut CudaStorage,
        layout: &Layout,
    ) -> Result<()> {
        let (out, shape) = self.collective_cuda(&Collective::AllReduce { op }, storage, layout)?;
        out.copy_strided_src(storage, layout.start_offset(), &Layout::contiguous(shape))
    }
    /// Sends `x` to group rank `dst`; may wait until `dst` posts the matching receive.
    fn send(&self, x: &Tensor, dst: usize) -> Result<()>;
    /// Receives a tensor of the given shape and dtype from group rank `src`.
    fn recv(&self, src: usize, shape: &Shape, dtype: DType) -> Result<Tensor>;
    /// Runs `sends` (tensor, destination) and receives (source, shape, dtype) as one group,
    /// so that they progress together and cannot deadlock one another (PyTorch's
    /// `batch_isend_irecv`, NCCL's grouped `ncclSend`/`ncclRecv`); returns the received
    /// tensors in the order of `recvs`.
    fn exchange(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<Vec<Tensor>> {
        let _ = (sends, recvs);
        Err(CommError::Unsupported {
            backend: self.name(),
            what: "grouped point-to-point (exchange)".to_string(),
        }
        .into())
    }
    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<()>;
    /// Collective: ranks passing the same `color` form a new group, ordered by `(key, rank)`;
    /// ranks passing `None` get no group.
    fn split(
        &self,
        color: Option<usize>,
        key: usize,
        label: &str,
    ) -> Result<Option<Arc<dyn Backend>>>;
    /// Marks the group (and, for the local backend, the whole job) as failed because of this
    /// rank, so that no other rank waits forever for it.
    fn abort(&self, reason: &str);
    /// Starts running this thread's operations on the group on the backend's own
    /// communication stream without ordering the caller's work after them (what
    /// [`Comm::start`] does on NCCL): `false`, the default, where the backend has none (the
    /// CPU's lane thread then runs them).
    fn begin_async(&self) -> bool {
        false
    }
    /// Ends what [`Backend::begin_async`] started: what the caller's work must be ordered
    /// after before it uses the operations' results (`None`: nothing to wait for).
    fn end_async(&self) -> Option<Box<dyn Fence>> {
        None
    }
}

/// A handle for one rank of one communication group: cheap to clone, shareable across threads.
///
/// See the [module documentation](self) for an example.
#[derive(Clone)]
pub struct Comm {
    backend: Arc<dyn Backend>,
    /// This rank's communication lane on the group, shared by the handle's clones; started
    /// by the first asynchronous call (`None` inside: operations run where they are called).
    lane: Arc<OnceLock<Option<lane::Lane>>>,
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Comm({} {} rank {}/{})",
            self.backend.name(),
            self.backend.label(),
            self.rank(),
            self.size()
        )
    }
}

impl Comm {
    /// Wraps a backend handle.
    pub fn from_backend(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            lane: Arc::default(),
        }
    }

    /// A handle on the same group that runs everything where it is called, bypassing the
    /// lane: what the lane's own jobs use.
    fn direct(&self) -> Self {
        // No lane of its own: its asynchronous calls run where they are made (on the lane).
        Self {
            backend: self.backend.clone(),
            lane: Arc::new(OnceLock::from(None)),
        }
    }

    /// The lane, started on first use; `None` off the CPU (NCCL enqueues and returns) or if
    /// its thread cannot start.
    fn lane(&self) -> Option<&lane::Lane> {
        if !self.device().is_cpu() {
            return None;
        }
        self.lane
            .get_or_init(|| {
                let name = format!("lane {} r{}", self.label(), self.ranks()[self.rank()]);
                lane::Lane::start(name)
                    .map_err(|e| tracing::warn!("{e}; its operations run synchronously"))
                    .ok()
            })
            .as_ref()
    }

    /// Waits until the operations queued on this group's lane are over: a blocking call never
    /// overtakes them (every rank of the group sees the same order).
    pub(crate) fn drain(&self) {
        if let Some(Some(lane)) = self.lane.get() {
            lane.drain()
        }
    }

    /// Waits for every operation started on this group's lane ([`Comm::start`], the `*_async`
    /// methods) to finish; their results stay with their [`Work`] handles.
    pub fn synchronize(&self) {
        self.drain()
    }

    /// Starts `f` on this rank's communication lane for the group and returns at once: on the
    /// CPU a thread of the rank's runs the group's operations one after the other in the order
    /// they were started, while the caller computes; on NCCL `f` runs here, its operations
    /// enqueued on the group's communication stream, which the compute stream waits for (on
    /// the device, with an event) only where the work is waited for ([`Work::wait`], on the
    /// thread that started it) or dropped. `f` gets a handle that runs its calls directly.
    /// Every rank of the group must start the same operations in the same order, as with
    /// blocking calls; a blocking call on the group first waits for the operations started
    /// before it. `what` names the operation in errors. With [`set_overlap`]`(false)` it runs
    /// here too. On NCCL, keep the tensors `f` moves alive until the work is waited for (the
    /// `*_async` calls keep theirs), as PyTorch's `record_stream` does.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_parallel::{comm::ReduceOp, launch};
    ///
    /// let got = launch(2, |ctx| {
    ///     let x = Tensor::new(&[ctx.rank() as f32 + 1.0], &Device::Cpu)?;
    ///     // Reduce and scale on the lane; the rank goes on meanwhile.
    ///     let work = ctx.comm().start("scaled sum", move |c| {
    ///         c.all_reduce(&x, ReduceOp::Sum)? * 10.0
    ///     });
    ///     work.wait()?.to_vec1::<f32>()
    /// })?;
    /// assert_eq!(got, vec![vec![30.0], vec![30.0]]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn start<T, F>(&self, what: &str, f: F) -> Work<T>
    where
        T: Send + 'static,
        F: FnOnce(&Comm) -> Result<T> + Send + 'static,
    {
        self.start_keeping(what, Vec::new(), f)
    }

    /// [`Comm::start`], with `keep` (the operation's input tensors) alive until the work is
    /// waited for: on NCCL their memory cannot be reused while the communication stream may
    /// still read it.
    fn start_keeping<T, F>(&self, what: &str, keep: Vec<Tensor>, f: F) -> Work<T>
    where
        T: Send + 'static,
        F: FnOnce(&Comm) -> Result<T> + Send + 'static,
    {
        let direct = self.direct();
        if !overlap() {
            // Behind whatever a lane started before the switch.
            self.drain();
            return Work::done(f(&direct));
        }
        if self.backend.begin_async() {
            // NCCL: enqueued on the group's communication stream here, waited for by the
            // compute stream where the caller waits for the work.
            struct Scope<'a>(Option<&'a dyn Backend>);
            impl Drop for Scope<'_> {
                fn drop(&mut self) {
                    // `f` panicked: close the scope (its fence orders the stream as dropped).
                    if let Some(b) = self.0 {
                        drop(b.end_async());
                    }
                }
            }
            let mut scope = Scope(Some(self.backend.as_ref()));
            let result = f(&direct);
            scope.0 = None;
            return Work::fenced(result, self.backend.end_async(), keep);
        }
        match self.lane() {
            Some(lane) => lane.submit(what, move || f(&direct)),
            None => Work::done(f(&direct)),
        }
    }

    /// [`Comm::all_reduce`] on the lane ([`Comm::start`]).
    pub fn all_reduce_async(&self, x: &Tensor, op: ReduceOp) -> Work<Tensor> {
        let x = x.clone();
        let keep = vec![x.clone()];
        self.start_keeping("all_reduce", keep, move |c| c.all_reduce(&x, op))
    }

    /// [`Comm::all_reduce_in_place`] on the lane ([`Comm::start`]): `x` holds the result once
    /// the work is waited for; do not read or write it before.
    pub fn all_reduce_in_place_async(&self, x: &Tensor, op: ReduceOp) -> Work<()> {
        let x = x.clone();
        let keep = vec![x.clone()];
        self.start_keeping("all_reduce_in_place", keep, move |c| {
            c.all_reduce_in_place(&x, op)
        })
    }

    /// [`Comm::reduce_scatter`] along `dim` on the lane ([`Comm::start`]).
    pub fn reduce_scatter_async(&self, x: &Tensor, dim: usize, op: ReduceOp) -> Work<Tensor> {
        let x = x.clone();
        let keep = vec![x.clone()];
        self.start_keeping("reduce_scatter", keep, move |c| {
            c.reduce_scatter(&x, dim, op)
        })
    }

    /// [`Comm::all_gather`] along `dim` on the lane ([`Comm::start`]).
    pub fn all_gather_async(&self, x: &Tensor, dim: usize) -> Work<Tensor> {
        let x = x.clone();
        let keep = vec![x.clone()];
        self.start_keeping("all_gather", keep, move |c| c.all_gather(&x, dim))
    }

    /// [`Comm::exchange`] on the lane ([`Comm::start`]): sends posted and receives awaited
    /// while the caller computes (Megatron's overlapped point-to-point).
    pub fn exchange_async(
        &self,
        sends: Vec<(Tensor, usize)>,
        recvs: Vec<(usize, Shape, DType)>,
    ) -> Work<Vec<Tensor>> {
        let keep = sends.iter().map(|(t, _)| t.clone()).collect();
        self.start_keeping("exchange", keep, move |c| {
            let sends: Vec<(&Tensor, usize)> = sends.iter().map(|(t, d)| (t, *d)).collect();
            let recvs: Vec<(usize, &Shape, DType)> =
                recvs.iter().map(|(s, sh, dt)| (*s, sh, *dt)).collect();
            c.exchange(&sends, &recvs)
        })
    }

    /// The backend behind this handle.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.backend.rank()
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.backend.size()
    }

    /// Global ranks of the group's members, in group-rank order.
    pub fn ranks(&self) -> &[usize] {
        self.backend.ranks()
    }

    /// The group's label, such as `tp[0,1]`.
    pub fn label(&self) -> &str {
        self.backend.label()
    }

    /// The device whose tensors this communicator moves.
    pub fn device(&self) -> &Device {
        self.backend.device()
    }

    /// Reduces `x` over the group; every rank gets the result.
    pub fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.collective(x, Collective::AllReduce { op })
    }

    /// Reduces `x` over the group into `x` itself: no output is allocated (a gradient bucket
    /// reduced in place). `x` must be contiguous; it must not be shared with a tensor that
    /// expects its old values (candle tensors share storage when one is a view of another).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_parallel::{comm::ReduceOp, launch};
    ///
    /// let sums = launch(2, |ctx| {
    ///     let bucket = Tensor::new(&[ctx.rank() as f32, 1.0], &Device::Cpu)?;
    ///     ctx.comm().all_reduce_in_place(&bucket, ReduceOp::Sum)?;
    ///     bucket.to_vec1::<f32>()
    /// })?;
    /// assert_eq!(sums, vec![vec![1.0, 2.0], vec![1.0, 2.0]]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn all_reduce_in_place(&self, x: &Tensor, op: ReduceOp) -> Result<()> {
        if !x.is_contiguous() {
            candle_core::bail!(
                "all_reduce_in_place on {}: the tensor of shape {:?} is not contiguous; reduce a contiguous buffer",
                self.label(),
                x.dims()
            )
        }
        tracing::trace!(group = self.label(), op = %op, shape = ?x.dims(), dtype = ?x.dtype(), "all_reduce in place");
        self.drain();
        x.inplace_op1(&InPlaceAllReduce {
            backend: self.backend(),
            op,
        })
    }

    /// Concatenates every rank's `x` (equal shapes) along `dim`, in rank order.
    pub fn all_gather<D: Dim>(&self, x: &Tensor, dim: D) -> Result<Tensor> {
        let dim = dim.to_index(x.shape(), "all_gather")?;
        self.collective(x, Collective::AllGather { dim })
    }

    /// Reduces `x` over the group and returns this rank's chunk along `dim`, whose size must be
    /// divisible by the group size.
    pub fn reduce_scatter<D: Dim>(&self, x: &Tensor, dim: D, op: ReduceOp) -> Result<Tensor> {
        let dim = dim.to_index(x.shape(), "reduce_scatter")?;
        self.collective(x, Collective::ReduceScatter { dim, op })
    }

    /// Ragged all-to-all along dim 0: this rank sends `send_splits[j]` consecutive rows to rank
    /// `j` and receives `recv_splits[j]` rows from rank `j`, concatenated in rank order.
    /// `recv_splits` must match what the peers send; [`Comm::exchange_split_sizes`] computes it.
    pub fn all_to_all(
        &self,
        x: &Tensor,
        send_splits: &[usize],
        recv_splits: &[usize],
    ) -> Result<Tensor> {
        self.collective(
            x,
            Collective::AllToAll {
                send_splits: send_splits.to_vec(),
                recv_splits: recv_splits.to_vec(),
            },
        )
    }

    /// Tells every rank how many rows each peer will send it: returns `recv` with `recv[j]` the
    /// `send_splits[rank]` of rank `j` (an all-to-all of the counts).
    pub fn exchange_split_sizes(&self, send_splits: &[usize]) -> Result<Vec<usize>> {
        let counts: Vec<i64> = send_splits.iter().map(|&c| c as i64).collect();
        let n = self.size();
        let ones = vec![1; n];
        let x = Tensor::from_vec(counts, send_splits.len(), self.device())?;
        if send_splits.len() != n {
            // Let the group-wide check report it on every rank.
            return self.all_to_all(&x, send_splits, &ones).map(|_| Vec::new());
        }
        let recv = self.all_to_all(&x, &ones, &ones)?;
        Ok(recv
            .to_vec1::<i64>()?
            .into_iter()
            .map(|c| c as usize)
            .collect())
    }

    /// Every rank's byte string, in rank order (lengths may differ): for small metadata.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let len = Tensor::new(&[bytes.len() as i64], self.device())?;
        let lens: Vec<usize> = self
            .all_gather(&len, 0)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|l| l as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut padded = bytes.to_vec();
        padded.resize(max, 0);
        let all = self
            .all_gather(&Tensor::from_vec(padded, max, self.device())?, 0)?
            .to_vec1::<u8>()?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &l)| all[r * max..r * max + l].to_vec())
            .collect())
    }

    /// Every rank gets a copy of `root`'s `x`; the other ranks pass a tensor of the same shape
    /// and dtype (its values are ignored).
    pub fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(x, Collective::Broadcast { root })
    }

    /// Sends `x` to group rank `dst` (a copy travels; `x` stays yours).
    ///
    /// Rendezvous semantics, on every backend: `send` may wait until `dst` posts the matching
    /// [`Comm::recv`] (an ungrouped `ncclSend` waits for its peer on the GPU stream, and the
    /// local backend waits the same way, so that code which deadlocks on GPUs deadlocks on the
    /// CPU too, where the timeout reports it). Do not rely on buffering: a ring where every
    /// rank sends before it receives deadlocks; use [`Comm::send_recv`] there. A rank cannot
    /// send to itself with `send`. A zero-element message moves nothing and waits for no one.
    pub fn send(&self, x: &Tensor, dst: usize) -> Result<()> {
        tracing::trace!(group = self.label(), dst, shape = ?x.dims(), "send");
        self.drain();
        self.backend.send(x, dst)
    }

    /// Sends `x` to `dst` and receives a tensor of `shape` and `dtype` from `src` in one step
    /// (a grouped `ncclSend` + `ncclRecv`): every rank of a ring can call it at once, and
    /// `dst == src == rank` returns a copy of `x`. A pipeline stage uses it to pass activations
    /// on while it receives the next ones.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_parallel::launch;
    ///
    /// let got = launch(3, |ctx| {
    ///     let (r, n) = (ctx.rank(), ctx.world_size());
    ///     let x = Tensor::new(&[r as f32], &Device::Cpu)?;
    ///     let y = ctx.comm().send_recv(&x, (r + 1) % n, (r + n - 1) % n, 1, DType::F32)?;
    ///     y.to_vec1::<f32>()
    /// })?;
    /// assert_eq!(got, vec![vec![2.0], vec![0.0], vec![1.0]]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn send_recv<S: Into<Shape>>(
        &self,
        x: &Tensor,
        dst: usize,
        src: usize,
        shape: S,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        tracing::trace!(group = self.label(), dst, src, shape = ?shape.dims(), "send_recv");
        self.drain();
        Ok(self
            .backend
            .exchange(&[(x, dst)], &[(src, &shape, dtype)])?
            .remove(0))
    }

    /// Sends every `(tensor, destination)` of `sends` and receives every `(source, shape,
    /// dtype)` of `recvs` as one group (PyTorch's `batch_isend_irecv`): they progress
    /// together, so neighbours that send to each other at once cannot deadlock. Messages
    /// between the same pair arrive in the order given. Returns the received tensors in the
    /// order of `recvs`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Shape, Tensor};
    /// use candle_parallel::launch;
    ///
    /// // Every rank sends to both neighbours and receives from both.
    /// let got = launch(3, |ctx| {
    ///     let (r, n) = (ctx.rank(), ctx.world_size());
    ///     let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    ///     let x = Tensor::new(&[r as f32], &Device::Cpu)?;
    ///     let one = Shape::from(1);
    ///     let got = ctx.comm().exchange(
    ///         &[(&x, next), (&x, prev)],
    ///         &[(prev, &one, DType::F32), (next, &one, DType::F32)],
    ///     )?;
    ///     Ok((got[0].to_vec1::<f32>()?[0], got[1].to_vec1::<f32>()?[0]))
    /// })?;
    /// assert_eq!(got, vec![(2.0, 1.0), (0.0, 2.0), (1.0, 0.0)]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn exchange(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, &Shape, DType)],
    ) -> Result<Vec<Tensor>> {
        tracing::trace!(
            group = self.label(),
            sends = sends.len(),
            recvs = recvs.len(),
            "exchange"
        );
        self.drain();
        self.backend.exchange(sends, recvs)
    }

    /// Receives a tensor of `shape` and `dtype` from group rank `src`. A sender whose tensor
    /// differs fails both sides with an error naming the two shapes (on the NCCL backend, with
    /// `CANDLE_PARALLEL_CHECK_COLLECTIVES=1`).
    pub fn recv<S: Into<Shape>>(&self, src: usize, shape: S, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        tracing::trace!(group = self.label(), src, shape = ?shape.dims(), "recv");
        self.drain();
        self.backend.recv(src, &shape, dtype)
    }

    /// Returns once every rank of the group has reached it.
    pub fn barrier(&self) -> Result<()> {
        self.drain();
        self.backend.barrier()
    }

    /// Collective over the group: ranks with the same `color` form a new group, ordered by
    /// `(key, rank)`, as `MPI_Comm_split`; `None` opts out and returns `None`.
    pub fn split(&self, color: Option<usize>, key: usize) -> Result<Option<Comm>> {
        self.split_labeled(color, key, "split")
    }

    /// [`Comm::split`] with a label for the new groups' messages (`tp` gives `tp[0,1]`).
    pub fn split_labeled(
        &self,
        color: Option<usize>,
        key: usize,
        label: &str,
    ) -> Result<Option<Comm>> {
        self.drain();
        Ok(self
            .backend
            .split(color, key, label)?
            .map(Comm::from_backend))
    }

    /// Fails the group on behalf of this rank: every other rank's pending and later calls
    /// return an error carrying `reason`. (The local backend fails the whole job; NCCL aborts
    /// every communicator of this rank in the world, whose peers then fail or time out.)
    pub fn abort(&self, reason: &str) {
        self.backend.abort(reason)
    }

    /// Runs `op` on `x` without recording it for backprop.
    fn collective(&self, x: &Tensor, op: Collective) -> Result<Tensor> {
        tracing::trace!(group = self.label(), op = %op, shape = ?x.dims(), dtype = ?x.dtype(), "collective");
        self.drain();
        x.contiguous()?.apply_op1_no_bwd(&CollectiveOp {
            backend: self.backend(),
            op: &op,
        })
    }
}

/// Runs a collective as the forward of a Candle custom op, on CPU or CUDA storage.
struct CollectiveOp<'a> {
    backend: &'a dyn Backend,
    op: &'a Collective,
}

impl CustomOp1 for CollectiveOp<'_> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.backend.collective_cpu(self.op, s, l)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.backend.collective_cuda(self.op, s, l)
    }
}

/// [`Comm::all_reduce_in_place`] as a Candle in-place op.
struct InPlaceAllReduce<'a> {
    backend: &'a dyn Backend,
    op: ReduceOp,
}

impl candle_core::InplaceOp1 for InPlaceAllReduce<'_> {
    fn name(&self) -> &'static str {
        "all_reduce_in_place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        self.backend.all_reduce_in_place_cpu(self.op, s, l)
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        self.backend.all_reduce_in_place_cuda(self.op, s, l)
    }
}

/// Storage types a [`Backend`] runs collectives on: lets code that is generic over CPU and
/// CUDA storage (the differentiable ops) call the right backend entry point.
pub(crate) trait CollectiveStorage: BackendStorage
where
    Self::Device: BackendDevice<Storage = Self>,
{
    fn run(backend: &dyn Backend, op: &Collective, s: &Self, l: &Layout) -> Result<(Self, Shape)>;
}

impl CollectiveStorage for CpuStorage {
    fn run(backend: &dyn Backend, op: &Collective, s: &Self, l: &Layout) -> Result<(Self, Shape)> {
        backend.collective_cpu(op, s, l)
    }
}

impl CollectiveStorage for CudaStorage {
    fn run(backend: &dyn Backend, op: &Collective, s: &Self, l: &Layout) -> Result<(Self, Shape)> {
        backend.collective_cuda(op, s, l)
    }
}

/// Backends whose library gathers and scatters flat buffers only (NCCL) regroup along other
/// dims with these. `c` is one rank's contiguous run within one of the `outer` rows.
///
/// After a flat all-gather of `n` inputs of `[outer, c]` into `flat` (`[n, outer, c]`), writes
/// `out` as `[outer, n * c]`: the concatenation along the gathered dim.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn regroup_gathered<S: BackendStorage>(
    flat: &S,
    out: &mut S,
    n: usize,
    outer: usize,
    c: usize,
) -> Result<()> {
    for r in 0..n {
        flat.copy2d(out, outer, c, c, n * c, r * outer * c, r * c)?;
    }
    Ok(())
}

/// Before a flat reduce-scatter: copies `input` (`[outer, n * c]` from element `start`) into
/// `tmp` as `[n, outer, c]`, so that rank `r`'s chunk is contiguous.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn regroup_for_scatter<S: BackendStorage>(
    input: &S,
    start: usize,
    tmp: &mut S,
    n: usize,
    outer: usize,
    c: usize,
) -> Result<()> {
    for r in 0..n {
        input.copy2d(tmp, outer, c, n * c, c, start + r * c, r * outer * c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::op::BackpropOp;
    use candle_core::{IndexOp, Storage};

    fn cpu(t: &Tensor) -> CpuStorage {
        match &*t.storage_and_layout().0 {
            Storage::Cpu(s) => s.clone(),
            _ => unreachable!("CPU tensor"),
        }
    }

    fn tensor(s: CpuStorage, dims: &[usize]) -> Tensor {
        Tensor::from_storage(Storage::Cpu(s), dims, BackpropOp::none(), false)
    }

    /// The regrouping the NCCL backend does around its flat collectives, checked on CPU
    /// storage against concatenation and narrowing along every dim.
    #[test]
    fn regrouping_matches_cat_and_narrow_along_every_dim() -> Result<()> {
        let n = 3;
        let dims = [2usize, 3, 4];
        let xs: Vec<Tensor> = (0..n)
            .map(|r| {
                Tensor::arange(0f32, 24.0, &Device::Cpu)?
                    .affine(1.0, 100.0 * r as f64)?
                    .reshape(&dims[..])
            })
            .collect::<Result<_>>()?;
        for dim in 0..dims.len() {
            let outer: usize = dims[..dim].iter().product();
            let len = 24;
            let c = len / outer;
            // All-gather: NCCL concatenates the flat inputs.
            let flat = Tensor::cat(
                &xs.iter()
                    .map(|x| x.flatten_all())
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?;
            let mut out = CpuStorage::F32(vec![0.0; n * len]);
            regroup_gathered(&cpu(&flat), &mut out, n, outer, c)?;
            let want = Tensor::cat(&xs, dim)?;
            let got = tensor(out, want.dims());
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "gather dim {dim}"
            );
            // Reduce-scatter: rank r's chunk of the regrouped input is its slice along dim.
            let big = Tensor::cat(&xs, dim)?; // n * dims[dim] along dim
            let pad = Tensor::zeros(5, DType::F32, &Device::Cpu)?;
            let with_offset = Tensor::cat(&[pad, big.flatten_all()?], 0)?;
            let mut tmp = CpuStorage::F32(vec![0.0; n * len]);
            regroup_for_scatter(&cpu(&with_offset), 5, &mut tmp, n, outer, c)?;
            let tmp = tensor(tmp, &[n, len]);
            for r in 0..n {
                let want = big.narrow(dim, r * dims[dim], dims[dim])?.flatten_all()?;
                assert_eq!(
                    tmp.i(r)?.to_vec1::<f32>()?,
                    want.to_vec1::<f32>()?,
                    "scatter dim {dim} rank {r}"
                );
            }
        }
        Ok(())
    }
}
