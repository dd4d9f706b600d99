//! Operations for parallel models: differentiable collectives ([`collectives`]), re-exported
//! here so that layers write `ops::copy_to_group(&x, &tp)`.
pub mod collectives;

pub use collectives::{
    all_gather_to_group, all_to_all, copy_to_group, gather_from_group, reduce_from_group,
    reduce_scatter_to_group, scatter_to_group,
};
