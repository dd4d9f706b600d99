//! Pipeline schedules (simulated) and pipelined training steps against the single-device
//! full-batch run, at 2–4 pipeline ranks, for every schedule.
mod common;

use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var};
use candle_parallel::checkpoint::{ParallelVarBuilder, Placement};
use candle_parallel::data_parallel::{GradCollector, GradSink};
use candle_parallel::pipeline::{
    run_pipedream_recorded, run_step, run_step_into, split_balanced, split_batch, split_layers,
    Action, PipeDreamOutput, PipelineSequential, Schedule, StageSplit, StageTape, StashableStage,
    UnitStage,
};
use candle_parallel::tensor_parallel as tp_layers;
use candle_parallel::{Comm, MeshShape};
use candle_parallel_models::testing::{max_rel_err, seeded, TanhMlp};
use common::launch;
use std::collections::BTreeMap;
use std::ops::Range;

const HIDDEN: usize = 6;
const LAYERS: usize = 12;
const BATCH: usize = 24;

fn layers(range: Range<usize>) -> Result<TanhMlp> {
    TanhMlp::new(range, HIDDEN, 100)
}

fn batch() -> Result<(Tensor, Tensor)> {
    Ok((
        seeded(&[BATCH, HIDDEN], 1, DType::F32)?,
        seeded(&[BATCH, HIDDEN], 2, DType::F32)?,
    ))
}

fn mse(y: &Tensor, target: &Tensor) -> Result<Tensor> {
    (y - target)?.sqr()?.mean_all()
}

/// The single-device run: loss and every layer's (w, b) gradients on the full batch.
fn reference() -> Result<(f32, Vec<Tensor>)> {
    let model = layers(0..LAYERS)?;
    let (x, target) = batch()?;
    let loss = mse(&model.forward(&x)?, &target)?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (w, b) in &model.layers {
        out.push(grads.get(w.as_tensor()).unwrap().clone());
        out.push(grads.get(b.as_tensor()).unwrap().clone());
    }
    Ok((loss.to_scalar::<f32>()?, out))
}

/// A pipelined step: per rank, its loss, its layers' indices and their gradients, its peak of
/// live activations and its deferred weight gradients.
type Ranked = (f32, Vec<usize>, Vec<Tensor>, usize, usize);

fn pipelined(schedule: &Schedule) -> Result<Vec<Ranked>> {
    let p = schedule.ranks();
    let m = schedule.micro_batches();
    let split = split_layers(LAYERS, schedule.stages())?;
    launch(p, |ctx| {
        let r = ctx.rank();
        let ranges: Vec<Range<usize>> = (0..schedule.chunks())
            .map(|c| split[schedule.stage_of(r, c)].clone())
            .collect();
        let chunks: Vec<TanhMlp> = ranges
            .iter()
            .map(|range| layers(range.clone()))
            .collect::<Result<_>>()?;
        let mut params = Vec::new();
        let mut indices = Vec::new();
        for (range, chunk) in ranges.iter().zip(&chunks) {
            for (i, (w, b)) in range.clone().zip(&chunk.layers) {
                params.push(w.clone());
                params.push(b.clone());
                indices.push(i);
            }
        }
        let (x, target) = batch()?;
        let targets = split_batch(&target, m)?;
        let modules: Vec<&dyn Module> = chunks.iter().map(|c| c as &dyn Module).collect();
        let out = run_step(
            ctx.comm(),
            schedule,
            &modules,
            &params,
            &split_batch(&x, m)?,
            (&Shape::from((BATCH / m, HIDDEN)), DType::F32),
            &|mb, y| mse(y, &targets[mb]),
        )?;
        let grads = out
            .grads
            .into_iter()
            .map(|g| g.expect("every layer is used"))
            .collect();
        Ok((
            out.loss,
            indices,
            grads,
            out.peak_live,
            out.deferred_weight_grads,
        ))
    })
}

