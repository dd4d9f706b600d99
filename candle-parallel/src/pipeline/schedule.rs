//! Pipeline schedules as data: per rank, the ordered list of forward and backward actions on
//! micro-batches, checked by simulating it before anything runs.
//!
//! A pipeline of `ranks` ranks with `chunks` model chunks per rank has `ranks * chunks`
//! stages; chunk `c` of rank `r` is stage `c * ranks + r` (Megatron's interleaving: with one
//! chunk, rank `r` is stage `r`). Forward of micro-batch `m` on stage `s` needs its forward on
//! stage `s - 1`; backward on stage `s` needs its forward on `s` and its backward on `s + 1`.
//!
//! ```
//! use candle_parallel::pipeline::Schedule;
//!
//! let s = Schedule::one_f_one_b(4, 8)?;
//! let sim = s.simulate()?;
//! // 1F1B has GPipe's bubble, (p - 1) / (m + p - 1), with at most p micro-batches in flight.
//! assert!((sim.bubble_fraction() - 3.0 / 11.0).abs() < 1e-9);
//! assert!(sim.peak_in_flight().iter().all(|&n| n <= 4));
//! println!("{sim}"); // the step x rank grid
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Result};
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

/// One step of one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Forward of micro-batch `mb` through this rank's model chunk `chunk`.
    Forward { mb: usize, chunk: usize },
    /// Backward of micro-batch `mb` through chunk `chunk` (input and weight gradients).
    Backward { mb: usize, chunk: usize },
    /// The input-gradient half of a backward (zero-bubble schedules): what the previous stage
    /// waits for. The weight gradients of [`crate::ops::linear`] are deferred to...
    BackwardInput { mb: usize, chunk: usize },
    /// ...the weight-gradient half, which no other stage waits for: it fills bubbles.
    BackwardWeight { mb: usize, chunk: usize },
}

/// What has been computed for a micro-batch on a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Done {
    Forward,
    InputGrad,
    WeightGrad,
}

impl Action {
    pub fn mb(&self) -> usize {
        match *self {
            Self::Forward { mb, .. }
            | Self::Backward { mb, .. }
            | Self::BackwardInput { mb, .. }
            | Self::BackwardWeight { mb, .. } => mb,
        }
    }

    pub fn chunk(&self) -> usize {
        match *self {
            Self::Forward { chunk, .. }
            | Self::Backward { chunk, .. }
            | Self::BackwardInput { chunk, .. }
            | Self::BackwardWeight { chunk, .. } => chunk,
        }
    }

    /// Simulated duration with unit costs ([`ActionCosts::default`]): a forward 1, each half
    /// of a backward 1 (a whole backward 2).
    pub fn cost(&self) -> usize {
        ActionCosts::default().of(self)
    }

    /// What the action computes.
    fn computes(&self) -> &'static [Done] {
        match self {
            Self::Forward { .. } => &[Done::Forward],
            Self::Backward { .. } => &[Done::InputGrad, Done::WeightGrad],
            Self::BackwardInput { .. } => &[Done::InputGrad],
            Self::BackwardWeight { .. } => &[Done::WeightGrad],
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (letter, mb, chunk) = match *self {
            Self::Forward { mb, chunk } => ("F", mb, chunk),
            Self::Backward { mb, chunk } => ("B", mb, chunk),
            Self::BackwardInput { mb, chunk } => ("I", mb, chunk),
            Self::BackwardWeight { mb, chunk } => ("W", mb, chunk),
        };
        write!(f, "{letter}{mb}.{chunk}")
    }
}

/// How long each kind of action takes on the simulated clock, in ticks: what a schedule is
/// planned and simulated with. Unit costs by default (a forward 1, each half of a backward 1,
/// a whole backward 2); [`ActionCosts::from_seconds`] turns a step's measured durations into
/// ticks, which the zero-bubble list scheduler plans with (as its authors profile F, B and W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionCosts {
    pub forward: usize,
    pub backward_input: usize,
    pub backward_weight: usize,
}

impl Default for ActionCosts {
    fn default() -> Self {
        Self {
            forward: 1,
            backward_input: 1,
            backward_weight: 1,
        }
    }
}

impl ActionCosts {
    /// Ticks per forward in [`ActionCosts::from_seconds`]: the resolution of measured costs.
    pub const TICKS_PER_FORWARD: usize = 8;

