//! Memory measured, not counted: a counting global allocator that attributes every allocation
//! to the rank whose thread made it, per-rank peaks by phase, and the process's resident set.
//!
//! Ranks run as threads of one process, so the process's RSS mixes them. [`CountingAlloc`]
//! tags each allocation with the rank of the thread that made it (the [`crate::Launcher`]
//! tags its rank threads) in a small header, so that a buffer freed by another rank (the local
//! backend shares buffers between ranks) is still taken off its owner's count. Allocations of
//! untagged threads (the main thread, Rayon's and gemm's workers) are counted apart
//! ([`untagged`]).
//!
//! A program opts in by installing the allocator; without it every query here says so with an
//! error rather than reporting zeros.
//!
//! ```
//! use candle_parallel::memory::{self, CountingAlloc};
//!
//! #[global_allocator]
//! static ALLOC: CountingAlloc = CountingAlloc;
//!
//! # fn main() -> candle_core::Result<()> {
//! let out = candle_parallel::launch(2, |ctx| {
//!     let mut phases = memory::PhaseMeter::new(ctx.rank())?;
//!     phases.enter("alloc");
//!     let t = candle_core::Tensor::zeros(1 << 20, candle_core::DType::F32, ctx.device())?;
//!     drop(t);
//!     phases.enter("done");
//!     Ok(phases.finish())
//! })?;
//! // Each rank's 4 MiB tensor is in its own peak for the phase.
//! assert!(out[0][0].peak_bytes >= 4 << 20);
//! # Ok(())
//! # }
//! ```
//!
//! (On the GPU the tensors live in device memory: these counts are the host's side only.)

use candle_core::{bail, Result};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Ranks counted one by one; higher ranks share the last slot with the untagged threads'.
pub const MAX_TRACKED_RANKS: usize = 256;
const UNTAGGED: u32 = MAX_TRACKED_RANKS as u32;

#[repr(align(128))] // one cache line pair per slot: ranks do not contend
struct Slot {
    current: AtomicUsize,
    peak: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // a template to fill the array with
const EMPTY: Slot = Slot {
    current: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
};
static SLOTS: [Slot; MAX_TRACKED_RANKS + 1] = [EMPTY; MAX_TRACKED_RANKS + 1];
static PROCESS: Slot = EMPTY;
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // `const`: reading it never allocates (this runs inside the allocator).
    static TAG: Cell<u32> = const { Cell::new(UNTAGGED) };
}

/// Header bytes before each allocation: at least 16 and the allocation's alignment, so the
/// caller's pointer keeps its alignment. The owner's tag sits in the 4 bytes before it.
fn header(align: usize) -> usize {
    align.max(16)
}

/// Read first: a store on every allocation would make every thread write one cache line.
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// The calling thread's tag (untagged where its thread-local is unavailable, as during the
/// thread's teardown).
fn current_tag() -> u32 {
    TAG.try_with(Cell::get).unwrap_or(UNTAGGED)
}

/// Starts `slot`'s peak afresh from what it holds now (an allocation racing with the reset
/// still counts).
fn restart_peak(slot: &Slot) {
    slot.peak
        .store(slot.current.load(Ordering::Relaxed), Ordering::Relaxed);
    slot.peak
        .fetch_max(slot.current.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn add(slot: &Slot, n: usize) {
    let now = slot.current.fetch_add(n, Ordering::Relaxed) + n;
    slot.peak.fetch_max(now, Ordering::Relaxed);
}

fn sub(slot: &Slot, n: usize) {
    slot.current.fetch_sub(n, Ordering::Relaxed);
}

/// A global allocator over the system's that counts the bytes each rank holds (see the
/// [module docs](self)). Install it with `#[global_allocator]` in a binary.
pub struct CountingAlloc;

impl CountingAlloc {
    fn tagged(base: *mut u8, hdr: usize, size: usize) -> *mut u8 {
        if base.is_null() {
            return base;
        }
        let tag = current_tag();
        // SAFETY: base points to hdr + size bytes; hdr >= 16 leaves room for the tag.
        unsafe {
            let data = base.add(hdr);
            (data.sub(4) as *mut u32).write_unaligned(tag);
            add(&SLOTS[tag as usize], size);
            add(&PROCESS, size);
            data
        }
    }

    /// A block of `layout` with room for the header before it, from `raw`, tagged.
    fn with_header(layout: Layout, raw: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
        mark_installed();
        let hdr = header(layout.align());
        let Ok(full) = Layout::from_size_align(layout.size() + hdr, layout.align()) else {
            return std::ptr::null_mut();
        };
        Self::tagged(raw(full), hdr, layout.size())
    }

    /// The tag of an allocation made by this allocator.
    ///
    /// # Safety
    /// `data` must have been returned by this allocator.
    unsafe fn tag_of(data: *mut u8) -> usize {
        ((data.sub(4) as *const u32).read_unaligned() as usize).min(MAX_TRACKED_RANKS)
    }
}

// SAFETY: every pointer handed out is `hdr` bytes into a block of the system allocator of
// layout (size + hdr, align), and every free or reallocation goes back to that block.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::with_header(layout, |full| System.alloc(full))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::with_header(layout, |full| System.alloc_zeroed(full))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let hdr = header(layout.align());
        sub(&SLOTS[Self::tag_of(ptr)], layout.size());
        sub(&PROCESS, layout.size());
        let full = Layout::from_size_align_unchecked(layout.size() + hdr, layout.align());
        System.dealloc(ptr.sub(hdr), full);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let hdr = header(layout.align());
        let Some(new_full) = new_size.checked_add(hdr) else {
            return std::ptr::null_mut();
        };
        if Layout::from_size_align(new_full, layout.align()).is_err() {
            return std::ptr::null_mut();
        }
        let tag = Self::tag_of(ptr);
        let full = Layout::from_size_align_unchecked(layout.size() + hdr, layout.align());
        // The header moves with the block: the owner stays the same.
        let base = System.realloc(ptr.sub(hdr), full, new_full);
        if base.is_null() {
            return base;
        }
        let (old, slot) = (layout.size(), &SLOTS[tag]);
        if new_size >= old {
            add(slot, new_size - old);
            add(&PROCESS, new_size - old);
        } else {
            sub(slot, old - new_size);
            sub(&PROCESS, old - new_size);
        }
        base.add(hdr)
    }
}

