//! One thread per process that follows every enqueued NCCL operation and aborts the
//! communicators whose operations do not finish in time or whose NCCL reports an error.
//!
//! Aborts run on threads of their own, never on the watchdog: `ncclCommAbort` can wait (for a
//! call in flight to return, for kernels on the same stream to end), and the watchdog must keep
//! watching the other communicators meanwhile. An abort that is itself stuck for longer than
//! the timeout ends the process with a message: the one way left not to hang.

use crate::comm::lock;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What the watchdog needs from a communicator (type-erased over the [`super::NcclApi`]).
pub(super) trait Watched: Send + Sync {
    /// Records `reason` as the communicator's failure (the first one wins) and its rank's.
    fn record_failure(&self, reason: &str);
    /// Takes the communicator out (waiting for a call in flight to return) and aborts it.
    fn abort_now(&self);
    /// When an abort started that has not finished yet.
    fn abort_pending_since(&self) -> Option<Instant>;
    fn timeout(&self) -> Duration;
    fn global_rank(&self) -> usize;
    fn label(&self) -> &str;
    /// The fingerprint of the world the communicator belongs to.
    fn world(&self) -> u64;
    /// Identifies the communicators of one rank in one world (its own and split ones).
    fn lineage(&self) -> usize;
    /// Asks NCCL for errors found in the background, unless a call holds the communicator.
    /// Returns the error.
    fn poll_async_error(&self) -> Option<String>;
}

/// An enqueued operation: `done` says whether it finished (or how the device failed).
pub(super) struct Pending {
    pub comm: Arc<dyn Watched>,
    pub done: Box<dyn Fn() -> Result<bool, String> + Send>,
    pub what: String,
    pub since: Instant,
}

#[derive(Default)]
pub(super) struct Watchdog {
    pending: Mutex<Vec<Pending>>,
    comms: Mutex<Vec<Weak<dyn Watched>>>,
    /// Worlds aborted as a whole ([`super::abort_world`]): joins still in progress give up.
    aborted_worlds: Mutex<HashSet<u64>>,
}

pub(super) fn watchdog() -> &'static Watchdog {
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
    pub fn follow(&self, p: Pending) {
        lock(&self.pending).push(p);
    }

    pub fn register(&self, c: Weak<dyn Watched>) {
        let mut comms = lock(&self.comms);
        comms.retain(|w| w.strong_count() > 0);
        comms.push(c);
    }

    fn live(&self) -> Vec<Arc<dyn Watched>> {
        lock(&self.comms).iter().filter_map(Weak::upgrade).collect()
    }

    /// Fails and aborts (each on a thread of its own, all at once: one abort can wait for
    /// the kernels of another communicator on the same stream) every communicator for which
    /// `which` holds.
    pub fn abort_where(&self, reason: &str, which: impl Fn(&dyn Watched) -> bool) {
        let members: Vec<_> = self.live().into_iter().filter(|c| which(&**c)).collect();
        for m in &members {
            m.record_failure(reason);
        }
        for m in members {
            let spawned = std::thread::Builder::new()
                .name("nccl-abort".into())
                .spawn(move || m.abort_now());
            if let Err(e) = spawned {
                tracing::error!("cannot start a thread to abort an NCCL communicator: {e}");
            }
        }
    }

    /// Aborts every communicator of the rank and world `c` belongs to.
    pub fn abort_lineage(&self, c: &dyn Watched, reason: &str) {
        let lineage = c.lineage();
        self.abort_where(reason, |m| m.lineage() == lineage);
    }

    pub fn abort_world(&self, world: u64, reason: &str) {
        lock(&self.aborted_worlds).insert(world);
        self.abort_where(reason, |m| m.world() == world);
    }

    pub fn world_aborted(&self, world: u64) -> bool {
        lock(&self.aborted_worlds).contains(&world)
    }

    fn run(&self) {
        let mut last_error_poll = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            // A panic in one check must not end the watching of every other communicator.
            let polled = catch_unwind(AssertUnwindSafe(|| {
                self.check_pending();
                if last_error_poll.elapsed() >= Duration::from_millis(100) {
                    last_error_poll = Instant::now();
                    self.check_communicators();
                }
            }));
            if let Err(p) = polled {
                tracing::error!("the NCCL watchdog caught a panic: {p:?}");
            }
        }
    }

    fn check_pending(&self) {
        let all = std::mem::take(&mut *lock(&self.pending));
        let mut keep = Vec::with_capacity(all.len());
        for p in all {
            let failure = match (p.done)() {
                Ok(true) => None,
                Ok(false) if p.since.elapsed() > p.comm.timeout() => Some(format!(
                    "{} timed out after {:.1}s on rank {}: a peer never arrived or is stuck. If they are only slow, raise the timeout (Launcher::timeout or CANDLE_PARALLEL_TIMEOUT_SECS)",
                    p.what,
                    p.since.elapsed().as_secs_f64(),
                    p.comm.global_rank()
                )),
                Ok(false) => {
                    keep.push(p);
                    continue;
                }
                Err(e) => Some(format!(
                    "{} failed on rank {}: {e}",
                    p.what,
                    p.comm.global_rank()
                )),
            };
            if let Some(reason) = failure {
                self.abort_lineage(&*p.comm, &reason);
            }
        }
        // Operations enqueued meanwhile were pushed onto the emptied list.
        lock(&self.pending).extend(keep);
    }

    fn check_communicators(&self) {
        for c in self.live() {
            if let Some(e) = c.poll_async_error() {
                self.abort_lineage(
                    &*c,
                    &format!("NCCL reported an error on rank {}: {e}", c.global_rank()),
                );
            }
            if let Some(t) = c.abort_pending_since() {
                if t.elapsed() > c.timeout() + Duration::from_secs(10) {
                    // The abort waits for a call that never returns (say, a kernel launch
                    // behind a kernel that never ends): nothing in this process can free it.
                    let msg = format!(
                        "candle-parallel: aborting the NCCL communicator of group {} on rank {} has been stuck for {:.0}s; ending the process rather than hanging",
                        c.label(),
                        c.global_rank(),
                        t.elapsed().as_secs_f64()
                    );
                    tracing::error!("{msg}");
                    eprintln!("{msg}");
                    std::process::abort();
                }
            }
        }
    }
}
