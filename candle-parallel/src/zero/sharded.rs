//! [`ShardedModule`]: a module whose parameters are partitioned over the replicas (ZeRO stage
//! 3, PyTorch's FSDP), gathered just before its forward and again in its backward.

use super::{Info, Seg};
use crate::checkpoint::ParallelVarBuilder;
use crate::comm::{lock, Comm, Work};
use crate::data_parallel::BatchGroups;
use crate::mesh::DeviceMesh;
use crate::ops::attach_backward;
use crate::ops::released::Released;
use candle_core::{bail, DType, Device, Module, Result, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

type Build = dyn Fn(ParallelVarBuilder) -> Result<Box<dyn Module>> + Send + Sync;

/// The parameters of one synchronisation group of a module: packed flat, padded to a multiple
/// of the group size; this rank holds partition `rank`.
#[derive(Debug)]
pub(crate) struct Group {
    /// The batch dimensions the group is partitioned (and its gradients summed) over.
    pub dims: Vec<crate::mesh::MeshDim>,
    pub comm: Option<Comm>,
    pub segs: Vec<Seg>,
    pub padded: usize,
    pub part: usize,
    pub rank: usize,
    /// Where this group's partition starts in the module's shard variable.
    pub var_offset: usize,
}

struct Inner {
    name: String,
    /// The builder the module was first built from (for its prefix).
    prefix: ParallelVarBuilder,
    build: Box<Build>,
    infos: Vec<Info>,
    groups: Vec<Group>,
    /// This rank's partitions of every group, one after the other.
    /// This rank's partitions of every group, one after the other, in f32 whatever the module
    /// computes in: for 16-bit modules it is the master copy (mixed precision).
    shard: Var,
    /// The dtype the module computes in (its parameters are gathered in it).
    dtype: DType,
    device: Device,
    /// FSDP2's `reshard_after_forward`: free the gathered parameters after the forward
    /// (gather again in the backward), or keep them until the backward.
    reshard_after_forward: AtomicBool,
    /// Activation checkpointing at the module's boundary: keep only the input and run the
    /// forward again in the backward.
    recompute: AtomicBool,
    /// Whether [`Inner::warn_held`] has spoken.
    warned_held: AtomicBool,
    /// The dtype gradients are reduce-scattered in (the optimizer's `reduce_dtype`).
    reduce_dtype: Mutex<DType>,
    /// Gathers started ahead of use (FSDP2's prefetch), one per group, on the groups' lanes.
    prefetched: Mutex<Option<Vec<Work<Tensor>>>>,
    /// The modules whose gathers start as this one's forward starts, and as its (resharded)
    /// backward starts.
    forward_prefetch: Mutex<Vec<Weak<Inner>>>,
    backward_prefetch: Mutex<Vec<Weak<Inner>>>,
}

/// What a module's forward keeps for its backward.
enum Saved {
    /// The output with its graph, the input as a variable (float inputs), the id of each
    /// parameter's variable (its gradient's key in the backward's store), and the scope the
    /// parameters were released through (resharded after the forward: the graph does not
    /// hold them and the backward gathers them again).
    Graph {
        y: Tensor,
        xv: Option<Var>,
        ids: Vec<TensorId>,
        released: Option<Arc<Released>>,
    },
    /// The input only (recomputation), and the gathered parameters where they were not
    /// resharded.
    Recompute(Option<Vec<Tensor>>),
}

/// A module whose parameters each replica holds only a partition of (ZeRO stage 3,
/// FSDP-style): its parameters are all-gathered just before its forward, used, and freed
/// (the forward's activations stay, its parameters do not: see
/// [`ShardedModule::set_reshard_after_forward`]); in the backward pass they are gathered
/// again and the parameters' gradients are reduce-scattered to the partitions as they are
/// produced. With [`ShardedModule::set_recompute`] only the module's input stays between
/// forward and backward, and the backward runs the forward again.
///
/// Parameters are partitioned over the batch dimensions they are replicated along (see
/// [`BatchGroups`]), so an expert is partitioned over dp and a shared weight over dp × ep.
/// The gradient of [`ShardedModule::shard`] is the partitions' gradient summed over the
/// replicas; [`super::ZeroOptimizer::new_sharded`] turns it into the mean and steps.
///
/// The module is rebuilt from its gathered parameters by the `build` closure, which must
/// compute the same function every time (no randomness).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_parallel::checkpoint::{ParallelVarBuilder, Placement};
/// use candle_parallel::data_parallel::BatchGroups;
/// use candle_parallel::mesh::MeshDim;
/// use candle_parallel::zero::ShardedModule;
/// use candle_parallel::{Launcher, MeshShape};
///
/// let out = Launcher::new(2).mesh(MeshShape::new().dp(2)).run(|ctx| {
///     let mesh = ctx.mesh()?;
///     let batch = BatchGroups::new(&mesh, &[MeshDim::Dp])?;
///     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
///     let fc = ShardedModule::new("fc", &vb.pp("fc"), &batch, &mesh, |vb| {
///         let init = candle_nn::Init::Const(0.5);
///         let w = vb.get((4, 6), "weight", Placement::Replicated, init)?;
///         let b = vb.get(4, "bias", Placement::Replicated, init)?;
///         // `ops::linear` lets the gathered weight be freed after the forward.
///         Ok(candle_nn::func(move |x| {
///             candle_parallel::ops::linear(x, &w)?.broadcast_add(&b)
///         }))
///     })?;
///     let x = Tensor::ones((3, 6), DType::F32, &Device::Cpu)?;
///     let y = fc.forward(&x)?;
///     let grads = y.sum_all()?.backward()?;
///     // Each rank holds and gets the gradient of half of the 28 parameters.
///     Ok((fc.shard().elem_count(), grads.get(fc.shard().as_tensor()).unwrap().dims().to_vec()))
/// })?;
/// assert_eq!(out[0], (14, vec![14]));
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone)]
pub struct ShardedModule {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ShardedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedModule")
            .field("name", &self.inner.name)
            .field("params", &self.inner.infos.len())
            .field("shard", &self.inner.shard.dims())
            .finish()
    }
}