fn check_against_reference(schedule: &Schedule) -> Result<Vec<usize>> {
    let (loss, want) = reference()?;
    let ranks = pipelined(schedule)?;
    let mut seen = [false; LAYERS];
    let what = format!(
        "{} p={} v={} m={}",
        schedule.name(),
        schedule.ranks(),
        schedule.chunks(),
        schedule.micro_batches()
    );
    for (l, indices, grads, _, deferred) in &ranks {
        // Zero-bubble defers every layer's weight gradient of every micro-batch to its W step.
        let split = schedule.name() == "zero-bubble";
        let expected = if split {
            indices.len() * schedule.micro_batches()
        } else {
            0
        };
        assert_eq!(
            *deferred,
            expected,
            "{}: deferred weight gradients",
            schedule.name()
        );
        assert!(
            ((l - loss) / loss).abs() < 1e-5,
            "{what}: loss {l} vs {loss}"
        );
        for (k, &i) in indices.iter().enumerate() {
            seen[i] = true;
            for (j, g) in grads[2 * k..2 * k + 2].iter().enumerate() {
                let e = max_rel_err(g, &want[2 * i + j])?;
                assert!(e <= 1e-5, "{what}: layer {i} grad {j} differs by {e:e}");
            }
        }
    }
    assert!(seen.iter().all(|&s| s), "{what}: every layer has a stage");
    Ok(ranks.iter().map(|r| r.3).collect())
}

#[test]
fn every_schedule_gives_the_full_batch_gradients_at_2_to_4_ranks() -> Result<()> {
    for p in 2..=4 {
        let m = 2 * p;
        let gpipe = check_against_reference(&Schedule::gpipe(p, m)?)?;
        assert_eq!(gpipe, vec![m; p], "GPipe keeps every micro-batch alive");
        let one_f_one_b = check_against_reference(&Schedule::one_f_one_b(p, m)?)?;
        for (r, &live) in one_f_one_b.iter().enumerate() {
            assert_eq!(
                live,
                p - r,
                "1F1B rank {r} holds at most p - r micro-batches"
            );
        }
        check_against_reference(&Schedule::interleaved(p, 2, m)?)?;
        // Micro-batches that the ranks do not divide (but the batch does): uneven rounds.
        let odd = [3, 4, 6][p - 2];
        check_against_reference(&Schedule::interleaved(p, 2, odd)?)?;
        check_against_reference(&Schedule::interleaved(p, 3, odd)?)?;
        let zb = check_against_reference(&Schedule::zero_bubble(p, m)?)?;
        for (r, &live) in zb.iter().enumerate() {
            // 1F1B's peak (its first rank's), on every rank: what ZB-H1 needs.
            assert!(live <= p, "zero-bubble rank {r} holds {live} > {p}");
        }
    }
    // Uneven stages (12 layers over 5 stages), more micro-batches than ranks.
    check_against_reference(&Schedule::one_f_one_b(5, 6)?)?;
    Ok(())
}

#[test]
fn simulated_bubbles_match_the_formula_and_interleaving_shrinks_them() -> Result<()> {
    for p in [2usize, 4] {
        for m in [4usize, 8, 16] {
            let formula = (p - 1) as f64 / (m + p - 1) as f64;
            for s in [Schedule::gpipe(p, m)?, Schedule::one_f_one_b(p, m)?] {
                let sim = s.simulate()?;
                assert!(
                    (sim.bubble_fraction() - formula).abs() < 1e-12,
                    "{} p={p} m={m}: {} vs {formula}",
                    s.name(),
                    sim.bubble_fraction()
                );
            }
            let one = Schedule::one_f_one_b(p, m)?.simulate()?;
            let inter = Schedule::interleaved(p, 2, m)?.simulate()?;
            assert!(
                inter.bubble_fraction() < one.bubble_fraction(),
                "interleaved p={p} m={m}: {} vs 1F1B {}",
                inter.bubble_fraction(),
                one.bubble_fraction()
            );
            assert!(one.peak_in_flight().iter().all(|&n| n <= p));
            let zb = Schedule::zero_bubble(p, m)?.simulate()?;
            assert!(
                zb.bubble_fraction() < one.bubble_fraction(),
                "zero-bubble p={p} m={m}: {} vs 1F1B {}",
                zb.bubble_fraction(),
                one.bubble_fraction()
            );
            assert_eq!(
                Schedule::gpipe(p, m)?.simulate()?.peak_in_flight(),
                vec![m; p]
            );
        }
    }
    Ok(())
}

