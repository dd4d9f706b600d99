//! Data parallelism: every rank of the dp group a replica that sees its own part of each
//! global batch; gradients averaged over the group in buckets.
//!
//! - [`shard_batch`]: this rank's rows of a global batch (the same split for any dp, given the
//!   same global batch).
//! - [`GradBuckets`]: the parameters' gradients packed into flat buckets (default 25 MiB, as
//!   PyTorch's DDP) in one fixed order on every rank, each averaged with one in-place
//!   all-reduce into a buffer allocated once, then unpacked. The layout is agreed across the
//!   group once, when the buckets are made.
//! - [`DataParallel`]: the synchronisation of a whole model on a mesh, read from each
//!   parameter's [`Param::local_to`]: a weight is summed over the batch-splitting dimensions
//!   it is replicated along (dp, and ep where the experts' ranks see different tokens), an
//!   expert only over dp.
//! - [`GradAccumulator`]: gradients summed over several backward passes (micro-batches)
//!   before the one synchronisation.
//! - [`GradSink`]: where a backward pass run one unit at a time (a decoder layer, the
//!   embedding, the head) hands each unit's gradients as soon as they exist, so that only one
//!   unit's full gradients live at once; [`crate::zero::ZeroOptimizer`] packs and reduces
//!   them into its buckets, [`GradCollector`] keeps them whole.
//!
//! [`crate::zero`] builds ZeRO's sharded optimizer on the same buckets.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use candle_parallel::checkpoint::Param;
//! use candle_parallel::data_parallel::{shard_batch, GradBuckets};
//! use candle_parallel::launch;
//!
//! let grads = launch(2, |ctx| {
//!     let w = Var::new(&[1f32, 1.0], &Device::Cpu)?;
//!     let params = [Param::replicated("w", w.clone())];
//!     let batch = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]], &Device::Cpu)?;
//!     let mine = shard_batch(&batch, ctx.comm())?; // rows 0-1 or 2-3
//!     let loss = mine.broadcast_mul(w.as_tensor())?.sum_all()?;
//!     let mut g = vec![loss.backward()?.get(w.as_tensor()).cloned()];
//!     GradBuckets::new(&params, ctx.comm(), 25 << 20)?.all_reduce(&mut g)?;
//!     g[0].as_ref().unwrap().to_vec1::<f32>()
//! })?;
//! // The mean over the replicas: ([1, 1] + [3, 3]) / 2 on both.
//! assert_eq!(grads, vec![vec![2.0, 2.0], vec![2.0, 2.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::checkpoint::Param;
use crate::comm::{Comm, ReduceOp};
use crate::mesh::{DeviceMesh, MeshDim};
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};

/// DDP's default bucket size: 25 MiB.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// This rank's rows of `global` (dim 0 split into `dp.size()` equal consecutive parts, in rank
/// order): an error naming the sizes when they do not divide.
pub fn shard_batch(global: &Tensor, dp: &Comm) -> Result<Tensor> {
    let (rows, parts) = (global.dim(0)?, dp.size());
    if !rows.is_multiple_of(parts) {
        bail!(
            "a global batch of {rows} rows does not split over the {parts} data-parallel ranks of {}: use a batch size divisible by {parts}",
            dp.label()
        )
    }
    let per = rows / parts;
    global.narrow(0, dp.rank() * per, per)
}

/// Where one parameter lies in a flat bucket.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    /// Index into the parameter list.
    pub param: usize,
    /// First element in the bucket.
    pub offset: usize,
    /// Elements.
    pub len: usize,
}

/// One bucket: parameters packed one after the other, then zeros up to `padded` (a multiple
/// of the group size, so that ZeRO can cut it into equal partitions).
#[derive(Clone, Debug)]
pub(crate) struct FlatBucket {
    pub segments: Vec<Segment>,
    pub elems: usize,
    pub padded: usize,
}

