//! Trainable ops: analytic gradients against central finite differences (f64), forwards
//! against candle-nn's composite references.
use candle_core::{DType, Result, Tensor, Var};
use candle_parallel::ops;
use candle_parallel_models::testing::{max_rel_err, seeded};

/// d(sum(f(inputs) · c))/d(inputs[k]) by central differences, for every element.
fn numeric_grad(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    k: usize,
    c: &Tensor,
) -> Result<Tensor> {
    let h = 1e-6;
    let base = inputs[k].flatten_all()?.to_vec1::<f64>()?;
    let mut g = vec![0f64; base.len()];
    for (i, gi) in g.iter_mut().enumerate() {
        let eval = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            let mut xs = inputs.to_vec();
            xs[k] = Tensor::from_vec(v, inputs[k].dims(), inputs[k].device())?;
            (f(&xs)? * c)?.sum_all()?.to_scalar::<f64>()
        };
        *gi = (eval(h)? - eval(-h)?) / (2.0 * h);
    }
    Tensor::from_vec(g, inputs[k].dims(), inputs[k].device())
}

/// Checks every input's analytic gradient against finite differences.
fn check(name: &str, f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Result<()> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let c = seeded(y.dims(), 99, DType::F64)?;
    let grads = (&y * &c)?.sum_all()?.backward()?;
    for (k, v) in vars.iter().enumerate() {
        let analytic = grads.get(v.as_tensor()).expect("gradient").clone();
        let numeric = numeric_grad(f, inputs, k, &c)?;
        let e = max_rel_err(&analytic, &numeric)?;
        assert!(e < 1e-6, "{name}: input {k} gradient off by {e:e}");
    }
    Ok(())
}

fn f64s(dims: &[usize], seed: u64) -> Result<Tensor> {
    seeded(dims, seed, DType::F64)
}

fn rope_tables(t: usize, d: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), &candle_core::Device::Cpu)?;
    let pos = Tensor::arange(0u32, t as u32, &candle_core::Device::Cpu)?.to_dtype(DType::F32)?;
    let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

#[test]
fn softmax_gradient_matches_finite_differences() -> Result<()> {
    check(
        "softmax",
        &|x| ops::softmax_last_dim(&x[0]),
        &[f64s(&[2, 3, 5], 1)?],
    )
}

#[test]
fn rms_norm_gradients_match_finite_differences() -> Result<()> {
    let x = f64s(&[2, 3, 6], 2)?;
    let w = (f64s(&[6], 3)? + 1.5)?;
    check("rms_norm", &|t| ops::rms_norm(&t[0], &t[1], 1e-5), &[x, w])
}

#[test]
fn rope_gradient_matches_finite_differences() -> Result<()> {
    let (cos, sin) = rope_tables(4, 6, DType::F64)?;
    check(
        "rope",
        &|x| ops::rope(&x[0], &cos, &sin),
        &[f64s(&[1, 2, 4, 6], 4)?],
    )
}

#[test]
fn swiglu_gradients_match_finite_differences() -> Result<()> {
    check(
        "swiglu",
        &|t| ops::swiglu(&t[0], &t[1]),
        &[f64s(&[3, 4], 5)?, f64s(&[3, 4], 6)?],
    )
}

#[test]
fn forwards_equal_candle_nn_references_in_f32() -> Result<()> {
    let x = seeded(&[2, 3, 4, 8], 7, DType::F32)?;
    let w = seeded(&[8], 8, DType::F32)?;
    let xv = Var::from_tensor(&x)?; // tracked, so the attach path runs
    let e = max_rel_err(
        &ops::softmax_last_dim(xv.as_tensor())?,
        &candle_nn::ops::softmax(&x, 3)?,
    )?;
    assert!(e < 1e-6, "softmax {e:e}");
    let e = max_rel_err(
        &ops::rms_norm(xv.as_tensor(), &w, 1e-6)?,
        &candle_nn::ops::rms_norm_slow(&x, &w, 1e-6)?,
    )?;
    assert!(e < 1e-5, "rms_norm {e:e}");
    let (cos, sin) = rope_tables(4, 8, DType::F32)?;
    let e = max_rel_err(
        &ops::rope(xv.as_tensor(), &cos, &sin)?,
        &candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)?,
    )?;
    assert!(e < 1e-6, "rope {e:e}");
    Ok(())
}

#[test]
fn trainable_ops_work_in_bf16() -> Result<()> {
    let x = Var::from_tensor(&seeded(&[2, 8], 9, DType::BF16)?)?;
    let w = Var::from_tensor(&seeded(&[8], 10, DType::BF16)?)?;
    let y = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)?;
    let y = ops::softmax_last_dim(&y)?;
    let g = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
    assert_eq!(g.get(x.as_tensor()).unwrap().dtype(), DType::BF16);
    assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[8]);
    Ok(())
}