#[test]
fn a_schedule_prints_as_a_step_by_rank_grid() -> Result<()> {
    let grid = Schedule::one_f_one_b(2, 2)?.simulate()?.to_string();
    let rows: Vec<&str> = grid.lines().collect();
    assert!(
        rows[0].contains("1f1b") && rows[0].contains("bubble"),
        "{grid}"
    );
    // t=0: rank 0 runs the forward of micro-batch 0, rank 1 waits for it.
    assert!(rows[2].split_whitespace().eq(["0", "F0.0", "."]), "{grid}");
    assert_eq!(
        rows.len(),
        2 + Schedule::one_f_one_b(2, 2)?.simulate()?.makespan()
    );
    Ok(())
}

#[test]
fn bad_schedules_and_inputs_are_clear_errors() -> Result<()> {
    // A rank that runs a backward before its forward waits forever: found by the simulation.
    let f = |mb| Action::Forward { mb, chunk: 0 };
    let b = |mb| Action::Backward { mb, chunk: 0 };
    let e = Schedule::from_actions("bad", 2, 1, 1, vec![vec![b(0), f(0)], vec![f(0), b(0)]])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("deadlocks")
            && e.contains("rank 0 at B0.0 waits for forward of micro-batch 0 on stage 0"),
        "{e}"
    );
    let e = Schedule::from_actions("short", 2, 1, 2, vec![vec![f(0), b(0)], vec![f(0), b(0)]])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 0 (2 actions) does not run micro-batch 1 on chunk 0 exactly once"),
        "{e}"
    );
    let e = split_layers(3, 4).unwrap_err().to_string();
    assert!(e.contains("use at most 3 stages"), "{e}");
    let e = split_batch(&Tensor::zeros((10, 2), DType::F32, &Device::Cpu)?, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not split into 4"), "{e}");
    // A micro-batch of another shape fails on every rank before any work.
    let errs = launch(2, |ctx| {
        let s = Schedule::gpipe(2, 2)?;
        let stage = layers(0..1)?;
        let mbs = [
            Tensor::zeros((2, HIDDEN), DType::F32, &Device::Cpu)?,
            Tensor::zeros((3, HIDDEN), DType::F32, &Device::Cpu)?,
        ];
        let r = run_step(
            ctx.comm(),
            &s,
            &[&stage],
            &[],
            &mbs,
            (&Shape::from((2, HIDDEN)), DType::F32),
            &|_, y| y.sum_all(),
        );
        Ok(r.err().map(|e| e.to_string()).unwrap_or_default())
    })?;
    for e in errs {
        assert!(e.contains("micro-batch 1 has shape [3, 6]"), "{e}");
    }
    Ok(())
}

#[test]
fn balanced_splits_minimise_the_heaviest_stage() -> Result<()> {
    assert_eq!(split_layers(7, 3)?, vec![0..3, 3..5, 5..7]);
    let w = [5, 1, 1, 1, 1, 1, 4, 4];
    let s = split_balanced(&w, 3)?;
    let heaviest = s.iter().map(|r| w[r.clone()].iter().sum::<usize>()).max();
    assert_eq!(heaviest, Some(7), "{s:?}"); // [5, 1, 1] [1, 1, 1, 4] [4]
    assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), w.len());
    Ok(())
}

/// A residual MLP block per layer, split over tp: `x + down(tanh(up(x)))`.
struct TpStage(
    Vec<(
        tp_layers::ColumnParallelLinear,
        tp_layers::RowParallelLinear,
    )>,
);

impl Module for TpStage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (up, down) in &self.0 {
            x = (&x + down.forward(&up.forward(&x)?.tanh()?)?)?;
        }
        Ok(x)
    }
}

