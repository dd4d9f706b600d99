//! candle-nn interoperability: candle-nn layers loading from a sharded builder, sharded layers
//! loading from a candle-nn `VarMap`, our AdamW as a `candle_nn::Optimizer`, the MoE layer as
//! a `ModuleT`, and a dispatcher written outside the library.
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::moe::{
    moe_layer, AllReduceDispatcher, Dispatch, Dispatched, LocalExperts, MoeLayer, Plan,
    RouterConfig, Routing, TokenDispatcher,
};
use candle_parallel::optim::{AdamW, AdamWConfig};
use candle_parallel::tensor_parallel::{column_parallel_linear, row_parallel_linear};
use candle_parallel::{launch, Launcher, MeshShape};
use candle_parallel_models::testing::{max_rel_err, seeded};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const TOL: f64 = 1e-5;

#[test]
fn candle_nn_layers_load_from_a_sharded_builder() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cp-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("model.safetensors");
    let w = seeded(&[8], 1, DType::F32)?;
    let b = seeded(&[8], 2, DType::F32)?;
    let lin = seeded(&[3, 8], 3, DType::F32)?;
    let tensors = [
        ("norm.weight", &w),
        ("norm.bias", &b),
        ("head.weight", &lin),
    ];
    candle_core::safetensors::save(
        &tensors
            .iter()
            .map(|(n, t)| (n.to_string(), (*t).clone()))
            .collect(),
        &file,
    )?;
    let x = seeded(&[4, 8], 4, DType::F32)?;
    // Straight from candle-nn.
    let nn_vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu)? };
    let want = candle_nn::linear_no_bias(8, 3, nn_vb.pp("head"))?
        .forward(&candle_nn::layer_norm(8, 1e-5, nn_vb.pp("norm"))?.forward(&x)?)?;
    // Through the sharded builder's candle-nn view: the same tensors, recorded as parameters.
    let vb = ParallelVarBuilder::from_safetensors(&[&file], DType::F32, &Device::Cpu)?.trainable();
    let view = vb.to_candle_nn();
    let norm = candle_nn::layer_norm(8, 1e-5, view.pp("norm"))?;
    let head = candle_nn::linear_no_bias(8, 3, vb.pp("head").to_candle_nn())?;
    let got = head.forward(&norm.forward(&x)?)?;
    assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
    let names: Vec<String> = vb.params().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["head.weight", "norm.bias", "norm.weight"]);
    // A shape-less lookup reads the stored shape; a missing tensor is a clear error.
    assert_eq!(view.get_unchecked("head.weight")?.dims(), &[3, 8]);
    let init_view = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).to_candle_nn();
    let err = init_view.get_unchecked("x").unwrap_err().to_string();
    assert!(err.contains("shape is unknown"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn sharded_layers_load_from_a_varmap() -> Result<()> {
    // A user's single-device MLP in a VarMap.
    let varmap = VarMap::new();
    let nn_vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let fc1 = candle_nn::linear(6, 8, nn_vb.pp("fc1"))?;
    let fc2 = candle_nn::linear(8, 6, nn_vb.pp("fc2"))?;
    let x = seeded(&[5, 6], 7, DType::F32)?;
    let want = fc2.forward(&fc1.forward(&x)?.relu()?)?;
    for tp in [2, 4] {
        let outs = launch(tp, |ctx| {
            let vb = ParallelVarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let fc1 = column_parallel_linear(6, 8, vb.pp("fc1"), ctx.comm())?;
            let fc2 = row_parallel_linear(8, 6, vb.pp("fc2"), ctx.comm())?;
            assert_eq!(fc1.weight().dims(), &[8 / tp, 6]);
            fc2.forward(&fc1.forward(&x)?.relu()?)
        })?;
        for o in outs {
            let e = max_rel_err(&o, &want)?;
            assert!(e <= TOL, "tp={tp}: relative error {e:e}");
        }
    }
    // The VarMap's variables are read, not shared: training the sharded copy leaves them.
    assert_eq!(varmap.all_vars().len(), 4);
    Ok(())
}

#[test]
fn our_adamw_is_a_candle_nn_optimizer_with_candle_nns_numbers() -> Result<()> {
    let cfg = AdamWConfig {
        lr: 0.05,
        weight_decay: 0.1,
        ..Default::default()
    };
    let nn_cfg = candle_nn::ParamsAdamW {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let train = |opt: &mut dyn FnMut(&Tensor) -> Result<()>, w: &Var| -> Result<Vec<f32>> {
        let x = seeded(&[4, 3], 11, DType::F32)?;
        for _ in 0..5 {
            opt(&x.matmul(w.as_tensor())?.sqr()?.sum_all()?)?;
        }
        w.as_tensor().flatten_all()?.to_vec1::<f32>()
    };
    let w0 = seeded(&[3, 2], 12, DType::F32)?;
    let (a, b) = (
        Var::from_tensor(&w0.copy()?)?,
        Var::from_tensor(&w0.copy()?)?,
    );
    let mut ours = <AdamW as Optimizer>::new(vec![a.clone()], cfg)?;
    let mut theirs = candle_nn::AdamW::new(vec![b.clone()], nn_cfg)?;
    let got = train(&mut |l| ours.backward_step(l), &a)?;
    let want = train(&mut |l| theirs.backward_step(l), &b)?;
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
    assert_ne!(got, w0.flatten_all()?.to_vec1::<f32>()?);
    assert_eq!(ours.params()[0].name, "param.00000");
    Ok(())
}

/// A dispatcher written outside the library: delegates and counts its calls.
struct Counting {
    inner: AllReduceDispatcher,
    calls: Arc<AtomicUsize>,
}

impl TokenDispatcher for Counting {
    fn dispatch(
        &self,
        x: &Tensor,
        routing: &Routing,
        plan: &Plan,
        experts: &LocalExperts,
    ) -> Result<Dispatched> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.dispatch(x, routing, plan, experts)
    }
}

#[test]
fn moe_layer_is_a_module_t_and_takes_a_user_dispatcher() -> Result<()> {
    let x = seeded(&[2, 5, 8], 21, DType::F32)?;
    let calls = Arc::new(AtomicUsize::new(0));
    let outs = Launcher::new(4)
        .mesh(MeshShape::new().ep(2).tp(2))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let build = |vb: ParallelVarBuilder| -> Result<MoeLayer> {
                moe_layer(
                    8,
                    12,
                    RouterConfig::mixtral(4, 2),
                    Dispatch::AllReduce,
                    vb,
                    mesh.ep(),
                    mesh.tp(),
                )
            };
            let plain = build(ParallelVarBuilder::from_init(3, DType::F32, &Device::Cpu))?;
            let custom = build(ParallelVarBuilder::from_init(3, DType::F32, &Device::Cpu))?
                .with_dispatcher(Box::new(Counting {
                    inner: AllReduceDispatcher::new(mesh.ep()),
                    calls: calls.clone(),
                }));
            let full = plain.forward(&x, false)?;
            let y = custom.forward_t(&x, false)?;
            let aux = custom.take_aux().expect("forward_t leaves its routing");
            assert!(custom.take_aux().is_none());
            assert_eq!(aux.stats, full.aux.stats);
            let (a, b) = (aux.switch_aux_loss()?, full.aux.switch_aux_loss()?);
            assert_eq!(a.to_scalar::<f32>()?, b.to_scalar::<f32>()?);
            Ok((y, full.output))
        })?;
    for (y, want) in &outs {
        assert_eq!(y.dims(), &[2, 5, 8]);
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one dispatch per rank");
    Ok(())
}

#[test]
fn router_is_a_module_giving_the_gate_logits() -> Result<()> {
    launch(1, |ctx| {
        let vb = ParallelVarBuilder::from_init(5, DType::F32, &Device::Cpu);
        let layer = moe_layer(
            8,
            12,
            RouterConfig::mixtral(4, 2),
            Dispatch::AllToAll,
            vb,
            ctx.comm(),
            ctx.comm(),
        )?;
        let x = seeded(&[2, 3, 8], 6, DType::F32)?;
        // The gate as HF's `gate` module computes it, on any leading dims.
        let logits = layer.router().forward(&x)?;
        let want = x.reshape((6, 8))?.matmul(&layer.router().weight().t()?)?;
        assert_eq!(logits.dims(), &[2, 3, 4]);
        let e = max_rel_err(&logits.reshape((6, 4))?, &want)?;
        assert!(e < 1e-6, "{e:e}");
        Ok(())
    })?;
    Ok(())
}
