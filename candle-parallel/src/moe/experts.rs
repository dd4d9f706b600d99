//! The experts: SwiGLU MLPs (`w2(silu(w1 x) · w3 x)`) built from the tensor-parallel linear
//! layers (w1/w3 column-parallel, w2 row-parallel), and the contiguous range of them a rank
//! holds under expert parallelism.

use super::combine::{combine_into, combine_outputs, zeros_for_combine};
use crate::checkpoint::{ParallelVarBuilder, Placement};
use crate::comm::Comm;
use crate::ops;
use crate::tensor_parallel::{ColumnParallelLinear, RowParallelLinear};
use candle_core::{bail, DType, Module, Result, Tensor};
use std::ops::Range;

/// One SwiGLU expert on this rank: its tp slices. Its layers leave the tp communication to
/// [`LocalExperts::forward_rows`], which does it once for all experts.
#[derive(Clone, Debug)]
pub struct Expert {
    /// `[ffn / tp, hidden]`
    pub w1: ColumnParallelLinear,
    /// `[hidden, ffn / tp]`
    pub w2: RowParallelLinear,
    /// `[ffn / tp, hidden]`
    pub w3: ColumnParallelLinear,
}

/// What a checkpoint calls an expert's three projections: Mixtral's `w1` (gate), `w3` (up)
/// and `w2` (down), or the `gate_proj` / `up_proj` / `down_proj` of Qwen-MoE, DeepSeek and
/// dense Llama-style MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertNames {
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl ExpertNames {
    /// Mixtral's `w1`, `w3`, `w2`.
    pub const MIXTRAL: Self = Self {
        gate: "w1",
        up: "w3",
        down: "w2",
    };
    /// `gate_proj`, `up_proj`, `down_proj` (Qwen2-MoE, Qwen3-MoE, DeepSeek).
    pub const GATE_UP_DOWN: Self = Self {
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    };
}

impl Expert {
    /// Wraps this rank's slices of the three weights (no biases).
    pub fn new(w1: Tensor, w2: Tensor, w3: Tensor, tp: &Comm) -> Self {
        let col = |w| ColumnParallelLinear::new(w, None, tp).with_external_communication(true);
        Self {
            w1: col(w1),
            w2: RowParallelLinear::new(w2, None, tp).with_external_communication(true),
            w3: col(w3),
        }
    }

    /// Reads expert `vb` (HF names `w1`, `w2`, `w3`): this rank's tp slices.
    pub fn load(hidden: usize, ffn: usize, vb: &ParallelVarBuilder, tp: &Comm) -> Result<Self> {
        Self::load_named(hidden, ffn, vb, tp, ExpertNames::MIXTRAL)
    }

    /// [`Expert::load`] with the projections under `names`.
    pub fn load_named(
        hidden: usize,
        ffn: usize,
        vb: &ParallelVarBuilder,
        tp: &Comm,
        names: ExpertNames,
    ) -> Result<Self> {
        use crate::lora::{adapter, Kind};
        let init = crate::tensor_parallel::linear_weight_init();
        let (col, row) = (Placement::split_over(0, tp), Placement::split_over(1, tp));
        let mut e = Self::new(
            vb.pp(names.gate).get((ffn, hidden), "weight", col, init)?,
            vb.pp(names.down).get((hidden, ffn), "weight", row, init)?,
            vb.pp(names.up).get((ffn, hidden), "weight", col, init)?,
            tp,
        );
        let lora = |name: &str, kind, shard| {
            let (i, o) = match kind {
                Kind::Column => (hidden, ffn),
                Kind::Row => (ffn, hidden),
            };
            adapter(&vb.pp(name), i, o, kind, shard, None, tp)
        };
        e.w1 = e.w1.with_lora(lora(names.gate, Kind::Column, col)?);
        e.w2 = e.w2.with_lora(lora(names.down, Kind::Row, row)?);
        e.w3 = e.w3.with_lora(lora(names.up, Kind::Column, col)?);
        Ok(e)
    }

    /// Whether any of its weights, biases or adapters is trainable.
    pub fn tracks_gradients(&self) -> bool {
        let tracks = |t: Option<&Tensor>| t.is_some_and(Tensor::track_op);
        let lora = |l: Option<&crate::lora::LoraAdapter>| {
            l.is_some_and(|l| l.a().track_op() || l.b().track_op())
        };
        [&self.w1, &self.w3]
            .iter()
            .any(|c| c.weight().track_op() || tracks(c.bias()) || lora(c.lora()))
            || self.w2.weight().track_op()
            || tracks(self.w2.bias())
            || lora(self.w2.lora())
    }
}