/// Collective over `comm`: an error on every rank unless all hold the same parameters
/// (`members` of `params`) with the same local shapes, in the same order.
/// What the synchronisation of a parameter needs to know of it: a [`Param`], or a
/// description of one not yet read (ZeRO 3 learns a module's parameters before reading its
/// partition of them).
pub(crate) trait ParamLayout {
    fn layout_name(&self) -> &str;
    /// This rank's slice's shape.
    fn layout_dims(&self) -> &[usize];
    /// Whether ranks along `dim` hold different data of the parameter.
    fn layout_local_to(&self, dim: MeshDim) -> bool;
}

impl ParamLayout for Param {
    fn layout_name(&self) -> &str {
        &self.name
    }

    fn layout_dims(&self) -> &[usize] {
        self.var.dims()
    }

    fn layout_local_to(&self, dim: MeshDim) -> bool {
        self.is_local_to(dim)
    }
}

impl ParamLayout for crate::checkpoint::ParamMeta {
    fn layout_name(&self) -> &str {
        &self.name
    }

    fn layout_dims(&self) -> &[usize] {
        &self.dims
    }

    fn layout_local_to(&self, dim: MeshDim) -> bool {
        dim == MeshDim::Pp || self.local_to.contains(&dim)
    }
}

pub(crate) fn agree_layout<P: ParamLayout>(
    params: &[P],
    members: &[usize],
    comm: &Comm,
) -> Result<()> {
    let layout: Vec<String> = members
        .iter()
        .map(|&i| format!("{} {:?}", params[i].layout_name(), params[i].layout_dims()))
        .collect();
    let mine = layout.join("\n");
    let all = comm.all_gather_bytes(mine.as_bytes())?;
    for (r, other) in all.iter().enumerate() {
        if other != mine.as_bytes() {
            let other = String::from_utf8_lossy(other);
            let at = layout
                .iter()
                .zip(other.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(layout.len().min(other.lines().count()));
            bail!(
                "data parallel over {}: the replicas hold different parameters: rank {} has {} parameters, rank {} has {}; the first difference is at #{at}: {:?} vs {:?}",
                comm.label(),
                comm.ranks()[comm.rank()],
                layout.len(),
                comm.ranks()[r],
                other.lines().count(),
                layout.get(at),
                other.lines().nth(at)
            )
        }
    }
    Ok(())
}

/// Buckets of at most `bucket_bytes` of f32 (a parameter larger than that gets a bucket of
/// its own) over `members`, filled from the last to the first (the order in which a backward
/// pass produces gradients, as DDP), each padded to a multiple of `parts`.
pub(crate) fn plan_buckets(
    params: &[Param],
    members: &[usize],
    bucket_bytes: usize,
    parts: usize,
) -> Vec<FlatBucket> {
    let limit = (bucket_bytes / 4).max(1);
    let mut buckets = Vec::new();
    let mut current: Vec<Segment> = Vec::new();
    let mut elems = 0;
    let close = |segments: Vec<Segment>, elems: usize, out: &mut Vec<FlatBucket>| {
        out.push(FlatBucket {
            segments,
            elems,
            padded: elems.div_ceil(parts) * parts,
        })
    };
    for &i in members.iter().rev() {
        let n = params[i].var.elem_count();
        if elems > 0 && elems + n > limit {
            close(std::mem::take(&mut current), elems, &mut buckets);
            elems = 0;
        }
        current.push(Segment {
            param: i,
            offset: elems,
            len: n,
        });
        elems += n;
    }
    if !current.is_empty() {
        close(current, elems, &mut buckets);
    }
    buckets
}

/// Writes the gradients of `bucket`'s parameters (as f32; `None` as zeros) into `buf`
/// (`[bucket.padded]`, f32), checking their shapes.
fn pack_into(
    buf: &Tensor,
    bucket: &FlatBucket,
    params: &[Param],
    grads: &[Option<Tensor>],
) -> Result<()> {
    for s in &bucket.segments {
        let p = &params[s.param];
        let flat = match &grads[s.param] {
            Some(g) => {
                if g.dims() != p.var.dims() {
                    bail!(
                        "the gradient of {} has shape {:?}, the parameter (this rank's slice) {:?}",
                        p.name,
                        g.dims(),
                        p.var.dims()
                    )
                }
                g.flatten_all()?.to_dtype(DType::F32)?.contiguous()?
            }
            None => Tensor::zeros(s.len, DType::F32, buf.device())?,
        };
        buf.slice_set(&flat, 0, s.offset)?;
    }
    Ok(())
}

/// The parameters' gradients in flat buckets, averaged over the data-parallel group.
#[derive(Debug)]
pub struct GradBuckets {
    dp: Comm,
    buckets: Vec<FlatBucket>,
    /// One f32 buffer per bucket, allocated once and reduced in place.
    buffers: Vec<Tensor>,
    params: Vec<Param>,
}

impl GradBuckets {
    /// Buckets of at most `bucket_bytes` (a parameter larger than that gets a bucket of its
    /// own) over `params`, filled from the last parameter to the first (the order in which a
    /// backward pass produces gradients, as DDP). Collective over `dp`: the ranks must hold the
    /// same parameters in the same order, or every rank gets an error naming the first
    /// difference.
    pub fn new(params: &[Param], dp: &Comm, bucket_bytes: usize) -> Result<Self> {
        let members: Vec<usize> = (0..params.len()).collect();
        agree_layout(params, &members, dp)?;
        Self::agreed(params, dp, bucket_bytes)
    }

    /// [`GradBuckets::new`] for parameters whose layout the ranks agreed on already.
    fn agreed(params: &[Param], dp: &Comm, bucket_bytes: usize) -> Result<Self> {
        let members: Vec<usize> = (0..params.len()).collect();
        let buckets = plan_buckets(params, &members, bucket_bytes, 1);
        let buffers = if dp.size() == 1 {
            Vec::new()
        } else {
            buckets
                .iter()
                .map(|b| Tensor::zeros(b.padded, DType::F32, dp.device()))
                .collect::<Result<_>>()?
        };
        Ok(Self {
            dp: dp.clone(),
            buckets,
            buffers,
            params: params.to_vec(),
        })
    }

    /// How many buckets, and how many elements each holds.
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.elems).collect()
    }

    /// Bytes of the bucket buffers this holds (allocated once).
    pub fn buffer_bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.elem_count() * 4).sum()
    }

    /// Averages `grads` (in the order of the parameters; `None` counts as zeros and gets the
    /// average) over the dp group, bucket by bucket, in place of the given tensors. Reduced in
    /// f32 whatever the gradients' dtype.
    pub fn all_reduce(&self, grads: &mut [Option<Tensor>]) -> Result<()> {
        self.reduce(grads, ReduceOp::Avg, 1.0)
    }

    /// Reduces with `op`, then multiplies by `scale` (1 leaves the result as reduced).
    fn reduce(&self, grads: &mut [Option<Tensor>], op: ReduceOp, scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!(
                "GradBuckets::all_reduce: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        if self.dp.size() == 1 {
            if scale != 1.0 {
                for g in grads.iter_mut().flatten() {
                    *g = (&*g * scale)?;
                }
            }
            return Ok(());
        }
        for (bucket, buf) in self.buckets.iter().zip(&self.buffers) {
            let dtypes: Vec<DType> = bucket
                .segments
                .iter()
                .map(|s| {
                    grads[s.param]
                        .as_ref()
                        .map_or(self.params[s.param].var.dtype(), |g| g.dtype())
                })
                .collect();
            pack_into(buf, bucket, &self.params, grads)?;
            self.dp.all_reduce_in_place(buf, op)?;
            for (s, dtype) in bucket.segments.iter().zip(dtypes) {
                // A copy: the buffer is reused by the next reduction.
                let mut g = buf
                    .narrow(0, s.offset, s.len)?
                    .reshape(self.params[s.param].var.shape())?;
                if scale != 1.0 {
                    g = (g * scale)?;
                }
                grads[s.param] = Some(g.to_dtype(dtype)?.copy()?);
            }
        }
        Ok(())
    }
}

