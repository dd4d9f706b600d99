//! Pipeline parallelism: a model cut into stages over the ranks of the pipeline group, a batch
//! cut into micro-batches so that stages work at the same time.
//!
//! - [`Schedule`]: per rank, the ordered forward and backward actions of one step — GPipe,
//!   1F1B (PipeDream-Flush), interleaved 1F1B — checked by simulating it before anything
//!   runs (every message has its receiver, no rank waits forever), with its bubble fraction
//!   and a printable step × rank grid.
//! - [`run_step`]: runs a schedule on this rank's model chunks, passing activations forward
//!   and gradients back with grouped point-to-point calls, accumulating the gradients over
//!   micro-batches so that they equal the full batch's.
//! - [`run_step_into`]: the same for a stage that runs its own backward unit by unit
//!   ([`UnitStage`]), handing each unit's gradients to a
//!   [`GradSink`](crate::data_parallel::GradSink) as soon as they exist (and recomputing its
//!   activations if it chooses).
//! - [`run_pipedream`]: PipeDream's asynchronous 1F1B, weights updated after every backward,
//!   with or without weight stashing ([`StashableStage`]).
//! - [`ModelSchedule`]: a model's `--schedule` ([`ScheduleKind`]), zero-bubble planned for
//!   the costs measured in its first step.
//! - [`PipelineSequential`]: an ordered list of layers cut into stages (uniformly, balanced by
//!   weight, or at given boundaries), each rank building only its own.
//! - [`split_layers`] / [`split_balanced`]: which layers each stage holds; [`rank_chunks`]:
//!   which stages a rank holds under the interleaved schedule.
//!
//! ```
//! use candle_core::{DType, Device, Module, Shape, Tensor, Var};
//! use candle_parallel::launch;
//! use candle_parallel::pipeline::{run_step, split_batch, Schedule};
//!
//! // A two-stage pipeline of y = x * w per stage, over 4 micro-batches.
//! struct Scale(Var);
//! impl Module for Scale {
//!     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
//!         x.broadcast_mul(self.0.as_tensor())
//!     }
//! }
//! let losses = launch(2, |ctx| {
//!     let schedule = Schedule::one_f_one_b(2, 4)?;
//!     let w = Var::new(&[2f32 + ctx.rank() as f32], &Device::Cpu)?; // 2, then 3
//!     let stage = Scale(w.clone());
//!     let batch = Tensor::new(&[[1f32], [2.0], [3.0], [4.0]], &Device::Cpu)?;
//!     let out = run_step(
//!         ctx.comm(),
//!         &schedule,
//!         &[&stage],
//!         &[w],
//!         &split_batch(&batch, 4)?,
//!         (&Shape::from((1, 1)), DType::F32),
//!         &|_, y| y.sum_all(),
//!     )?;
//!     Ok(out.loss)
//! })?;
//! // The mean over micro-batches of 6 * x: 6 * 2.5.
//! assert_eq!(losses, vec![15.0, 15.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod choice;
mod executor;
mod schedule;
mod sequential;

pub use choice::{ModelSchedule, ScheduleKind};
pub use executor::{
    current_micro_batch, run_pipedream, run_pipedream_recorded, run_step, run_step_into,
    split_batch, with_micro_batch, Communication, Executed, PipeDreamOutput, SinkStepOutput,
    StageTape, StashableStage, StepOutput, UnitStage,
};
pub use schedule::{
    check_rank_chunks, rank_chunks, split_balanced, split_layers, Action, ActionCosts, Schedule,
    Simulation, Timed,
};
pub use sequential::{PipelineSequential, SequentialChunk, StageSplit};
