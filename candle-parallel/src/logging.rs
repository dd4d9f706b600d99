//! Rank-tagged logging with `tracing`.
//!
//! The launcher runs each rank inside a span `rank{rank=1 ep=0 tp=1}`, so every event a rank
//! emits carries its rank and mesh coordinates. [`init`] installs a subscriber that prints to
//! stderr and, for ranks that have a log file (see `Launcher::log_dir`), also writes each
//! rank's events to its own file, e.g. `logs/rank-1_ep-0_tp-1.log`.
//!
//! On the console, ranks other than 0 show only warnings and errors ([`enter_rank`]), so a
//! job's report appears once; their files get everything.
//!
//! The filter comes from `RUST_LOG` in `tracing_subscriber::filter::Targets` syntax
//! (`info`, `candle_parallel=debug,warn`); the default is `info`.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::{format, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

thread_local! {
    static RANK_LOG: RefCell<Option<Arc<Mutex<File>>>> = const { RefCell::new(None) };
    /// The rank the current thread runs, for the console filter.
    static CONSOLE_RANK: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// While alive, the current thread runs rank `rank` ([`enter_rank`]).
#[must_use = "the thread stops counting as the rank when the guard is dropped"]
pub struct RankConsoleGuard(Option<usize>);

impl Drop for RankConsoleGuard {
    fn drop(&mut self) {
        CONSOLE_RANK.with(|r| r.set(self.0));
    }
}

/// Marks the current thread as rank `rank` (the launcher does this for every rank): on the
/// console, its events below WARN show only for rank 0, so a report appears once, not once
/// per rank; every rank's warnings and errors always show, tagged with the rank; the rank's
/// log file (`Launcher::log_dir`) gets all its events.
pub fn enter_rank(rank: usize) -> RankConsoleGuard {
    RankConsoleGuard(CONSOLE_RANK.with(|r| r.replace(Some(rank))))
}

/// The current thread's rank log file, if any: a helper thread of a rank (its communication
/// lane) writes to the same ([`set_rank_log`]).
pub(crate) fn rank_log() -> Option<Arc<Mutex<File>>> {
    RANK_LOG.with(|f| f.borrow().clone())
}

/// Sends the current thread's events to `file` too (a rank's helper thread).
pub(crate) fn set_rank_log(file: Option<Arc<Mutex<File>>>) {
    RANK_LOG.with(|f| *f.borrow_mut() = file);
}

/// The rank the current thread runs on the console ([`enter_rank`]), if any: a helper thread
/// of a rank (its communication lane) enters the same.
pub(crate) fn console_rank() -> Option<usize> {
    CONSOLE_RANK.with(|r| r.get())
}

/// The console's per-rank filter (see [`enter_rank`]); decided per event, never cached.
struct ConsoleRanks;

impl<S> tracing_subscriber::layer::Filter<S> for ConsoleRanks {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        // Spans pass (they carry the rank's fields); events of ranks other than 0 only from
        // WARN up.
        meta.is_span()
            || *meta.level() <= tracing::Level::WARN
            || CONSOLE_RANK.with(|r| r.get().is_none_or(|r| r == 0))
    }

    fn callsite_enabled(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
}

/// Installs the global subscriber: stderr plus per-rank files. Returns `false` (and changes
/// nothing) if a global subscriber was already installed.
pub fn init() -> bool {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter.clone().and(ConsoleRanks));
    // Span fields are formatted once per field-formatter *type* and cached on the span, so the
    // file layer needs a type of its own, or it would reuse the stderr layer's coloured text.
    let plain_fields =
        format::debug_fn(|w, field, value| write!(w, "{field}={value:?}")).delimited(" ");
    let files = tracing_subscriber::fmt::layer()
        .fmt_fields(plain_fields)
        .with_writer(RankFileWriter)
        .with_ansi(false)
        .with_target(false)
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(stderr)
        .with(files)
        .try_init()
        .is_ok()
}

/// While alive, the current thread's log events also go to a file. Dropping it stops that.
#[must_use = "the rank log file is closed when the guard is dropped"]
pub struct RankLogGuard {
    path: PathBuf,
}

impl RankLogGuard {
    /// The file this thread logs to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RankLogGuard {
    fn drop(&mut self) {
        RANK_LOG.with(|f| f.borrow_mut().take());
    }
}

/// Sends the current thread's events to `dir/NAME.log` (created or truncated) from now on.
pub fn log_to_file(dir: &Path, name: &str) -> io::Result<RankLogGuard> {
    // The io errors name their path (callers show them as they are).
    let named = |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| named(e, dir))?;
    let path = dir.join(format!("{name}.log"));
    let file = File::create(&path).map_err(|e| named(e, &path))?;
    RANK_LOG.with(|f| *f.borrow_mut() = Some(Arc::new(Mutex::new(file))));
    Ok(RankLogGuard { path })
}

struct RankFileWriter;

/// Writes to the current thread's rank file, or nowhere if it has none.
struct RankFile(Option<Arc<Mutex<File>>>);

impl Write for RankFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            Some(f) => f.lock().unwrap_or_else(|e| e.into_inner()).write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.0 {
            Some(f) => f.lock().unwrap_or_else(|e| e.into_inner()).flush(),
            None => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for RankFileWriter {
    type Writer = RankFile;

    fn make_writer(&'a self) -> Self::Writer {
        RankFile(RANK_LOG.with(|f| f.borrow().clone()))
    }
}
