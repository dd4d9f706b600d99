//! Runs a [`Schedule`] for one training step on this rank's model chunks.
//!
//! Every rank follows the schedule's simulated clock: at each tick it first exchanges the
//! messages due then (activations to the next stage, gradients to the previous one) as one
//! group ([`Comm::exchange`]), then starts its action due then. With
//! [`crate::comm::set_overlap_p2p`] (Megatron's `overlap_p2p_comm`) the group is posted on the
//! pipeline group's communication lane instead and waited for only when an action consumes a
//! message, so sends and receives travel while the rank computes. Ranks meet only in those
//! groups, tick by tick in the same order, so no two ranks can wait on each other in a cycle:
//! neighbours that send to each other at once (1F1B's steady state) never deadlock.

use super::schedule::{Action, Schedule};
use crate::comm::{Comm, ReduceOp, Work};
use crate::data_parallel::GradSink;
use crate::ops;
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Module, Result, Shape, Tensor, Var};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::Instant;

/// What one rank's part of a pipelined step produced.
pub struct StepOutput {
    /// The step's loss: the mean over micro-batches of the last stage's loss, on every rank.
    pub loss: f32,
    /// The gradients of the step's parameters, in their order: the gradient of the mean over
    /// micro-batches of their losses (each loss is divided by the number of micro-batches). For
    /// a loss that is a mean over equally sized micro-batches this is the full batch's gradient
    /// (a loss over batch statistics, such as a load-balancing loss, is averaged per
    /// micro-batch instead). `None` for a parameter no chunk of this rank used.
    pub grads: Vec<Option<Tensor>>,
    /// The most micro-batch chunks this rank held activations for at once (measured).
    pub peak_live: usize,
    /// Weight gradients computed in weight-gradient (`W`) steps rather than with their
    /// backward: zero-bubble schedules defer those of [`crate::ops::linear`].
    pub deferred_weight_grads: usize,
    /// What this rank ran, with wall-clock times in seconds from the start of the step.
    pub executed: Vec<Executed>,
    /// Its messages' time on the communication lane, and the part it waited for.
    pub communication: Communication,
}

/// What a rank's pipeline messages cost in one step, in seconds from the start of the step:
/// when its communication lane moved them, and when the rank itself stood waiting for one (the
/// exposed part; with overlap off, every exchange is).
#[derive(Clone, Debug, Default)]
pub struct Communication {
    /// Each tick's exchange on the lane: (start, end).
    pub lane: Vec<(f64, f64)>,
    /// Where the rank waited for a message instead of computing: (start, end).
    pub waited: Vec<(f64, f64)>,
}

impl Communication {
    /// Seconds the lane was busy.
    pub fn lane_seconds(&self) -> f64 {
        self.lane.iter().map(|(a, b)| b - a).sum()
    }

    /// Seconds the rank waited for messages: the communication not hidden.
    pub fn exposed_seconds(&self) -> f64 {
        self.waited.iter().map(|(a, b)| b - a).sum()
    }
}

/// One executed action.
#[derive(Clone, Copy, Debug)]
pub struct Executed {
    pub action: Action,
    pub stage: usize,
    pub start: f64,
    pub end: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Activation,
    Gradient,
}