fn tp_stage(range: Range<usize>, vb: &ParallelVarBuilder, tp: &Comm) -> Result<TpStage> {
    let blocks = range
        .map(|i| {
            let vb = vb.pp(format!("layers.{i}"));
            Ok((
                tp_layers::column_parallel_linear(HIDDEN, 2 * HIDDEN, vb.pp("up"), tp)?,
                tp_layers::row_parallel_linear(2 * HIDDEN, HIDDEN, vb.pp("down"), tp)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(TpStage(blocks))
}

/// Pipeline stages that run tensor-parallel layers inside (pp × tp on a mesh): every rank's
/// gradient slices equal the single-device full-batch gradients, for every schedule.
#[test]
fn tensor_parallel_layers_inside_pipeline_stages_give_the_full_batch_gradients() -> Result<()> {
    const BLOCKS: usize = 4;
    let (x, target) = batch()?;
    let reference = candle_parallel::launch(1, |ctx| {
        let vb = ParallelVarBuilder::from_init(5, DType::F32, &Device::Cpu).trainable();
        let model = tp_stage(0..BLOCKS, &vb, ctx.comm())?;
        let loss = mse(&model.forward(&x)?, &target)?;
        let grads = loss.backward()?;
        let full: BTreeMap<String, Tensor> = vb
            .params()
            .into_iter()
            .map(|p| {
                (
                    p.name.clone(),
                    grads.get(p.var.as_tensor()).unwrap().clone(),
                )
            })
            .collect();
        Ok((loss.to_scalar::<f32>()?, full))
    })?
    .remove(0);
    for name in ["gpipe", "1f1b", "interleaved", "zero-bubble"] {
        let (pp, tp, m) = (2, 2, 4);
        let schedule = Schedule::by_name(name, pp, 2, m)?;
        let split = split_layers(BLOCKS, schedule.stages())?;
        let outs = common::Launcher::new(pp * tp)
            .mesh(MeshShape::new().pp(pp).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let (pp_comm, tp_comm) = (mesh.pp(), mesh.tp());
                let vb = ParallelVarBuilder::from_init(5, DType::F32, &Device::Cpu).trainable();
                let chunks: Vec<TpStage> = (0..schedule.chunks())
                    .map(|c| {
                        tp_stage(
                            split[schedule.stage_of(pp_comm.rank(), c)].clone(),
                            &vb,
                            tp_comm,
                        )
                    })
                    .collect::<Result<_>>()?;
                let params = vb.params();
                let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();
                let targets = split_batch(&target, m)?;
                let modules: Vec<&dyn Module> = chunks.iter().map(|c| c as &dyn Module).collect();
                let out = run_step(
                    pp_comm,
                    &schedule,
                    &modules,
                    &vars,
                    &split_batch(&x, m)?,
                    (&Shape::from((BATCH / m, HIDDEN)), DType::F32),
                    &|mb, y| mse(y, &targets[mb]),
                )?;
                let grads: Vec<(String, Placement, Tensor)> = params
                    .into_iter()
                    .zip(out.grads)
                    .map(|(p, g)| (p.name, p.placement, g.expect("used")))
                    .collect();
                Ok((out.loss, grads))
            })?;
        for (rank, (loss, grads)) in outs.iter().enumerate() {
            assert!(
                ((loss - reference.0) / reference.0).abs() < 1e-5,
                "{name} rank {rank}"
            );
            for (pname, placement, g) in grads {
                let want = common::slice_of(&reference.1[pname], *placement)?;
                let e = max_rel_err(g, &want)?;
                assert!(e <= 1e-5, "{name} rank {rank} {pname}: {e:e}");
            }
        }
    }
    Ok(())
}

/// PipeDream without flushes: every backward updates its stage at once (SGD here), so the
/// micro-batches in flight run on different weight versions. With weight stashing, each
/// micro-batch's gradient is exactly the gradient of the function its forward computed (the
/// composition of each stage at the version it used); without, some backward computes with
/// newer weights than its forward and its gradient is off.
#[test]
fn pipedream_with_stashing_gives_each_micro_batch_the_gradient_of_its_version() -> Result<()> {
    let (p, n, lr) = (3, 6, 0.5);
    let split = split_layers(LAYERS, p)?;
    let (x, target) = batch()?;
    let (xs, targets) = (split_batch(&x, n)?, split_batch(&target, n)?);
    let run = |stash: bool| {
        launch(p, |ctx| {
            let stage = layers(split[ctx.rank()].clone())?;
            let live = stage.vars();
            let mut sgd = |_mb: usize, grads: &[Tensor]| -> Result<()> {
                for (v, g) in live.iter().zip(grads) {
                    v.set(&(v.as_tensor() - (g * lr)?)?)?;
                }
                Ok(())
            };
            run_pipedream_recorded(
                ctx.comm(),
                &stage,
                &xs,
                (&Shape::from((BATCH / n, HIDDEN)), DType::F32),
                &|mb, y| mse(y, &targets[mb]),
                stash,
                &mut sgd,
            )
        })
    };
    // The exact gradient of micro-batch `mb` with every stage at the version its forward used.
    let exact = |outs: &[PipeDreamOutput], mb: usize| -> Result<Vec<Vec<Tensor>>> {
        let vars: Vec<Vec<Var>> = outs
            .iter()
            .map(|o| o.forward_weights[mb].iter().map(Var::from_tensor).collect())
            .collect::<Result<_>>()?;
        let mut y = xs[mb].clone();
        for (s, vs) in vars.iter().enumerate() {
            let ws: Vec<Tensor> = vs.iter().map(|v| v.as_tensor().clone()).collect();
            y = layers(split[s].clone())?.forward_with(&y, &ws)?;
        }
        let grads = mse(&y, &targets[mb])?.backward()?;
        Ok(vars
            .iter()
            .map(|vs| {
                vs.iter()
                    .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                    .collect()
            })
            .collect())
    };
    let stashed = run(true)?;
    // Versions did move: the first stage's last forward saw weights its first did not.
    let first = &stashed[0].forward_weights;
    assert!(max_rel_err(&first[n - 1][0], &first[0][0])? > 1e-4);
    for mb in 0..n {
        let want = exact(&stashed, mb)?;
        for (s, out) in stashed.iter().enumerate() {
            for (g, w) in out.grads[mb].iter().zip(&want[s]) {
                let e = max_rel_err(g, w)?;
                assert!(e <= 1e-5, "stashed: micro-batch {mb} stage {s}: {e:e}");
            }
        }
    }
    let unstashed = run(false)?;
    let mut worst: f64 = 0.0;
    for mb in 0..n {
        let want = exact(&unstashed, mb)?;
        for (s, out) in unstashed.iter().enumerate() {
            for (g, w) in out.grads[mb].iter().zip(&want[s]) {
                worst = worst.max(max_rel_err(g, w)?);
            }
            // The last stage runs each backward right after its forward: one version.
            if s == p - 1 {
                for (a, b) in out.forward_weights[mb]
                    .iter()
                    .zip(&out.backward_weights[mb])
                {
                    assert_eq!(max_rel_err(a, b)?, 0.0);
                }
            }
        }
    }
    assert!(
        worst > 1e-2,
        "without stashing some gradient is inconsistent: {worst:e}"
    );
    Ok(())
}

/// `PipelineSequential` builds only this rank's layers, by index, under any split, and its
/// step equals the full-batch run; bad boundaries are clear errors.
#[test]
fn pipeline_sequential_builds_its_stages_under_every_split() -> Result<()> {
    let (loss, _) = reference()?;
    let (x, target) = batch()?;
    let m = 4;
    let targets = split_batch(&target, m)?;
    for split in [
        StageSplit::Uniform,
        StageSplit::Explicit(vec![0..5, 5..LAYERS]),
        StageSplit::Balanced((0..LAYERS).map(|i| 1 + i % 3).collect()),
    ] {
        let built = std::sync::Mutex::new(Vec::new());
        let losses = launch(2, |ctx| {
            let model = PipelineSequential::build(
                Schedule::one_f_one_b(2, m)?,
                ctx.rank(),
                LAYERS,
                split.clone(),
                |i| {
                    built.lock().unwrap().push(i);
                    Ok(Box::new(layers(i..i + 1)?))
                },
            )?;
            let out = model.step(
                ctx.comm(),
                &[],
                &split_batch(&x, m)?,
                (&Shape::from((BATCH / m, HIDDEN)), DType::F32),
                &|mb, y| mse(y, &targets[mb]),
            )?;
            Ok(out.loss)
        })?;
        for l in losses {
            assert!(((l - loss) / loss).abs() < 1e-5, "{split:?}: {l} vs {loss}");
        }
        let mut built = built.into_inner().unwrap();
        built.sort();
        assert_eq!(
            built,
            (0..LAYERS).collect::<Vec<_>>(),
            "{split:?}: each layer built once"
        );
    }
    let e = PipelineSequential::build(
        Schedule::gpipe(2, 2)?,
        0,
        LAYERS,
        StageSplit::Explicit(vec![0..5, 6..LAYERS]),
        |i| Ok(Box::new(layers(i..i + 1)?)),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("consecutive ranges covering the 12 layers"),
        "{e}"
    );
    Ok(())
}

/// Ranks that disagree on the step (here the number of micro-batches) fail together, before
/// any message, naming both sides.
#[test]
fn ranks_that_disagree_on_the_step_fail_together() -> Result<()> {
    let errs = launch(2, |ctx| {
        let m = 2 + 2 * ctx.rank();
        let s = Schedule::gpipe(2, m)?;
        let stage = layers(0..1)?;
        let mbs = vec![Tensor::zeros((2, HIDDEN), DType::F32, &Device::Cpu)?; m];
        let r = run_step(
            ctx.comm(),
            &s,
            &[&stage],
            &[],
            &mbs,
            (&Shape::from((2, HIDDEN)), DType::F32),
            &|_, y| y.sum_all(),
        );
        Ok(r.err().map(|e| e.to_string()).unwrap_or_default())
    })?;
    for e in errs {
        assert!(
            e.contains("the ranks disagree on the step")
                && e.contains("2 micro-batches")
                && e.contains("4 micro-batches")
                && !e.contains("Forward"),
            "{e}"
        );
    }
    Ok(())
}

/// A `TanhMlp` stage that runs its own backward one layer at a time into a sink, keeping each
/// layer's graph or only its input (`recompute`).
struct UnitMlp {
    mlp: TanhMlp,
    recompute: bool,
}

/// Per layer: its input as a variable, and its output with its graph unless recomputed.
struct UnitMlpTape<'a> {
    stage: &'a UnitMlp,
    inputs: Vec<Var>,
    outputs: Vec<Option<Tensor>>,
}

impl UnitMlp {
    fn layer(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let (w, b) = &self.mlp.layers[i];
        candle_parallel::ops::linear(x, w.as_tensor())?
            .broadcast_add(b.as_tensor())?
            .tanh()
    }
}

impl UnitStage for UnitMlp {
    fn forward_units<'s>(&'s self, x: &Tensor) -> Result<(Tensor, Box<dyn StageTape + 's>)> {
        let mut tape = UnitMlpTape {
            stage: self,
            inputs: vec![Var::from_tensor(x)?],
            outputs: Vec::new(),
        };
        for i in 0..self.mlp.layers.len() {
            let y = self.layer(i, tape.inputs[i].as_tensor())?;
            tape.inputs.push(Var::from_tensor(&y.detach())?);
            tape.outputs.push((!self.recompute).then_some(y));
        }
        let out = tape.inputs.last().unwrap().as_tensor().clone();
        Ok((out, Box::new(tape)))
    }
}

impl StageTape for UnitMlpTape<'_> {
    fn backward(
        mut self: Box<Self>,
        grad: &Tensor,
        sink: &mut dyn GradSink,
    ) -> Result<Option<Tensor>> {
        let mut g = grad.clone();
        for i in (0..self.outputs.len()).rev() {
            let y = match self.outputs[i].take() {
                Some(y) => y,
                None => self.stage.layer(i, self.inputs[i].as_tensor())?,
            };
            let mut store = (y * &g)?.sum_all()?.backward()?;
            g = store.get(self.inputs[i].as_tensor()).unwrap().detach();
            sink.add_store(&mut store)?;
            sink.unit_done(&[&format!("layer{i}.")])?;
        }
        Ok(Some(g))
    }
}