/// The mesh dimensions along which the ranks see different examples, checked: data parallel
/// and expert parallel only (tensor-parallel ranks share their inputs; pipeline stages pass
/// them on).
pub(crate) fn check_batch_dims(batch_dims: &[MeshDim]) -> Result<Vec<MeshDim>> {
    let mut dims = batch_dims.to_vec();
    dims.sort();
    dims.dedup();
    if let Some(d) = dims.iter().find(|d| matches!(d, MeshDim::Pp | MeshDim::Tp)) {
        bail!(
            "data parallel: {d} cannot split the batch (its ranks share their inputs); the batch dimensions are dp and, with all-to-all expert dispatch, ep"
        )
    }
    Ok(dims)
}

/// The communicators over every subset of a mesh's batch dimensions (the dimensions whose
/// ranks see different examples: dp, and ep with all-to-all expert dispatch), made once: a
/// parameter's gradients are summed over the batch dimensions it is not local to
/// ([`Param::local_to`]), with one of these.
#[derive(Clone, Debug)]
pub struct BatchGroups {
    dims: Vec<MeshDim>,
    /// Per subset of `dims` (bit i: `dims[i]`): its dimensions and communicator (`None` when
    /// that is this rank alone).
    subsets: Vec<(Vec<MeshDim>, Option<Comm>)>,
    replicas: usize,
}