thread_local! {
    static MICRO_BATCH: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The micro-batch this thread's current pipeline action (or [`with_micro_batch`] scope) runs
/// for: what a model reads per-micro-batch inputs by (e.g. packed sequences' positions) where
/// a stage's forward and backward get only the activation. `None` outside any.
pub fn current_micro_batch() -> Option<usize> {
    MICRO_BATCH.with(|c| c.get())
}

/// Runs `f` as micro-batch `mb` ([`current_micro_batch`]), as the pipeline executor runs each
/// action: for the loops that run micro-batches without a schedule.
pub fn with_micro_batch<R>(mb: usize, f: impl FnOnce() -> R) -> R {
    let _scope = MicroBatchScope::enter(mb);
    f()
}

/// Sets [`current_micro_batch`] until dropped, restoring the one before (also on unwinding).
struct MicroBatchScope(Option<usize>);

impl MicroBatchScope {
    fn enter(mb: usize) -> Self {
        Self(MICRO_BATCH.with(|c| c.replace(Some(mb))))
    }
}

impl Drop for MicroBatchScope {
    fn drop(&mut self) {
        MICRO_BATCH.with(|c| c.set(self.0));
    }
}

/// A message's identity: (kind, micro-batch, the stage it is for).
type Key = (Kind, usize, usize);

/// The messages that reached this rank, and the exchanges still running on the pipeline
/// group's communication lane (Megatron's overlapped point-to-point): a tick's sends and
/// receives are posted and the rank computes on; a message is waited for only when an action
/// consumes it.
struct Inbox {
    arrived: HashMap<Key, Tensor>,
    /// Exchanges in the order they were posted (the lane runs them in that order), with the
    /// keys of what each receives and whether it went on the lane; each returns when (in
    /// seconds from `started`) it ran.
    in_flight: VecDeque<(Work<Exchanged>, Vec<Key>, bool)>,
    started: Instant,
    times: Communication,
    /// When the last wait for a message ended (taken by the action that waited).
    waited_until: Option<f64>,
}

/// What an exchange received, and when (seconds from the step's start) the lane ran it.
type Exchanged = (Vec<Tensor>, f64, f64);

/// A receive to post: from whom, what, and the message it is.
type Receive = (usize, Shape, DType, Key);

impl Inbox {
    fn new(started: Instant) -> Self {
        Self {
            arrived: HashMap::new(),
            in_flight: VecDeque::new(),
            started,
            times: Communication::default(),
            waited_until: None,
        }
    }

    /// Posts one tick's sends and receives as a group: on `comm`'s lane with
    /// [`crate::comm::set_overlap_p2p`], else run here.
    fn post(
        &mut self,
        comm: &Comm,
        sends: Vec<(Tensor, usize)>,
        recvs: Vec<Receive>,
    ) -> Result<()> {
        let started = self.started;
        let keys = recvs.iter().map(|r| r.3).collect();
        let specs: Vec<(usize, Shape, DType)> = recvs
            .into_iter()
            .map(|(from, shape, dtype, _)| (from, shape, dtype))
            .collect();
        let exchange = move |c: &Comm| {
            let start = started.elapsed().as_secs_f64();
            let sends: Vec<(&Tensor, usize)> = sends.iter().map(|(t, d)| (t, *d)).collect();
            let recvs: Vec<(usize, &Shape, DType)> =
                specs.iter().map(|(f, s, dt)| (*f, s, *dt)).collect();
            let got = c.exchange(&sends, &recvs)?;
            Ok((got, start, started.elapsed().as_secs_f64()))
        };
        let lane = crate::comm::overlap_p2p();
        let work = match lane {
            true => comm.start("pipeline exchange", exchange),
            // Run here: its error stops the rank at this tick.
            false => Work::done(Ok(exchange(comm)?)),
        };
        self.in_flight.push_back((work, keys, lane));
        Ok(())
    }

    /// Waits for the oldest exchange still running.
    fn settle_one(&mut self) -> Result<bool> {
        let Some((work, keys, lane)) = self.in_flight.pop_front() else {
            return Ok(false);
        };
        let (got, start, end) = work.wait()?;
        self.times.lane.push((start, end));
        if !lane {
            // Run where it was posted: all of it exposed.
            self.times.waited.push((start, end));
        }
        for (key, t) in keys.into_iter().zip(got) {
            self.arrived.insert(key, t);
        }
        Ok(true)
    }

    /// The message `key`, waiting for the exchanges posted before it as needed.
    fn take(&mut self, key: Key, what: &str) -> Result<Tensor> {
        let waiting = self.started.elapsed().as_secs_f64();
        let mut waited = false;
        let t = loop {
            if let Some(t) = self.arrived.remove(&key) {
                break t;
            }
            // Waiting counts where the exchange ran on the lane (inline ones count whole).
            waited |= self.in_flight.front().is_some_and(|f| f.2);
            if !self.settle_one()? {
                bail!("pipeline step: {what} {key:?} never arrived (a bug in the schedule's messages)")
            }
        };
        if waited {
            let now = self.started.elapsed().as_secs_f64();
            self.times.waited.push((waiting, now));
            self.waited_until = Some(now);
        }
        Ok(t)
    }

    /// Waits for every exchange still running (its errors surface here).
    fn settle_all(&mut self) -> Result<()> {
        while self.settle_one()? {}
        Ok(())
    }
}

/// A message between stages: at tick `time`, from rank `from` to rank `to`, the activation
/// (or gradient) of micro-batch `mb` for stage `stage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Message {
    time: usize,
    kind: Kind,
    mb: usize,
    stage: usize,
    from: usize,
    to: usize,
}