/// A stage running its own unit-wise backward (`run_step_into`) gives the full batch's
/// gradients on GPipe and 1F1B, with and without recomputation, and holds what the schedule
/// keeps in flight; schedules it cannot run are refused on every rank.
#[test]
fn unit_wise_stages_give_the_full_batch_gradients() -> Result<()> {
    let (loss, want) = reference()?;
    for schedule in [
        Schedule::one_f_one_b(3, 4)?,
        Schedule::gpipe(2, 6)?,
        Schedule::one_f_one_b(4, 8)?,
    ] {
        for recompute in [false, true] {
            let p = schedule.ranks();
            let m = schedule.micro_batches();
            let split = split_layers(LAYERS, p)?;
            let ranks = launch(p, |ctx| {
                let range = split[ctx.rank()].clone();
                let stage = UnitMlp {
                    mlp: layers(range.clone())?,
                    recompute,
                };
                let vars: Vec<Var> = stage
                    .mlp
                    .layers
                    .iter()
                    .flat_map(|(w, b)| [w.clone(), b.clone()])
                    .collect();
                let mut sink = GradCollector::new(&vars);
                let (x, target) = batch()?;
                let targets = split_batch(&target, m)?;
                let out = run_step_into(
                    ctx.comm(),
                    &schedule,
                    &stage,
                    &mut sink,
                    &split_batch(&x, m)?,
                    (&Shape::from((BATCH / m, HIDDEN)), DType::F32),
                    &|mb, y| mse(y, &targets[mb]),
                )?;
                let grads: Vec<Tensor> = sink.take()?.into_iter().map(Option::unwrap).collect();
                Ok((out.losses, range, grads, out.peak_live))
            })?;
            let what = format!("{} p={p} m={m} recompute {recompute}", schedule.name());
            for (r, (losses, range, grads, peak)) in ranks.iter().enumerate() {
                let l = losses.iter().sum::<f32>() / m as f32;
                assert!(
                    ((l - loss) / loss).abs() < 1e-5,
                    "{what}: loss {l} vs {loss}"
                );
                for (k, i) in range.clone().enumerate() {
                    for j in 0..2 {
                        let e = max_rel_err(&grads[2 * k + j], &want[2 * i + j])?;
                        assert!(e <= 1e-5, "{what}: layer {i} grad {j} differs by {e:e}");
                    }
                }
                let in_flight = if schedule.name() == "gpipe" {
                    m
                } else {
                    m.min(p - r)
                };
                assert_eq!(
                    *peak, in_flight,
                    "{what}: rank {r}'s micro-batches in flight"
                );
            }
        }
    }
    for (schedule, want) in [
        (Schedule::interleaved(2, 2, 4)?, "model chunks per rank"),
        (Schedule::zero_bubble(2, 4)?, "splits backwards"),
    ] {
        let errs = launch(2, |ctx| {
            let stage = UnitMlp {
                mlp: layers(0..2)?,
                recompute: false,
            };
            let mut sink = GradCollector::new(&[]);
            let x = split_batch(&batch()?.0, 4)?;
            let out = run_step_into(
                ctx.comm(),
                &schedule,
                &stage,
                &mut sink,
                &x,
                (&Shape::from((BATCH / 4, HIDDEN)), DType::F32),
                &|_, y| y.sum_all(),
            );
            Ok(out.err().map(|e| e.to_string()).unwrap_or_default())
        })?;
        for e in errs {
            assert!(e.contains(want), "{}: {e}", schedule.name());
        }
    }
    Ok(())
}