impl BatchGroups {
    /// Collective over the mesh's world: every rank builds the same communicators in the same
    /// order.
    pub fn new(mesh: &DeviceMesh, batch_dims: &[MeshDim]) -> Result<Self> {
        let dims = check_batch_dims(batch_dims)?;
        let mut subsets = Vec::new();
        for mask in 0..(1usize << dims.len()) {
            let subset: Vec<MeshDim> = dims
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, d)| *d)
                .collect();
            let comm = match subset.iter().map(|&d| mesh.size(d)).product::<usize>() {
                1 => None,
                _ => Some(mesh.comm_over(&subset)?),
            };
            subsets.push((subset, comm));
        }
        Ok(Self {
            replicas: dims.iter().map(|&d| mesh.size(d)).product(),
            dims,
            subsets,
        })
    }

    /// How many replicas a global batch is split over.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The subset (index) a parameter's gradients are summed over.
    pub(crate) fn subset_of<P: ParamLayout>(&self, p: &P) -> usize {
        self.dims
            .iter()
            .enumerate()
            .filter(|(_, &d)| !p.layout_local_to(d))
            .map(|(i, _)| 1 << i)
            .sum()
    }

    /// The subsets: dimensions and communicator.
    pub(crate) fn subsets(&self) -> &[(Vec<MeshDim>, Option<Comm>)] {
        &self.subsets
    }

    /// `params` grouped by the subset their gradients are summed over (subsets with none
    /// left out), each group's layout agreed across its ranks (collective: an error on every
    /// rank names the first difference).
    pub(crate) fn groups_of<P: ParamLayout>(&self, params: &[P]) -> Result<Vec<SyncGroup>> {
        let mut out = Vec::new();
        for (i, (dims, comm)) in self.subsets.iter().enumerate() {
            let members: Vec<usize> = (0..params.len())
                .filter(|&j| self.subset_of(&params[j]) == i)
                .collect();
            if members.is_empty() {
                continue;
            }
            if let Some(c) = comm {
                agree_layout(params, &members, c)?;
            }
            let (size, rank) = comm.as_ref().map_or((1, 0), |c| (c.size(), c.rank()));
            out.push(SyncGroup {
                dims: dims.clone(),
                comm: comm.clone(),
                size,
                rank,
                members,
            });
        }
        Ok(out)
    }
}