/// Runs one training step of `schedule` on this rank (`comm` is the pipeline group; its rank
/// is the pipeline rank).
///
/// - `chunks`: this rank's model chunks, chunk `c` being stage `schedule.stage_of(rank, c)`.
/// - `params`: the trainable variables of this rank's chunks, whose gradients are returned.
/// - `micro_batches`: the inputs of the first stage, one per micro-batch, all of one shape;
///   every rank passes them (only the first stage reads them), so that every rank checks them
///   alike before any work.
/// - `activation`: the shape and dtype of what passes between stages (per micro-batch).
/// - `loss`: on the last stage, the loss of micro-batch `mb` given its output (a scalar; the
///   step's loss is their mean).
///
/// See the [module documentation](super) for an example.
pub fn run_step(
    comm: &Comm,
    schedule: &Schedule,
    chunks: &[&dyn Module],
    params: &[Var],
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
    loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<StepOutput> {
    // First, on every rank alike: what the checks below then decide alike.
    agree(comm, schedule, chunks.len(), micro_batches, activation)?;
    let me = comm.rank();
    if chunks.len() != schedule.chunks() {
        bail!(
            "pipeline step on rank {me}: the schedule {} runs {} model chunks per rank, got {}",
            schedule.name(),
            schedule.chunks(),
            chunks.len()
        )
    }
    let mut compute = Accumulate {
        chunks,
        params,
        grads: vec![None; params.len()],
    };
    let m = schedule.micro_batches() as f64;
    let run = execute(
        comm,
        schedule,
        &mut compute,
        micro_batches,
        activation,
        &|mb, y| loss(mb, y)? / m,
    )?;
    Ok(StepOutput {
        loss: run.losses.iter().sum(),
        grads: compute.grads,
        peak_live: run.peak_live,
        deferred_weight_grads: run.deferred_weight_grads,
        executed: run.executed,
        communication: run.communication,
    })
}

/// A pipeline stage that runs its own backward, unit by unit, into a [`GradSink`]: what
/// [`run_step_into`] runs. Its forward keeps what its backward needs (its units' activations,
/// or only their inputs when it recomputes them) in the [`StageTape`] it returns.
pub trait UnitStage {
    /// The forward of one micro-batch: `x` is the stage's input (the first stage's micro-batch,
    /// or the previous stage's output), untracked. Returns the output, detached (sent on, or
    /// given to the loss), and the tape its backward runs from.
    fn forward_units<'s>(&'s self, x: &Tensor) -> Result<(Tensor, Box<dyn StageTape + 's>)>;
}

/// What a [`UnitStage`]'s forward kept for one micro-batch's backward.
pub trait StageTape {
    /// The backward, given the gradient of the stage's output: each unit's parameter gradients
    /// go to `sink` as soon as they exist (with [`GradSink::unit_done`] after each unit).
    /// Returns the gradient of the stage's input (`None` for the first stage's token ids).
    fn backward(self: Box<Self>, grad: &Tensor, sink: &mut dyn GradSink) -> Result<Option<Tensor>>;
}

/// What one rank's part of a [`run_step_into`] produced (its gradients went to the sink).
pub struct SinkStepOutput {
    /// The last stage's loss of every micro-batch, on every rank.
    pub losses: Vec<f32>,
    /// The most micro-batches this rank held activations for at once (measured).
    pub peak_live: usize,
    /// What this rank ran, with wall-clock times in seconds from the start of the step.
    pub executed: Vec<Executed>,
    /// Its messages' time on the communication lane, and the part it waited for.
    pub communication: Communication,
}

/// [`run_step`] for a stage that runs its own unit-wise backward ([`UnitStage`]): the same
/// schedule and messages, each micro-batch's backward handing its gradients to `sink` unit by
/// unit ([`GradSink::end_micro_batch`] after each), so that the stage's full gradients never
/// exist at once. `loss` is the micro-batch's own (not divided by the number of micro-batches:
/// the sink averages). One chunk per rank, and no split backward (zero-bubble's `W` steps):
/// those schedules are refused.
///
/// ```
/// use candle_core::{DType, Device, Result, Shape, Tensor, Var};
/// use candle_parallel::data_parallel::{GradCollector, GradSink};
/// use candle_parallel::launch;
/// use candle_parallel::pipeline::{run_step_into, split_batch, Schedule, StageTape, UnitStage};
///
/// // y = x * w per stage, its backward by hand.
/// struct Scale(Var);
/// struct Tape<'a>(&'a Scale, Tensor);
/// impl UnitStage for Scale {
///     fn forward_units<'s>(&'s self, x: &Tensor) -> Result<(Tensor, Box<dyn StageTape + 's>)> {
///         Ok((x.broadcast_mul(self.0.as_tensor())?, Box::new(Tape(self, x.clone()))))
///     }
/// }
/// impl StageTape for Tape<'_> {
///     fn backward(self: Box<Self>, g: &Tensor, sink: &mut dyn GradSink) -> Result<Option<Tensor>> {
///         sink.add_grad(0, &(g * &self.1)?.sum_keepdim(0)?.reshape(1)?)?;
///         sink.unit_done(&[""])?;
///         Ok(Some(g.broadcast_mul(self.0 .0.as_tensor())?))
///     }
/// }
/// let grads = launch(2, |ctx| {
///     let w = Var::new(&[2f32 + ctx.rank() as f32], &Device::Cpu)?; // 2, then 3
///     let mut sink = GradCollector::new(&[w.clone()]);
///     let batch = Tensor::new(&[[1f32], [2.0], [3.0], [4.0]], &Device::Cpu)?;
///     run_step_into(
///         ctx.comm(),
///         &Schedule::one_f_one_b(2, 4)?,
///         &Scale(w),
///         &mut sink,
///         &split_batch(&batch, 4)?,
///         (&Shape::from((1, 1)), DType::F32),
///         &|_, y| y.sum_all(),
///     )?;
///     Ok(sink.take()?[0].as_ref().unwrap().to_vec1::<f32>()?[0])
/// })?;
/// // d(6x)/dw: 3x on the first stage, 2x on the second, x's mean being 2.5.
/// assert_eq!(grads, vec![7.5, 5.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn run_step_into(
    comm: &Comm,
    schedule: &Schedule,
    stage: &dyn UnitStage,
    sink: &mut dyn GradSink,
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
    loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<SinkStepOutput> {
    agree(comm, schedule, 1, micro_batches, activation)?;
    if schedule.chunks() != 1 {
        bail!(
            "pipeline step on rank {}: the schedule {} runs {} model chunks per rank; a unit-wise step runs one: use GPipe or 1F1B",
            comm.rank(),
            schedule.name(),
            schedule.chunks()
        )
    }
    let mut compute = UnitWise {
        stage,
        sink,
        tapes: HashMap::new(),
        backwards_left: micro_batches.len(),
    };
    let run = execute(
        comm,
        schedule,
        &mut compute,
        micro_batches,
        activation,
        loss,
    )?;
    Ok(SinkStepOutput {
        losses: run.losses,
        peak_live: run.peak_live,
        executed: run.executed,
        communication: run.communication,
    })
}

/// A flushed step whose stage runs its own backward into a sink.
struct UnitWise<'a> {
    stage: &'a dyn UnitStage,
    sink: &'a mut dyn GradSink,
    /// Per micro-batch in flight, what its forward kept.
    tapes: HashMap<usize, Box<dyn StageTape + 'a>>,
    /// Micro-batch backwards still to run in this step (the last one is announced to the sink).
    backwards_left: usize,
}