/// Zero-bubble at full strength: with unit costs it reaches ZB-H1's idle time, a third of
/// 1F1B's at p = 4, m = 8, within 1F1B's peak of p micro-batches in flight; planned for
/// measured costs, it beats 1F1B's order run with the same costs; and it is the same on every
/// call (every rank derives it alone).
#[test]
fn zero_bubble_reaches_zb_h1_and_plans_for_measured_costs() -> Result<()> {
    use candle_parallel::pipeline::ActionCosts;
    let idle = |s: &Schedule| -> Result<usize> {
        let sim = s.simulate()?;
        let busy: usize = sim.timeline()[0].iter().map(|t| t.end - t.start).sum();
        Ok(sim.makespan() - busy)
    };
    let (zb, one) = (Schedule::zero_bubble(4, 8)?, Schedule::one_f_one_b(4, 8)?);
    assert_eq!((idle(&zb)?, idle(&one)?), (3, 9), "{}", zb.simulate()?);
    for (p, m) in [(2, 4), (3, 6), (4, 4), (4, 5), (4, 12), (8, 8), (8, 16)] {
        let zb = Schedule::zero_bubble(p, m)?;
        let sim = zb.simulate()?;
        let one = Schedule::one_f_one_b(p, m)?.simulate()?;
        assert!(sim.peak_in_flight().iter().all(|&n| n <= p), "p={p} m={m}");
        let (zb_idle, one_idle) = (sim.makespan() - 3 * m, one.makespan() - 3 * m);
        // ZB-H1: (p - 1)(F + B - W) against (p - 1)(F + B + W); some slack at 8 ranks.
        assert!(
            zb_idle <= (p - 1) + p / 4 && 2 * zb_idle <= one_idle,
            "p={p} m={m}: idle {zb_idle} vs 1F1B {one_idle}\n{sim}"
        );
        assert_eq!(
            format!("{sim}"),
            format!("{}", Schedule::zero_bubble(p, m)?.simulate()?)
        );
    }
    // A slow input gradient and a cheap weight gradient, as measured.
    let costs = ActionCosts::from_seconds(0.010, 0.015, 0.005)?;
    for (p, m) in [(4, 8), (4, 16)] {
        let zb = Schedule::zero_bubble_with_costs(p, m, costs)?;
        assert_eq!(zb.costs(), costs);
        let one = Schedule::one_f_one_b(p, m)?.with_costs(costs)?;
        let (zb, one) = (zb.simulate()?, one.simulate()?);
        let work = m * (costs.forward + costs.backward_input + costs.backward_weight);
        // ZB-H1's idle time, (p - 1)(F + B - W), and a forward of slack.
        let zb_h1 = (p - 1) * (costs.forward + costs.backward_input - costs.backward_weight);
        assert!(
            zb.makespan() - work <= zb_h1 + costs.forward && zb.makespan() < one.makespan(),
            "p={p} m={m}: idle {} (ZB-H1 {zb_h1}), 1F1B {}",
            zb.makespan() - work,
            one.makespan() - work
        );
        assert!(zb.peak_in_flight().iter().all(|&n| n <= p));
    }
    assert!(ActionCosts::from_seconds(0.0, 1.0, 1.0).is_err());
    Ok(())
}

