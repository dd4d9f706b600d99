//! [`linear`]: `x · wᵀ` as candle-nn's `Linear` computes it, with a backward that produces the
//! weight's gradient directly in the weight's layout. Candle's composite (`x.matmul(&w.t())`)
//! records a transpose: its weight gradient arrives transposed and is accumulated with a
//! strided add, a third slower than a contiguous one on the expert and projection shapes.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x · wᵀ` for `x` of shape `[..., in]` and `w` of shape `[out, in]`: `[..., out]`, with a
/// backward (`dx = g · w`, `dw = gᵀ · x`).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_parallel::ops;
///
/// let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Var::new(&[[1f32, 0.0], [0.0, 3.0], [1.0, 1.0]], &Device::Cpu)?;
/// let y = ops::linear(&x, w.as_tensor())?;
/// assert_eq!(y.to_vec2::<f32>()?, [[1.0, 6.0, 3.0]]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(w.as_tensor()).unwrap().to_vec2::<f32>()?, [[1.0, 2.0]; 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, k) = w.dims2()?;
    if x.rank() == 0 || x.dim(candle_core::D::Minus1)? != k {
        bail!(
            "linear: input of shape {:?} for a weight of shape {:?}: the input's last dim must be {k}",
            x.dims(),
            w.dims()
        )
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// The custom op behind [`linear`].
struct Linear;

/// `x · wᵀ` on any backend's storage: `x` contiguous `[m, k]` (any leading dims flattened),
/// `w` `[n, k]` read transposed by the matmul itself.
fn forward<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    if !xl.is_contiguous() {
        bail!("linear: the input must be contiguous")
    }
    let m = xl.shape().elem_count() / k.max(1);
    let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let wt = wl.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, n, k), &x2, &wt)?;
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((y, Shape::from(dims)))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let g2 = g.detach().reshape((m, n))?;
        let dx = g2.matmul(&w.detach())?.reshape(x.dims())?;
        let dw = g2.t()?.matmul(&x.detach().reshape((m, k))?)?;
        Ok((Some(dx), Some(dw)))
    }
}