impl Compute for UnitWise<'_> {
    fn forward(&mut self, mb: usize, _chunk: usize, x: &Tensor) -> Result<Tensor> {
        let (y, tape) = self.stage.forward_units(x)?;
        self.tapes.insert(mb, tape);
        Ok(y.detach())
    }

    fn backward_done(&mut self, _: usize, _: usize, _: &GradStore) -> Result<()> {
        bail!("a unit-wise stage runs its own backward")
    }

    fn weight_grads(&mut self, _: Vec<(Tensor, Tensor)>) -> Result<()> {
        bail!("a unit-wise stage runs whole backwards: no weight-gradient steps")
    }

    fn owns_backward(&self) -> bool {
        true
    }

    fn backward(&mut self, mb: usize, _chunk: usize, grad: &Tensor) -> Result<Option<Tensor>> {
        let tape = self
            .tapes
            .remove(&mb)
            .expect("a backward runs after its forward");
        self.backwards_left = self.backwards_left.saturating_sub(1);
        self.sink.begin_backward(self.backwards_left == 0)?;
        let input_grad = tape.backward(grad, self.sink)?;
        self.sink.end_micro_batch()?;
        Ok(input_grad)
    }
}

/// A stage whose forward takes its parameters as arguments, so that a micro-batch can run on
/// an older version of them while newer ones train: PipeDream's weight stashing.
pub trait StashableStage {
    /// The live parameters, which the update after every backward changes.
    fn params(&self) -> Vec<Var>;
    /// The forward computed with `params` (in the order of [`StashableStage::params`]).
    fn forward_with(&self, x: &Tensor, params: &[Tensor]) -> Result<Tensor>;
}

/// What one rank's part of a PipeDream run produced, per micro-batch. The per-micro-batch
/// gradients and weight versions are recorded only by [`run_pipedream_recorded`] (they hold
/// a copy of the stage's weights per micro-batch); [`run_pipedream`] leaves them empty.
pub struct PipeDreamOutput {
    /// The last stage's loss of every micro-batch, on every rank.
    pub losses: Vec<f32>,
    /// This rank's stage's gradients (in the order of its parameters) from each backward.
    pub grads: Vec<Vec<Tensor>>,
    /// The weights each micro-batch's forward used on this stage (with stashing, the stashed
    /// versions themselves; without, copies: diagnostics that cost a copy of the stage's
    /// weights per micro-batch).
    pub forward_weights: Vec<Vec<Tensor>>,
    /// The weights each micro-batch's backward computed with: the forward's when stashing,
    /// else the live ones at the time (newer: the inconsistency stashing removes).
    pub backward_weights: Vec<Vec<Tensor>>,
    /// The most micro-batches this rank held activations (and stashed weights) for at once.
    pub peak_live: usize,
    pub executed: Vec<Executed>,
    /// Its messages' time on the communication lane, and the part it waited for.
    pub communication: Communication,
}

/// PipeDream's asynchronous 1F1B (Narayanan et al. 2019) over `micro_batches`: no flush, the
/// weights of each stage updated by `update(mb, grads)` right after micro-batch `mb`'s backward
/// on it, so the forwards in flight run on different versions. With `stash`, each
/// micro-batch's backward uses the version its forward used (weight stashing: the gradient is
/// that of the function it computed); without it, the backward sees the weights as updated
/// meanwhile, which is the inconsistency PipeDream's paper describes.
///
/// What a rank holds grows with the micro-batches in flight (at most the pipeline's depth),
/// not with their number: a stashed weight version lives from its micro-batch's forward to
/// its backward, and nothing is kept per micro-batch after that.
pub fn run_pipedream(
    comm: &Comm,
    stage: &dyn StashableStage,
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
    loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
    stash: bool,
    update: &mut dyn FnMut(usize, &[Tensor]) -> Result<()>,
) -> Result<PipeDreamOutput> {
    pipedream(
        comm,
        stage,
        micro_batches,
        activation,
        loss,
        stash,
        update,
        false,
    )
}

