//! The ep group shares its tokens: each rank runs its experts on the copies routed to them and
//! the partial outputs are summed over the group. At ep = 1 this is the local computation.

use super::{Dispatched, TokenDispatcher};
use crate::comm::Comm;
use crate::moe::experts::LocalExperts;
use crate::moe::plan::Plan;
use crate::moe::router::Routing;
use crate::ops;
use candle_core::{bail, Result, Tensor};

/// See the [module docs](self).
pub struct AllReduceDispatcher {
    ep: Comm,
}

impl AllReduceDispatcher {
    /// A dispatcher over the expert-parallel group `ep`, whose ranks hold the same tokens.
    pub fn new(ep: &Comm) -> Self {
        Self { ep: ep.clone() }
    }
}

impl TokenDispatcher for AllReduceDispatcher {
    fn dispatch(
        &self,
        x: &Tensor,
        r: &Routing,
        p: &Plan,
        experts: &LocalExperts,
    ) -> Result<Dispatched> {
        let (t, _) = x.dims2()?;
        let local = experts.range();
        if local.end > p.counts.len() {
            bail!(
                "moe all-reduce on {}: local experts {local:?} are not among the plan's {} experts",
                self.ep.label(),
                p.counts.len()
            )
        }
        let start: usize = p.counts[..local.start].iter().sum();
        let n: usize = p.counts[local.clone()].iter().sum();
        let (assignment, token) = (&p.assignment[start..start + n], &p.token[start..start + n]);
        // The expert path's input gradient and the routing weights' gradient are partial on each
        // ep rank (its experts only): sum them over the ep group.
        let xe = ops::copy_to_group(x, &self.ep)?;
        let w = ops::copy_to_group(&r.weights, &self.ep)?;
        let partial = experts.forward_combined(&xe, token, &p.counts[local], &w, assignment, t)?;
        Ok(Dispatched {
            output: ops::reduce_from_group(&partial, &self.ep)?,
            tokens_per_expert: p.counts.clone(),
        })
    }
}