/// Parameters whose gradients are summed over the same batch dimensions.
pub(crate) struct SyncGroup {
    pub dims: Vec<MeshDim>,
    /// The communicator over `dims` (`None`: this rank alone).
    pub comm: Option<Comm>,
    /// This rank's place in it.
    pub size: usize,
    pub rank: usize,
    /// Indices into the parameters.
    pub members: Vec<usize>,
}

/// Gradient synchronisation for a model on a mesh (DDP over dp, and over ep for the weights
/// the experts' ranks share), read from each parameter's [`Param::local_to`].
///
/// Every rank's gradients are those of the mean loss over *its* examples; after
/// [`DataParallel::sync`] every rank holds the gradient of the mean loss over the *global*
/// batch: a replicated weight's gradients are summed over the batch dimensions and divided by
/// the number of replicas; an expert, which receives every ep rank's tokens through the
/// all-to-all, is summed over dp only, with the same division.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_parallel::checkpoint::ParallelVarBuilder;
/// use candle_parallel::data_parallel::{DataParallel, DEFAULT_BUCKET_BYTES};
/// use candle_parallel::mesh::MeshDim;
/// use candle_parallel::tensor_parallel::column_parallel_linear;
/// use candle_parallel::{Launcher, MeshShape};
///
/// let norms = Launcher::new(4).mesh(MeshShape::new().dp(2).tp(2)).run(|ctx| {
///     let mesh = ctx.mesh()?;
///     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
///     let fc = column_parallel_linear(4, 4, vb.pp("fc"), mesh.tp())?.with_gather_output(true);
///     let params = vb.params();
///     let dp = DataParallel::new(&params, &mesh, &[MeshDim::Dp], DEFAULT_BUCKET_BYTES)?;
///     let x = Tensor::full(1f32 + mesh.dp().rank() as f32, (2, 4), &Device::Cpu)?;
///     let grads = fc.forward(&x)?.sum_all()?.backward()?;
///     let mut g: Vec<_> = params.iter().map(|p| grads.get(p.var.as_tensor()).cloned()).collect();
///     dp.sync(&mut g)?;
///     // Parameters sorted by name: fc.bias, then this rank's [2, 4] slice of fc.weight.
///     g[1].as_ref().unwrap().sum_all()?.to_scalar::<f32>()
/// })?;
/// // The mean of the replicas' gradients (inputs of 1 and 2): 2 rows × 1.5 in each of the
/// // slice's 8 elements.
/// assert_eq!(norms, vec![24.0; 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
pub struct DataParallel {
    /// Each synchronisation group's members (indices into the parameters) and buckets.
    groups: Vec<(Vec<usize>, GradBuckets)>,
    replicas: usize,
    params: usize,
}

impl DataParallel {
    /// The synchronisation of `params` on `mesh`, whose `batch_dims` (dp; with all-to-all
    /// expert dispatch also ep) split each global batch. Collective over the world.
    pub fn new(
        params: &[Param],
        mesh: &DeviceMesh,
        batch_dims: &[MeshDim],
        bucket_bytes: usize,
    ) -> Result<Self> {
        let batch = BatchGroups::new(mesh, batch_dims)?;
        let mut groups = Vec::new();
        for g in batch.groups_of(params)? {
            let Some(comm) = &g.comm else {
                continue;
            };
            let subset: Vec<Param> = g.members.iter().map(|&j| params[j].clone()).collect();
            groups.push((g.members, GradBuckets::agreed(&subset, comm, bucket_bytes)?));
        }
        Ok(Self {
            groups,
            replicas: batch.replicas(),
            params: params.len(),
        })
    }

    /// How many replicas a global batch is split over.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Bytes of the bucket buffers this holds.
    pub fn buffer_bytes(&self) -> usize {
        self.groups.iter().map(|g| g.1.buffer_bytes()).sum()
    }