/// [`run_pipedream`] that also records, per micro-batch, the gradients and the weights its
/// forward and backward used ([`PipeDreamOutput`]): diagnostics that cost a copy of the
/// stage's weights per micro-batch.
pub fn run_pipedream_recorded(
    comm: &Comm,
    stage: &dyn StashableStage,
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
    loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
    stash: bool,
    update: &mut dyn FnMut(usize, &[Tensor]) -> Result<()>,
) -> Result<PipeDreamOutput> {
    pipedream(
        comm,
        stage,
        micro_batches,
        activation,
        loss,
        stash,
        update,
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn pipedream(
    comm: &Comm,
    stage: &dyn StashableStage,
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
    loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
    stash: bool,
    update: &mut dyn FnMut(usize, &[Tensor]) -> Result<()>,
    record: bool,
) -> Result<PipeDreamOutput> {
    let schedule = Schedule::one_f_one_b(comm.size(), micro_batches.len())?;
    agree(comm, &schedule, 1, micro_batches, activation)?;
    let m = micro_batches.len();
    let mut compute = PipeDream {
        stage,
        live: stage.params(),
        stash,
        record,
        stashed: HashMap::new(),
        update,
        grads: vec![Vec::new(); m],
        forward_weights: vec![Vec::new(); m],
        backward_weights: vec![Vec::new(); m],
    };
    let run = execute(
        comm,
        &schedule,
        &mut compute,
        micro_batches,
        activation,
        loss,
    )?;
    Ok(PipeDreamOutput {
        losses: run.losses,
        grads: compute.grads,
        forward_weights: compute.forward_weights,
        backward_weights: compute.backward_weights,
        peak_live: run.peak_live,
        executed: run.executed,
        communication: run.communication,
    })
}

struct PipeDream<'a> {
    stage: &'a dyn StashableStage,
    live: Vec<Var>,
    stash: bool,
    /// Whether the per-micro-batch gradients and weight versions are kept.
    record: bool,
    /// Per micro-batch in flight, the weight versions its forward used (as variables).
    stashed: HashMap<usize, Vec<Var>>,
    update: &'a mut dyn FnMut(usize, &[Tensor]) -> Result<()>,
    grads: Vec<Vec<Tensor>>,
    forward_weights: Vec<Vec<Tensor>>,
    backward_weights: Vec<Vec<Tensor>>,
}

/// Copies of the values of `vars` now.
fn snapshot(vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter().map(|v| v.as_tensor().copy()).collect()
}

impl Compute for PipeDream<'_> {
    fn forward(&mut self, mb: usize, _chunk: usize, x: &Tensor) -> Result<Tensor> {
        if self.stash {
            // A copy of the live weights as new variables: the version this micro-batch keeps.
            // (`Var::from_tensor` of a variable would share it; of its detached view, it copies
            // the storage once.)
            let vars: Vec<Var> = self
                .live
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().detach()))
                .collect::<Result<_>>()?;
            let ws: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = self.stage.forward_with(x, &ws)?;
            if self.record {
                self.forward_weights[mb] = ws; // never changed: no second copy
            }
            self.stashed.insert(mb, vars);
            Ok(y)
        } else {
            // The live variables themselves: their updates change what the backward reads.
            let ws: Vec<Tensor> = self.live.iter().map(|v| v.as_tensor().clone()).collect();
            if self.record {
                self.forward_weights[mb] = snapshot(&self.live)?;
            }
            self.stage.forward_with(x, &ws)
        }
    }

    fn backward_done(&mut self, mb: usize, _chunk: usize, store: &GradStore) -> Result<()> {
        let used = match self.stashed.remove(&mb) {
            Some(vars) => vars,
            None => self.live.clone(),
        };
        let grads: Vec<Tensor> = used
            .iter()
            .map(|v| match store.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<Result<_>>()?;
        if self.record {
            self.backward_weights[mb] = if self.stash {
                used.iter().map(|v| v.as_tensor().clone()).collect()
            } else {
                snapshot(&used)?
            };
        }
        // The stashed version is dropped with `used` after the update.
        (self.update)(mb, &grads)?;
        if self.record {
            self.grads[mb] = grads;
        }
        Ok(())
    }

    fn weight_grads(&mut self, _: Vec<(Tensor, Tensor)>) -> Result<()> {
        bail!("PipeDream runs whole backwards: no weight-gradient steps")
    }
}

