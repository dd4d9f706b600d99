//! [`attach_backward`]: a value computed by a fast kernel outside the graph, joined to the graph
//! with a backward you supply. The trainable softmax, RMSNorm and rotary embedding are built on
//! it, and so is the MoE layer's link that keeps empty branches on the gradient path.

use super::OnceValue;
use candle_core::Tensor;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape};

/// The backward of [`attach_backward`]: given the inputs, the forward value and the output
/// gradient, one gradient (or `None`) per input.
type Vjp = dyn Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// `value`, with a backward into `inputs` (one or two tensors): forward is a copy of `value`;
/// backward calls `vjp(inputs, value, grad)`. Use it to give a backward to a fast kernel
/// (computed on detached inputs) or to make a tensor depend on others. When no input takes
/// part in a graph, `value` is returned as is.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::ops::attach_backward;
///
/// let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
/// let fast = x.as_tensor().detach().sqr()?; // e.g. a kernel without a backward
/// let y = attach_backward("square", &fast, &[x.as_tensor()], |ins, _y, g| {
///     Ok(vec![Some((g * (ins[0] * 2.0)?)?)])
/// })?;
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, [2.0, 4.0, 6.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn attach_backward(
    name: &'static str,
    value: &Tensor,
    inputs: &[&Tensor],
    vjp: impl Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(1..=2).contains(&inputs.len()) {
        bail!(
            "attach_backward({name}): takes one or two inputs, got {}",
            inputs.len()
        )
    }
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(value.clone());
    }
    if let Some(t) = inputs
        .iter()
        .find(|t| !t.device().same_device(value.device()))
    {
        bail!(
            "attach_backward({name}): the value is on {:?} but an input is on {:?}: compute it on the inputs' device",
            value.device().location(),
            t.device().location()
        )
    }
    // The value is a constant of the graph: only the inputs receive gradients. The op takes
    // it in its forward instead of as an argument, which the graph would keep alive beside
    // the output until the backward.
    let op = Attached {
        name,
        inputs: inputs.len(),
        value: OnceValue::new(name, value.detach()),
        vjp: Box::new(vjp),
    };
    match *inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        _ => bail!("attach_backward({name}): takes one or two inputs"),
    }
}

/// The custom op behind [`attach_backward`], on one input (`CustomOp1`) or two (`CustomOp2`).
struct Attached {
    name: &'static str,
    /// How many inputs (1 or 2).
    inputs: usize,
    /// The value, taken by the forward.
    value: OnceValue,
    vjp: Box<Vjp>,
}

impl Attached {
    /// The inputs' gradients from the vjp (detached inputs: what the backward computes is a
    /// value, not a graph, which would keep every intermediate of the backward, and the
    /// inputs' variables, alive for as long as the gradient lives).
    fn grads(&self, inputs: &[&Tensor], res: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        let refs: Vec<&Tensor> = detached.iter().collect();
        let got: Vec<Option<Tensor>> = (self.vjp)(&refs, res, g)?
            .into_iter()
            .map(|t| t.map(|t| t.detach()))
            .collect();
        if got.len() != self.inputs {
            bail!(
                "attach_backward({}): the backward returned {} gradients for {} inputs",
                self.name,
                got.len(),
                self.inputs
            )
        }
        Ok(got)
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.copy_cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.copy_cuda()
    }

    fn bwd(&self, a: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[a], res, g)?.pop().flatten())
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.copy_cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.copy_cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut got = self.grads(&[a, b], res, g)?;
        let gb = got.pop().flatten();
        Ok((got.pop().flatten(), gb))
    }
}

/// `t`, made to depend (with value zero) on `deps`: backward passes the gradient to `t` and
/// zeros to each dependency. A rank whose branch is empty must still run the same collectives
/// in backward as its peers; this keeps the branch's inputs on the gradient path (candle's
/// ordinary ops return an empty tensor untracked).
pub fn depend_on(t: &Tensor, deps: &[&Tensor]) -> Result<Tensor> {
    let mut out = t.clone();
    for d in deps {
        out = attach_backward("depend", &out.detach(), &[&out, d], |ins, _, g| {
            Ok(vec![Some(g.clone()), Some(ins[1].zeros_like()?)])
        })?;
    }
    Ok(out)
}