/// The interleaved schedule takes any number of micro-batches (rounds of uneven sizes when the
/// ranks do not divide it): it completes, keeps a smaller bubble than 1F1B from two
/// micro-batches on, and keeps Megatron's order where the ranks divide it.
#[test]
fn interleaving_takes_any_number_of_micro_batches() -> Result<()> {
    for p in 2..=5 {
        for chunks in 2..=3 {
            for m in 1..=13 {
                let s = Schedule::interleaved(p, chunks, m)?.simulate()?;
                let one = Schedule::one_f_one_b(p, m)?.simulate()?;
                if m >= 2 {
                    assert!(
                        s.bubble_fraction() < one.bubble_fraction(),
                        "p={p} chunks={chunks} m={m}: {} vs 1F1B {}",
                        s.bubble_fraction(),
                        one.bubble_fraction()
                    );
                }
            }
        }
    }
    // Megatron's order with 2 ranks, 2 chunks, 4 micro-batches: rounds of 2.
    let order: Vec<String> = Schedule::interleaved(2, 2, 4)?
        .actions(0)
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(
        order[..6],
        ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1"].map(String::from)
    );
    Ok(())
}

/// Pipeline messages posted on the communication lane and waited for where consumed
/// (`comm::set_overlap_p2p`, Megatron's `overlap_p2p_comm`): every schedule still gives the
/// full batch's gradients, and the step reports when its messages moved. (The switch is
/// process-wide; the other tests here give the same numbers with it on.)
#[test]
fn messages_on_the_lane_give_the_same_gradients_in_every_schedule() -> Result<()> {
    candle_parallel::comm::set_overlap_p2p(true);
    for p in 2..=4 {
        let m = 2 * p;
        check_against_reference(&Schedule::gpipe(p, m)?)?;
        check_against_reference(&Schedule::one_f_one_b(p, m)?)?;
        check_against_reference(&Schedule::interleaved(p, 2, m)?)?;
        check_against_reference(&Schedule::zero_bubble(p, m)?)?;
    }
    let comm = launch(2, |ctx| {
        let s = Schedule::one_f_one_b(2, 4)?;
        let stage = layers(ctx.rank() * 6..ctx.rank() * 6 + 6)?;
        let (x, target) = batch()?;
        let targets = split_batch(&target, 4)?;
        let out = run_step(
            ctx.comm(),
            &s,
            &[&stage],
            &stage.vars(),
            &split_batch(&x, 4)?,
            (&Shape::from((BATCH / 4, HIDDEN)), DType::F32),
            &|mb, y| mse(y, &targets[mb]),
        )?;
        Ok(out.communication)
    })?;
    for (r, c) in comm.iter().enumerate() {
        // Four activations one way and four gradients back, each exchange on the lane.
        assert!(c.lane.len() >= 4, "rank {r}: {c:?}");
        assert!(c.lane_seconds() >= 0.0 && c.exposed_seconds() <= c.lane_seconds() + 1.0);
    }
    candle_parallel::comm::set_overlap_p2p(false);
    Ok(())
}