/// What a schedule's actions do with the model: the part that differs between a flushed step
/// (gradients accumulated) and PipeDream (weights updated after every backward).
trait Compute {
    /// The forward of micro-batch `mb` through local chunk `chunk` (with its graph).
    fn forward(&mut self, mb: usize, chunk: usize, x: &Tensor) -> Result<Tensor>;
    /// The backward of `mb` through `chunk` produced `store`: take its parameter gradients.
    fn backward_done(&mut self, mb: usize, chunk: usize, store: &GradStore) -> Result<()>;
    /// A `W` step computed these (weight, gradient) pairs.
    fn weight_grads(&mut self, grads: Vec<(Tensor, Tensor)>) -> Result<()>;
    /// Whether the stage runs its own backward ([`Compute::backward`]) from its output's
    /// gradient, keeping what it needs itself, instead of the executor back-propagating
    /// through the output's graph (and [`Compute::backward_done`] taking the gradients).
    fn owns_backward(&self) -> bool {
        false
    }
    /// The backward of `mb` through `chunk` given the gradient of its output: the gradient of
    /// its input (`None` for the first stage, or for no gradient).
    fn backward(&mut self, _mb: usize, _chunk: usize, _grad: &Tensor) -> Result<Option<Tensor>> {
        bail!("this pipeline computation back-propagates through the output's graph")
    }
}

/// A flushed step: gradients summed over micro-batches.
struct Accumulate<'a> {
    chunks: &'a [&'a dyn Module],
    params: &'a [Var],
    grads: Vec<Option<Tensor>>,
}

impl Compute for Accumulate<'_> {
    fn forward(&mut self, _mb: usize, chunk: usize, x: &Tensor) -> Result<Tensor> {
        self.chunks[chunk].forward(x)
    }

    fn backward_done(&mut self, _mb: usize, _chunk: usize, store: &GradStore) -> Result<()> {
        for (acc, p) in self.grads.iter_mut().zip(self.params) {
            if let Some(g) = store.get(p.as_tensor()) {
                accumulate(acc, g)?;
            }
        }
        Ok(())
    }

    fn weight_grads(&mut self, grads: Vec<(Tensor, Tensor)>) -> Result<()> {
        for (weight, g) in grads {
            if let Some(i) = self
                .params
                .iter()
                .position(|p| p.as_tensor().id() == weight.id())
            {
                accumulate(&mut self.grads[i], &g)?;
            }
        }
        Ok(())
    }
}

/// What [`execute`] measured.
struct Run {
    /// Per micro-batch, the last stage's loss, on every rank.
    losses: Vec<f32>,
    peak_live: usize,
    deferred_weight_grads: usize,
    executed: Vec<Executed>,
    communication: Communication,
}

