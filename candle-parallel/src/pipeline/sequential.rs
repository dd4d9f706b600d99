//! [`PipelineSequential`]: an ordered list of layers cut into pipeline stages, of which each
//! rank builds only its own.

use super::executor::{run_step, StepOutput};
use super::schedule::{split_balanced, split_layers, Schedule};
use crate::comm::Comm;
use candle_core::{bail, DType, Module, Result, Shape, Tensor, Var};
use std::ops::Range;

/// How layers are assigned to stages.
#[derive(Clone, Debug)]
pub enum StageSplit {
    /// Equal numbers of layers (the first stages take one more when it does not divide).
    Uniform,
    /// Contiguous ranges whose heaviest total weight (say, parameter count) is smallest.
    Balanced(Vec<usize>),
    /// These ranges, one per stage, covering every layer in order.
    Explicit(Vec<Range<usize>>),
}

/// One model chunk: consecutive layers applied in order.
pub struct SequentialChunk {
    layers: Range<usize>,
    modules: Vec<Box<dyn Module + Send + Sync>>,
}

impl SequentialChunk {
    /// The global indices of its layers.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }
}

impl Module for SequentialChunk {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for m in &self.modules {
            x = m.forward(&x)?;
        }
        Ok(x)
    }
}

/// An ordered list of `n` layers cut into the stages of a [`Schedule`]; this rank builds the
/// layers of its stages only, each by its global index (so that layer `i` loads its own
/// weights by name from a checkpoint, whichever stage holds it). The first and last layers may
/// be an embedding and a head; the loss is given per step.
///
/// ```
/// use candle_core::{DType, Device, Module, Shape, Tensor};
/// use candle_parallel::launch;
/// use candle_parallel::pipeline::{PipelineSequential, Schedule, StageSplit};
///
/// let losses = launch(2, |ctx| {
///     let schedule = Schedule::gpipe(2, 2)?;
///     // Four layers y = x + i over two ranks: this rank builds two of them.
///     let model = PipelineSequential::build(schedule, ctx.rank(), 4, StageSplit::Uniform, |i| {
///         Ok(Box::new(move |x: &Tensor| x.affine(1.0, i as f64)))
///     })?;
///     assert_eq!(model.chunks()[0].layers(), 2 * ctx.rank()..2 * ctx.rank() + 2);
///     let mbs = [Tensor::zeros((1, 1), DType::F32, &Device::Cpu)?, Tensor::ones((1, 1), DType::F32, &Device::Cpu)?];
///     let out = model.step(ctx.comm(), &[], &mbs, (&Shape::from((1, 1)), DType::F32), &|_, y| y.sum_all())?;
///     Ok(out.loss)
/// })?;
/// assert_eq!(losses, vec![6.5, 6.5]); // mean of 0 + 6 and 1 + 6
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct PipelineSequential {
    schedule: Schedule,
    rank: usize,
    chunks: Vec<SequentialChunk>,
}

impl PipelineSequential {
    /// Builds pipeline rank `rank`'s chunks (its rank in the pipeline group, `mesh.pp().rank()`)
    /// of `n` layers split by `split` over `schedule`'s stages; `layer(i)` makes layer `i`,
    /// called only for this rank's layers.
    pub fn build(
        schedule: Schedule,
        rank: usize,
        n: usize,
        split: StageSplit,
        mut layer: impl FnMut(usize) -> Result<Box<dyn Module + Send + Sync>>,
    ) -> Result<Self> {
        let stages = schedule.stages();
        if rank >= schedule.ranks() {
            bail!(
                "PipelineSequential: rank {rank} is not one of the schedule's {} ranks",
                schedule.ranks()
            )
        }
        let ranges = match split {
            StageSplit::Uniform => split_layers(n, stages)?,
            StageSplit::Balanced(w) => {
                if w.len() != n {
                    bail!("PipelineSequential: {} weights for {n} layers", w.len())
                }
                split_balanced(&w, stages)?
            }
            StageSplit::Explicit(r) => {
                let contiguous = r.len() == stages
                    && r.first().is_some_and(|f| f.start == 0)
                    && r.last().is_some_and(|l| l.end == n)
                    && r.windows(2).all(|w| w[0].end == w[1].start)
                    && r.iter().all(|x| x.start < x.end);
                if !contiguous {
                    bail!(
                        "PipelineSequential: the stage ranges {r:?} must be {stages} non-empty consecutive ranges covering the {n} layers in order"
                    )
                }
                r
            }
        };
        let chunks = (0..schedule.chunks())
            .map(|c| {
                let range = ranges[schedule.stage_of(rank, c)].clone();
                let modules = range.clone().map(&mut layer).collect::<Result<_>>()?;
                Ok(SequentialChunk {
                    layers: range,
                    modules,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            schedule,
            rank,
            chunks,
        })
    }

    /// This rank's chunks, in chunk order.
    pub fn chunks(&self) -> &[SequentialChunk] {
        &self.chunks
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// One training step ([`run_step`]) over the pipeline group `comm`.
    pub fn step(
        &self,
        comm: &Comm,
        params: &[Var],
        micro_batches: &[Tensor],
        activation: (&Shape, DType),
        loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<StepOutput> {
        if comm.rank() != self.rank {
            bail!(
                "PipelineSequential: built for pipeline rank {} but stepped on rank {} of {}: build it with the pipeline group's rank (mesh.pp().rank())",
                self.rank,
                comm.rank(),
                comm.label()
            )
        }
        let chunks: Vec<&dyn Module> = self.chunks.iter().map(|c| c as &dyn Module).collect();
        run_step(
            comm,
            &self.schedule,
            &chunks,
            params,
            micro_batches,
            activation,
            loss,
        )
    }
}
