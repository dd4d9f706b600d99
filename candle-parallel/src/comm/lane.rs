//! A communication lane: one rank's collectives on one group, run in order on a thread of their
//! own while the rank computes (PyTorch's `async_op=True`, Megatron's overlapped reductions).
//!
//! On the CPU the lane is a worker thread per (group, rank), started by the first asynchronous
//! call: it runs the queued operations one after the other, in the order the rank queued them,
//! so every rank of the group meets the others in the same order, exactly as with blocking
//! calls. A blocking call on a group whose lane has work queued first waits for that work (one
//! stream per group, as PyTorch's process groups), so blocking and asynchronous calls never
//! overtake each other. On CUDA the operations run where they are called: NCCL already returns
//! to the host once they are enqueued.
use crate::comm::lock;
use candle_core::Result;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

/// An operation started on a communication lane ([`crate::Comm::start`] and the `*_async`
/// methods): [`Work::wait`] returns its result once it is done.
///
/// Dropping a `Work` does not cancel the operation (the peers expect it); it still runs, and
/// an error nobody waits for is logged as a warning.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_parallel::{comm::ReduceOp, launch};
///
/// let sums = launch(2, |ctx| {
///     let x = Tensor::new(&[ctx.rank() as f32, 1.0], &Device::Cpu)?;
///     let work = ctx.comm().all_reduce_async(&x, ReduceOp::Sum);
///     // ... compute here while the reduction runs ...
///     work.wait()?.to_vec1::<f32>()
/// })?;
/// assert_eq!(sums, vec![vec![1.0, 2.0], vec![1.0, 2.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[must_use = "an operation's result (and its error) is known only through wait()"]
pub struct Work<T> {
    state: WorkState<T>,
}

enum WorkState<T> {
    Done(Result<T>),
    /// Enqueued on a device stream of the backend's own ([`crate::comm::Backend::begin_async`]):
    /// the compute stream waits for the fence first. (Fields drop in this order: the fence
    /// orders the compute stream before the tensors the operation used can be freed.)
    Fenced {
        fence: Option<Box<dyn Fence>>,
        /// The operation's inputs, alive until the compute stream waited for it (PyTorch's
        /// `record_stream`): freed earlier, their memory could be reused under it.
        keep: Vec<candle_core::Tensor>,
        result: Result<T>,
    },
    Pending {
        rx: mpsc::Receiver<Result<T>>,
        what: String,
    },
}

impl<T> Work<T> {
    /// A finished operation (run where it was called).
    pub(crate) fn done(result: Result<T>) -> Self {
        Self {
            state: WorkState::Done(result),
        }
    }

    /// An operation enqueued on a device stream: `fence` orders the caller's work after it;
    /// `keep` stays alive until then.
    pub(crate) fn fenced(
        result: Result<T>,
        fence: Option<Box<dyn Fence>>,
        keep: Vec<candle_core::Tensor>,
    ) -> Self {
        Self {
            state: WorkState::Fenced {
                fence,
                keep,
                result,
            },
        }
    }

    /// Waits for the operation and returns its result. On NCCL the host does not wait: the
    /// compute stream is made to wait (on the device) for the communication stream's work.
    pub fn wait(self) -> Result<T> {
        match self.state {
            WorkState::Done(r) => r,
            WorkState::Fenced {
                fence,
                keep,
                result,
            } => {
                if let Some(fence) = fence {
                    fence.wait()?;
                }
                drop(keep);
                result
            }
            WorkState::Pending { rx, what } => rx.recv().unwrap_or_else(|_| {
                Err(candle_core::Error::Msg(format!(
                    "{what}: the communication lane stopped before the operation finished"
                )))
            }),
        }
    }
}

/// What the caller's device work must be ordered after before it uses an asynchronous
/// operation's results (a CUDA event on the communication stream, waited for by the compute
/// stream). Dropped without [`Fence::wait`], it still orders the work.
pub trait Fence: Send {
    /// Orders the caller's later device work after the operations (on the device; the host
    /// goes on at once).
    fn wait(self: Box<Self>) -> Result<()>;
}

type Job = Box<dyn FnOnce() + Send>;

/// The queue and thread of one rank's lane on one group.
pub(crate) struct Lane {
    tx: Mutex<mpsc::Sender<Job>>,
    /// The lane's own thread: a job that reaches its own lane (a blocking call or a start
    /// through a captured handle) runs there at once instead of waiting for itself.
    thread: std::thread::ThreadId,
    /// Operations queued and not yet finished, and its change signal.
    pending: Arc<(Mutex<usize>, Condvar)>,
    name: String,
}

impl Lane {
    /// Starts the lane's thread, named `name` (the group and rank); it keeps the caller's rank
    /// tags (logging span, console rank, memory accounting).
    pub(crate) fn start(name: String) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let console = crate::logging::console_rank();
        let memory = crate::memory::thread_rank();
        let log = crate::logging::rank_log();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _console = console.map(crate::logging::enter_rank);
                crate::memory::set_thread_rank(memory);
                crate::logging::set_rank_log(log);
                // Ends when the last handle to the group (and so the sender) is dropped.
                for job in rx {
                    job();
                }
            })
            .map_err(|e| {
                candle_core::Error::Msg(format!("cannot start the communication lane {name}: {e}"))
            })?;
        Ok(Self {
            tx: Mutex::new(tx),
            thread: handle.thread().id(),
            pending,
            name,
        })
    }

    /// Queues `f`; its result comes back through the returned [`Work`].
    pub(crate) fn submit<T, F>(&self, what: &str, f: F) -> Work<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        if self.on_lane() {
            return Work::done(f());
        }
        let (rtx, rrx) = mpsc::channel();
        let pending = self.pending.clone();
        // Events of the job belong to the span it was started in (the rank's, a step's).
        let span = tracing::Span::current();
        *lock(&pending.0) += 1;
        let label = format!("{what} on {}", self.name);
        let job_label = label.clone();
        let job: Job = Box::new(move || {
            let _span = span.enter();
            let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
                Err(candle_core::Error::Msg(format!(
                    "{job_label} panicked (a bug in candle-parallel)"
                )))
            });
            if let Err(mpsc::SendError(Err(e))) = rtx.send(result) {
                tracing::warn!("{job_label} failed and nobody waited for it: {e}");
            }
            let (count, cv) = &*pending;
            *lock(count) -= 1;
            cv.notify_all();
        });
        if lock(&self.tx).send(job).is_err() {
            *lock(&self.pending.0) -= 1;
            return Work::done(Err(candle_core::Error::Msg(format!(
                "{label}: the communication lane's thread is gone"
            ))));
        }
        Work {
            state: WorkState::Pending {
                rx: rrx,
                what: label,
            },
        }
    }

    /// Whether the calling thread is the lane's own.
    fn on_lane(&self) -> bool {
        std::thread::current().id() == self.thread
    }

    /// Waits until every queued operation has finished (at once on the lane's own thread, whose
    /// current job is one of them).
    pub(crate) fn drain(&self) {
        if self.on_lane() {
            return;
        }
        let (count, cv) = &*self.pending;
        let mut n = lock(count);
        while *n > 0 {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}