    /// The simulated duration of `a`.
    pub fn of(&self, a: &Action) -> usize {
        match a {
            Action::Forward { .. } => self.forward,
            Action::Backward { .. } => self.backward_input + self.backward_weight,
            Action::BackwardInput { .. } => self.backward_input,
            Action::BackwardWeight { .. } => self.backward_weight,
        }
    }

    /// Costs from measured durations (seconds, or any one unit) of a forward, an
    /// input-gradient half and a weight-gradient half of a backward: a forward is
    /// [`ActionCosts::TICKS_PER_FORWARD`] ticks, the others in proportion (at least 1, at most
    /// 8 forwards).
    ///
    /// ```
    /// use candle_parallel::pipeline::ActionCosts;
    ///
    /// let c = ActionCosts::from_seconds(0.010, 0.012, 0.006)?;
    /// assert_eq!((c.forward, c.backward_input, c.backward_weight), (8, 10, 5));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn from_seconds(forward: f64, backward_input: f64, backward_weight: f64) -> Result<Self> {
        let all = [forward, backward_input, backward_weight];
        if all.iter().any(|c| !c.is_finite() || *c < 0.0) || forward <= 0.0 {
            bail!("action costs: forward {forward}, input gradient {backward_input}, weight gradient {backward_weight}: give finite durations, the forward's above zero")
        }
        let unit = forward / Self::TICKS_PER_FORWARD as f64;
        let ticks = |c: f64| ((c / unit).round() as usize).clamp(1, 8 * Self::TICKS_PER_FORWARD);
        Ok(Self {
            forward: Self::TICKS_PER_FORWARD,
            backward_input: ticks(backward_input),
            backward_weight: ticks(backward_weight),
        })
    }
}

/// Per rank, the ordered actions of one training step.
#[derive(Clone, Debug)]
pub struct Schedule {
    name: String,
    ranks: usize,
    chunks: usize,
    micro_batches: usize,
    costs: ActionCosts,
    actions: Vec<Vec<Action>>,
    /// Its run on the clock, computed once when it is made (it also proves it completes).
    simulation: Simulation,
}

impl Schedule {
    /// GPipe: every forward, then every backward; gradients are applied after the step. Keeps
    /// all `m` micro-batches' activations alive.
    pub fn gpipe(ranks: usize, micro_batches: usize) -> Result<Self> {
        check_sizes("gpipe", ranks, 1, micro_batches)?;
        let actions = (0..ranks)
            .map(|_| {
                let f = (0..micro_batches).map(|mb| Action::Forward { mb, chunk: 0 });
                let b = (0..micro_batches).map(|mb| Action::Backward { mb, chunk: 0 });
                f.chain(b).collect()
            })
            .collect();
        Self::from_actions("gpipe", ranks, 1, micro_batches, actions)
    }

    /// 1F1B (PipeDream-Flush, Megatron's default): rank `r` runs `p - r - 1` warm-up forwards,
    /// then alternates one forward and one backward, then drains the backwards, so at most
    /// `p` micro-batches are in flight on any rank.
    pub fn one_f_one_b(ranks: usize, micro_batches: usize) -> Result<Self> {
        check_sizes("1f1b", ranks, 1, micro_batches)?;
        let actions = (0..ranks)
            .map(|r| {
                let warmup = (ranks - r - 1).min(micro_batches);
                let mut a: Vec<Action> = (0..warmup)
                    .map(|mb| Action::Forward { mb, chunk: 0 })
                    .collect();
                for i in 0..micro_batches - warmup {
                    a.push(Action::Forward {
                        mb: warmup + i,
                        chunk: 0,
                    });
                    a.push(Action::Backward { mb: i, chunk: 0 });
                }
                for mb in micro_batches - warmup..micro_batches {
                    a.push(Action::Backward { mb, chunk: 0 });
                }
                a
            })
            .collect();
        Self::from_actions("1f1b", ranks, 1, micro_batches, actions)
    }