    /// Turns every rank's gradients (of the mean loss over its own examples, in the order of
    /// the parameters) into the gradients of the mean loss over the global batch, the same on
    /// every replica.
    pub fn sync(&self, grads: &mut [Option<Tensor>]) -> Result<()> {
        if grads.len() != self.params {
            bail!(
                "DataParallel::sync: {} gradients for {} parameters",
                grads.len(),
                self.params
            )
        }
        let scale = 1.0 / self.replicas as f64;
        let mut done = vec![false; self.params];
        for (members, buckets) in &self.groups {
            let mut mine: Vec<Option<Tensor>> = members.iter().map(|&i| grads[i].take()).collect();
            buckets.reduce(&mut mine, ReduceOp::Sum, scale)?;
            for (&i, g) in members.iter().zip(mine) {
                grads[i] = g;
                done[i] = true;
            }
        }
        if self.replicas > 1 {
            // Parameters summed over no dimension (an expert at dp = 1 with ep > 1) still
            // count their share of the global batch.
            for (g, _) in grads.iter_mut().zip(done).filter(|(_, d)| !d) {
                if let Some(t) = g {
                    *t = (&*t * scale)?;
                }
            }
        }
        Ok(())
    }
}

/// Gradients summed over several backward passes (gradient accumulation): add each pass's,
/// then [`GradAccumulator::take`] their mean once, for the one synchronisation of the step.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    passes: usize,
}

impl GradAccumulator {
    /// Adds one pass's gradients (in the order of the parameters).
    pub fn add(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if self.passes == 0 {
            self.sums = vec![None; grads.len()];
        } else if grads.len() != self.sums.len() {
            bail!(
                "GradAccumulator: {} gradients after passes of {}",
                grads.len(),
                self.sums.len()
            )
        }
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                self.sum_into(i, g)?;
            }
        }
        self.passes += 1;
        Ok(())
    }

    /// Adds `g` to the sum of parameter `index` in the current pass.
    fn sum_into(&mut self, index: usize, g: &Tensor) -> Result<()> {
        let n = self.sums.len();
        let Some(acc) = self.sums.get_mut(index) else {
            bail!("GradAccumulator: a gradient for parameter {index} of {n}")
        };
        *acc = Some(match acc.take() {
            Some(a) => (a + g)?,
            None => g.clone(),
        });
        Ok(())
    }

    /// How many passes were added since the last take.
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// The mean over the passes (each pass's loss being a mean over its equally sized
    /// micro-batch, this is the gradient of the mean over all of them); resets.
    pub fn take(&mut self) -> Result<Vec<Option<Tensor>>> {
        if self.passes == 0 {
            bail!("GradAccumulator::take: no gradients were added")
        }
        let n = self.passes as f64;
        self.passes = 0;
        let len = self.sums.len();
        std::mem::replace(&mut self.sums, vec![None; len])
            .into_iter()
            .map(|g| g.map(|g| g / n).transpose())
            .collect()
    }
}

/// Where a backward pass hands its gradients, unit by unit (a unit: a decoder layer, the
/// embedding, the head; what FSDP and DeepSpeed hook as a module). A model whose backward
/// runs one unit at a time (boundaries detached, each unit's backward seeded with the
/// gradient of its output) gives each unit's gradients here as soon as they exist and drops
/// them, then says the unit is done: a sink may reduce (and free) a bucket whose parameters
/// are all done. Candle has no backward hooks; this is the hook.
///
/// Within a step: for each micro-batch, any number of [`GradSink::add_grad`] /
/// [`GradSink::add_store`] and [`GradSink::unit_done`] calls, then one
/// [`GradSink::end_micro_batch`]. The step's gradient is the mean over the micro-batches.
/// Every rank must make the same `unit_done` and `end_micro_batch` calls in the same order
/// (they may start collectives); which gradients arrive may differ.
pub trait GradSink {
    /// The variables whose gradients the sink takes, in order.
    fn sink_vars(&self) -> Vec<Var>;

