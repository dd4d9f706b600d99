//! Packed rows (several examples per row, each with positions from 0 and its own causal
//! attention) give the loss and every gradient of the same examples padded one per row, to
//! float precision: on one device, at ep 2 × tp 2, with pipeline stages (the whole-graph
//! backward, and the unit-wise one with full recomputation), and at ZeRO 3.
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::data_parallel::{BatchGroups, GradCollector, Recompute};
use candle_parallel::mesh::MeshDim;
use candle_parallel::moe::Dispatch;
use candle_parallel::pipeline::split_layers;
use candle_parallel::zero::{ZeroConfig, ZeroOptimizer};
use candle_parallel::MeshShape;
use candle_parallel_models::llama::IGNORE_INDEX;
use candle_parallel_models::mixtral::{
    counted_targets, Mixtral, MixtralConfig, ShardedMixtral, Targets,
};
use common::Launcher;

fn config() -> MixtralConfig {
    let mut cfg = MixtralConfig::tiny();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.vocab_size = 61;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.num_hidden_layers = 2;
    cfg.sliding_window = None;
    cfg
}

/// Eight examples of 2 to 8 tokens: (ids, the first learnt position).
fn examples() -> Vec<(Vec<u32>, usize)> {
    let lens = [5, 8, 3, 7, 8, 2, 6, 4];
    let mut x: u64 = 99;
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids = (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % 61) as u32
                })
                .collect();
            (ids, 1 + i % 2)
        })
        .collect()
}

/// One batch: ids, labels, attention mask and (packed) position ids.
struct Batch {
    ids: Tensor,
    labels: Tensor,
    mask: Tensor,
    positions: Option<Tensor>,
}

/// The examples one per row of 8, padded at the end.
fn padded() -> Result<Batch> {
    let (mut ids, mut labels, mut mask) = (vec![], vec![], vec![]);
    for (e, first) in examples() {
        for i in 0..8 {
            let t = e.get(i).copied();
            ids.push(t.unwrap_or(0));
            labels.push(match t {
                Some(t) if i >= first => t as i64,
                _ => IGNORE_INDEX,
            });
            mask.push(u8::from(t.is_some()));
        }
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (8, 8), &Device::Cpu)?,
        labels: Tensor::from_vec(labels, (8, 8), &Device::Cpu)?,
        mask: Tensor::from_vec(mask, (8, 8), &Device::Cpu)?,
        positions: None,
    })
}

/// The examples two per row of 16 (in order, so that every replica and micro-batch holds the
/// same examples as padded), the rest padding; an example's first token is never a target.
fn packed() -> Result<Batch> {
    let (mut ids, mut labels, mut mask, mut pos) = (vec![], vec![], vec![], vec![]);
    for pair in examples().chunks(2) {
        let mut n = 0;
        for (e, first) in pair {
            for (i, &t) in e.iter().enumerate() {
                ids.push(t);
                labels.push(if i >= *first { t as i64 } else { IGNORE_INDEX });
                mask.push(1u8);
                pos.push(i as u32);
            }
            n += e.len();
        }
        for i in 0..16 - n {
            ids.push(0);
            labels.push(IGNORE_INDEX);
            mask.push(0);
            pos.push(i as u32);
        }
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (4, 16), &Device::Cpu)?,
        labels: Tensor::from_vec(labels, (4, 16), &Device::Cpu)?,
        mask: Tensor::from_vec(mask, (4, 16), &Device::Cpu)?,
        positions: Some(Tensor::from_vec(pos, (4, 16), &Device::Cpu)?),
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// `Mixtral::batch_grads` (whole-graph backward; through the schedule with pp).
    Whole,
    /// `Mixtral::train_grads` unit-wise, recomputing each layer in its backward.
    UnitsFull,
    /// `ShardedMixtral::batch_grads` (ZeRO 3).
    Sharded,
}

/// A rank's cross-entropy and gradients (flattened).
type RankGrads = (f64, Vec<Option<Vec<f32>>>);