    /// Interleaved 1F1B (Megatron): `chunks` model chunks per rank, so the pipeline has
    /// `ranks * chunks` stages and a bubble `chunks` times smaller. Micro-batches go through in
    /// rounds, each round through every chunk in turn: rounds of `ranks` micro-batches when
    /// `ranks` divides their number (Megatron's order), else `max(1, m / ranks)` rounds of
    /// sizes as equal as can be, each at least `ranks` (PyTorch's way), so any number of
    /// micro-batches works.
    ///
    /// ```
    /// use candle_parallel::pipeline::Schedule;
    ///
    /// // 4 ranks, 2 chunks each, 6 micro-batches: one round of 6.
    /// let s = Schedule::interleaved(4, 2, 6)?.simulate()?;
    /// let one = Schedule::one_f_one_b(4, 6)?.simulate()?;
    /// assert!(s.bubble_fraction() < one.bubble_fraction());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn interleaved(ranks: usize, chunks: usize, micro_batches: usize) -> Result<Self> {
        check_sizes("interleaved", ranks, chunks, micro_batches)?;
        let (p, m) = (ranks, micro_batches);
        let rounds = (m / p).max(1);
        // Round j: micro-batches base[j]..base[j] + size[j].
        let sizes: Vec<usize> = (0..rounds)
            .map(|j| m / rounds + usize::from(j < m % rounds))
            .collect();
        // The k-th forward (backward) of a rank: each round through every chunk in turn
        // (backwards through the chunks in reverse).
        let mut forwards = Vec::with_capacity(m * chunks);
        let mut backwards = Vec::with_capacity(m * chunks);
        let mut base = 0;
        for &g in &sizes {
            for c in 0..chunks {
                for i in 0..g {
                    forwards.push(Action::Forward {
                        mb: base + i,
                        chunk: c,
                    });
                    backwards.push(Action::Backward {
                        mb: base + i,
                        chunk: chunks - 1 - c,
                    });
                }
            }
            base += g;
        }
        let total = m * chunks;
        let first = sizes[0];
        let actions = (0..p)
            .map(|r| {
                // As Megatron: with a single round of every micro-batch, every forward warms
                // up; else enough to reach the first backward.
                let warmup = if chunks == 1 {
                    p - r - 1
                } else if rounds == 1 && first == p {
                    total
                } else {
                    (p - r - 1) * 2 + (chunks - 1) * first
                }
                .min(total);
                let mut a: Vec<Action> = forwards[..warmup].to_vec();
                for i in 0..total - warmup {
                    a.push(forwards[warmup + i]);
                    a.push(backwards[i]);
                }
                a.extend_from_slice(&backwards[total - warmup..]);
                a
            })
            .collect();
        Self::from_actions("interleaved", ranks, chunks, micro_batches, actions)
    }

    /// A zero-bubble schedule reaching ZB-H1's bubble (Qi et al. 2023) with unit costs:
    /// [`Schedule::zero_bubble_with_costs`] with a forward, an input-gradient and a
    /// weight-gradient half of a backward costing the same.
    pub fn zero_bubble(ranks: usize, micro_batches: usize) -> Result<Self> {
        Self::zero_bubble_with_costs(ranks, micro_batches, ActionCosts::default())
    }

    /// A zero-bubble schedule (Qi et al. 2023): each backward split into its input-gradient
    /// half (`I`, what the previous stage waits for) and its weight-gradient half (`W`, which
    /// nobody waits for, so it fills what would be bubbles), planned for `costs` (measured F,
    /// I and W, as the authors profile them). Every rank holds at most `ranks` micro-batches
    /// between a forward and its `W` — 1F1B's peak, its first rank's. List scheduling on the
    /// clock: a rank runs a ready `I` first, else a forward (within the memory bound), else a
    /// waiting `W`; the plain rule and a fixed, seeded set of perturbed ones (another ready
    /// action taken now and then) are simulated, and the shortest wins, so every rank derives
    /// the same schedule. At p = 4, m = 8 with unit costs it idles 3 ticks per rank where 1F1B
    /// idles 9: ZB-H1's `(p − 1)(F + B − W)` against `(p − 1)(F + B + W)`.
    ///
    /// ```
    /// use candle_parallel::pipeline::{ActionCosts, Schedule};
    ///
    /// let zb = Schedule::zero_bubble(4, 8)?.simulate()?;
    /// let one = Schedule::one_f_one_b(4, 8)?.simulate()?;
    /// // Idle ticks per rank: makespan minus the 3 m ticks of work.
    /// assert_eq!((zb.makespan() - 24, one.makespan() - 24), (3, 9));
    /// assert!(zb.peak_in_flight().iter().all(|&n| n <= 4));
    /// // Planned for measured costs: a slower input gradient, a cheaper weight gradient.
    /// let costs = ActionCosts::from_seconds(1.0, 1.5, 0.5)?;
    /// let s = Schedule::zero_bubble_with_costs(4, 8, costs)?;
    /// assert_eq!(s.costs(), costs);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn zero_bubble_with_costs(
        ranks: usize,
        micro_batches: usize,
        costs: ActionCosts,
    ) -> Result<Self> {
        check_sizes("zero-bubble", ranks, 1, micro_batches)?;
        if costs.forward == 0 || costs.backward_input == 0 || costs.backward_weight == 0 {
            bail!("zero-bubble: every action must cost at least one tick, got {costs:?}")
        }
        // Enough tries to find ZB-H1's order at the sizes pipelines run, bounded in work.
        let tries = (200_000 / (ranks * micro_batches).max(1)).clamp(8, 256);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut best: Option<(usize, Vec<Vec<Action>>)> = None;
        for attempt in 0..tries {
            // The plain rule first, then perturbed ones.
            let noise = if attempt == 0 { 0.0 } else { 0.15 };
            let (makespan, actions) =
                list_schedule_zero_bubble(ranks, micro_batches, costs, noise, &mut rng)?;
            if best.as_ref().is_none_or(|(b, _)| makespan < *b) {
                best = Some((makespan, actions));
            }
        }
        let (_, actions) = best.expect("at least one try");
        Self::build("zero-bubble", ranks, 1, micro_batches, costs, actions)
    }

    /// A schedule from its actions, after checking that every micro-batch runs forward and
    /// backward exactly once on every stage, on the rank that holds it, and that the schedule
    /// completes (its simulation finds no deadlock).
    pub fn from_actions(
        name: &str,
        ranks: usize,
        chunks: usize,
        micro_batches: usize,
        actions: Vec<Vec<Action>>,
    ) -> Result<Self> {
        Self::build(
            name,
            ranks,
            chunks,
            micro_batches,
            ActionCosts::default(),
            actions,
        )
    }

    /// [`Schedule::from_actions`], simulated with `costs`.
    fn build(
        name: &str,
        ranks: usize,
        chunks: usize,
        micro_batches: usize,
        costs: ActionCosts,
        actions: Vec<Vec<Action>>,
    ) -> Result<Self> {
        check_sizes(name, ranks, chunks, micro_batches)?;
        if actions.len() != ranks {
            bail!(
                "schedule {name}: {} action lists for {ranks} ranks",
                actions.len()
            )
        }
        let mut seen = std::collections::HashSet::new();
        for (r, list) in actions.iter().enumerate() {
            for a in list {
                if a.mb() >= micro_batches || a.chunk() >= chunks {
                    bail!("schedule {name}: rank {r} runs {a}, but there are {micro_batches} micro-batches and {chunks} chunks per rank")
                }
                if !seen.insert((r, *a)) {
                    bail!("schedule {name}: rank {r} runs {a} twice")
                }
            }
        }
        // Every micro-batch and chunk: one forward, and one backward or both of its halves.
        for (r, list) in actions.iter().enumerate() {
            for mb in 0..micro_batches {
                for chunk in 0..chunks {
                    let has = |a: Action| seen.contains(&(r, a));
                    let whole = has(Action::Backward { mb, chunk });
                    let halves = (
                        has(Action::BackwardInput { mb, chunk }),
                        has(Action::BackwardWeight { mb, chunk }),
                    );
                    let complete = has(Action::Forward { mb, chunk })
                        && matches!(
                            (whole, halves),
                            (true, (false, false)) | (false, (true, true))
                        );
                    if !complete {
                        bail!(
                            "schedule {name}: rank {r} ({} actions) does not run micro-batch {mb} on chunk {chunk} exactly once: it needs a forward and a backward (or both halves of one)",
                            list.len()
                        )
                    }
                }
            }
        }
        let simulation = run_clock(name, ranks, chunks, costs, &actions)?;
        Ok(Self {
            name: name.to_string(),
            ranks,
            chunks,
            micro_batches,
            costs,
            actions,
            simulation,
        })
    }

    /// The schedule by name: `gpipe`, `1f1b`, `interleaved` (with `chunks` per rank) or
    /// `zero-bubble`.
    pub fn by_name(name: &str, ranks: usize, chunks: usize, micro_batches: usize) -> Result<Self> {
        match name {
            "gpipe" => Self::gpipe(ranks, micro_batches),
            "1f1b" => Self::one_f_one_b(ranks, micro_batches),
            "interleaved" => Self::interleaved(ranks, chunks, micro_batches),
            "zero-bubble" => Self::zero_bubble(ranks, micro_batches),
            other => {
                bail!("unknown schedule {other:?}: use gpipe, 1f1b, interleaved or zero-bubble")
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pipeline ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Model chunks per rank.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The action durations the schedule was planned and is simulated with.
    pub fn costs(&self) -> ActionCosts {
        self.costs
    }

    /// The same actions simulated with other durations (say, measured ones): how this order
    /// would run if the actions took that long.
    pub fn with_costs(self, costs: ActionCosts) -> Result<Self> {
        Self::build(
            &self.name,
            self.ranks,
            self.chunks,
            self.micro_batches,
            costs,
            self.actions,
        )
    }

    /// Stages of the model: `ranks * chunks`.
    pub fn stages(&self) -> usize {
        self.ranks * self.chunks
    }

    /// The stage that chunk `chunk` of rank `rank` holds.
    pub fn stage_of(&self, rank: usize, chunk: usize) -> usize {
        chunk * self.ranks + rank
    }

    /// The (rank, chunk) that holds `stage`.
    pub fn holder_of(&self, stage: usize) -> (usize, usize) {
        (stage % self.ranks, stage / self.ranks)
    }

    /// Rank `rank`'s actions, in order.
    pub fn actions(&self, rank: usize) -> &[Action] {
        &self.actions[rank]
    }

    /// The schedule run on a clock (durations from [`Schedule::costs`]: by default a forward
    /// costs 1, a backward 2, each half of a split backward 1; messages arrive at once), each
    /// rank starting its next action as soon as its inputs are there. Computed when the schedule is made, which fails if some rank would
    /// wait for something that never comes.
    pub fn simulate(&self) -> Result<Simulation> {
        Ok(self.simulation.clone())
    }
}

/// Runs `actions` on the clock (see [`Schedule::simulate`]); fails naming what a stuck rank
/// waits for.
fn run_clock(
    name: &str,
    ranks: usize,
    chunks: usize,
    costs: ActionCosts,
    actions: &[Vec<Action>],
) -> Result<Simulation> {
    let stage_of = |r: usize, c: usize| c * ranks + r;
    let stages = ranks * chunks;
    // End time of every scheduled (action kind, mb, stage).
    let mut end: HashMap<(Done, usize, usize), usize> = HashMap::new();
    let mut next = vec![0usize; ranks];
    let mut free = vec![0usize; ranks];
    let mut slots: Vec<Vec<Timed>> = vec![Vec::new(); ranks];
    let total: usize = actions.iter().map(Vec::len).sum();
    let mut done = 0;
    while done < total {
        let mut progressed = false;
        for r in 0..ranks {
            while let Some(&a) = actions[r].get(next[r]) {
                let stage = stage_of(r, a.chunk());
                let deps = dependencies(a, stage, stages);
                let Some(ready) = deps
                    .iter()
                    .map(|d| end.get(d).copied())
                    .try_fold(free[r], |t, e| e.map(|e| t.max(e)))
                else {
                    break;
                };
                let finish = ready + costs.of(&a);
                for &d in a.computes() {
                    end.insert((d, a.mb(), stage), finish);
                }
                slots[r].push(Timed {
                    action: a,
                    stage,
                    start: ready,
                    end: finish,
                });
                free[r] = finish;
                next[r] += 1;
                done += 1;
                progressed = true;
            }
        }
        if !progressed {
            let waiting: Vec<String> = (0..ranks)
                .filter_map(|r| {
                    actions[r].get(next[r]).map(|a| {
                        let stage = stage_of(r, a.chunk());
                        let missing: Vec<String> = dependencies(*a, stage, stages)
                            .into_iter()
                            .filter(|d| !end.contains_key(d))
                            .map(|(d, mb, s)| {
                                let what = match d {
                                    Done::Forward => "forward",
                                    Done::InputGrad => "backward",
                                    Done::WeightGrad => "weight gradient",
                                };
                                format!("{what} of micro-batch {mb} on stage {s}")
                            })
                            .collect();
                        format!("rank {r} at {a} waits for {}", missing.join(" and "))
                    })
                })
                .collect();
            bail!("schedule {} deadlocks: {}", name, waiting.join("; "))
        }
    }
    Ok(Simulation {
        schedule: name.to_string(),
        slots,
    })
}

/// One list-scheduled zero-bubble order (see [`Schedule::zero_bubble_with_costs`]): with
/// probability `noise` a rank takes another ready action than the rule's first choice.
/// Returns its makespan and the actions.
fn list_schedule_zero_bubble(
    p: usize,
    m: usize,
    costs: ActionCosts,
    noise: f64,
    rng: &mut u64,
) -> Result<(usize, Vec<Vec<Action>>)> {
    let mut uniform = || {
        // xorshift64*: deterministic, the same on every rank.
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut end: HashMap<(Done, usize, usize), usize> = HashMap::new();
    let mut actions: Vec<Vec<Action>> = vec![Vec::with_capacity(3 * m); p];
    let (mut next_forward, mut next_input) = (vec![0usize; p], vec![0usize; p]);
    let mut waiting_w: Vec<std::collections::VecDeque<usize>> = vec![Default::default(); p];
    let (mut holding, mut free) = (vec![0usize; p], vec![0usize; p]);
    let done_by = |end: &HashMap<(Done, usize, usize), usize>, key, t: usize| {
        end.get(&key).is_some_and(|&e| e <= t)
    };
    let mut t = 0;
    let mut left = 3 * m * p;
    while left > 0 {
        for r in 0..p {
            if free[r] > t {
                continue;
            }
            let (i, f) = (next_input[r], next_forward[r]);
            let input_ready = i < f
                && done_by(&end, (Done::Forward, i, r), t)
                && (r + 1 == p || done_by(&end, (Done::InputGrad, i, r + 1), t));
            let forward_ready =
                f < m && holding[r] < p && (r == 0 || done_by(&end, (Done::Forward, f, r - 1), t));
            let ready: Vec<u8> = [input_ready, forward_ready, !waiting_w[r].is_empty()]
                .iter()
                .enumerate()
                .filter(|(_, &ok)| ok)
                .map(|(k, _)| k as u8)
                .collect();
            let Some(&first) = ready.first() else {
                continue;
            };
            let pick = if ready.len() > 1 && noise > 0.0 && uniform() < noise {
                ready[1 + ((uniform() * (ready.len() - 1) as f64) as usize).min(ready.len() - 2)]
            } else {
                first
            };
            let action = match pick {
                0 => {
                    next_input[r] += 1;
                    waiting_w[r].push_back(i);
                    Action::BackwardInput { mb: i, chunk: 0 }
                }
                1 => {
                    next_forward[r] += 1;
                    holding[r] += 1;
                    Action::Forward { mb: f, chunk: 0 }
                }
                _ => {
                    holding[r] -= 1;
                    let mb = waiting_w[r].pop_front().expect("a waiting W");
                    Action::BackwardWeight { mb, chunk: 0 }
                }
            };
            let finish = t + costs.of(&action);
            for &d in action.computes() {
                end.insert((d, action.mb(), r), finish);
            }
            free[r] = finish;
            actions[r].push(action);
            left -= 1;
        }
        // On to the next moment something finishes: an action running now (what a waiting
        // rank waits for is one).
        match free.iter().filter(|&&e| e > t).min() {
            Some(&next) => t = next,
            None if left > 0 => bail!("zero-bubble: list scheduling did not finish (a bug)"),
            None => {}
        }
    }
    Ok((free.into_iter().max().unwrap_or(0), actions))
}

/// What `a` on `stage` waits for: (what, micro-batch, stage).
fn dependencies(a: Action, stage: usize, stages: usize) -> Vec<(Done, usize, usize)> {
    let mb = a.mb();
    match a {
        Action::Forward { .. } if stage > 0 => vec![(Done::Forward, mb, stage - 1)],
        Action::Forward { .. } => vec![],
        Action::Backward { .. } | Action::BackwardInput { .. } if stage + 1 < stages => {
            vec![(Done::Forward, mb, stage), (Done::InputGrad, mb, stage + 1)]
        }
        Action::Backward { .. } | Action::BackwardInput { .. } => {
            vec![(Done::Forward, mb, stage)]
        }
        Action::BackwardWeight { .. } => vec![(Done::InputGrad, mb, stage)],
    }
}

fn check_sizes(name: &str, ranks: usize, chunks: usize, micro_batches: usize) -> Result<()> {
    if ranks == 0 || chunks == 0 || micro_batches == 0 {
        bail!("schedule {name}: needs at least one rank, one chunk per rank and one micro-batch (got {ranks} ranks, {chunks} chunks, {micro_batches} micro-batches)")
    }
    Ok(())
}

/// An action placed on the simulated clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timed {
    pub action: Action,
    pub stage: usize,
    pub start: usize,
    pub end: usize,
}

/// The simulated run of a [`Schedule`].
#[derive(Clone, Debug)]
pub struct Simulation {
    schedule: String,
    slots: Vec<Vec<Timed>>,
}

impl Simulation {
    /// Per rank, its actions on the clock.
    pub fn timeline(&self) -> &[Vec<Timed>] {
        &self.slots
    }

    /// When the last action ends.
    pub fn makespan(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.last().map(|t| t.end))
            .max()
            .unwrap_or(0)
    }

    /// The share of rank-time spent idle: `(p - 1) / (m + p - 1)` for GPipe and 1F1B.
    pub fn bubble_fraction(&self) -> f64 {
        let busy: usize = self.slots.iter().flatten().map(|t| t.end - t.start).sum();
        let all = self.makespan() * self.slots.len();
        if all == 0 {
            0.0
        } else {
            1.0 - busy as f64 / all as f64
        }
    }

    /// Per rank, the most micro-batch chunks whose forward ran and backward did not yet: the
    /// activations a rank keeps alive at its peak.
    pub fn peak_in_flight(&self) -> Vec<usize> {
        self.slots
            .iter()
            .map(|s| {
                let (mut live, mut peak) = (0usize, 0usize);
                for t in s {
                    match t.action {
                        Action::Forward { .. } => {
                            live += 1;
                            peak = peak.max(live);
                        }
                        // Activations stay until the weight gradients no longer need them.
                        Action::Backward { .. } | Action::BackwardWeight { .. } => live -= 1,
                        Action::BackwardInput { .. } => {}
                    }
                }
                peak
            })
            .collect()
    }
}

/// The step x rank grid: one row per clock tick, `F3.0` is the forward of micro-batch 3 on
/// chunk 0, `.` is idle.
impl fmt::Display for Simulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranks = self.slots.len();
        writeln!(
            f,
            "schedule {}: {ranks} ranks, bubble {:.1}%",
            self.schedule,
            100.0 * self.bubble_fraction()
        )?;
        write!(f, "{:>5}", "t")?;
        for r in 0..ranks {
            write!(f, " {:>7}", format!("rank {r}"))?;
        }
        writeln!(f)?;
        for t in 0..self.makespan() {
            write!(f, "{t:>5}")?;
            for s in &self.slots {
                let cell = s
                    .iter()
                    .find(|x| x.start <= t && t < x.end)
                    .map_or_else(|| ".".to_string(), |x| x.action.to_string());
                write!(f, " {cell:>7}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Splits `layers` layers into `stages` contiguous ranges of sizes differing by at most one
/// (the first stages take the extra layers).
pub fn split_layers(layers: usize, stages: usize) -> Result<Vec<Range<usize>>> {
    if stages == 0 || stages > layers {
        bail!("cannot split {layers} layers into {stages} pipeline stages: every stage needs at least one layer; use at most {layers} stages")
    }
    let (base, extra) = (layers / stages, layers % stages);
    let mut start = 0;
    Ok((0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

/// The layer ranges that rank `rank` of `ranks` holds when `layers` layers are split into
/// `ranks × chunks` stages ([`split_layers`]) for the interleaved schedule: its chunk `c` is
/// stage `c · ranks + rank` ([`Schedule::stage_of`]), so each rank holds every `ranks`-th
/// stage (Megatron's virtual pipeline stages).
///
/// ```
/// use candle_parallel::pipeline::rank_chunks;
///
/// // 8 layers, 2 ranks, 2 chunks each: rank 0 holds layers 0..2 and 4..6.
/// assert_eq!(rank_chunks(8, 2, 2, 0)?, vec![0..2, 4..6]);
/// assert_eq!(rank_chunks(8, 2, 2, 1)?, vec![2..4, 6..8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn rank_chunks(
    layers: usize,
    ranks: usize,
    chunks: usize,
    rank: usize,
) -> Result<Vec<Range<usize>>> {
    if chunks == 0 || rank >= ranks {
        bail!("rank_chunks: rank {rank} of {ranks} pipeline ranks with {chunks} chunks each: use a rank below the rank count and at least one chunk")
    }
    if ranks * chunks > layers {
        let most = match layers / ranks {
            0 | 1 => format!(
                "use fewer pipeline ranks (at most {})",
                layers / chunks.max(1)
            ),
            v => format!("use at most {v} chunks per rank"),
        };
        bail!(
            "{layers} layers cannot fill {ranks} pipeline ranks × {chunks} chunks = {} stages (every stage needs a layer): {most}, or a model with more layers",
            ranks * chunks
        )
    }
    let stages = split_layers(layers, ranks * chunks)?;
    Ok((0..chunks)
        .map(|c| stages[c * ranks + rank].clone())
        .collect())
}

/// Checks, collectively over the pipeline group `pp`, that its ranks' chunks (`mine`: this
/// rank's layer ranges, in order) are the stages of `schedule_chunks` chunks per rank that
/// [`rank_chunks`] gives: stage `c · p + r` (chunk `c` of rank `r`) follows stage `c · p + r − 1`
/// and the stages cover `0..layers`. A pipeline fed other layer ranges would run the layers
/// out of order without any shape telling (every stage passes the same packed tensor).
///
/// ```
/// use candle_parallel::launch;
/// use candle_parallel::pipeline::{check_rank_chunks, rank_chunks};
///
/// // 8 layers, 2 ranks, 2 chunks each: rank_chunks's ranges pass, contiguous ones do not.
/// let verdicts = launch(2, |ctx| {
///     let r = ctx.comm().rank();
///     let good = check_rank_chunks(ctx.comm(), &rank_chunks(8, 2, 2, r)?, 2, 8).is_ok();
///     let contiguous = [r * 4..r * 4 + 2, r * 4 + 2..r * 4 + 4];
///     let bad = check_rank_chunks(ctx.comm(), &contiguous, 2, 8).is_err();
///     Ok((good, bad))
/// })?;
/// assert_eq!(verdicts, vec![(true, true), (true, true)]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn check_rank_chunks(
    pp: &crate::Comm,
    mine: &[Range<usize>],
    schedule_chunks: usize,
    layers: usize,
) -> Result<()> {
    if mine.len() != schedule_chunks {
        bail!(
            "pipeline rank {}: the schedule runs {schedule_chunks} chunks per rank, this model holds {} ({mine:?})",
            pp.rank(),
            mine.len()
        )
    }
    let flat: Vec<u32> = mine
        .iter()
        .flat_map(|r| [r.start as u32, r.end as u32])
        .collect();
    let all = pp
        .all_gather(&candle_core::Tensor::new(flat.as_slice(), pp.device())?, 0)?
        .to_vec1::<u32>()?;
    let p = pp.size();
    let per = 2 * schedule_chunks;
    let mut next = 0u32;
    for s in 0..p * schedule_chunks {
        let (r, c) = (s % p, s / p);
        let (start, end) = (all[r * per + 2 * c], all[r * per + 2 * c + 1]);
        if start != next || end <= start {
            bail!(
                "pipeline stage {s} (chunk {c} of rank {r}) holds layers {start}..{end}, but the stages before it end at layer {next}: give rank r the layer ranges pipeline::rank_chunks(layers, pp, chunks, r) returns"
            )
        }
        next = end;
    }
    if next as usize != layers {
        bail!("the pipeline's stages end at layer {next} of {layers}: give every rank pipeline::rank_chunks's layer ranges")
    }
    Ok(())
}

/// Splits layers of the given weights (parameter counts, say) into `stages` contiguous
/// ranges whose largest total weight is as small as possible.
pub fn split_balanced(weights: &[usize], stages: usize) -> Result<Vec<Range<usize>>> {
    let n = weights.len();
    if stages == 0 || stages > n {
        bail!("cannot split {n} layers into {stages} pipeline stages: every stage needs at least one layer; use at most {n} stages")
    }
    let prefix: Vec<usize> = std::iter::once(0)
        .chain(weights.iter().scan(0, |a, &w| {
            *a += w;
            Some(*a)
        }))
        .collect();
    // best[k][i]: the smallest largest-stage weight of the first i layers in k stages.
    let inf = usize::MAX;
    let mut best = vec![vec![inf; n + 1]; stages + 1];
    let mut cut = vec![vec![0; n + 1]; stages + 1];
    best[0][0] = 0;
    for k in 1..=stages {
        for i in k..=n {
            for j in k - 1..i {
                if best[k - 1][j] == inf {
                    continue;
                }
                let cost = best[k - 1][j].max(prefix[i] - prefix[j]);
                if cost < best[k][i] {
                    best[k][i] = cost;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(stages);
    let mut i = n;
    for k in (1..=stages).rev() {
        let j = cut[k][i];
        ranges.push(j..i);
        i = j;
    }
    ranges.reverse();
    Ok(ranges)
}
