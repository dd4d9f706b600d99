//! Data parallelism: every rank of the dp group a replica that sees its own part of each
//! global batch; gradients averaged over the group in buckets.
//!
//! - [`shard_batch`]: this rank's rows of a global batch (the same split for any dp, given the
//!   same global batch).
//! - [`GradBuckets`]: the parameters' gradients packed into flat buckets (default 25 MiB, as
//!   PyTorch's DDP) in one fixed order on every rank, each averaged with one all-reduce, then
//!   unpacked. The layout is agreed across the group once, when the buckets are made.
//! - [`GradAccumulator`]: gradients summed over several backward passes (micro-batches)
//!   before the one synchronisation.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use candle_parallel::checkpoint::{Param, Placement};
//! use candle_parallel::data_parallel::{shard_batch, GradBuckets};
//! use candle_parallel::launch;
//!
//! let grads = launch(2, |ctx| {
//!     let w = Var::new(&[1f32, 1.0], &Device::Cpu)?;
//!     let params = [Param { name: "w".into(), var: w.clone(), full_dims: vec![2], placement: Placement::Replicated }];
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
use candle_core::{bail, DType, Result, Tensor};

/// This rank's rows of `global` (dim 0 split into `dp.size()` equal consecutive parts, in rank
/// order): an error naming the sizes when they do not divide.
pub fn shard_batch(global: &Tensor, dp: &Comm) -> Result<Tensor> {
    let rows = global.dim(0)?;
    let n = dp.size();
    if !rows.is_multiple_of(n) {
        bail!(
            "a global batch of {rows} rows does not split over the {n} data-parallel ranks of {}: use a batch size divisible by {n}",
            dp.label()
        )
    }
    let per = rows / n;
    global.narrow(0, dp.rank() * per, per)
}

/// One bucket: parameters (by index) packed one after the other.
#[derive(Clone, Debug)]
struct Bucket {
    members: Vec<usize>,
    elems: usize,
}

/// The parameters' gradients in flat buckets, averaged over the data-parallel group.
#[derive(Debug)]
pub struct GradBuckets {
    dp: Comm,
    buckets: Vec<Bucket>,
    shapes: Vec<Vec<usize>>,
}

impl GradBuckets {
    /// Buckets of at most `bucket_bytes` (a parameter larger than that gets a bucket of its
    /// own) over `params`, filled from the last parameter to the first (the order in which a
    /// backward pass produces gradients, as DDP). Collective over `dp`: the ranks must hold the
    /// same parameters in the same order, or every rank gets an error naming the first
    /// difference.
    pub fn new(params: &[Param], dp: &Comm, bucket_bytes: usize) -> Result<Self> {
        let layout: Vec<String> = params
            .iter()
            .map(|p| format!("{} {:?}", p.name, p.var.dims()))
            .collect();
        let mine = layout.join("\n");
        let all = dp.all_gather_bytes(mine.as_bytes())?;
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
                    dp.label(),
                    dp.ranks()[dp.rank()],
                    layout.len(),
                    dp.ranks()[r],
                    other.lines().count(),
                    layout.get(at),
                    other.lines().nth(at)
                )
            }
        }
        // Reduced in f32: 4 bytes an element.
        let limit = (bucket_bytes / 4).max(1);
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut current = Bucket {
            members: Vec::new(),
            elems: 0,
        };
        for (i, p) in params.iter().enumerate().rev() {
            let n = p.var.elem_count();
            if current.elems > 0 && current.elems + n > limit {
                buckets.push(std::mem::replace(
                    &mut current,
                    Bucket {
                        members: Vec::new(),
                        elems: 0,
                    },
                ));
            }
            current.members.push(i);
            current.elems += n;
        }
        if !current.members.is_empty() {
            buckets.push(current);
        }
        Ok(Self {
            dp: dp.clone(),
            buckets,
            shapes: params.iter().map(|p| p.var.dims().to_vec()).collect(),
        })
    }

    /// How many buckets, and how many elements each holds.
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.elems).collect()
    }

    /// Averages `grads` (in the order of the parameters; `None` counts as zeros and gets the
    /// average) over the dp group, bucket by bucket, in place of the given tensors. Reduced in
    /// f32 whatever the gradients' dtype.
    pub fn all_reduce(&self, grads: &mut [Option<Tensor>]) -> Result<()> {
        if grads.len() != self.shapes.len() {
            bail!(
                "GradBuckets::all_reduce: {} gradients for {} parameters",
                grads.len(),
                self.shapes.len()
            )
        }
        if self.dp.size() == 1 {
            return Ok(());
        }
        let device = self.dp.device().clone();
        for bucket in &self.buckets {
            let mut dtypes = Vec::with_capacity(bucket.members.len());
            let flat: Vec<Tensor> = bucket
                .members
                .iter()
                .map(|&i| match &grads[i] {
                    Some(g) => {
                        if g.dims() != self.shapes[i].as_slice() {
                            bail!(
                                "GradBuckets::all_reduce: the gradient of parameter #{i} has shape {:?}, the parameter {:?}",
                                g.dims(),
                                self.shapes[i]
                            )
                        }
                        dtypes.push(Some(g.dtype()));
                        g.flatten_all()?.to_dtype(DType::F32)
                    }
                    None => {
                        dtypes.push(None);
                        Tensor::zeros(self.shapes[i].iter().product::<usize>(), DType::F32, &device)
                    }
                })
                .collect::<Result<_>>()?;
            let packed = Tensor::cat(&flat, 0)?;
            let mean = self.dp.all_reduce(&packed, ReduceOp::Avg)?;
            let mut offset = 0;
            for (&i, dtype) in bucket.members.iter().zip(dtypes) {
                let n: usize = self.shapes[i].iter().product();
                let g = mean
                    .narrow(0, offset, n)?
                    .reshape(self.shapes[i].as_slice())?
                    .to_dtype(dtype.unwrap_or(DType::F32))?;
                grads[i] = Some(g);
                offset += n;
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
        for (acc, g) in self.sums.iter_mut().zip(grads) {
            if let Some(g) = g {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        self.passes += 1;
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
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|g| g.map(|g| g / n).transpose())
            .collect()
    }
}