impl ShardedModule {
    /// Learns the module's parameters by building it once with `build` over a shapes-only
    /// view of `vb` (nothing read, nothing allocated: `vb` must be trainable so that the
    /// parameters are known), then reads from `vb` only what this rank's partition holds:
    /// one parameter at a time, those that overlap the partition, each cut to the
    /// overlap. No rank materialises the module (nor the model) on the way. Collective over
    /// the world (the replicas must build the same parameters).
    pub fn new<M: Module + 'static>(
        name: &str,
        vb: &ParallelVarBuilder,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        build: impl Fn(ParallelVarBuilder) -> Result<M> + Send + Sync + 'static,
    ) -> Result<Self> {
        if !vb.is_trainable() {
            bail!("ShardedModule {name}: the builder must be trainable (ParallelVarBuilder::trainable) so that the module's parameters are known")
        }
        drop(vb.take_new_metas());
        drop(build(vb.shapes_only())?);
        let params = vb.take_new_metas();
        if params.is_empty() {
            bail!("ShardedModule {name}: building the module created no parameters")
        }
        let dtype = params[0].dtype;
        if let Some(p) = params.iter().find(|p| p.dtype != dtype) {
            bail!(
                "ShardedModule {name}: parameter {} is {:?}, the others {dtype:?}: a sharded module holds one dtype",
                p.name,
                p.dtype
            )
        }
        let device = vb.device().clone();
        let infos: Vec<Info> = params.iter().map(|p| Info::of_meta(p, mesh)).collect();
        let mut groups = Vec::new();
        let mut pieces = Vec::new();
        let mut var_offset = 0;
        for g in batch.groups_of(&params)? {
            let (dims, comm, members, n, rank) = (&g.dims, &g.comm, &g.members, g.size, g.rank);
            let mut segs = Vec::with_capacity(members.len());
            let mut offset = 0;
            for &j in members {
                let len = params[j].dims.iter().product();
                segs.push(Seg {
                    info: j,
                    offset,
                    len,
                });
                offset += len;
            }
            let padded = offset.div_ceil(n) * n;
            let part = padded / n;
            // This rank's partition: each parameter's overlap with it, read on its own, then
            // the padding's zeros.
            let (lo, hi) = (rank * part, (rank + 1) * part);
            let mut flat = Vec::new();
            for (s, a, b) in super::overlaps(&segs, lo, part) {
                flat.push(
                    vb.read_flat(&params[s.info], a - s.offset, b - a)?
                        .to_dtype(DType::F32)?,
                );
            }
            let filled = offset.clamp(lo, hi) - lo;
            if filled < part {
                flat.push(Tensor::zeros(part - filled, DType::F32, &device)?);
            }
            pieces.push(match flat.is_empty() {
                // A group of empty parameters: an empty partition.
                true => Tensor::zeros(0, DType::F32, &device)?,
                false => Tensor::cat(&flat, 0)?,
            });
            groups.push(Group {
                dims: dims.clone(),
                comm: comm.clone(),
                segs,
                padded,
                part,
                rank,
                var_offset,
            });
            var_offset += part;
        }
        let shard = Var::from_tensor(&Tensor::cat(&pieces, 0)?)?;
        let build: Box<Build> = Box::new(move |vb| Ok(Box::new(build(vb)?) as Box<dyn Module>));
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                prefix: ParallelVarBuilder::from_local_tensors(HashMap::new(), dtype, &device)
                    .with_prefix_of(vb),
                build,
                infos,
                groups,
                shard,
                dtype,
                device,
                reshard_after_forward: AtomicBool::new(true),
                recompute: AtomicBool::new(false),
                warned_held: AtomicBool::new(false),
                reduce_dtype: Mutex::new(DType::F32),
                prefetched: Mutex::new(None),
                forward_prefetch: Mutex::new(Vec::new()),
                backward_prefetch: Mutex::new(Vec::new()),
            }),
        })
    }

    /// FSDP2's `reshard_after_forward`. `true` (the default): the gathered parameters are
    /// freed after the forward and gathered again for the backward; the forward's graph keeps
    /// its activations but not the parameters (the ops that consume them look them up again
    /// in the backward). `false`: the gathered parameters stay from the forward to the
    /// backward: one gather per step instead of two, for the memory of the module's
    /// parameters in between. The same gradients either way.
    pub fn set_reshard_after_forward(&self, reshard: bool) {
        self.inner
            .reshard_after_forward
            .store(reshard, Ordering::Relaxed);
    }

    /// Activation checkpointing of the whole module (`false` by default): the forward keeps
    /// only its input, and the backward runs the forward again before its own (on the
    /// parameters gathered again, or kept where they were not resharded). The same gradients
    /// either way.
    pub fn set_recompute(&self, recompute: bool) {
        self.inner.recompute.store(recompute, Ordering::Relaxed);
    }

    /// The forward for evaluation: the parameters gathered, used and freed, and nothing kept
    /// for a backward (the output does not track gradients; the module runs its inference
    /// paths).
    pub fn forward_untracked(&self, x: &Tensor) -> Result<Tensor> {
        let inner = &self.inner;
        let gathered = inner.gathered(&inner.shard.as_tensor().detach())?;
        let module = (inner.build)(inner.builder(gathered))?;
        Inner::prefetch(&inner.forward_prefetch)?;
        module.forward(&x.detach())
    }

    /// FSDP2's explicit forward prefetch: as this module's forward starts (its own parameters
    /// gathered), the gathers of `modules` start on their groups' communication lanes, so
    /// that they arrive while this module computes; at most this module's and theirs are
    /// gathered at once. Usually the next module in forward order; `&[]` turns it off. Every
    /// rank must set the same.
    pub fn set_modules_to_forward_prefetch(&self, modules: &[&ShardedModule]) {
        *lock(&self.inner.forward_prefetch) =
            modules.iter().map(|m| Arc::downgrade(&m.inner)).collect();
    }

    /// FSDP2's explicit backward prefetch: as this module's backward gathers its parameters
    /// again (resharded after the forward), the gathers of `modules` start too. Usually the
    /// previous module in forward order (the next one the backward reaches).
    pub fn set_modules_to_backward_prefetch(&self, modules: &[&ShardedModule]) {
        *lock(&self.inner.backward_prefetch) =
            modules.iter().map(|m| Arc::downgrade(&m.inner)).collect();
    }

    /// Waits for and drops a gather started ahead and not used (the parameters are about to
    /// change: the optimizer calls this before its step).
    pub fn discard_prefetched(&self) {
        if let Some(works) = lock(&self.inner.prefetched).take() {
            for w in works {
                // The peers run it too; its value is stale either way.
                let _ = w.wait();
            }
        }
    }

    /// The dtype the gradients cross the replicas in (set by the optimizer from its
    /// `ZeroConfig::reduce_dtype`); they are packed and kept in f32.
    pub fn set_reduce_dtype(&self, dtype: DType) {
        *self
            .inner
            .reduce_dtype
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = dtype;
    }

    /// This rank's partitions of the module's parameters (flat, f32): the variable the
    /// optimizer updates.
    pub fn shard(&self) -> &Var {
        &self.inner.shard
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn infos(&self) -> &[Info] {
        &self.inner.infos
    }

    pub(crate) fn groups(&self) -> &[Group] {
        &self.inner.groups
    }

    /// Every parameter's tp/ep slice, gathered over the replicas (in the order of the infos).
    /// Collective over the replicas.
    pub(crate) fn gathered(&self) -> Result<Vec<Tensor>> {
        self.inner.gathered(&self.inner.shard.as_tensor().detach())
    }
}

