//! Helpers of the integration tests only.
#![allow(dead_code)] // each test file uses its own subset

use candle_core::{Result, Tensor};
use std::path::PathBuf;

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
