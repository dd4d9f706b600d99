//! One thread per process that follows every enqueued NCCL operation and aborts the
//! communicators whose operations do not finish in time or whose NCCL reports an error.

use crate::comm::lock;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What the watchdog needs from a communicator (type-erased over the [`super::NcclApi`]).
pub(super) trait Watched: Send + Sync {
    /// Records `reason` and aborts the communicator.
    fn abort(&self, reason: String);
    fn timeout(&self) -> Duration;
    fn global_rank(&self) -> usize;
    /// The fingerprint of the world the communicator belongs to.
    fn world(&self) -> u64;
    /// Asks NCCL for errors found in the background; aborts on one.
    fn poll_async_error(&self);
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
        lock(&self.comms).push(c);
    }

    /// The live communicators of the world `world`.
    pub fn of_world(&self, world: u64) -> Vec<Arc<dyn Watched>> {
        lock(&self.comms)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| c.world() == world)
            .collect()
    }

    fn run(&self) {
        let mut last_error_poll = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let all = std::mem::take(&mut *lock(&self.pending));
            let mut keep = Vec::with_capacity(all.len());
            for p in all {
                match (p.done)() {
                    Ok(true) => {}
                    Ok(false) if p.since.elapsed() > p.comm.timeout() => p.comm.abort(format!(
                        "{} timed out after {:.1}s on rank {}: a peer never arrived or is stuck. If they are only slow, raise the timeout (Launcher::timeout or CANDLE_PARALLEL_TIMEOUT_SECS)",
                        p.what,
                        p.since.elapsed().as_secs_f64(),
                        p.comm.global_rank()
                    )),
                    Ok(false) => keep.push(p),
                    Err(e) => p.comm.abort(format!(
                        "{} failed on rank {}: {e}",
                        p.what,
                        p.comm.global_rank()
                    )),
                }
            }
            // Operations enqueued meanwhile were pushed onto the emptied list.
            lock(&self.pending).extend(keep);
            if last_error_poll.elapsed() >= Duration::from_millis(100) {
                last_error_poll = Instant::now();
                let comms: Vec<Arc<dyn Watched>> = {
                    let mut comms = lock(&self.comms);
                    comms.retain(|w| w.strong_count() > 0);
                    comms.iter().filter_map(Weak::upgrade).collect()
                };
                for c in comms {
                    c.poll_async_error();
                }
            }
        }
    }
}