impl Inner {
    /// This rank's partition of group `g`, in the compute dtype (half the bytes for bf16).
    fn part_of(&self, shard: &Tensor, g: &Group) -> Result<Tensor> {
        shard
            .narrow(0, g.var_offset, g.part)?
            .to_dtype(self.dtype)?
            .contiguous()
    }

    /// Starts gathering the parameters on the groups' lanes, unless already started.
    fn start_gather(&self) -> Result<()> {
        let mut slot = lock(&self.prefetched);
        if slot.is_some() {
            return Ok(());
        }
        let shard = self.shard.as_tensor().detach();
        let mut works = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let part = self.part_of(&shard, g)?;
            works.push(match &g.comm {
                Some(c) => c.all_gather_async(&part, 0),
                None => Work::done(Ok(part)),
            });
        }
        *slot = Some(works);
        Ok(())
    }

    /// Starts the gathers of the modules in `list` (theirs to use next).
    fn prefetch(list: &Mutex<Vec<Weak<Inner>>>) -> Result<()> {
        let next: Vec<Arc<Inner>> = lock(list).iter().filter_map(Weak::upgrade).collect();
        for m in next {
            m.start_gather()?;
        }
        Ok(())
    }

    fn gathered(&self, shard: &Tensor) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = vec![None; self.infos.len()];
        let mut ahead = lock(&self.prefetched).take().map(Vec::into_iter);
        for g in &self.groups {
            let full = match ahead.as_mut().and_then(Iterator::next) {
                Some(work) => work.wait()?,
                None => {
                    let part = self.part_of(shard, g)?;
                    match &g.comm {
                        Some(c) => c.all_gather(&part, 0)?,
                        None => part,
                    }
                }
            };
            for s in &g.segs {
                let t = full.narrow(0, s.offset, s.len)?;
                out[s.info] = Some(t.reshape(self.infos[s.info].dims.as_slice())?);
            }
        }
        Ok(out
            .into_iter()
            .map(|t| t.expect("every parameter in a group"))
            .collect())
    }

    /// A builder over the gathered parameters (in the order of the infos).
    fn builder(&self, gathered: Vec<Tensor>) -> ParallelVarBuilder {
        let map: HashMap<String, Tensor> = self
            .infos
            .iter()
            .map(|i| i.name.clone())
            .zip(gathered)
            .collect();
        ParallelVarBuilder::from_local_tensors(map, self.dtype, &self.device)
            .with_prefix_of(&self.prefix)
    }

    /// The forward over variables copied from the gathered parameters (the builder, and with
    /// it the gathered buffers, is dropped once the module holds its copies), with its graph.
    /// `release`: the copies are released (see `ops::released`) and freed with the module.
    fn forward_graph(
        &self,
        x: &Tensor,
        gathered: Vec<Tensor>,
        release: bool,
        prefetch: Option<&Mutex<Vec<Weak<Inner>>>>,
    ) -> Result<Saved> {
        let (module, vars) = {
            let vb = self.builder(gathered).trainable();
            let module = (self.build)(vb.clone())?;
            let mut vars: HashMap<String, Var> =
                vb.params().into_iter().map(|p| (p.name, p.var)).collect();
            let vars = self
                .infos
                .iter()
                .map(|i| match vars.remove(&i.name) {
                    Some(v) => Ok(v),
                    None => bail!(
                        "ShardedModule {}: rebuilding the module did not create parameter {}: the build must create the same parameters every time",
                        self.name,
                        i.name
                    ),
                })
                .collect::<Result<Vec<Var>>>()?;
            (module, vars)
        };
        if let Some(list) = prefetch {
            Self::prefetch(list)?;
        }
        let ids = vars.iter().map(|v| v.as_tensor().id()).collect();
        let released = match release {
            true => {
                let refs: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
                Some(Released::new(&self.name, &refs, &self.device)?)
            }
            false => None,
        };
        let x = x.detach();
        let xv = match x.dtype() {
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 => Some(Var::from_tensor(&x)?),
            _ => None, // token ids
        };
        let input = xv.as_ref().map_or(&x, |v| v.as_tensor());
        let y = match &released {
            Some(r) => r.scope(|| module.forward(input))?,
            None => module.forward(input)?,
        };
        // The module's copies of released parameters go here (the graph holds the others).
        drop((module, vars));

        Ok(Saved::Graph {
            y,
            xv,
            ids,
            released,
        })
    }

    /// Says once which parameter matrices a released forward's graph held anyway (the
    /// backward found them in the graph: an op that does not look parameters up in
    /// `ops::released` consumed them, while `ops::linear`, the vocab-parallel embedding and
    /// `ops::checkpoint` do). (Vectors, such as norm weights, are held by design: they are
    /// small.)
    fn warn_held(&self, held: &[usize]) {
        if held.is_empty() || self.warned_held.swap(true, Ordering::Relaxed) {
            return;
        }
        let names: Vec<String> = held
            .iter()
            .map(|&i| format!("{} {:?}", self.infos[i].name, self.infos[i].dims))
            .collect();
        tracing::warn!(
            "ShardedModule {}: {} parameter matrices stayed gathered from the forward to the backward ({}): the ops that consume them hold them in the graph; use candle_parallel::ops::linear (or the tensor-parallel layers) to let them be freed after the forward",
            self.name,
            names.len(),
            names.join(", ")
        );
    }

    /// The backward from what the forward kept: the parameters gathered again where they
    /// were released or are recomputed from (or the kept ones), the forward run again where
    /// it was not kept, the output's gradient through its graph, and the parameters'
    /// gradients reduce-scattered to this rank's partitions.
    fn backward(
        &self,
        saved: Option<Saved>,
        x: &Tensor,
        shard: &Tensor,
        g: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        // A second backward (the first took what was kept) recomputes on parameters gathered
        // again.
        let saved = match saved.unwrap_or(Saved::Recompute(None)) {
            Saved::Recompute(kept) => {
                let regathered = kept.is_none();
                let gathered = match kept {
                    Some(k) => k,
                    None => self.gathered(shard)?,
                };
                let prefetch = regathered.then_some(&self.backward_prefetch);
                self.forward_graph(x, gathered, false, prefetch)?
            }
            graph => graph,
        };
        let Saved::Graph {
            y,
            xv,
            ids,
            released,
        } = saved
        else {
            bail!(
                "ShardedModule {}: the forward was not recomputed",
                self.name
            )
        };
        if let Some(r) = &released {
            r.set_weights(Some(self.gathered(shard)?));
            Self::prefetch(&self.backward_prefetch)?;
        }
        // The module's weights (copies, or released) do not outlive this backward: none of
        // their gradients can wait for a split schedule's weight step.
        let store = crate::ops::without_deferral(|| crate::ops::backward(&(&y * g)?.sum_all()?));
        if let Some(r) = &released {
            // The gathered parameters go as soon as the graph is through (errors included).
            r.set_weights(None);
        }
        let mut store = store?;
        drop(y); // the output's graph holds the kept parameters' copies
        let dx = xv.and_then(|v| store.remove(v.as_tensor()));
        // The gradients out of the store (and the released parameters' scope), in the order
        // of the infos; then the store goes.
        let mut grads: Vec<Option<Tensor>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let graph = store.get_id(*id).cloned();
                let scope = released.as_ref().and_then(|r| r.take_grad(i));
                Ok(match (graph, scope) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                })
            })
            .collect::<Result<_>>()?;
        if released.is_some() {
            // A released matrix the graph reached was held by it since the forward.
            let held: Vec<usize> = (0..ids.len())
                .filter(|&i| self.infos[i].dims.len() >= 2 && store.get_id(ids[i]).is_some())
                .collect();
            self.warn_held(&held);
        }
        drop(store);
        let mut parts = Vec::with_capacity(self.groups.len());
        for grp in &self.groups {
            let flat = Tensor::zeros(grp.padded, DType::F32, &self.device)?;
            for s in &grp.segs {
                // Each gradient is freed as it is packed.
                if let Some(g) = grads[s.info].take() {
                    flat.slice_set(
                        &g.flatten_all()?.to_dtype(DType::F32)?.contiguous()?,
                        0,
                        s.offset,
                    )?;
                }
            }
            let dtype = *self.reduce_dtype.lock().unwrap_or_else(|e| e.into_inner());
            parts.push(match &grp.comm {
                Some(c) => super::reduce_scatter_in(c, &flat, dtype)?,
                None => flat,
            });
        }
        // f32, as the shard: the gradients are reduced and kept in f32.
        let dshard = Tensor::cat(&parts, 0)?;
        Ok(vec![dx, Some(dshard)])
    }
}

