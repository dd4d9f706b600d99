//! The device mesh: coordinates, groups, bad shapes, and per-rank log files.
mod common;

use candle_core::{Device, Result, Tensor};
use candle_parallel::mesh::DeviceMesh;
use candle_parallel::{MeshDim, MeshShape, ReduceOp};
use common::{launch, Launcher};

#[test]
fn ep_tp_layout_of_the_seed_document() -> Result<()> {
    // world 4, ep 2, tp 2: the table in seeds/002 ("EP/TP 并行示例").
    let rows = Launcher::new(4)
        .mesh(MeshShape::new().ep(2).tp(2))
        .run(|ctx| {
            let m = ctx.mesh()?;
            Ok((
                m.coord(MeshDim::Ep),
                m.coord(MeshDim::Tp),
                m.tp().ranks().to_vec(),
                m.ep().ranks().to_vec(),
                m.rank_name(),
            ))
        })?;
    let want = [
        (0, 0, vec![0, 1], vec![0, 2], "rank-0_ep-0_tp-0"),
        (0, 1, vec![0, 1], vec![1, 3], "rank-1_ep-0_tp-1"),
        (1, 0, vec![2, 3], vec![0, 2], "rank-2_ep-1_tp-0"),
        (1, 1, vec![2, 3], vec![1, 3], "rank-3_ep-1_tp-1"),
    ];
    for (got, want) in rows.iter().zip(want) {
        assert_eq!(
            (got.0, got.1, &got.2, &got.3, got.4.as_str()),
            (want.0, want.1, &want.2, &want.3, want.4)
        );
    }
    Ok(())
}

#[test]
fn four_dimensional_mesh_groups_and_collectives() -> Result<()> {
    // dp 2 × pp 1 × ep 2 × tp 2 over 8 ranks; tp varies fastest.
    let shape = MeshShape::new().dp(2).pp(1).ep(2).tp(2);
    let rows = launch(8, |ctx| {
        let m = DeviceMesh::new(ctx.comm(), shape)?;
        let r = Tensor::new(&[ctx.rank() as f32], &Device::Cpu)?;
        // Sum of global ranks over each group checks that the groups hold the right members.
        let tp_sum = m.tp().all_reduce(&r, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
        let dp_ep = m.comm_over(&[MeshDim::Dp, MeshDim::Ep])?;
        Ok((
            m.coords(),
            m.dp().ranks().to_vec(),
            m.pp().size(),
            tp_sum,
            dp_ep.ranks().to_vec(),
            dp_ep.label().to_string(),
        ))
    })?;
    for (rank, (coords, dp, pp_size, tp_sum, dp_ep, label)) in rows.into_iter().enumerate() {
        assert_eq!(coords, shape.coords_of(rank));
        assert_eq!(shape.rank_of(coords), rank);
        assert_eq!(coords, [rank / 4, 0, (rank / 2) % 2, rank % 2]);
        assert_eq!(dp, vec![rank % 4, rank % 4 + 4]);
        assert_eq!(pp_size, 1);
        let base = rank - rank % 2;
        assert_eq!(tp_sum, (base + base + 1) as f32);
        let tp_i = rank % 2;
        assert_eq!(dp_ep, vec![tp_i, tp_i + 2, tp_i + 4, tp_i + 6]);
        assert!(label.starts_with("dpxep["), "{label}");
    }
    Ok(())
}

#[test]
fn mesh_sizes_must_multiply_to_the_world_size() {
    let e = launch(4, |ctx| {
        DeviceMesh::new(ctx.comm(), MeshShape::new().ep(2).tp(3)).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("mesh ep=2,tp=3 has 6 ranks but the world has 4"),
        "{e}"
    );
    let e = Launcher::new(2)
        .mesh(MeshShape::new().tp(4))
        .run(|_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("choose sizes whose product is 2"), "{e}");
    let e = Launcher::new(1)
        .mesh(MeshShape::new().tp(0))
        .run(|_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("has size 0"), "{e}");
    let e = launch(1, |ctx| ctx.mesh().map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Launcher::mesh"), "{e}");
}

#[test]
fn mesh_shapes_parse_from_flags() -> Result<()> {
    let s: MeshShape = "ep=2, tp=2".parse()?;
    assert_eq!(s, MeshShape::new().ep(2).tp(2));
    assert_eq!(s.to_string(), "ep=2,tp=2");
    assert_eq!(s.named_dims(), vec![MeshDim::Ep, MeshDim::Tp]);
    assert!("xp=2"
        .parse::<MeshShape>()
        .unwrap_err()
        .to_string()
        .contains("unknown mesh dimension 'xp'"));
    assert!("tp=2,tp=2"
        .parse::<MeshShape>()
        .unwrap_err()
        .to_string()
        .contains("given twice"));
    assert!("tp2"
        .parse::<MeshShape>()
        .unwrap_err()
        .to_string()
        .contains("NAME=SIZE"));
    // A size 0 is refused where the flag is parsed, before anything divides by it.
    let e = "ep=0,tp=2".parse::<MeshShape>().unwrap_err().to_string();
    assert!(e.contains("dimension ep has size 0"), "{e}");
    Ok(())
}

#[test]
fn per_rank_log_files_are_named_by_coordinates() -> Result<()> {
    candle_parallel::logging::init();
    let dir = std::env::temp_dir().join(format!("cp-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Launcher::new(4)
        .mesh(MeshShape::new().ep(2).tp(2))
        .log_dir(&dir)
        .run(|ctx| {
            tracing::info!(step = 7, "hello from rank {}", ctx.rank());
            Ok(())
        })?;
    for (rank, name) in [
        "rank-0_ep-0_tp-0",
        "rank-1_ep-0_tp-1",
        "rank-2_ep-1_tp-0",
        "rank-3_ep-1_tp-1",
    ]
    .iter()
    .enumerate()
    {
        let text = std::fs::read_to_string(dir.join(format!("{name}.log")))?;
        // The event is in its own rank's file only, tagged with the rank and its coordinates.
        assert!(
            text.contains(&format!("hello from rank {rank}")),
            "{name}: {text}"
        );
        let (ep, tp) = (rank / 2, rank % 2);
        assert!(
            text.contains(&format!("rank{{rank={rank} ep={ep} tp={tp}}}")),
            "{name}: {text}"
        );
        for other in (0..4).filter(|o| *o != rank) {
            assert!(
                !text.contains(&format!("hello from rank {other}")),
                "{name}: {text}"
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
