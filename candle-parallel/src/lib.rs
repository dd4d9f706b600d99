//! # candle-parallel
//!
//! Run and train [Candle](https://github.com/huggingface/candle) models across many devices.
//!
//! - [`comm`]: the [`Comm`] communicator and its backends (threads on the CPU by default; NCCL
//!   on CUDA devices with the `nccl` feature);
//! - [`mod@launch`]: start N ranks as threads ([`launch::launch`], [`launch::Launcher`]) or as
//!   processes on one or many machines ([`launch::process`]);
//! - [`mesh`]: the `dp × pp × ep × tp` [`DeviceMesh`] and its per-dimension groups;
//! - [`ops`]: collectives that take part in autograd (`copy_to_group`, `reduce_from_group`, ...);
//! - [`tensor_parallel`]: column/row-parallel linear, vocab-parallel embedding and cross-entropy,
//!   sequence parallelism, attention heads over tp;
//! - [`moe`]: router, auxiliary losses, expert-parallel MoE layer (all-to-all / all-reduce);
//! - [`checkpoint`]: per-rank sharded loading, distributed atomic saves, resharding, HF export;
//! - [`optim`]: AdamW over sharded parameters, global gradient-norm clipping;
//! - [`logging`]: rank-tagged `tracing` output, one file per rank on request;
//! - [`memory`]: a counting allocator that attributes bytes to ranks, peaks per phase, RSS.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_parallel::{launch::launch, ops};
//!
//! // Each of 2 ranks holds half of W's columns; the gradient of x is summed over both.
//! let grads = launch(2, |ctx| {
//!     let x = Var::new(&[[1f32, 2.0]], &Device::Cpu)?;
//!     let w = Tensor::new(&[[1f32], [1.0]], &Device::Cpu)?; // this rank's column
//!     let y = ops::copy_to_group(x.as_tensor(), ctx.comm())?.matmul(&w)?;
//!     let grads = y.sum_all()?.backward()?;
//!     grads.get(x.as_tensor()).unwrap().to_vec2::<f32>()
//! })?;
//! assert_eq!(grads[0], vec![vec![2.0, 2.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```
pub mod checkpoint;
pub mod comm;
pub mod data_parallel;
pub mod launch;
pub mod logging;
pub mod lora;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod moe;
pub mod ops;
pub mod optim;
pub mod pipeline;
mod random;
pub mod tensor_parallel;
pub mod trainer;
pub mod zero;

pub use comm::{Comm, CommError, ReduceOp};
pub use launch::{launch, Launcher, RankContext};
pub use mesh::{DeviceMesh, MeshDim, MeshShape};