/// Whether [`CountingAlloc`] is this program's global allocator.
pub fn is_counting() -> bool {
    // Any program allocates before it asks; the first allocation sets the flag.
    drop(std::hint::black_box(Box::new(0u8)));
    INSTALLED.load(Ordering::Relaxed)
}

fn require() -> Result<()> {
    if !is_counting() {
        bail!(
            "memory: the counting allocator is not installed; add \
             `#[global_allocator] static ALLOC: candle_parallel::memory::CountingAlloc = \
             candle_parallel::memory::CountingAlloc;` to the program"
        )
    }
    Ok(())
}

/// Attributes the calling thread's allocations to `rank` (`None`: untagged). The
/// [`crate::Launcher`] does this for its rank threads.
pub fn set_thread_rank(rank: Option<usize>) {
    let tag = rank.map_or(UNTAGGED, |r| r.min(MAX_TRACKED_RANKS) as u32);
    let _ = TAG.try_with(|t| t.set(tag));
}

/// The rank the calling thread's allocations are attributed to.
pub fn thread_rank() -> Option<usize> {
    match current_tag() {
        UNTAGGED => None,
        r => Some(r as usize),
    }
}

/// Bytes held now and the most held since the last [`reset_peak`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub current: usize,
    pub peak: usize,
}

fn held(slot: &Slot) -> Held {
    Held {
        current: slot.current.load(Ordering::Relaxed),
        peak: slot.peak.load(Ordering::Relaxed),
    }
}

fn slot_of(rank: usize) -> Result<&'static Slot> {
    require()?;
    if rank >= MAX_TRACKED_RANKS {
        bail!("memory: rank {rank} is not counted on its own (ranks 0..{MAX_TRACKED_RANKS} are)")
    }
    Ok(&SLOTS[rank])
}

/// What `rank`'s threads hold (allocations they made and nobody freed yet).
pub fn rank(rank: usize) -> Result<Held> {
    Ok(held(slot_of(rank)?))
}

/// What the untagged threads hold (the main thread, thread pools' workers).
pub fn untagged() -> Result<Held> {
    require()?;
    Ok(held(&SLOTS[MAX_TRACKED_RANKS]))
}

/// What the whole process holds through the allocator.
pub fn process() -> Result<Held> {
    require()?;
    Ok(held(&PROCESS))
}

/// Starts `rank`'s peak afresh from what it holds now.
pub fn reset_peak(rank: usize) -> Result<()> {
    restart_peak(slot_of(rank)?);
    Ok(())
}

/// Starts the process's peak afresh from what it holds now.
pub fn reset_process_peak() -> Result<()> {
    require()?;
    restart_peak(&PROCESS);
    Ok(())
}

/// The resident set of the process as the kernel reports it: `(now, peak)` in bytes (Linux
/// `/proc/self/status`: `VmRSS`, `VmHWM`); `None` elsewhere.
pub fn rss() -> Option<(usize, usize)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The memory in use on `device`'s GPU (its total less what is free: every context and
/// process on that GPU, the CUDA allocator's pools included), as CUDA reports it; `None` for
/// the CPU, and for a GPU without the `nccl` feature (no CUDA in the build). The GPU's
/// counterpart of [`rss`]: the counting allocator sees only host memory.
///
/// ```
/// use candle_core::Device;
///
/// assert_eq!(candle_parallel::memory::device_used(&Device::Cpu)?, None);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn device_used(device: &candle_core::Device) -> Result<Option<usize>> {
    match device {
        #[cfg(feature = "nccl")]
        candle_core::Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().map_err(|e| {
                candle_core::Error::msg(format!(
                    "cannot read the memory in use on CUDA device {:?}: {e:?}",
                    device.location()
                ))
            })?;
            Ok(Some(total.saturating_sub(free)))
        }
        _ => Ok(None),
    }
}