/// Runs `schedule` on this rank with `compute` doing the model's part.
fn execute(
    comm: &Comm,
    schedule: &Schedule,
    compute: &mut dyn Compute,
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
    loss: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<Run> {
    let me = comm.rank();
    let m = schedule.micro_batches();
    let stages = schedule.stages();
    if comm.size() != schedule.ranks() {
        bail!(
            "pipeline step: the schedule {} is for {} ranks but the pipeline group {} has {}",
            schedule.name(),
            schedule.ranks(),
            comm.label(),
            comm.size()
        )
    }
    if micro_batches.len() != m {
        bail!(
            "pipeline step on rank {me}: the schedule {} runs {m} micro-batches, got {}",
            schedule.name(),
            micro_batches.len()
        )
    }
    if let Some((i, x)) = micro_batches
        .iter()
        .enumerate()
        .find(|(_, x)| x.dims() != micro_batches[0].dims())
    {
        bail!(
            "pipeline step: micro-batch {i} has shape {:?} but micro-batch 0 has {:?}: every micro-batch must have the same shape",
            x.dims(),
            micro_batches[0].dims()
        )
    }
    let sim = schedule.simulate()?;
    let mut messages = Vec::new();
    for (r, timeline) in sim.timeline().iter().enumerate() {
        for t in timeline {
            let (kind, stage) = match t.action {
                Action::Forward { .. } if t.stage + 1 < stages => (Kind::Activation, t.stage + 1),
                Action::Backward { .. } | Action::BackwardInput { .. } if t.stage > 0 => {
                    (Kind::Gradient, t.stage - 1)
                }
                _ => continue,
            };
            messages.push(Message {
                time: t.end,
                kind,
                mb: t.action.mb(),
                stage,
                from: r,
                to: schedule.holder_of(stage).0,
            });
        }
    }
    // The same order on every rank: the groups' messages between a pair match one by one.
    messages.sort();
    let mine: Vec<_> = sim.timeline()[me].clone();

    // Produced here, to hand on: (kind, mb, stage it is for) -> tensor.
    let mut produced: HashMap<(Kind, usize, usize), Tensor> = HashMap::new();
    // Arrived here: (kind, mb, stage it is for) -> tensor.
    let started = Instant::now();
    let mut inbox = Inbox::new(started);
    // Per (mb, stage) held here: the input variable (not on stage 0) and the output.
    let mut inputs: HashMap<(usize, usize), Var> = HashMap::new();
    let mut outputs: HashMap<(usize, usize), Tensor> = HashMap::new();
    // Per (mb, stage): the weight gradients a split backward left for its W step.
    let mut waiting_weights: HashMap<(usize, usize), ops::DeferredWeightGrads> = HashMap::new();
    let mut losses = vec![0f32; m];
    let mut deferred_count = 0;
    let (mut peak_live, mut executed) = (0, Vec::with_capacity(mine.len()));
    let (act_shape, act_dtype) = activation;
    let mut next_message = 0;
    let mut next_action = 0;
    let own_backward = compute.owns_backward();
    if own_backward {
        // Over every rank's actions: every rank refuses alike.
        if let Some(t) = sim
            .timeline()
            .iter()
            .flatten()
            .find(|t| !matches!(t.action, Action::Forward { .. } | Action::Backward { .. }))
        {
            bail!(
                "pipeline step on rank {me}: the schedule {} splits backwards ({:?}), which a stage running its own unit-wise backward cannot: use a schedule without weight-gradient steps (GPipe, 1F1B)",
                schedule.name(),
                t.action
            )
        }
    }
    for tick in 0..=sim.makespan() {
        // 1. The messages due at this tick, as one group.
        let due_end = messages[next_message..]
            .iter()
            .position(|msg| msg.time > tick)
            .map_or(messages.len(), |p| next_message + p);
        let due = &messages[next_message..due_end];
        next_message = due_end;
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for msg in due.iter().filter(|x| x.from == me || x.to == me) {
            let key = (msg.kind, msg.mb, msg.stage);
            if msg.from == me {
                let t = produced
                    .remove(&key)
                    .expect("a message is sent after its action ran");
                if msg.to == me {
                    inbox.arrived.insert(key, t);
                } else {
                    sends.push((t, msg.to));
                }
            } else {
                recvs.push((msg.from, key));
            }
        }
        if !sends.is_empty() || !recvs.is_empty() {
            let recvs = recvs
                .into_iter()
                .map(|(from, key)| (from, act_shape.clone(), act_dtype, key))
                .collect();
            inbox.post(comm, sends, recvs)?;
        }
        // 2. This rank's action due at this tick.
        while let Some(t) = mine.get(next_action).filter(|t| t.start == tick) {
            next_action += 1;
            let start = started.elapsed().as_secs_f64();
            let (mb, chunk, stage) = (t.action.mb(), t.action.chunk(), t.stage);
            let _scope = MicroBatchScope::enter(mb);
            match t.action {
                Action::Forward { .. } => {
                    let x = if stage == 0 {
                        micro_batches[mb].clone()
                    } else {
                        let a = inbox.take((Kind::Activation, mb, stage), "the activation")?;
                        if own_backward {
                            // The stage keeps its own input for its own backward.
                            a
                        } else {
                            let v = Var::from_tensor(&a)?;
                            let x = v.as_tensor().clone();
                            inputs.insert((mb, stage), v);
                            x
                        }
                    };
                    let y = compute.forward(mb, chunk, &x)?;
                    if stage + 1 < stages {
                        if y.dims() != act_shape.dims() || y.dtype() != act_dtype {
                            bail!(
                                "pipeline step: stage {stage} (rank {me}, chunk {chunk}) produced {:?}{:?} for micro-batch {mb}, but the activation between stages was declared {act_dtype:?}{:?}",
                                y.dtype(),
                                y.dims(),
                                act_shape.dims()
                            )
                        }
                        produced.insert((Kind::Activation, mb, stage + 1), y.detach());
                    }
                    outputs.insert((mb, stage), y);
                }
                Action::Backward { .. } if own_backward => {
                    let y = outputs
                        .remove(&(mb, stage))
                        .expect("a backward runs after its forward");
                    // The gradient of the stage's (detached) output: from the loss on the last
                    // stage, else from the next stage.
                    let g = if stage + 1 == stages {
                        let v = Var::from_tensor(&y)?;
                        let l = loss(mb, v.as_tensor())?.to_dtype(DType::F32)?;
                        losses[mb] = l.to_scalar::<f32>()?;
                        match crate::ops::backward(&l)?.remove(v.as_tensor()) {
                            Some(g) => g,
                            None => y.zeros_like()?,
                        }
                    } else {
                        inbox.take((Kind::Gradient, mb, stage), "the gradient")?
                    };
                    drop(y);
                    let input_grad = compute.backward(mb, chunk, &g)?;
                    if stage > 0 {
                        let g = match input_grad {
                            Some(g) => g,
                            None => Tensor::zeros(act_shape, act_dtype, comm.device())?,
                        };
                        if g.dims() != act_shape.dims() || g.dtype() != act_dtype {
                            bail!(
                                "pipeline step: stage {stage} (rank {me}) returned a {:?}{:?} gradient of its input for micro-batch {mb}, but the activation between stages was declared {act_dtype:?}{:?}",
                                g.dtype(),
                                g.dims(),
                                act_shape.dims()
                            )
                        }
                        produced.insert((Kind::Gradient, mb, stage - 1), g);
                    }
                }
                Action::Backward { .. } | Action::BackwardInput { .. } => {
                    let y = outputs
                        .remove(&(mb, stage))
                        .expect("a backward runs after its forward");
                    let split = matches!(t.action, Action::BackwardInput { .. });
                    let mut backward = || -> Result<GradStore> {
                        if stage + 1 == stages {
                            let l = loss(mb, &y)?.to_dtype(DType::F32)?;
                            losses[mb] = l.to_scalar::<f32>()?;
                            crate::ops::backward(&l)
                        } else {
                            let g = inbox.take((Kind::Gradient, mb, stage), "the gradient")?;
                            crate::ops::backward(&(&y * g)?.sum_all()?)
                        }
                    };
                    let store = if split {
                        // The weight gradients of the linear layers wait for the W step.
                        let (store, deferred) = ops::defer_weight_grads(backward)?;
                        waiting_weights.insert((mb, stage), deferred);
                        store
                    } else {
                        backward()?
                    };
                    compute.backward_done(mb, chunk, &store)?;
                    if stage > 0 {
                        let v = inputs
                            .remove(&(mb, stage))
                            .expect("a stage's input is kept until its backward");
                        let g = match store.get(v.as_tensor()) {
                            Some(g) => g.clone(),
                            None => v.as_tensor().zeros_like()?,
                        };
                        produced.insert((Kind::Gradient, mb, stage - 1), g);
                    }
                }
                Action::BackwardWeight { .. } => {
                    let deferred = waiting_weights
                        .remove(&(mb, stage))
                        .expect("a weight-gradient step runs after its input-gradient step");
                    deferred_count += deferred.len();
                    compute.weight_grads(deferred.compute()?)?;
                }
            }
            peak_live = peak_live.max(outputs.len() + waiting_weights.len());
            // The action computes from when its message arrived.
            let start = inbox.waited_until.take().map_or(start, |w| w.max(start));
            executed.push(Executed {
                action: t.action,
                stage,
                start,
                end: started.elapsed().as_secs_f64(),
            });
        }
    }
    inbox.settle_all()?;
    // The losses live on the last stage's rank: everyone gets them.
    let device = comm.device().clone();
    let total = comm.all_reduce(&Tensor::new(losses, &device)?, ReduceOp::Sum)?;
    Ok(Run {
        losses: total.to_vec1::<f32>()?,
        peak_live,
        deferred_weight_grads: deferred_count,
        executed,
        communication: std::mem::take(&mut inbox.times),
    })
}

/// Checks, on every rank at once, that the pipeline's ranks run the same schedule (every
/// action of every rank), the same number and shape of micro-batches and the same activation:
/// each rank derives the messages it exchanges from these, so a disagreement would pair
/// messages wrongly (or wait forever) instead of failing.
fn agree(
    comm: &Comm,
    schedule: &Schedule,
    chunks: usize,
    micro_batches: &[Tensor],
    activation: (&Shape, DType),
) -> Result<()> {
    // The actions travel as a hash: the same schedule gives the same one in every process.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for r in 0..schedule.ranks() {
        schedule.actions(r).hash(&mut hasher);
    }
    let mine = format!(
        "schedule {} ({} ranks, {} chunks, {} micro-batches, actions #{:016x}), {chunks} chunks given, {} micro-batches given {:?}, activation {:?} {:?}",
        schedule.name(),
        schedule.ranks(),
        schedule.chunks(),
        schedule.micro_batches(),
        hasher.finish(),
        micro_batches.len(),
        micro_batches.iter().map(|x| (x.dims().to_vec(), x.dtype())).collect::<Vec<_>>(),
        activation.0.dims(),
        activation.1
    );
    let all = comm.all_gather_bytes(mine.as_bytes())?;
    if let Some(r) = all.iter().position(|b| b != &all[0]) {
        bail!(
            "pipeline step on group {}: the ranks disagree on the step: rank {} runs {} but rank {} runs {}",
            comm.label(),
            comm.ranks()[0],
            String::from_utf8_lossy(&all[0]),
            comm.ranks()[r],
            String::from_utf8_lossy(&all[r])
        )
    }
    Ok(())
}

/// Adds `g` to the gradient accumulated in `acc`.
fn accumulate(acc: &mut Option<Tensor>, g: &Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + g)?,
        None => g.clone(),
    });
    Ok(())
}

/// Cuts `batch` into `micro_batches` equal parts along dim 0.
pub fn split_batch(batch: &Tensor, micro_batches: usize) -> Result<Vec<Tensor>> {
    let rows = batch.dim(0)?;
    if micro_batches == 0 || !rows.is_multiple_of(micro_batches) {
        bail!(
            "a batch of {rows} rows does not split into {micro_batches} equal micro-batches: use a number of micro-batches that divides {rows}"
        )
    }
    batch.chunk(micro_batches, 0)
}