impl Module for ShardedModule {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inner = &self.inner;
        let shard = inner.shard.as_tensor();
        let reshard = inner.reshard_after_forward.load(Ordering::Relaxed);
        let gathered = inner.gathered(&shard.detach())?;
        let (y, saved) = if inner.recompute.load(Ordering::Relaxed) {
            let kept = (!reshard).then(|| gathered.clone());
            let y = {
                let module = (inner.build)(inner.builder(gathered))?;
                Inner::prefetch(&inner.forward_prefetch)?;
                // The forward the backward will recompute: on the training path, whose
                // roundings the recomputation reproduces (the inference path's differ at tp > 1).
                crate::ops::with_training_paths(true, || module.forward(&x.detach()))?
            }; // the gathered parameters are freed here (unless kept)
            (y, Saved::Recompute(kept))
        } else {
            let saved = inner.forward_graph(x, gathered, reshard, Some(&inner.forward_prefetch))?;
            let Saved::Graph { y, .. } = &saved else {
                bail!("ShardedModule {}: the forward kept no graph", inner.name)
            };
            (y.detach(), saved)
        };
        let me = self.inner.clone();
        // Taken by the first backward; a second one recomputes.
        let saved = Mutex::new(Some(saved));
        attach_backward("zero3_module", &y, &[x, shard], move |ins, _, g| {
            let s = saved.lock().unwrap_or_else(|e| e.into_inner()).take();
            me.backward(s, ins[0], ins[1], g)
        })
    }
}

/// A sharded module as a part of a model to write: its parameters gathered over the replicas
/// only when its turn comes.
impl crate::checkpoint::ModelPart for ShardedModule {
    fn describe(&self) -> Vec<(String, DType, Vec<usize>, Vec<crate::mesh::MeshDim>)> {
        self.inner
            .infos
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    i.dtype,
                    i.full_dims.clone(),
                    i.local_to.clone(),
                )
            })
            .collect()
    }

    fn materialise(
        &self,
    ) -> Result<Vec<(crate::checkpoint::ShardedTensor, Vec<crate::mesh::MeshDim>)>> {
        Ok(self
            .inner
            .infos
            .iter()
            .zip(self.gathered()?)
            .map(|(info, t)| {
                let st = crate::checkpoint::ShardedTensor {
                    name: info.name.clone(),
                    local: t,
                    full_dims: info.full_dims.clone(),
                    placement: info.placement,
                    region: None,
                };
                (st, info.local_to.clone())
            })
            .collect())
    }
}
