//! Helpers of the integration tests only.
#![allow(dead_code)] // each test file uses its own subset

pub mod nccl_emulator;

use candle_core::{Device, Result, Tensor};
use candle_parallel::launch::RankContext;
use candle_parallel::MeshShape;
use std::path::PathBuf;
use std::time::Duration;

/// Whether the multi-rank tests run on the NCCL backend's logic over the emulator of NCCL
/// (`CANDLE_PARALLEL_TEST_BACKEND=nccl-emulator`) instead of the local backend.
pub fn on_emulator() -> bool {
    std::env::var("CANDLE_PARALLEL_TEST_BACKEND").is_ok_and(|v| v == "nccl-emulator")
}

/// The library's launcher, or the NCCL backend over the emulator when [`on_emulator`]: the
/// tests that use it run unchanged on both.
#[derive(Clone, Debug)]
pub struct Launcher(candle_parallel::Launcher);

impl Launcher {
    pub fn new(world_size: usize) -> Self {
        Self(candle_parallel::Launcher::new(world_size))
    }

    pub fn mesh(self, shape: MeshShape) -> Self {
        Self(self.0.mesh(shape))
    }

    pub fn timeout(self, timeout: Duration) -> Self {
        Self(self.0.timeout(timeout))
    }

    pub fn log_dir(self, dir: impl Into<PathBuf>) -> Self {
        Self(self.0.log_dir(dir))
    }

    pub fn run<T, F>(&self, f: F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(RankContext) -> Result<T> + Sync,
    {
        if on_emulator() {
            let on_engine = |ctx: RankContext| {
                assert_eq!(
                    ctx.comm().backend().name(),
                    "nccl",
                    "the emulated NCCL backend"
                );
                f(ctx)
            };
            let out = self
                .0
                .run_on_engine::<nccl_emulator::HostNccl, T, _>(|_| Ok(Device::Cpu), &on_engine);
            // NCCL's rules (stream order included) kept by every run so far.
            let broken = nccl_emulator::HostNccl::take_violations();
            assert!(broken.is_empty(), "NCCL usage rules broken: {broken:#?}");
            out
        } else {
            self.0.run(f)
        }
    }
}

/// [`candle_parallel::launch`] through [`Launcher`].
pub fn launch<T, F>(world_size: usize, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(RankContext) -> Result<T> + Sync,
{
    Launcher::new(world_size).run(f)
}

/// This rank's part of `full` as `shard` describes it (padding with zeros): the reference the
/// tests slice single-device results with, written independently of the library's loader.
pub fn slice_of(full: &Tensor, shard: candle_parallel::checkpoint::Placement) -> Result<Tensor> {
    use candle_parallel::checkpoint::Placement;
    Ok(match shard {
        Placement::Replicated => full.clone(),
        Placement::Split { dim, rank, parts } => {
            let c = full.dim(dim)? / parts;
            full.narrow(dim, rank * c, c)?
        }
        Placement::SplitPadded { dim, rank, parts } => {
            let size = full.dim(dim)?;
            let c = size.div_ceil(parts);
            let start = (rank * c).min(size);
            let len = c.min(size - start);
            full.narrow(dim, start, len)?
                .pad_with_zeros(dim, 0, c - len)?
        }
        Placement::Range { dim, start, len } => full.narrow(dim, start, len)?,
    })
}

/// The rendezvous probe (`tests/fixtures/rendezvous_probe.rs`, built as an example target by
/// `cargo test`): `CANDLE_PARALLEL_PROBE` if set (a bundle copied to another machine), else
/// beside the test binary's build directory.
pub fn probe_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CANDLE_PARALLEL_PROBE") {
        return PathBuf::from(p);
    }
    example_path("rendezvous_probe")
}

/// The example program `name`, which `cargo test` builds (with the same profile and features)
/// into `target/<profile>/examples/`.
pub fn example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test binary> -> target/<profile>/examples/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("a build directory");
    let path = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    // `cargo test` builds it with the other example targets; `cargo test --test NAME` alone
    // does not.
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --example {name}` (with the same profile and features \
         as the tests), or plain `cargo test`, which builds it",
        path.display()
    );
    path
}