/// This rank's partial output (before the tp reduction).
impl Module for Expert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.w1.forward(x)?, self.w3.forward(x)?);
        // Inference: SwiGLU over w1's fresh output, which nothing else holds.
        let h = if in_place_ok(&a, &b) {
            ops::swiglu_in_place(&a, &b)?;
            a
        } else if ops::selective_recompute() && (a.track_op() || b.track_op()) {
            return self.down_recomputed(&a, &b);
        } else {
            ops::swiglu(&a, &b)?
        };
        self.w2.forward(&h)
    }
}

impl Expert {
    /// Under selective recomputation, this expert on rows `idx` of `src` without keeping the
    /// gathered rows (the dispatch side of the MoE permutation, recomputed in the backward:
    /// `ops::linear::gathered_gate_up`), then the SwiGLU and down projection recomputed too;
    /// `None` where it does not apply (no selective recomputation, adapters or biases on the
    /// gate and up projections, released weights, nothing to differentiate).
    fn forward_gathered(&self, src: &Tensor, idx: &Tensor) -> Result<Option<Tensor>> {
        let (w1, w3) = (self.w1.weight(), self.w3.weight());
        if !ops::selective_recompute()
            || !(src.track_op() || w1.track_op() || w3.track_op())
            || !self.w1.is_bare()
            || !self.w3.is_bare()
            || crate::ops::released::lookup(w1).is_some()
            || crate::ops::released::lookup(w3).is_some()
        {
            return Ok(None);
        }
        let gu = crate::ops::gathered_gate_up(src, idx, w1, w3)?;
        let (a, b) = (gu.get(0)?, gu.get(1)?);
        self.down_recomputed(&a, &b).map(Some)
    }

    /// `w2(swiglu(a, b))` without keeping the SwiGLU activation (`[rows, ffn / tp]`, a third
    /// of the expert's intermediates): the backward recomputes it from `a` and `b`, which
    /// SwiGLU's own backward keeps anyway (selective recomputation; Megatron's `moe_act`).
    fn down_recomputed(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        // The closure keeps the layer's settings, not its weights (which are inputs).
        let w2 = self.w2.settings_only()?;
        let mut inputs = vec![a, b, self.w2.weight()];
        if let Some(l) = self.w2.lora() {
            inputs.extend([l.a(), l.b()]);
        }
        ops::checkpoint("expert_swiglu_down", &inputs, move |t| {
            let h = ops::swiglu(&t[0], &t[1])?;
            let lora = (t.len() == 5).then(|| (&t[3], &t[4]));
            w2.partial_with(&h, &t[2], lora)
        })
    }
}

/// Whether the in-place inference passes apply: nothing tracks gradients (nor is the training
/// path asked for), and the CPU kernels take the tensors.
fn in_place_ok(a: &Tensor, b: &Tensor) -> bool {
    !ops::training_paths()
        && !a.track_op()
        && !b.track_op()
        && a.device().is_cpu()
        && a.is_contiguous()
        && a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64)
}

/// The experts a rank holds: `experts[i]` is global expert `first + i`.
pub struct LocalExperts {
    experts: Vec<Expert>,
    first: usize,
    tp: Comm,
}

impl LocalExperts {
    /// `experts` are global experts `first..first + experts.len()`, split over `tp`.
    pub fn new(experts: Vec<Expert>, first: usize, tp: &Comm) -> Self {
        Self {
            experts,
            first,
            tp: tp.clone(),
        }
    }

    /// Global indices of the experts this rank holds.
    pub fn range(&self) -> Range<usize> {
        self.first..self.first + self.experts.len()
    }

