//! The NCCL backend: communicators over CUDA devices (cargo feature `nccl`).
//!
//! [`NcclBackend`] is the backend logic of [`super::nccl_engine`] over NCCL itself
//! ([`CudaNccl`]): every operation is enqueued on a CUDA stream and returns at once (a group
//! of several ranks has a communication stream of its own, ordered with Candle's compute
//! stream by events: see [`super::nccl_engine`]); the host waits only where the algorithm
//! needs a value on the host (barrier, [`Comm::split`](super::Comm::split), the argument
//! checks).
//!
//! NCCL itself never times out: a rank that never arrives leaves its peers' kernels spinning.
//! A watchdog thread (one per process) therefore follows every enqueued operation with a CUDA
//! event. When one is not done within the timeout, or NCCL reports an asynchronous error, the
//! watchdog aborts the communicator (`ncclCommAbort`), which ends the spinning kernels; every
//! later call on it returns [`CommError::Aborted`](super::CommError::Aborted) with the reason
//! (the operation, its call number, the rank and NCCL's own message). Communicators are
//! non-blocking (`blocking = 0` in their config), so no NCCL call holds a communicator while
//! waiting for peers and an abort from the watchdog (or a failing peer thread) never races a
//! call in flight. A rank whose host thread went on after such an operation has undefined
//! values, so [`NcclBackend::check`] (and the launcher, at the end of a rank) waits for the
//! device and turns a past abort into an error.
//!
//! Set `CANDLE_PARALLEL_CHECK_COLLECTIVES=1` to have every collective first compare its
//! operation, dtype and shape across the group (one small all-gather and a host wait; a
//! ragged all-to-all also compares every pair's split sizes), and every send/recv pair compare
//! the sender's shape and dtype with the receiver's: a mismatch becomes
//! [`CommError::Mismatch`](super::CommError::Mismatch) on every rank involved, naming the
//! ranks and their shapes, instead of the hang or garbage NCCL would give.
//!
//! Candle's CUDA device computes on the calling thread's own stream (CUDA's per-thread default
//! stream); a communicator's operations wait for the calling thread's, and a
//! [`Work`](super::Work) orders the thread that waits for it (wait on the thread that started
//! it). Using one communicator from several threads is safe (calls are serialised) but orders
//! its operations only as the threads do.
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

pub use super::nccl_engine::{abort_world, NcclId};
use super::nccl_engine::{Addr, EngineBackend, NcclApi, Status};
use super::ReduceOp;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nccl::sys;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::mem::MaybeUninit;
use std::sync::Arc;

/// One rank of one NCCL communicator on a CUDA device. Built with [`NcclBackend::new`] (a new
/// world) or by [`Comm::split`](super::Comm::split); wrap it in a [`Comm`](super::Comm) with
/// [`Comm::from_backend`](super::Comm::from_backend).
pub type NcclBackend = EngineBackend<CudaNccl>;

impl NcclId {
    /// A fresh id (rank 0 only).
    pub fn new() -> Result<Self> {
        Self::generate::<CudaNccl>()
    }
}

/// NCCL's communicator configuration as NCCL 2.17 defines it (its first version with
/// `blocking`, `cgaClusterSize`, `minCTAs`, `maxCTAs` and `netName`). NCCL reads a config by
/// its `size` and `version` and gives later fields their defaults, so newer libraries accept
/// it; [`CudaNccl::init_rank`] checks the linked library is at least this version.
#[repr(C)]
struct NcclConfig {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
}

/// `NCCL_VERSION(2, 17, 0)`.
const CONFIG_VERSION: c_int = 21700;
/// `NCCL_CONFIG_UNDEF_INT`: NCCL's default for the field.
const UNDEF: c_int = c_int::MIN;

impl NcclConfig {
    /// The defaults of `NCCL_CONFIG_INITIALIZER`, non-blocking.
    fn non_blocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: CONFIG_VERSION as c_uint,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
        }
    }
}

