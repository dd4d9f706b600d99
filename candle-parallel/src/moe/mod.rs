//! Mixture of Experts with expert parallelism.
//!
//! - [`Router`]: a replicated linear gate, top-k on the device, differentiable into the gate.
//!   Mixtral-exact by default (softmax over all experts, top-k, renormalise); options for top-k
//!   on the logits then softmax (Megatron), sigmoid scores, no renormalisation, a capacity
//!   factor with token dropping (by lowest probability or by position), input jitter.
//! - Auxiliary losses: [`hf_load_balancing_loss`] (Hugging Face Mixtral's, one loss over all
//!   layers; [`hf_load_balancing_loss_masked`] leaves padding out, as HF's attention mask does), [`MoeAux::switch_aux_loss`] (Switch / Megatron, per layer), router z-loss.
//! - [`MoeLayer`]: SwiGLU experts (`w2(silu(w1 x) · w3 x)`), each rank holding its experts
//!   (w1/w3 column-parallel and w2 row-parallel over tp), with a [`TokenDispatcher`]
//!   ([`Dispatch`] names the built-in ones):
//!   - [`AllToAllDispatcher`]: token copies permuted so that each expert's are contiguous,
//!     per-expert counts exchanged, tokens sent to the ranks owning their experts, each local
//!     expert one matmul over its contiguous tokens, sent back, un-permuted and combined with
//!     the routing weights;
//!   - [`AllReduceDispatcher`]: the ep group shares its tokens; each rank runs its own experts
//!     on the tokens routed to them and the partial outputs are summed over the ep group;
//!     at ep = 1, the local computation.
//!
//!   Everything is differentiable end to end. For inference (nothing tracks gradients) the
//!   experts run SwiGLU in place and add their rows straight into the output
//!   ([`combine_into`]), with the training path's bits at tp = 1.
//!
//! One file per part, as Megatron-Core splits it: `router` (gate and top-k), `plan` (capacity
//! and token order), `experts`, `dispatcher/` (one file per strategy), `combine` (the
//! experts' rows back into the tokens'), `losses`, and `layer` (the composition). A new dispatcher is a new type implementing [`TokenDispatcher`], passed
//! to [`MoeLayer::with_dispatcher`].
mod combine;
mod dispatcher;
mod experts;
mod layer;
mod losses;
mod plan;
mod router;

pub use combine::{combine_into, combine_outputs, zeros_for_combine};
pub use dispatcher::{
    AllReduceDispatcher, AllToAllDispatcher, Dispatch, Dispatched, TokenDispatcher,
};
pub use experts::{Expert, ExpertNames, LocalExperts};
pub use layer::{moe_layer, moe_layer_named, MoeAux, MoeLayer, MoeOutput, MoeStats};
pub use losses::{
    hf_load_balancing_loss, hf_load_balancing_loss_masked, hf_load_balancing_loss_of_token_sums,
    hf_load_balancing_loss_of_token_sums_over, hf_load_balancing_loss_over,
    hf_load_balancing_token_sums, router_z_loss, switch_aux_loss, AuxScope,
};
pub use plan::{plan_tokens, Plan};
pub use router::{DropPolicy, ExpertLoad, Router, RouterConfig, Routing, Scoring};
