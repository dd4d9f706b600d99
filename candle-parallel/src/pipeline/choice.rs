//! Which schedule a model's training step runs (`--schedule` on the examples): the kind, and
//! for zero-bubble the action costs measured in the first step it ran.
use super::{Action, ActionCosts, Executed, Schedule};
use crate::comm::{lock, Comm, ReduceOp};
use candle_core::{bail, Result, Tensor};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A pipeline schedule by kind, as `--schedule` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// Every forward, then every backward ([`Schedule::gpipe`]).
    GPipe,
    /// One forward, one backward ([`Schedule::one_f_one_b`]): the default.
    #[default]
    OneFOneB,
    /// Several model chunks per rank ([`Schedule::interleaved`]).
    Interleaved,
    /// Split backwards, planned for the costs measured in the first step
    /// ([`Schedule::zero_bubble_with_costs`]).
    ZeroBubble,
}

impl ScheduleKind {
    /// Whether the schedule splits backwards into input- and weight-gradient halves (a stage
    /// that runs its own unit-wise backward cannot).
    pub fn splits_backwards(self) -> bool {
        self == Self::ZeroBubble
    }

    /// Whether a stage's backward must run whole (the model's `batch_grads`), not unit by unit
    /// into a gradient sink: zero-bubble splits it, interleaving runs several chunks per rank.
    pub fn needs_whole_backward(self) -> bool {
        matches!(self, Self::ZeroBubble | Self::Interleaved)
    }

    /// Model chunks per rank when `--chunks` is not given: 2 for interleaved (Megatron's
    /// usual virtual pipeline size), 1 for the others.
    pub fn default_chunks(self) -> usize {
        match self {
            Self::Interleaved => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::GPipe => "gpipe",
            Self::OneFOneB => "1f1b",
            Self::Interleaved => "interleaved",
            Self::ZeroBubble => "zero-bubble",
        })
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "gpipe" => Self::GPipe,
            "1f1b" => Self::OneFOneB,
            "interleaved" => Self::Interleaved,
            "zero-bubble" | "zb" => Self::ZeroBubble,
            other => {
                bail!("unknown schedule {other:?}: use gpipe, 1f1b, interleaved or zero-bubble")
            }
        })
    }
}

/// What a built schedule is for: ranks, micro-batches, action costs.
type BuiltFor = (usize, usize, ActionCosts);

/// A model's schedule setting for its training steps: the kind, and for zero-bubble the F, I
/// and W costs measured in the first step it ran (agreed over the pipeline group), which the
/// later steps are planned for, as the zero-bubble authors profile them.
///
/// ```
/// use candle_parallel::pipeline::{ModelSchedule, ScheduleKind};
///
/// let s = ModelSchedule::new("zero-bubble".parse()?, 1)?;
/// // Unit costs until a step was measured.
/// assert_eq!(s.schedule(4, 8)?.name(), "zero-bubble");
/// assert!(s.measured_costs().is_none());
/// let e = ModelSchedule::new(ScheduleKind::Interleaved, 1).unwrap_err().to_string();
/// assert!(e.contains("chunks"), "{e}");
/// // Two chunks per rank: interleaved 1F1B over 2 × 4 stages.
/// let s = ModelSchedule::new(ScheduleKind::Interleaved, 2)?;
/// assert_eq!(s.schedule(4, 6)?.stages(), 8);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
pub struct ModelSchedule {
    kind: ScheduleKind,
    /// Model chunks per rank (several only with [`ScheduleKind::Interleaved`]).
    chunks: usize,
    measured: Mutex<Option<ActionCosts>>,
    /// The last schedule built, by (ranks, micro-batches, costs): zero-bubble's list
    /// scheduling runs once, not every step.
    built: Mutex<Option<(BuiltFor, Schedule)>>,
    /// Whether the pipeline's ranks were found to hold their stages in this schedule's
    /// order ([`ModelSchedule::check_stages`], once).
    stages_checked: AtomicBool,
}

/// 1F1B over one stage per rank.
impl Default for ModelSchedule {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::default(),
            chunks: 1,
            measured: Mutex::new(None),
            built: Mutex::new(None),
            stages_checked: AtomicBool::new(false),
        }
    }
}

impl Clone for ModelSchedule {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            chunks: self.chunks,
            measured: Mutex::new(*lock(&self.measured)),
            built: Mutex::new(lock(&self.built).clone()),
            stages_checked: AtomicBool::new(self.stages_checked.load(Ordering::Relaxed)),
        }
    }
}

impl ModelSchedule {
    /// `kind` for a model that holds `chunks` model chunks per rank: interleaving needs
    /// several.
    pub fn new(kind: ScheduleKind, chunks: usize) -> Result<Self> {
        if kind == ScheduleKind::Interleaved && chunks < 2 {
            bail!("the interleaved schedule runs several model chunks per pipeline rank, and this model holds {chunks} (one contiguous stage per rank): use gpipe, 1f1b or zero-bubble, or build the model with several chunks per rank (--chunks 2, Mixtral::new_chunks with pipeline::rank_chunks)")
        }
        if kind != ScheduleKind::Interleaved && chunks != 1 {
            bail!("the {kind} schedule runs one contiguous stage per pipeline rank, and this model holds {chunks} chunks per rank: use --schedule interleaved, or build one stage per rank (--chunks 1)")
        }
        Ok(Self {
            kind,
            chunks,
            measured: Mutex::new(None),
            built: Mutex::new(None),
            stages_checked: AtomicBool::new(false),
        })
    }