/// The version of the NCCL library linked at run time, or why it is unusable.
fn nccl_version() -> std::result::Result<c_int, String> {
    let mut v: c_int = 0;
    // SAFETY: ncclGetVersion writes one int.
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    if r != sys::ncclResult_t::ncclSuccess {
        return Err(format!("ncclGetVersion failed: {r:?}"));
    }
    if v < CONFIG_VERSION {
        return Err(format!(
            "the linked NCCL library is version {v}; candle-parallel needs NCCL 2.17 or newer (non-blocking communicators)"
        ));
    }
    Ok(v)
}

/// A raw NCCL communicator.
#[derive(Clone, Copy)]
pub struct RawComm(sys::ncclComm_t);
// SAFETY: the engine uses a communicator from one thread at a time (under its lock).
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// NCCL and CUDA memory, as the backend logic uses them.
pub struct CudaNccl;

fn status(res: sys::ncclResult_t, comm: sys::ncclComm_t) -> Status {
    match res {
        sys::ncclResult_t::ncclSuccess => Status::Success,
        sys::ncclResult_t::ncclInProgress => Status::InProgress,
        _ => {
            // SAFETY: NCCL returns static, NUL-terminated strings.
            let name = unsafe { CStr::from_ptr(sys::ncclGetErrorString(res)) }
                .to_string_lossy()
                .into_owned();
            let last = unsafe { CStr::from_ptr(sys::ncclGetLastError(comm)) }
                .to_string_lossy()
                .into_owned();
            Status::Failed(if last.is_empty() {
                format!("NCCL error {res:?}: {name}")
            } else {
                format!("NCCL error {res:?}: {name} ({last})")
            })
        }
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

const BYTES: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;

fn cu(stream: &Arc<CudaStream>) -> sys::cudaStream_t {
    stream.cu_stream() as sys::cudaStream_t
}

/// One NCCL call that enqueues on `stream`: `f` gets the raw communicator and stream, and its
/// result becomes a [`Status`] with NCCL's message.
fn enqueue(
    comm: RawComm,
    stream: &Arc<CudaStream>,
    f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
) -> Status {
    status(f(comm.0, cu(stream)), comm.0)
}

impl NcclApi for CudaNccl {
    type Comm = RawComm;
    type Storage = CudaStorage;
    type Stream = Arc<CudaStream>;
    type Event = CudaEvent;

    fn unique_id() -> Result<[u8; 128]> {
        let mut id = MaybeUninit::uninit();
        // SAFETY: ncclGetUniqueId fills the id it is given.
        let res = unsafe { sys::ncclGetUniqueId(id.as_mut_ptr()) };
        if let Status::Failed(e) = status(res, std::ptr::null_mut()) {
            candle_core::bail!("ncclGetUniqueId failed: {e}. Is a GPU visible?")
        }
        // SAFETY: initialised by the successful call above.
        let id = unsafe { id.assume_init() };
        Ok(std::array::from_fn(|i| id.internal[i] as u8))
    }

    fn init_rank(
        nranks: usize,
        id: &[u8; 128],
        rank: usize,
        _device: &Device,
    ) -> (Option<RawComm>, Status) {
        if let Err(e) = nccl_version() {
            return (None, Status::Failed(e));
        }
        let id = sys::ncclUniqueId {
            internal: std::array::from_fn(|i| id[i] as c_char),
        };
        let mut config = NcclConfig::non_blocking();
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; NCCL reads `config.size` bytes.
        let r = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                nranks as c_int,
                id,
                rank as c_int,
                &mut config as *mut NcclConfig as *mut sys::ncclConfig_t,
            )
        };
        ((!comm.is_null()).then_some(RawComm(comm)), status(r, comm))
    }

    fn async_error(comm: RawComm) -> Status {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: live communicator, used by this thread alone (the engine's lock).
        let r = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
        match status(r, comm.0) {
            Status::Success => status(state, comm.0),
            other => other,
        }
    }

    fn abort(comm: RawComm) {
        // SAFETY: live communicator, no longer reachable by anyone else.
        unsafe { sys::ncclCommAbort(comm.0) };
    }

    fn finalize(comm: RawComm) -> Status {
        // SAFETY: live communicator, no longer reachable by anyone else.
        status(unsafe { sys::ncclCommFinalize(comm.0) }, comm.0)
    }

    fn destroy(comm: RawComm) {
        // SAFETY: a finalized communicator, no longer reachable by anyone else.
        unsafe { sys::ncclCommDestroy(comm.0) };
    }

    fn group_start() -> Status {
        status(unsafe { sys::ncclGroupStart() }, std::ptr::null_mut())
    }

    fn group_end() -> Status {
        status(unsafe { sys::ncclGroupEnd() }, std::ptr::null_mut())
    }

    fn reduces(dtype: DType) -> bool {
        reduce_type(dtype).is_some()
    }

    unsafe fn all_reduce(
        comm: RawComm,
        send: Addr,
        recv: Addr,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: &Arc<CudaStream>,
    ) -> Status {
        let Some(t) = reduce_type(dtype) else {
            return Status::Failed(format!("NCCL does not reduce {dtype:?}"));
        };
        enqueue(comm, stream, |c, s| {
            sys::ncclAllReduce(send as _, recv as _, count, t, reduce_op(op), c, s)
        })
    }

    unsafe fn all_gather(
        comm: RawComm,
        send: Addr,
        recv: Addr,
        bytes: usize,
        stream: &Arc<CudaStream>,
    ) -> Status {
        enqueue(comm, stream, |c, s| {
            sys::ncclAllGather(send as _, recv as _, bytes, BYTES, c, s)
        })
    }

    unsafe fn reduce_scatter(
        comm: RawComm,
        send: Addr,
        recv: Addr,
        recv_count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: &Arc<CudaStream>,
    ) -> Status {
        let Some(t) = reduce_type(dtype) else {
            return Status::Failed(format!("NCCL does not reduce {dtype:?}"));
        };
        enqueue(comm, stream, |c, s| {
            sys::ncclReduceScatter(send as _, recv as _, recv_count, t, reduce_op(op), c, s)
        })
    }

    unsafe fn broadcast(
        comm: RawComm,
        send: Addr,
        recv: Addr,
        bytes: usize,
        root: usize,
        stream: &Arc<CudaStream>,
    ) -> Status {
        enqueue(comm, stream, |c, s| {
            sys::ncclBroadcast(send as _, recv as _, bytes, BYTES, root as c_int, c, s)
        })
    }

    unsafe fn send(
        comm: RawComm,
        buf: Addr,
        bytes: usize,
        peer: usize,
        stream: &Arc<CudaStream>,
    ) -> Status {
        enqueue(comm, stream, |c, s| {
            sys::ncclSend(buf as _, bytes, BYTES, peer as c_int, c, s)
        })
    }

    unsafe fn recv(
        comm: RawComm,
        buf: Addr,
        bytes: usize,
        peer: usize,
        stream: &Arc<CudaStream>,
    ) -> Status {
        enqueue(comm, stream, |c, s| {
            sys::ncclRecv(buf as _, bytes, BYTES, peer as c_int, c, s)
        })
    }

    fn stream(device: &Device, op: &str) -> Result<Arc<CudaStream>> {
        Ok(cuda_device(device, op)?.cuda_stream())
    }

    fn new_stream(device: &Device) -> Result<Arc<CudaStream>> {
        // A second stream puts the context in cudarc's multi-stream mode (the first one
        // synchronizes the context once): every buffer then records its reads and writes with
        // events, so that Candle's kernels on the compute stream wait for what NCCL wrote on
        // this one. Without event tracking nothing would order them: refused.
        let ctx = cuda_device(device, "new_stream")?
            .cuda_stream()
            .context()
            .clone();
        if !ctx.is_event_tracking() {
            candle_core::bail!("the CUDA context's event tracking is off (disable_event_tracking), which a second stream needs")
        }
        ctx.new_stream()
            .map_err(|e| candle_core::Error::msg(format!("cannot create a CUDA stream: {e:?}")))
    }

    fn wait_event(stream: &Arc<CudaStream>, event: &CudaEvent) -> Result<()> {
        stream
            .wait(event)
            .map_err(|e| candle_core::Error::msg(format!("cudaStreamWaitEvent: {e:?}")))
    }

    fn bind(stream: &Arc<CudaStream>) -> Result<()> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::msg(format!("cannot bind the CUDA context: {e:?}")))
    }

    fn with_storage<R>(
        t: &Tensor,
        op: &str,
        f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
    ) -> Result<R> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => f(s, layout),
            _ => candle_core::bail!(
                "{op}: the NCCL backend moves CUDA tensors, got one on {:?}: create it on the communicator's device (Comm::device)",
                t.device().location()
            ),
        }
    }

    fn on_device(s: &CudaStorage, device: &Device) -> bool {
        matches!(device, Device::Cuda(d) if s.device.same_device(d))
    }

    fn into_tensor(s: CudaStorage, shape: Shape) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    }

    unsafe fn alloc(device: &Device, shape: &Shape, dtype: DType) -> Result<CudaStorage> {
        cuda_device(device, "alloc")?.alloc_uninit(shape, dtype)
    }

    fn read<R>(s: &CudaStorage, stream: &Arc<CudaStream>, f: impl FnOnce(Addr) -> R) -> R {
        let (p, _g) = read_ptr(&s.slice, stream);
        f(p)
    }

    fn write<R>(s: &mut CudaStorage, stream: &Arc<CudaStream>, f: impl FnOnce(Addr) -> R) -> R {
        let (p, _g) = write_ptr(&mut s.slice, stream);
        f(p)
    }

    unsafe fn copy(dst: Addr, src: Addr, bytes: usize, stream: &Arc<CudaStream>) -> Result<()> {
        candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(
            dst,
            src,
            bytes,
            stream.cu_stream(),
        )
        .map_err(|e| candle_core::Error::msg(format!("device copy of {bytes} bytes: {e:?}")))
    }

    fn record(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        stream
            .record_event(None)
            .map_err(|e| candle_core::Error::msg(format!("cannot record a CUDA event: {e:?}")))
    }

    fn is_done(event: &CudaEvent) -> std::result::Result<bool, String> {
        let _ = event.context().bind_to_thread();
        event
            .try_is_complete()
            .map_err(|e| format!("CUDA error {e:?}"))
    }

    fn host_wait(_: &Arc<CudaStream>) -> Result<()> {
        Ok(())
    }

    fn synchronize(stream: &Arc<CudaStream>) -> Result<()> {
        stream
            .synchronize()
            .map_err(|e| candle_core::Error::msg(format!("CUDA stream synchronize: {e:?}")))
    }

    fn synchronize_device(device: &Device) -> Result<()> {
        cuda_device(device, "synchronize")?
            .cuda_stream()
            .context()
            .synchronize()
            .map_err(|e| candle_core::Error::msg(format!("CUDA context synchronize: {e:?}")))
    }

    fn upload_i64(device: &Device, values: &[i64]) -> Result<CudaStorage> {
        cuda_device(device, "upload")?.storage_from_slice(values)
    }

    fn download_i64(s: &CudaStorage, stream: &Arc<CudaStream>) -> Result<Vec<i64>> {
        Self::synchronize(stream)?;
        match s.to_cpu_storage()? {
            CpuStorage::I64(v) => Ok(v),
            other => candle_core::bail!("download_i64: got {:?}", other.dtype()),
        }
    }
}

/// The device pointer (bytes) of a storage, with the guard that records the use on `stream`:
/// `$method` (`device_ptr` or `device_ptr_mut`) on the typed slice of every dtype.
macro_rules! with_ptr {
    ($storage:expr, $stream:expr, $method:ident) => {
        with_ptr!(@ $storage, $stream, $method;
            U8 U32 I16 I32 I64 BF16 F16 F32 F64 F8E4M3 F6E2M3 F6E3M2 F4 F8E8M0)
    };
    (@ $storage:expr, $stream:expr, $method:ident; $($dtype:ident)*) => {
        match $storage {
            $(CudaStorageSlice::$dtype(s) => s.$method($stream),)*
        }
    };
}

/// The device address of a buffer for reading on `stream`; the guard records the use.
fn read_ptr<'a>(s: &'a CudaStorageSlice, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    with_ptr!(s, stream, device_ptr)
}

/// The device address of a buffer for writing on `stream`; the guard records the use.
fn write_ptr<'a>(s: &'a mut CudaStorageSlice, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    with_ptr!(s, stream, device_ptr_mut)
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