    /// The experts this rank holds, in global order from [`LocalExperts::range`]'s start.
    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }

    /// How many experts this rank holds.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether this rank holds no expert.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// The tensor-parallel group the experts are split over.
    pub fn tp(&self) -> &Comm {
        &self.tp
    }

    /// One count per local expert, adding up to the rows.
    fn check_counts(&self, rows: &[u32], counts: &[usize]) -> Result<()> {
        if counts.len() != self.experts.len() || counts.iter().sum::<usize>() != rows.len() {
            bail!(
                "moe experts {:?}: {} row counts (sum {}) for {} local experts and {} rows",
                self.range(),
                counts.len(),
                counts.iter().sum::<usize>(),
                self.experts.len(),
                rows.len()
            )
        }
        Ok(())
    }

    /// Runs local expert `i` on the rows `rows[at_i..at_i + counts[i]]` of `src` (the
    /// segments of `rows` in order, one per local expert), each gathered straight from `src`:
    /// in backward each expert's input gradient is scattered into `src`'s once, instead of a
    /// full-size padded copy per expert as slicing one gathered tensor would cost. One
    /// `copy_to_group` before and one reduction over tp after, for all experts together. The
    /// output rows follow `rows`.
    pub fn forward_rows(&self, src: &Tensor, rows: &[u32], counts: &[usize]) -> Result<Tensor> {
        self.check_counts(rows, counts)?;
        let src = ops::copy_to_group(src, &self.tp)?;
        // Training with bare experts (no adapters or biases, weights held): one grouped op for
        // all of them. Inference keeps the per-expert path, which frees each expert's buffers
        // as it goes.
        let training = src.track_op() || self.experts.iter().any(Expert::tracks_gradients);
        if let Some(weights) = self
            .grouped_weights()
            .filter(|_| training && !rows.is_empty())
        {
            let y = crate::ops::grouped::grouped_swiglu(&src, rows, counts, &weights)?;
            return ops::reduce_from_group(&y, &self.tp);
        }
        let mut outs = Vec::with_capacity(counts.len());
        let mut at = 0;
        for (expert, &n) in self.experts.iter().zip(counts) {
            if n > 0 {
                let idx = Tensor::new(&rows[at..at + n], src.device())?;
                outs.push(match expert.forward_gathered(&src, &idx)? {
                    Some(y) => y,
                    None => expert.forward(&src.index_select(&idx, 0)?)?,
                });
            }
            at += n;
        }
        if outs.is_empty() {
            let empty = Tensor::zeros((0, src.dim(1)?), src.dtype(), src.device())?;
            return ops::depend_on(&empty, &[&src]);
        }
        ops::reduce_from_group(&Tensor::cat(&outs, 0)?, &self.tp)
    }

    /// The experts' weights for [`crate::ops::grouped::grouped_swiglu`], where every expert is
    /// bare: no adapter or bias, and no weight released by ZeRO 3 (those take the per-expert
    /// path, whose linears know how to find them again in the backward).
    fn grouped_weights(&self) -> Option<Vec<crate::ops::grouped::SwigluWeights>> {
        let released = |w: &Tensor| crate::ops::released::lookup(w).is_some();
        self.experts
            .iter()
            .map(|e| {
                let (gate, up, down) = (e.w1.weight(), e.w3.weight(), e.w2.weight());
                let bare = e.w1.is_bare()
                    && e.w3.is_bare()
                    && e.w2.lora().is_none()
                    && e.w2.bias().is_none()
                    && ![gate, up, down].into_iter().any(released);
                bare.then(|| crate::ops::grouped::SwigluWeights {
                    gate: gate.clone(),
                    up: up.clone(),
                    down: down.clone(),
                })
            })
            .collect()
    }

    /// [`forward_rows`](Self::forward_rows) with `rows` as the tokens, then
    /// [`combine_outputs`]: copy `j` runs its expert on `src[rows[j]]`, and the result times
    /// `weights.flatten_all()[assignment[j]]` is added into row `rows[j]` of the `[t, hidden]`
    /// output, which is summed over tp.
    ///
    /// For inference (nothing tracks gradients; CPU, f32 or f64) each expert's rows are added
    /// into the output as soon as they are computed ([`combine_into`]) and its SwiGLU runs in
    /// its w1 output's buffer: no buffer of every expert's outputs, and no pass over one.
    /// Summed over tp after combining (rather than before), so at tp > 1 the last bits may
    /// differ from the training path's.
    pub fn forward_combined(
        &self,
        src: &Tensor,
        rows: &[u32],
        counts: &[usize],
        weights: &Tensor,
        assignment: &[u32],
        t: usize,
    ) -> Result<Tensor> {
        let inference = !ops::training_paths()
            && !src.track_op()
            && !weights.track_op()
            && !self.experts.iter().any(Expert::tracks_gradients)
            && src.device().is_cpu()
            && matches!(src.dtype(), DType::F32 | DType::F64);
        if assignment.len() != rows.len() {
            bail!(
                "moe experts {:?}: {} routing assignments for {} rows",
                self.range(),
                assignment.len(),
                rows.len()
            )
        }
        if !inference {
            let y = self.forward_rows(src, rows, counts)?;
            return combine_outputs(&y, weights, assignment, rows, t);
        }
        self.check_counts(rows, counts)?;
        let w: Vec<f64> = weights
            .flatten_all()?
            .to_dtype(src.dtype())?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        if let Some(&bad) = assignment.iter().find(|&&k| k as usize >= w.len()) {
            bail!(
                "moe experts {:?}: routing assignment {bad} is outside the {} routing weights",
                self.range(),
                w.len()
            )
        }
        let out = zeros_for_combine(t, src.dim(1)?, src.dtype())?;
        let mut at = 0;
        for (expert, &n) in self.experts.iter().zip(counts) {
            if n > 0 {
                let r = &rows[at..at + n];
                let y = expert.forward(&src.index_select(&Tensor::new(r, src.device())?, 0)?)?;
                let wj: Vec<f64> = assignment[at..at + n]
                    .iter()
                    .map(|&k| w[k as usize])
                    .collect();
                combine_into(&out, &y, &wj, r)?;
            }
            at += n;
        }
        ops::reduce_from_group(&out, &self.tp)
    }
}
