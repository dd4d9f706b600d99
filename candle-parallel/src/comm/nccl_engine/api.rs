//! The narrow interface between the NCCL backend's logic and NCCL itself.
//!
//! The backend ([`super::EngineBackend`]) does everything NCCL leaves to its caller: checking
//! arguments, regrouping along dims other than 0, grouping the sends and receives of a ragged
//! all-to-all, the watchdog, aborting. It reaches NCCL, device memory and streams only through
//! [`NcclApi`]. The CUDA implementation (`comm::nccl`, feature `nccl`) forwards to NCCL; the
//! tests implement it over host memory with NCCL's documented semantics, so that the backend's
//! logic runs with several ranks on a machine without GPUs.

use crate::comm::ReduceOp;
use candle_core::backend::BackendStorage;
use candle_core::{DType, Device, Layout, Result, Shape, Tensor};

/// An address in the memory the implementation moves (a CUDA device pointer, or a host pointer
/// for an emulator).
pub type Addr = u64;

/// What an NCCL call reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Success,
    /// The (non-blocking) communicator is still working on the call: poll
    /// [`NcclApi::async_error`] until it is something else before the next call on it.
    InProgress,
    /// NCCL's error name and message.
    Failed(String),
}

/// NCCL's API as the backend uses it, on non-blocking communicators: no call waits for peers on
/// the host, so an abort from another thread is never blocked by a call in flight.
///
/// # Safety
/// Implementations move raw memory: the `unsafe` methods take addresses that the caller
/// guarantees to lie inside live buffers of the given sizes, ordered on the given stream.
pub trait NcclApi: Sized + Send + Sync + 'static {
    /// A communicator handle.
    type Comm: Copy + Send + Sync + 'static;
    /// The storage of the tensors this implementation moves.
    type Storage: BackendStorage + 'static;
    /// An ordered queue of device work.
    type Stream: Clone + Send + Sync + 'static;
    /// A marker in a stream: done once everything enqueued before it is done.
    type Event: Send + 'static;

    /// A fresh id for a new world (rank 0 makes it, every rank joins with it).
    fn unique_id() -> Result<[u8; 128]>;
    /// Starts joining rank `rank` of the world `id` of `nranks` ranks on `device`, as a
    /// non-blocking communicator: [`Status::InProgress`] until every rank has joined.
    fn init_rank(
        nranks: usize,
        id: &[u8; 128],
        rank: usize,
        device: &Device,
    ) -> (Option<Self::Comm>, Status);
    /// `ncclCommGetAsyncError`: the state of the communicator's last call and of its
    /// background work.
    fn async_error(comm: Self::Comm) -> Status;
    /// `ncclCommAbort`: frees the communicator and ends its kernels still waiting for peers.
    fn abort(comm: Self::Comm);
    /// `ncclCommFinalize`: flushes the communicator's work before [`NcclApi::destroy`]
    /// (`InProgress` until done).
    fn finalize(comm: Self::Comm) -> Status;
    /// `ncclCommDestroy`: frees a finalized communicator.
    fn destroy(comm: Self::Comm);
    fn group_start() -> Status;
    fn group_end() -> Status;
    /// Whether NCCL reduces this dtype.
    fn reduces(dtype: DType) -> bool;
    /// # Safety
    /// See the trait.
    #[allow(clippy::too_many_arguments)]
    unsafe fn all_reduce(
        comm: Self::Comm,
        send: Addr,
        recv: Addr,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: &Self::Stream,
    ) -> Status;
    /// Byte-wise all-gather of `bytes` from every rank, concatenated in rank order.
    /// # Safety
    /// See the trait.
    unsafe fn all_gather(
        comm: Self::Comm,
        send: Addr,
        recv: Addr,
        bytes: usize,
        stream: &Self::Stream,
    ) -> Status;
    /// # Safety
    /// See the trait.
    #[allow(clippy::too_many_arguments)]
    unsafe fn reduce_scatter(
        comm: Self::Comm,
        send: Addr,
        recv: Addr,
        recv_count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: &Self::Stream,
    ) -> Status;
    /// # Safety
    /// See the trait.
    unsafe fn broadcast(
        comm: Self::Comm,
        send: Addr,
        recv: Addr,
        bytes: usize,
        root: usize,
        stream: &Self::Stream,
    ) -> Status;
    /// # Safety
    /// See the trait.
    unsafe fn send(
        comm: Self::Comm,
        buf: Addr,
        bytes: usize,
        peer: usize,
        stream: &Self::Stream,
    ) -> Status;
    /// # Safety
    /// See the trait.
    unsafe fn recv(
        comm: Self::Comm,
        buf: Addr,
        bytes: usize,
        peer: usize,
        stream: &Self::Stream,
    ) -> Status;

    /// The stream the backend enqueues on for tensors of `device`; an error naming `op` when
    /// the device is not one this implementation moves.
    fn stream(device: &Device, op: &str) -> Result<Self::Stream>;
    /// A new stream on `device` for a communicator's own work (PyTorch's NCCL stream): the
    /// device's compute stream and it are ordered only through events
    /// ([`NcclApi::record`], [`NcclApi::wait_event`]).
    fn new_stream(device: &Device) -> Result<Self::Stream>;
    /// Makes `stream` wait, on the device (the host goes on at once), for everything enqueued
    /// before `event` on the stream it was recorded on.
    fn wait_event(stream: &Self::Stream, event: &Self::Event) -> Result<()>;
    /// Makes the calling thread ready to issue work on `stream` (binds the CUDA context).
    fn bind(stream: &Self::Stream) -> Result<()>;
    /// Runs `f` on the storage and layout of `t`, or fails naming `op` when `t` is not stored
    /// where this implementation moves data.
    fn with_storage<R>(
        t: &Tensor,
        op: &str,
        f: impl FnOnce(&Self::Storage, &Layout) -> Result<R>,
    ) -> Result<R>;
    /// Whether `s` lives on `device`.
    fn on_device(s: &Self::Storage, device: &Device) -> bool;
    /// A tensor owning `s`.
    fn into_tensor(s: Self::Storage, shape: Shape) -> Tensor;
    /// An uninitialised buffer.
    ///
    /// # Safety
    /// The caller writes every element before anyone reads it.
    unsafe fn alloc(device: &Device, shape: &Shape, dtype: DType) -> Result<Self::Storage>;
    /// `f` gets the address of `s` for reading on `stream`.
    fn read<R>(s: &Self::Storage, stream: &Self::Stream, f: impl FnOnce(Addr) -> R) -> R;
    /// `f` gets the address of `s` for writing on `stream`.
    fn write<R>(s: &mut Self::Storage, stream: &Self::Stream, f: impl FnOnce(Addr) -> R) -> R;
    /// Copies `bytes` bytes on `stream`.
    ///
    /// # Safety
    /// See the trait.
    unsafe fn copy(dst: Addr, src: Addr, bytes: usize, stream: &Self::Stream) -> Result<()>;
    fn record(stream: &Self::Stream) -> Result<Self::Event>;
    /// Whether everything before the event is done; an error when the device failed.
    fn is_done(event: &Self::Event) -> std::result::Result<bool, String>;
    /// Waits until the host may read what was enqueued on `stream` through the storage
    /// directly (host memory); CUDA work is ordered on the stream instead and returns at once.
    fn host_wait(stream: &Self::Stream) -> Result<()>;
    /// Waits until everything enqueued on `stream` is done.
    fn synchronize(stream: &Self::Stream) -> Result<()>;
    /// Waits until everything enqueued on any stream of `device` is done (CUDA: the context;
    /// Candle's compute stream is the calling thread's own).
    fn synchronize_device(device: &Device) -> Result<()>;
    /// `values` in device memory.
    fn upload_i64(device: &Device, values: &[i64]) -> Result<Self::Storage>;
    /// The values of `s`, once the work enqueued on `stream` before is done.
    fn download_i64(s: &Self::Storage, stream: &Self::Stream) -> Result<Vec<i64>>;
}