/// Starts the kernel's peak resident set (`VmHWM`) afresh from the current one (Linux:
/// writes 5 to `/proc/self/clear_refs`); `false` where that is not possible.
pub fn reset_rss_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One phase of a rank's work, as [`PhaseMeter`] measured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseMemory {
    pub name: String,
    /// What the rank held when the phase began.
    pub start_bytes: usize,
    /// The most it held during the phase.
    pub peak_bytes: usize,
    /// What it held when the phase ended (what persists into the next).
    pub end_bytes: usize,
}

/// A rank's peak and persistent bytes per phase (load, forward, backward, step, save):
/// `enter(name)` closes the phase before and starts `name`.
#[derive(Debug)]
pub struct PhaseMeter {
    rank: usize,
    open: Option<(String, usize)>,
    done: Vec<PhaseMemory>,
}

impl PhaseMeter {
    /// A meter for `rank` (its thread must be tagged with it, as the launcher's are).
    pub fn new(rank: usize) -> Result<Self> {
        slot_of(rank)?;
        Ok(Self {
            rank,
            open: None,
            done: Vec::new(),
        })
    }

    fn close(&mut self) {
        // Room first: growing the list allocates, which must not fall between reading the
        // counts and restarting the peak.
        self.done.reserve(1);
        let h = held(&SLOTS[self.rank]);
        if let Some((name, start)) = self.open.take() {
            self.done.push(PhaseMemory {
                name,
                start_bytes: start,
                peak_bytes: h.peak,
                end_bytes: h.current,
            });
        }
        restart_peak(&SLOTS[self.rank]);
    }

    /// Ends the current phase (if any) and begins `name`.
    pub fn enter(&mut self, name: &str) {
        self.close();
        let now = SLOTS[self.rank].current.load(Ordering::Relaxed);
        self.open = Some((name.to_string(), now));
    }

    /// Ends the current phase; every phase measured, in order.
    pub fn finish(mut self) -> Vec<PhaseMemory> {
        self.close();
        self.done
    }
}

/// A [`GradSink`](crate::data_parallel::GradSink) in front of another that tells a
/// [`PhaseMeter`] when the backward begins: its
/// [`begin_backward`](crate::data_parallel::GradSink::begin_backward) (or the first gradient,
/// unit or micro-batch end to arrive) closes the phase open then (the forward) and opens
/// `"backward"`, which runs until the caller enters the next phase. With several micro-batches the later ones' forwards fall
/// in it: their forward and backward are not separate in time.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::data_parallel::{GradCollector, GradSink};
/// use candle_parallel::memory::{self, CountingAlloc, PhaseMeter, PhasedSink};
///
/// // (In a program whose global allocator is CountingAlloc, on a rank's thread.)
/// # if memory::is_counting() {
/// let x = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let mut collector = GradCollector::new(&[x.clone()]);
/// let mut meter = PhaseMeter::new(0)?;
/// meter.enter("forward");
/// let y = x.as_tensor().sqr()?.sum_all()?;
/// let mut sink = PhasedSink::new(&mut collector, &mut meter);
/// sink.begin_backward(true)?;
/// sink.add_store(&mut y.backward()?)?;
/// sink.end_micro_batch()?;
/// meter.enter("optimizer");
/// let names: Vec<_> = meter.finish().into_iter().map(|p| p.name).collect();
/// assert_eq!(names, ["forward", "backward", "optimizer"]);
/// # }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct PhasedSink<'a> {
    inner: &'a mut dyn crate::data_parallel::GradSink,
    meter: &'a mut PhaseMeter,
    in_backward: bool,
}

impl<'a> PhasedSink<'a> {
    pub fn new(
        inner: &'a mut dyn crate::data_parallel::GradSink,
        meter: &'a mut PhaseMeter,
    ) -> Self {
        Self {
            inner,
            meter,
            in_backward: false,
        }
    }

    fn backward_begins(&mut self) {
        if !self.in_backward {
            self.in_backward = true;
            self.meter.enter("backward");
        }
    }
}

impl crate::data_parallel::GradSink for PhasedSink<'_> {
    fn sink_vars(&self) -> Vec<candle_core::Var> {
        self.inner.sink_vars()
    }

    fn add_grad(&mut self, index: usize, grad: &candle_core::Tensor) -> Result<()> {
        self.backward_begins();
        self.inner.add_grad(index, grad)
    }

    fn unit_done(&mut self, prefixes: &[&str]) -> Result<()> {
        self.backward_begins();
        self.inner.unit_done(prefixes)
    }

    fn end_micro_batch(&mut self) -> Result<()> {
        self.backward_begins();
        self.inner.end_micro_batch()
    }

    fn add_store(&mut self, store: &mut candle_core::backprop::GradStore) -> Result<()> {
        self.backward_begins();
        self.inner.add_store(store)
    }

    fn begin_backward(&mut self, last: bool) -> Result<()> {
        self.backward_begins();
        self.inner.begin_backward(last)
    }
}