/// Every rank's (ce loss, gradients) for `batch` (each replica its share of the rows).
fn grads(
    batch: &Batch,
    dp: usize,
    pp: usize,
    ep: usize,
    tp: usize,
    micro_batches: usize,
    path: Path,
) -> Result<Vec<RankGrads>> {
    let cfg = config();
    Launcher::new(dp * pp * ep * tp)
        .mesh(MeshShape::new().dp(dp).pp(pp).ep(ep).tp(tp))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(7, DType::F32, &Device::Cpu).trainable();
            let replicas = dp * ep;
            let replica = mesh.dp().rank() * ep + mesh.ep().rank();
            let rows = batch.ids.dim(0)? / replicas;
            let mine = |t: &Tensor| t.narrow(0, replica * rows, rows);
            let (ids, labels, mask) = (mine(&batch.ids)?, mine(&batch.labels)?, mine(&batch.mask)?);
            let positions = batch.positions.as_ref().map(mine).transpose()?;
            let targets = Targets {
                labels: &labels,
                global_tokens: counted_targets(&batch.labels)?,
                replicas,
                attention_mask: Some(&mask),
                position_ids: positions.as_ref(),
            };
            let layers = split_layers(cfg.num_hidden_layers, pp)?[mesh.pp().rank()].clone();
            let (ce, g) = match path {
                Path::Sharded => {
                    let groups = BatchGroups::new(mesh, &[MeshDim::Dp, MeshDim::Ep])?;
                    let m =
                        ShardedMixtral::new(&cfg, vb.clone(), &groups, mesh, Dispatch::AllToAll)?;
                    let zcfg = ZeroConfig {
                        stage: 3,
                        ..Default::default()
                    };
                    let opt =
                        ZeroOptimizer::new_sharded(&m.units(), vb.params(), &groups, mesh, zcfg)?;
                    let g = m.batch_grads(opt.vars(), &ids, Some(&targets), micro_batches)?;
                    (g.ce_loss, g.grads)
                }
                Path::Whole | Path::UnitsFull => {
                    let m = Mixtral::new_stage(
                        &cfg,
                        vb.clone(),
                        mesh.ep(),
                        mesh.tp(),
                        Dispatch::AllToAll,
                        layers,
                    )?;
                    let vars: Vec<Var> = vb.params().into_iter().map(|p| p.var).collect();
                    if path == Path::Whole {
                        let g =
                            m.batch_grads(&vars, &ids, Some(&targets), micro_batches, mesh.pp())?;
                        (g.ce_loss, g.grads)
                    } else {
                        let mut sink = GradCollector::new(&vars);
                        let l = m.train_grads(
                            &mut sink,
                            &ids,
                            Some(&targets),
                            micro_batches,
                            mesh.pp(),
                            Recompute::Full,
                        )?;
                        (l.ce_loss, sink.take()?)
                    }
                }
            };
            let g = g
                .iter()
                .map(|g| {
                    g.as_ref()
                        .map(|g| g.flatten_all()?.to_vec1::<f32>())
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((ce, g))
        })
}

fn assert_close(a: &[RankGrads], b: &[RankGrads], what: &str) {
    assert_eq!(a.len(), b.len());
    for (rank, ((ca, ga), (cb, gb))) in a.iter().zip(b).enumerate() {
        assert!(
            (ca - cb).abs() < 1e-5 * ca.abs().max(1.0),
            "{what} rank {rank}: ce {ca} vs {cb}"
        );
        assert_eq!(ga.len(), gb.len());
        let mut some = 0;
        for (i, (x, y)) in ga.iter().zip(gb).enumerate() {
            match (x, y) {
                (Some(x), Some(y)) => {
                    some += 1;
                    let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
                    let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                    assert!(
                        diff <= 2e-4 * scale,
                        "{what} rank {rank} grad {i}: max diff {diff} of {scale}"
                    );
                }
                (None, None) => {}
                _ => panic!("{what} rank {rank} grad {i}: one way has it, the other not"),
            }
        }
        assert!(some > 0, "{what} rank {rank}: no gradients");
    }
}

#[test]
fn packed_rows_give_the_padded_rows_gradients() -> Result<()> {
    let (pad, pack) = (padded()?, packed()?);
    // The same targets either way.
    assert_eq!(
        counted_targets(&pad.labels)?,
        counted_targets(&pack.labels)?
    );
    let cases = [
        (1, 1, 1, 1, 1, Path::Whole),
        (1, 1, 2, 2, 1, Path::Whole),
        (1, 2, 1, 1, 2, Path::Whole),
        (1, 2, 1, 2, 2, Path::UnitsFull),
        (2, 1, 1, 1, 2, Path::Sharded),
    ];
    for (dp, pp, ep, tp, m, path) in cases {
        let what = format!("dp{dp} pp{pp} ep{ep} tp{tp} m{m} {path:?}");
        let a = grads(&pad, dp, pp, ep, tp, m, path)?;
        let b = grads(&pack, dp, pp, ep, tp, m, path)?;
        assert_close(&a, &b, &what);
    }
    // Without its position ids the packed batch is another computation (examples see each
    // other): the comparison above can fail.
    let mut wrong = packed()?;
    wrong.positions = None;
    let a = grads(&pad, 1, 1, 1, 1, 1, Path::Whole)?;
    let c = grads(&wrong, 1, 1, 1, 1, 1, Path::Whole)?;
    assert!((a[0].0 - c[0].0).abs() > 1e-4, "{} vs {}", a[0].0, c[0].0);
    Ok(())
}

#[test]
fn bad_position_ids_are_refused() -> Result<()> {
    let mut b = packed()?;
    b.positions = Some(Tensor::from_vec(vec![1u32; 64], (4, 16), &Device::Cpu)?);
    let e = grads(&b, 1, 1, 1, 1, 1, Path::Whole)
        .unwrap_err()
        .to_string();
    assert!(e.contains("position_ids row 0, token 0"), "{e}");
    Ok(())
}
