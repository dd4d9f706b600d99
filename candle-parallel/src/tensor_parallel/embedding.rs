//! The vocabulary-parallel embedding and cross-entropy: no rank ever holds the whole vocabulary.

use crate::checkpoint::{ParallelVarBuilder, Placement};
use crate::comm::{Comm, ReduceOp};
use crate::ops;
use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::Init;

/// The vocabulary range `[start, start + len)` that `rank` owns, with `padded` rows stored
/// (`len < padded` on the last ranks when the vocabulary does not divide by tp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabRange {
    pub start: usize,
    pub len: usize,
    pub padded: usize,
}

impl VocabRange {
    /// Rank `rank`'s range of a vocabulary of `vocab` split over `parts` ranks.
    pub fn new(vocab: usize, rank: usize, parts: usize) -> Self {
        let padded = vocab.div_ceil(parts);
        let start = (rank * padded).min(vocab);
        Self {
            start,
            len: padded.min(vocab - start),
            padded,
        }
    }
}

/// An embedding table split by vocabulary rows over the tp group. Each rank looks up the ids
/// it owns (others give zero rows) and the partial results are summed (`reduce_from_group`),
/// or reduce-scattered along the sequence with sequence parallelism. A vocabulary that does not
/// divide by tp is padded with zero rows.
#[derive(Clone, Debug)]
pub struct VocabParallelEmbedding {
    weight: Tensor,
    range: VocabRange,
    vocab: usize,
    hidden: usize,
    tp: Comm,
    sequence_dim: Option<usize>,
}

impl VocabParallelEmbedding {
    /// Wraps this rank's rows `[padded, hidden]` of a vocabulary of `vocab`.
    pub fn new(weight: Tensor, vocab: usize, tp: &Comm) -> Result<Self> {
        let range = VocabRange::new(vocab, tp.rank(), tp.size());
        let (rows, hidden) = weight.dims2()?;
        if rows != range.padded {
            bail!(
                "vocab_parallel_embedding: rank {} of {} expects {} rows for a vocabulary of {vocab}, got {rows}",
                tp.rank(),
                tp.label(),
                range.padded
            )
        }
        Ok(Self {
            weight,
            range,
            vocab,
            hidden,
            tp: tp.clone(),
            sequence_dim: None,
        })
    }

    /// Sequence parallelism: reduce-scatter the output along `dim` instead of all-reducing it.
    pub fn with_sequence_parallel(mut self, dim: Option<usize>) -> Self {
        self.sequence_dim = dim;
        self
    }

    /// This rank's rows (padding included).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The vocabulary rows this rank owns.
    pub fn range(&self) -> VocabRange {
        self.range
    }

    /// The full vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }
}

impl Module for VocabParallelEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ids64 = ids.to_dtype(DType::I64)?;
        // An id no rank owns would silently embed as zeros: refuse it.
        if ids64.elem_count() > 0 {
            let (lo, hi) = (
                ids64.min_all()?.to_scalar::<i64>()?,
                ids64.max_all()?.to_scalar::<i64>()?,
            );
            if lo < 0 || hi >= self.vocab as i64 {
                bail!(
                    "vocab_parallel_embedding: token id {} is outside the vocabulary 0..{}",
                    if lo < 0 { lo } else { hi },
                    self.vocab
                )
            }
        }
        let start = self.range.start as f64;
        let owned = ids64
            .ge(start)?
            .mul(&ids64.lt(start + self.range.len as f64)?)?;
        let local = owned.where_cond(&(&ids64 - start)?, &ids64.zeros_like()?)?;
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(self.hidden);
        // (A ZeRO 3 module's forward may release the weight: see `ops::released`.)
        let rows = crate::ops::released::embedding(
            &self.weight,
            &local.flatten_all()?.to_dtype(DType::U32)?,
        )?;
        let mask = owned.flatten_all()?.to_dtype(rows.dtype())?.unsqueeze(1)?;
        let partial = rows.broadcast_mul(&mask)?.reshape(out_dims)?;
        match self.sequence_dim {
            Some(dim) => ops::reduce_scatter_to_group(&partial, dim, &self.tp),
            None => ops::reduce_from_group(&partial, &self.tp),
        }
    }
}

