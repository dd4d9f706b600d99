//! Splitting attention heads over the tp group, including grouped-query attention where tp
//! exceeds the number of key/value heads.

use crate::checkpoint::{ParallelVarBuilder, Placement};
use crate::comm::Comm;
use crate::tensor_parallel::{linear_bias_init, linear_weight_init, ColumnParallelLinear};
use candle_core::{bail, Result, Tensor};

/// How the heads of one attention layer are split over the tp group.
///
/// Query heads are split evenly. Key/value heads are split evenly when there are at least as
/// many as ranks; otherwise each KV head is replicated on `tp / num_kv_heads` consecutive ranks
/// (the ranks whose query heads use it), and their weight gradients are summed over those
/// replicas so that the copies stay identical.
///
/// ```
/// use candle_parallel::{launch, tensor_parallel::TpHeads};
///
/// // 8 query heads, 2 KV heads, tp = 4: each KV head lives on 2 ranks.
/// let split = launch(4, |ctx| {
///     let h = TpHeads::new(8, 2, 16, ctx.comm())?;
///     Ok((h.local_heads(), h.local_kv_heads(), h.kv_head_start()))
/// })?;
/// assert_eq!(split, vec![(2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TpHeads {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    tp_rank: usize,
    tp_size: usize,
    /// The ranks that hold this rank's KV heads, when they are replicated.
    kv_group: Option<Comm>,
}

impl TpHeads {
    /// Checks that the heads can be split over `tp` and, when KV heads are replicated, creates
    /// the groups of replicas (collective over `tp`).
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize, tp: &Comm) -> Result<Self> {
        let n = tp.size();
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "attention: {num_heads} query heads cannot be grouped over {num_kv_heads} key/value heads"
            )
        }
        if !num_heads.is_multiple_of(n) {
            bail!(
                "attention: {num_heads} query heads cannot be split over tensor-parallel size {n}: \
                 choose a tp that divides {num_heads}"
            )
        }
        if num_kv_heads >= n && !num_kv_heads.is_multiple_of(n) {
            bail!(
                "attention: {num_kv_heads} key/value heads cannot be split over tensor-parallel size {n}: \
                 choose a tp that divides {num_kv_heads}, or a multiple of it"
            )
        }
        if num_kv_heads < n && !n.is_multiple_of(num_kv_heads) {
            bail!(
                "attention: tensor-parallel size {n} exceeds the {num_kv_heads} key/value heads and is \
                 not a multiple of it, so KV heads cannot be replicated evenly: choose a tp that \
                 divides or is a multiple of {num_kv_heads}"
            )
        }
        let mut heads = Self {
            num_heads,
            num_kv_heads,
            head_dim,
            tp_rank: tp.rank(),
            tp_size: n,
            kv_group: None,
        };
        if num_kv_heads < n {
            heads.kv_group =
                tp.split_labeled(Some(heads.kv_head_start()), tp.rank(), "kv-replicas")?;
        }
        Ok(heads)
    }

    /// Query heads on this rank.
    pub fn local_heads(&self) -> usize {
        self.num_heads / self.tp_size
    }

    /// Key/value heads on this rank (1 when replicated).
    pub fn local_kv_heads(&self) -> usize {
        (self.num_kv_heads / self.tp_size).max(1)
    }

    /// The first KV head this rank holds.
    pub fn kv_head_start(&self) -> usize {
        if self.num_kv_heads >= self.tp_size {
            self.tp_rank * self.local_kv_heads()
        } else {
            self.tp_rank * self.num_kv_heads / self.tp_size
        }
    }

    /// Dimension of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The group of ranks replicating this rank's KV heads (`None` when they are split).
    pub fn kv_group(&self) -> Option<&Comm> {
        self.kv_group.as_ref()
    }

    /// The rows of a `[num_kv_heads · head_dim, hidden]` projection this rank holds.
    pub fn kv_shard(&self) -> Placement {
        Placement::Range {
            dim: 0,
            start: self.kv_head_start() * self.head_dim,
            len: self.local_kv_heads() * self.head_dim,
        }
    }

    /// A key or value projection (`[num_kv_heads · head_dim, hidden]`): this rank's KV heads,
    /// with gradients summed over the replicas when KV heads are replicated.
    pub fn kv_projection(
        &self,
        hidden: usize,
        bias: bool,
        vb: ParallelVarBuilder,
        tp: &Comm,
    ) -> Result<ColumnParallelLinear> {
        let out = self.num_kv_heads * self.head_dim;
        let w = vb.get(
            (out, hidden),
            "weight",
            self.kv_shard(),
            linear_weight_init(),
        )?;
        let b = if bias {
            Some(vb.get(out, "bias", self.kv_shard(), linear_bias_init(hidden))?)
        } else {
            None
        };
        let lora = crate::lora::adapter(
            &vb,
            hidden,
            out,
            crate::lora::Kind::Column,
            self.kv_shard(),
            self.kv_group.clone(),
            tp,
        )?;
        Ok(ColumnParallelLinear::new(w, b, tp)
            .with_weight_group(self.kv_group.clone())
            .with_lora(lora))
    }

    /// Repeats each local KV head so that every local query head has one:
    /// `[b, kv, s, d] -> [b, heads, s, d]`.
    pub fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let n_rep = self.local_heads() / self.local_kv_heads();
        if n_rep == 1 {
            return Ok(x.clone());
        }
        let (b, kv, s, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, kv, n_rep, s, d))?
            .reshape((b, kv * n_rep, s, d))
    }
}