#[test]
fn fused_swiglu_equals_the_composite_on_many_threads_and_strided_inputs() -> Result<()> {
    // Large enough to be split over the cores, in chunks of unequal length; `a` is a strided
    // view (a transpose), made contiguous inside the graph.
    let at = Var::from_tensor(&seeded(&[257, 301], 11, DType::F32)?)?;
    let a = at.as_tensor().t()?;
    let b = Var::from_tensor(&seeded(&[301, 257], 12, DType::F32)?)?;
    let c = seeded(&[301, 257], 13, DType::F32)?;
    assert!(!a.is_contiguous());
    let grads = |y: Tensor| -> Result<(Tensor, Tensor, Tensor)> {
        let g = (&y * &c)?.sum_all()?.backward()?;
        Ok((
            y,
            g.get(at.as_tensor()).unwrap().clone(),
            g.get(b.as_tensor()).unwrap().clone(),
        ))
    };
    let fused = grads(ops::swiglu(&a, b.as_tensor())?)?;
    let composite = grads((a.silu()? * b.as_tensor())?)?;
    for (what, got, want) in [
        ("output", &fused.0, &composite.0),
        ("grad a", &fused.1, &composite.1),
        ("grad b", &fused.2, &composite.2),
    ] {
        let e = max_rel_err(got, want)?;
        assert!(e < 1e-6, "swiglu {what}: {e:e}");
    }
    // Other dtypes take candle's composite.
    let h = ops::swiglu(
        &seeded(&[4, 8], 14, DType::BF16)?,
        &seeded(&[4, 8], 15, DType::BF16)?,
    )?;
    assert_eq!(h.dtype(), DType::BF16);
    // Extreme inputs: the fused sigmoid saturates like the exact one.
    let x = Tensor::new(
        &[-200f32, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0],
        &candle_core::Device::Cpu,
    )?;
    let one = x.ones_like()?;
    let got = ops::swiglu(&x, &one)?.to_vec1::<f32>()?;
    let want = [0.0, 0.0, -2.8e-12, 0.0, 30.0, 90.0, 200.0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{got:?}");
    }
    Ok(())
}

#[test]
fn attach_backward_takes_a_tracked_value_as_a_constant() -> Result<()> {
    let x = Var::new(&[1f32, 2.0, 3.0], &candle_core::Device::Cpu)?;
    let tracked = (x.as_tensor() * 3.0)?; // a value that is itself part of the graph
    let y = ops::attach_backward("triple", &tracked, &[x.as_tensor()], |_, _, g| {
        Ok(vec![Some((g * 3.0)?)])
    })?;
    let g = y.sum_all()?.backward()?;
    assert_eq!(
        g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?,
        [3.0, 3.0, 3.0]
    );
    let err = ops::attach_backward("none", &tracked, &[], |_, _, _| Ok(vec![])).unwrap_err();
    assert!(err.to_string().contains("one or two inputs"), "{err}");
    Ok(())
}

/// The bits of every element, as f64.
fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

/// `swiglu_in_place` writes `swiglu`'s bits into `a` and leaves `b` alone (f32 and f64, split
/// over the cores with a tail shorter than a vector; `a` a view with a start offset; inputs
/// where the sigmoid saturates), and refuses what it cannot do in place, saying why.
#[test]
fn swiglu_in_place_equals_swiglu_and_refuses_tracked_tensors() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        // Rows 1.. of a contiguous tensor: contiguous, starting at an offset.
        let whole = (seeded(&[258, 301], 21, dtype)? * 150.0)?;
        let a = whole.narrow(0, 1, 257)?;
        let b = seeded(&[257, 301], 22, dtype)?;
        let (first_row, b_before) = (bits(&whole.narrow(0, 0, 1)?)?, bits(&b)?);
        let want = ops::swiglu(&a, &b)?;
        ops::swiglu_in_place(&a, &b)?;
        assert_eq!(bits(&a)?, bits(&want)?, "{dtype:?}");
        assert_eq!(bits(&b)?, b_before, "{dtype:?}: b unchanged");
        assert_eq!(
            bits(&whole.narrow(0, 0, 1)?)?,
            first_row,
            "{dtype:?}: outside a"
        );
    }
    let a = seeded(&[4, 8], 23, DType::F32)?;
    let err = |r: Result<()>| r.unwrap_err().to_string();
    let v = Var::from_tensor(&a)?;
    let e = err(ops::swiglu_in_place(v.as_tensor(), &a));
    assert!(
        e.contains("a tracks gradients") && e.contains("ops::swiglu"),
        "{e}"
    );
    let e = err(ops::swiglu_in_place(&a, v.as_tensor()));
    assert!(e.contains("b tracks gradients"), "{e}");
    let e = err(ops::swiglu_in_place(&a, &a.t()?));
    assert!(e.contains("one shape and dtype"), "{e}");
    let e = err(ops::swiglu_in_place(&a.t()?.contiguous()?.t()?, &a));
    assert!(e.contains("must be contiguous"), "{e}");
    let e = err(ops::swiglu_in_place(
        &a.to_dtype(DType::BF16)?,
        &a.to_dtype(DType::BF16)?,
    ));
    assert!(e.contains("f32 or f64"), "{e}");
    // A tensor sharing a's storage cannot be its other input (candle refuses the alias).
    let e = err(ops::swiglu_in_place(&a, &a.clone()));
    assert!(e.contains("shares storage"), "{e}");
    Ok(())
}
