//! Tensor parallelism: sharded layers that swap in for candle-nn's.
//!
//! | candle-nn | tensor parallel | split |
//! |---|---|---|
//! | `linear` | [`column_parallel_linear`] | output features |
//! | `linear` | [`row_parallel_linear`] | input features (one all-reduce) |
//! | `embedding` | [`vocab_parallel_embedding`] | vocabulary rows (padded) |
//! | `loss::cross_entropy` | [`vocab_parallel_cross_entropy`] | vocabulary columns |
//!
//! Attention heads are split with [`TpHeads`]. Sequence parallelism (Megatron-SP) is an option
//! on each layer (`with_sequence_parallel(Some(seq_dim))`): activations between the row and
//! column layers stay split along the sequence, norms run on the split activations, and
//! [`sequence_parallel_weight`] makes a replicated weight used there (e.g. a norm's) receive
//! the gradient summed over the group. Dropout there needs a different mask on each rank,
//! dropout on replicated activations the same one: [`crate::ops::dropout`] takes the key.
//!
//! Constructors take a [`crate::checkpoint::ParallelVarBuilder`]: a rank gets its slice of the
//! checkpoint, or of the deterministic initialisation (tp = 1 and tp = 4 start from the same
//! weights).
mod attention;
mod embedding;
mod linear;

pub use attention::TpHeads;
pub use embedding::{
    vocab_parallel_cross_entropy, vocab_parallel_embedding, VocabParallelEmbedding, VocabRange,
};
pub use linear::{
    column_parallel_linear, column_parallel_linear_no_bias, linear_bias_init, linear_weight_init,
    row_parallel_linear, row_parallel_linear_no_bias, ColumnParallelLinear, RowParallelLinear,
};

use crate::comm::Comm;
use candle_core::{Result, Tensor};

/// For a replicated weight applied to sequence-parallel activations (a norm's scale): identity
/// forward; backward sums the per-rank partial gradients over the tp group, since each rank saw
/// only its part of the sequence.
pub fn sequence_parallel_weight(w: &Tensor, tp: &Comm) -> Result<Tensor> {
    crate::ops::copy_to_group(w, tp)
}
