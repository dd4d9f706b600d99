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

    /// Simulated duration: a forward 1, each half of a backward 1 (a whole backward 2).
    pub fn cost(&self) -> usize {
        match self {
            Self::Backward { .. } => 2,
            _ => 1,
        }
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

/// Per rank, the ordered actions of one training step.
#[derive(Clone, Debug)]
pub struct Schedule {
    name: String,
    ranks: usize,
    chunks: usize,
    micro_batches: usize,
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
    /// groups of `ranks`, so their number must be a multiple of `ranks`.
    pub fn interleaved(ranks: usize, chunks: usize, micro_batches: usize) -> Result<Self> {
        check_sizes("interleaved", ranks, chunks, micro_batches)?;
        if !micro_batches.is_multiple_of(ranks) {
            bail!(
                "the interleaved schedule runs micro-batches in groups of the {ranks} pipeline ranks: {micro_batches} micro-batches is not a multiple of {ranks}; use {} or {}",
                micro_batches / ranks * ranks,
                micro_batches.div_ceil(ranks) * ranks
            )
        }
        let total = micro_batches * chunks;
        // The k-th forward (backward) of a rank: micro-batches in groups of `ranks`, each
        // group through every chunk in turn (backwards through the chunks in reverse).
        let forward = |k: usize| Action::Forward {
            mb: k / (ranks * chunks) * ranks + k % ranks,
            chunk: (k / ranks) % chunks,
        };
        let backward = |k: usize| Action::Backward {
            mb: k / (ranks * chunks) * ranks + k % ranks,
            chunk: chunks - 1 - (k / ranks) % chunks,
        };
        let actions = (0..ranks)
            .map(|r| {
                // As Megatron: with as many micro-batches as ranks, every forward warms up.
                let warmup = if chunks == 1 {
                    ranks - r - 1
                } else if micro_batches == ranks {
                    total
                } else {
                    (ranks - r - 1) * 2 + (chunks - 1) * ranks
                }
                .min(total);
                let mut a: Vec<Action> = (0..warmup).map(forward).collect();
                for i in 0..total - warmup {
                    a.push(forward(warmup + i));
                    a.push(backward(i));
                }
                a.extend((total - warmup..total).map(backward));
                a
            })
            .collect();
        Self::from_actions("interleaved", ranks, chunks, micro_batches, actions)
    }

    /// A zero-bubble schedule in the spirit of ZB-H1 (Qi et al. 2023): each backward is split
    /// into its input-gradient half (`I`, what the previous stage waits for) and its
    /// weight-gradient half (`W`, which nobody waits for). Built by list scheduling on the
    /// clock (every action costs 1): a rank runs a ready `I` first, else the next forward while
    /// it holds fewer micro-batches than 1F1B would (`ranks - rank`), else a waiting `W`; so
    /// the `W`s fill bubbles of 1F1B's warm-up and cool-down at 1F1B's peak memory. Its bubble
    /// lies between 1F1B's and ZB-H1's hand-built ideal.
    pub fn zero_bubble(ranks: usize, micro_batches: usize) -> Result<Self> {
        check_sizes("zero-bubble", ranks, 1, micro_batches)?;
        let (p, m) = (ranks, micro_batches);
        let mut end: HashMap<(Done, usize, usize), usize> = HashMap::new();
        let mut actions: Vec<Vec<Action>> = vec![Vec::new(); p];
        let mut next_forward = vec![0usize; p];
        let mut next_input = vec![0usize; p];
        let mut waiting_w: Vec<std::collections::VecDeque<usize>> = vec![Default::default(); p];
        let mut holding = vec![0usize; p];
        let mut free = vec![0usize; p];
        let done_by = |end: &HashMap<(Done, usize, usize), usize>, key, t: usize| {
            end.get(&key).is_some_and(|&e| e <= t)
        };
        let mut t = 0;
        while actions.iter().any(|a| a.len() < 3 * m) {
            if t > 10 * (m + p) {
                bail!("zero-bubble: list scheduling did not finish (a bug)")
            }
            for r in 0..p {
                if free[r] > t {
                    continue;
                }
                let (s, i, f) = (r, next_input[r], next_forward[r]);
                let input_ready = i < f
                    && done_by(&end, (Done::Forward, i, s), t)
                    && (s + 1 == p || done_by(&end, (Done::InputGrad, i, s + 1), t));
                let forward_ready = f < m
                    && holding[r] < p - r
                    && (s == 0 || done_by(&end, (Done::Forward, f, s - 1), t));
                let action = if input_ready {
                    next_input[r] += 1;
                    waiting_w[r].push_back(i);
                    Action::BackwardInput { mb: i, chunk: 0 }
                } else if forward_ready {
                    next_forward[r] += 1;
                    holding[r] += 1;
                    Action::Forward { mb: f, chunk: 0 }
                } else if let Some(mb) = waiting_w[r].pop_front() {
                    holding[r] -= 1;
                    Action::BackwardWeight { mb, chunk: 0 }
                } else {
                    continue;
                };
                for &d in action.computes() {
                    end.insert((d, action.mb(), s), t + action.cost());
                }
                free[r] = t + action.cost();
                actions[r].push(action);
            }
            t += 1;
        }
        Self::from_actions("zero-bubble", ranks, 1, micro_batches, actions)
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
        let simulation = run_clock(name, ranks, chunks, &actions)?;
        Ok(Self {
            name: name.to_string(),
            ranks,
            chunks,
            micro_batches,
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

    /// The schedule run on a clock (a forward costs 1, a backward 2, each half of a split
    /// backward 1; messages arrive at once), each rank starting its next action as soon as its
    /// inputs are there. Computed when the schedule is made, which fails if some rank would
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
                let finish = ready + a.cost();
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