    /// The schedule a model of `chunks` chunks per rank runs unless told otherwise: 1F1B over
    /// one chunk, interleaved over several.
    pub fn for_chunks(chunks: usize) -> Result<Self> {
        let kind = match chunks {
            1 => ScheduleKind::default(),
            _ => ScheduleKind::Interleaved,
        };
        Self::new(kind, chunks)
    }

    /// A trainer's `--schedule` and `--chunks` (`None`: the schedule's default) for a model of
    /// `layers` layers over `pp` pipeline ranks: the chunks per rank, or an error that says
    /// what to change (checked before any rank starts).
    pub fn chunks_for(
        kind: ScheduleKind,
        chunks: Option<usize>,
        layers: usize,
        pp: usize,
    ) -> Result<usize> {
        let chunks = chunks.unwrap_or(kind.default_chunks());
        Self::new(kind, chunks)?;
        if chunks > 1 && pp == 1 {
            bail!("--schedule interleaved runs several chunks per pipeline rank: give it 2 or more pipeline ranks (--pp 2)")
        }
        super::rank_chunks(layers, pp, chunks, 0)?;
        Ok(chunks)
    }

    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// The first time it is called, collectively over `pp`: the ranks hold their stages
    /// (`mine`: this rank's layer ranges) in the order this schedule runs them, over
    /// `layers` layers ([`super::check_rank_chunks`]); later calls do nothing.
    pub fn check_stages(
        &self,
        pp: &Comm,
        mine: &[std::ops::Range<usize>],
        layers: usize,
    ) -> Result<()> {
        if pp.size() > 1 && !self.stages_checked.load(Ordering::Relaxed) {
            super::check_rank_chunks(pp, mine, self.chunks, layers)?;
            self.stages_checked.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Model chunks per rank.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// A forward-only pass's schedule (evaluation) over `ranks` ranks: one micro-batch through
    /// every stage, the chunks in turn when there are several.
    pub fn forward_schedule(&self, ranks: usize, micro_batches: usize) -> Result<Schedule> {
        match self.chunks {
            1 => Schedule::gpipe(ranks, micro_batches),
            v => Schedule::interleaved(ranks, v, micro_batches),
        }
    }

    /// The zero-bubble costs measured so far (`None` before the first zero-bubble step).
    pub fn measured_costs(&self) -> Option<ActionCosts> {
        *lock(&self.measured)
    }

    /// This step's schedule for `ranks` pipeline ranks and `micro_batches`.
    pub fn schedule(&self, ranks: usize, micro_batches: usize) -> Result<Schedule> {
        let key = (
            ranks,
            micro_batches,
            self.measured_costs().unwrap_or_default(),
        );
        if let Some((k, s)) = lock(&self.built).as_ref() {
            if *k == key {
                return Ok(s.clone());
            }
        }
        let s = self.build(ranks, micro_batches)?;
        *lock(&self.built) = Some((key, s.clone()));
        Ok(s)
    }

    fn build(&self, ranks: usize, micro_batches: usize) -> Result<Schedule> {
        match self.kind {
            ScheduleKind::GPipe => Schedule::gpipe(ranks, micro_batches),
            ScheduleKind::OneFOneB => Schedule::one_f_one_b(ranks, micro_batches),
            ScheduleKind::Interleaved => Schedule::interleaved(ranks, self.chunks, micro_batches),
            ScheduleKind::ZeroBubble => Schedule::zero_bubble_with_costs(
                ranks,
                micro_batches,
                self.measured_costs().unwrap_or_default(),
            ),
        }
    }

    /// After a step: at zero-bubble, the first time, the mean durations of this rank's F, I
    /// and W actions, the slowest rank's of each over every group in `agree_over` in turn
    /// (the pipeline group and every group whose ranks meet inside a stage — tp, ep — so that
    /// all of them plan the same schedule; collective over each), become the costs later
    /// steps are planned for.
    pub fn observe(&self, agree_over: &[&Comm], executed: &[Executed]) -> Result<()> {
        if self.kind != ScheduleKind::ZeroBubble || self.measured_costs().is_some() {
            return Ok(());
        }
        let mut sums = [0f64; 3];
        let mut counts = [0usize; 3];
        for e in executed {
            let k = match e.action {
                Action::Forward { .. } => 0,
                Action::BackwardInput { .. } => 1,
                Action::BackwardWeight { .. } => 2,
                Action::Backward { .. } => continue,
            };
            sums[k] += e.end - e.start;
            counts[k] += 1;
        }
        let means: Vec<f64> = (0..3).map(|k| sums[k] / counts[k].max(1) as f64).collect();
        let mut agreed = means;
        // The max over each group in turn: the max over all of their ranks together.
        for c in agree_over {
            agreed = c
                .all_reduce(&Tensor::new(agreed.as_slice(), c.device())?, ReduceOp::Max)?
                .to_vec1::<f64>()?;
        }
        // A stage too fast to time keeps unit costs.
        let costs = ActionCosts::from_seconds(agreed[0], agreed[1], agreed[2]).unwrap_or_default();
        tracing::info!(
            forward = costs.forward,
            input_grad = costs.backward_input,
            weight_grad = costs.backward_weight,
            "zero-bubble: planned for the costs measured in the first step (ticks)"
        );
        *lock(&self.measured) = Some(costs);
        Ok(())
    }
}
