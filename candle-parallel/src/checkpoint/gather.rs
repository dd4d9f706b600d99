//! Reassembling full tensors from every rank's parts (for comparisons, exports and tests).

use super::placement::{Param, Placement};
use crate::comm::{Comm, ReduceOp};
use candle_core::{Result, Tensor};

/// Reassembles the full tensor from every rank's `local` part (collective over `comm`, whose
/// ranks hold the parts that `shard` describes for each of them). Every rank gets the result.
/// Parts held by several ranks (replicated rows) are averaged, so they count once.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_parallel::checkpoint::{gather_full, Placement};
/// use candle_parallel::launch;
///
/// let full = launch(3, |ctx| {
///     let part = Tensor::full(ctx.rank() as f32, (2, 1), &Device::Cpu)?;
///     let shard = Placement::SplitPadded { dim: 1, rank: ctx.rank(), parts: 3 };
///     gather_full(&part, shard, &[2, 3], ctx.comm())
/// })?;
/// assert_eq!(full[0].to_vec2::<f32>()?, vec![vec![0.0, 1.0, 2.0]; 2]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gather_full(
    local: &Tensor,
    shard: Placement,
    full: &[usize],
    comm: &Comm,
) -> Result<Tensor> {
    let Some(s) = shard.slice(full, "(gather_full)")? else {
        // Replicated: every rank holds the whole tensor already; average any drift.
        return comm.all_reduce(&local.detach(), ReduceOp::Avg);
    };
    let real = local.detach().narrow(s.dim, 0, s.len)?;
    let after = full[s.dim] - s.start - s.len;
    let placed = real.pad_with_zeros(s.dim, s.start, after)?;
    let sum = comm.all_reduce(&placed, ReduceOp::Sum)?;
    // How many ranks hold each row along the shard dim.
    let mut ones = vec![0f32; full[s.dim]];
    ones[s.start..s.start + s.len]
        .iter_mut()
        .for_each(|v| *v = 1.0);
    let coverage = comm.all_reduce(
        &Tensor::new(ones.as_slice(), local.device())?,
        ReduceOp::Sum,
    )?;
    let mut shape = vec![1; full.len()];
    shape[s.dim] = full[s.dim];
    let coverage = coverage
        .maximum(1f32)?
        .reshape(shape)?
        .to_dtype(local.dtype())?;
    sum.broadcast_div(&coverage)
}

/// The gradient of every parameter at its full (unsharded) shape, by name, sorted by name
/// (collective over `comm`, the group the parameters are sharded over). A parameter without a
/// gradient gets zeros.
pub fn full_gradients(
    params: &[Param],
    grads: &candle_core::backprop::GradStore,
    comm: &Comm,
) -> Result<Vec<(String, Tensor)>> {
    let grads: Vec<Option<Tensor>> = params
        .iter()
        .map(|p| grads.get(p.var.as_tensor()).cloned())
        .collect();
    full_gradients_of(params, &grads, comm)
}

/// [`full_gradients`] from gradients given in the order of `params` (what a pipelined step
/// returns).
pub fn full_gradients_of(
    params: &[Param],
    grads: &[Option<Tensor>],
    comm: &Comm,
) -> Result<Vec<(String, Tensor)>> {
    if grads.len() != params.len() {
        candle_core::bail!(
            "full_gradients_of: {} gradients for {} parameters",
            grads.len(),
            params.len()
        )
    }
    params
        .iter()
        .zip(grads)
        .map(|(p, g)| {
            let local = match g {
                Some(g) => g.clone(),
                None => p.var.as_tensor().zeros_like()?,
            };
            Ok((
                p.name.clone(),
                gather_full(&local, p.placement, &p.full_dims, comm)?,
            ))
        })
        .collect()
}

/// Every rank's named full-shape tensors, merged on every rank (collective over `world`):
/// each rank sends `mine`, and tensors of the same name from several ranks are summed (a
/// tied weight's gradient from the first and the last pipeline stage). Sorted by name.
pub fn merge_on_all(world: &Comm, mine: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    merge_with(world, mine, |acc, t| acc + t)
}

/// [`merge_on_all`] with `combine` for tensors of the same name from several ranks.
fn merge_with(
    world: &Comm,
    mine: Vec<(String, Tensor)>,
    combine: impl Fn(Tensor, Tensor) -> Result<Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let bytes = if mine.is_empty() {
        Vec::new()
    } else {
        safetensors::serialize(mine.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| candle_core::Error::msg(format!("serialising tensors: {e}")))?
    };
    let mut out: std::collections::BTreeMap<String, Tensor> = Default::default();
    for b in world.all_gather_bytes(&bytes)? {
        if b.is_empty() {
            continue;
        }
        for (name, t) in candle_core::safetensors::load_buffer(&b, &candle_core::Device::Cpu)? {
            let t = match out.remove(&name) {
                Some(acc) => combine(acc, t)?,
                None => t,
            };
            out.insert(name, t);
        }
    }
    Ok(out.into_iter().collect())
}

/// One full-shape copy of every tensor of a model on a mesh, on every rank (collective over
/// the world): tp slices gathered; each tensor sent by one holder (tp rank 0, dp rank 0, and
/// ep rank 0 unless it is local to ep, as experts are); pipeline stages each send their own,
/// and a tensor two stages hold (a tied weight) is kept once. `tensors` are this rank's parts with the mesh dimensions each is local to
/// ([`crate::zero::ZeroOptimizer::named_params`] gives them).
pub fn gather_model(
    tensors: &[(super::ShardedTensor, Vec<crate::mesh::MeshDim>)],
    mesh: &crate::mesh::DeviceMesh,
) -> Result<Vec<(String, Tensor)>> {
    use crate::mesh::MeshDim;
    let mut mine = Vec::new();
    for (t, local_to) in tensors {
        let full = gather_full(&t.local, t.placement, &t.full_dims, mesh.tp())?;
        let sends = mesh.tp().rank() == 0
            && mesh.dp().rank() == 0
            && (local_to.contains(&MeshDim::Ep) || mesh.ep().rank() == 0);
        if sends {
            mine.push((t.name.clone(), full.to_device(&candle_core::Device::Cpu)?));
        }
    }
    // A parameter held twice is one tensor: the first copy (the gradients' merge sums).
    merge_with(mesh.world(), mine, |first, _| Ok(first))
}