    /// Adds `grad`, one backward pass's gradient of variable `index` (of
    /// [`GradSink::sink_vars`]). A variable may get several in one micro-batch (a tied
    /// weight): they are summed.
    fn add_grad(&mut self, index: usize, grad: &Tensor) -> Result<()>;

    /// The parameters whose names start with one of `prefixes` get no more gradient in this
    /// micro-batch (their unit's backward is over).
    fn unit_done(&mut self, prefixes: &[&str]) -> Result<()>;

    /// Ends the current micro-batch: whatever was not yet done is done now.
    fn end_micro_batch(&mut self) -> Result<()>;

    /// The current micro-batch's forward is over and its backward begins (called before its
    /// first `backward()`); `last`: it is the step's last micro-batch, whose gradients a sink
    /// may start reducing over the replicas unit by unit while the backward goes on (DDP
    /// reduces in the last micro-batch only). For sinks that measure or schedule by phase;
    /// does nothing by default.
    fn begin_backward(&mut self, last: bool) -> Result<()> {
        let _ = last;
        Ok(())
    }

    /// Takes every gradient `store` holds for the sink's variables out of it, one at a time
    /// (each is freed once added, unless the caller holds it too).
    fn add_store(&mut self, store: &mut GradStore) -> Result<()> {
        for (i, v) in self.sink_vars().iter().enumerate() {
            if let Some(g) = store.remove(v.as_tensor()) {
                self.add_grad(i, &g)?;
            }
        }
        Ok(())
    }
}

/// A [`GradSink`] that keeps each variable's gradient whole, summed over the micro-batches
/// (as [`GradAccumulator`]); [`GradCollector::take`] gives their mean. What a caller that
/// wants the full gradients (a test, a custom optimizer) gives a unit-wise backward.
#[derive(Debug)]
pub struct GradCollector {
    vars: Vec<Var>,
    /// The sums, a pass per micro-batch.
    acc: GradAccumulator,
}

impl GradCollector {
    pub fn new(vars: &[Var]) -> Self {
        Self {
            vars: vars.to_vec(),
            acc: GradAccumulator {
                sums: vec![None; vars.len()],
                passes: 0,
            },
        }
    }

    /// The mean over the micro-batches of each variable's gradient (`None` where none came);
    /// resets.
    pub fn take(&mut self) -> Result<Vec<Option<Tensor>>> {
        self.acc.take()
    }
}

impl GradSink for GradCollector {
    fn sink_vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    fn add_grad(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        self.acc.sum_into(index, grad)
    }

    fn unit_done(&mut self, _prefixes: &[&str]) -> Result<()> {
        Ok(())
    }

    fn end_micro_batch(&mut self) -> Result<()> {
        self.acc.passes += 1;
        Ok(())
    }
}

/// What a unit-wise backward keeps of the forward (activation checkpointing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Every unit's activations are kept from its forward to its backward.
    #[default]
    None,
    /// Only each unit's input is kept; the unit's forward runs again just before its backward
    /// (Megatron's and PyTorch's full activation checkpointing: one more forward per step,
    /// the activations of one unit at a time). The same gradients, bit for bit.
    Full,
    /// Every unit's activations are kept except the parts that are cheap to compute and heavy
    /// to keep, which their backward recomputes (Megatron's selective recomputation): the
    /// attention's scores and probabilities (`[b, heads, s, s]`), the experts' SwiGLU
    /// activations and the MoE combine's weighted rows (see
    /// [`crate::ops::with_selective_recompute`]). The same gradients, bit for bit.
    Selective,
}

impl std::str::FromStr for Recompute {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "full" => Ok(Self::Full),
            "selective" => Ok(Self::Selective),
            _ => bail!("recompute {s:?}: use none (keep activations), selective (recompute the attention scores, the experts' activations and the MoE combine in the backward) or full (recompute each layer in the backward)"),
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Full => "full",
            Self::Selective => "selective",
        })
    }
}
