//! Token dispatchers: how routed tokens reach the experts and come back.
//!
//! A dispatcher gets the layer's tokens, the router's decision, the [`Plan`] (which copies each
//! expert keeps, in which order) and this rank's [`LocalExperts`], and returns the combined
//! output. A new strategy (a grouped all-gather, a capacity-free DeepEP-style exchange) is a
//! new type implementing [`TokenDispatcher`], passed to [`super::MoeLayer::with_dispatcher`].
//!
//! - [`AllToAllDispatcher`]: tokens differ per ep rank and travel to their experts' ranks and
//!   back (GShard / Megatron);
//! - [`AllReduceDispatcher`]: the ep group shares its tokens; each rank runs its experts on the
//!   copies routed to them and the partial outputs are summed over the group (at ep = 1, the
//!   plain local computation).
mod all_reduce;
mod all_to_all;

pub use all_reduce::AllReduceDispatcher;
pub use all_to_all::AllToAllDispatcher;

pub use super::combine::combine_outputs;
use super::experts::LocalExperts;
use super::plan::Plan;
use super::router::Routing;
use crate::comm::Comm;
use candle_core::{Result, Tensor};

/// What a dispatcher returns.
pub struct Dispatched {
    /// `[T, hidden]`: each token's experts' outputs weighted by the routing weights.
    pub output: Tensor,
    /// Routed copies each expert processed (over the ep group where tokens are exchanged).
    pub tokens_per_expert: Vec<usize>,
}

/// Moves a layer's routed tokens to their experts and the results back.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Result, Tensor};
/// use candle_parallel::checkpoint::ParallelVarBuilder;
/// use candle_parallel::moe::*;
/// use candle_parallel::launch;
///
/// /// Logs each dispatch, then lets the all-reduce dispatcher do the work.
/// struct Logged(AllReduceDispatcher);
///
/// impl TokenDispatcher for Logged {
///     fn dispatch(&self, x: &Tensor, r: &Routing, p: &Plan, e: &LocalExperts) -> Result<Dispatched> {
///         eprintln!("{} tokens, {} dropped", x.dim(0)?, p.dropped);
///         self.0.dispatch(x, r, p, e)
///     }
/// }
///
/// launch(1, |ctx| {
///     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu);
///     let cfg = RouterConfig::mixtral(4, 2);
///     let layer = moe_layer(8, 16, cfg, Dispatch::AllToAll, vb, ctx.comm(), ctx.comm())?
///         .with_dispatcher(Box::new(Logged(AllReduceDispatcher::new(ctx.comm()))));
///     let y = layer.forward_t(&Tensor::ones((3, 8), DType::F32, &Device::Cpu)?, false)?;
///     assert_eq!(y.dims(), &[3, 8]);
///     assert_eq!(layer.take_aux().unwrap().stats.tokens_per_expert.iter().sum::<usize>(), 6);
///     Ok(())
/// })?;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait TokenDispatcher: Send + Sync {
    /// Runs `experts` on the copies of `x` (`[T, hidden]`) that `plan` keeps and combines the
    /// results with `routing.weights`. Every rank of the group must call it (it may
    /// communicate), and every rank must take part in the same collectives in backward, also
    /// when its experts receive no tokens (see [`ops::depend_on`]).
    fn dispatch(
        &self,
        x: &Tensor,
        routing: &Routing,
        plan: &Plan,
        experts: &LocalExperts,
    ) -> Result<Dispatched>;
}

/// The built-in dispatchers, by name (what models and configs choose).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Tokens differ per ep rank; they travel to the experts' ranks and back (GShard/Megatron).
    AllToAll,
    /// The ep group shares its tokens; partial outputs are summed over it.
    AllReduce,
}

impl Dispatch {
    /// The dispatcher over the expert-parallel group `ep` (at ep = 1 both are the local
    /// computation).
    pub fn dispatcher(self, ep: &Comm) -> Box<dyn TokenDispatcher> {
        match self {
            Dispatch::AllToAll if ep.size() > 1 => Box::new(AllToAllDispatcher::new(ep)),
            _ => Box::new(AllReduceDispatcher::new(ep)),
        }
    }
}