/// A vocabulary-parallel twin of `candle_nn::embedding(vocab, hidden, vb)`.
pub fn vocab_parallel_embedding(
    vocab: usize,
    hidden: usize,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<VocabParallelEmbedding> {
    let shard = Placement::split_padded_over(0, tp);
    let init = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    let w = vb.get((vocab, hidden), "weight", shard, init)?;
    VocabParallelEmbedding::new(w, vocab, tp)
}

/// Mean cross-entropy of `logits_shard` (`[N, padded_vocab / tp]`: this rank's columns of the
/// logits, as a column-parallel LM head produces them) against `targets` (`[N]`, u32 or i64),
/// skipping targets equal to `ignore_index`. No rank materialises the full-vocabulary logits:
/// the max, the sum of exponentials and the target logit are reduced across the group. The
/// gradient flows to each rank's shard. Columns past `vocab` (padding) are excluded. Returns an
/// f32 scalar, the same on every rank.
pub fn vocab_parallel_cross_entropy(
    logits_shard: &Tensor,
    targets: &Tensor,
    vocab: usize,
    tp: &Comm,
    ignore_index: Option<i64>,
) -> Result<Tensor> {
    let (n, cols) = logits_shard.dims2()?;
    let range = VocabRange::new(vocab, tp.rank(), tp.size());
    if cols != range.padded {
        bail!(
            "vocab_parallel_cross_entropy: rank {} of {} expects logits with {} columns \
             (vocabulary {vocab} over {} ranks), got shape {:?}",
            tp.rank(),
            tp.label(),
            range.padded,
            tp.size(),
            logits_shard.dims()
        )
    }
    if targets.dims() != [n] {
        bail!(
            "vocab_parallel_cross_entropy: targets of shape {:?} do not match logits {:?}",
            targets.dims(),
            logits_shard.dims()
        )
    }
    let device = logits_shard.device();
    let mut logits = logits_shard.to_dtype(DType::F32)?;
    if range.len < range.padded {
        let mask: Vec<f32> = (0..cols)
            .map(|j| {
                if j < range.len {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        logits = logits.broadcast_add(&Tensor::new(mask.as_slice(), device)?)?;
    }
    // Softmax is shift-invariant: subtract the (detached) global max for stability.
    let max = tp.all_reduce(&logits.detach().max_keepdim(D::Minus1)?, ReduceOp::Max)?;
    let shifted = logits.broadcast_sub(&max)?;
    let sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?;

    let t = targets.to_dtype(DType::I64)?;
    let start = range.start as f64;
    let mut owned = t.ge(start)?.mul(&t.lt(start + range.len as f64)?)?;
    let valid = match ignore_index {
        Some(ig) => t.ne(ig as f64)?,
        None => t.ones_like()?.to_dtype(DType::U8)?,
    };
    owned = owned.mul(&valid)?;
    let local = owned.where_cond(&(&t - start)?, &t.zeros_like()?)?;
    let gathered = shifted.gather(&local.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    // A select, not a product: a padding column is −inf and −inf · 0 would be NaN.
    let picked = owned
        .unsqueeze(1)?
        .where_cond(&gathered, &gathered.zeros_like()?)?;
    // One all-reduce for both sums; its backward is the identity, so each rank's logits get
    // softmax − one-hot on their own columns.
    let both = ops::reduce_from_group(&Tensor::cat(&[&sum_exp, &picked], 1)?, tp)?;
    let per_token = (both.narrow(1, 0, 1)?.log()? - both.narrow(1, 1, 1)?)?.squeeze(1)?;
    let valid = valid.to_dtype(DType::F32)?;
    let count = valid.sum_all()?.to_scalar::<f32>()?.max(1.0);
    (per_token * valid)?.sum_all()? / count as f64
}
