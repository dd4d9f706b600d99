//! Sharded checkpoints: HF loading that reads only a rank's bytes, distributed atomic saves,
//! resharding across layouts, export back to HF, bad input, interrupted saves and resuming.
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Init;
use candle_parallel::checkpoint::{
    check_checkpoint, export_hf, read_metadata, save_checkpoint, verify_checkpoint,
    ParallelVarBuilder, Placement, SaveOptions, SaveStage, ShardedTensor, COMPLETE_FILE,
    FORMAT_VERSION, METADATA_FILE,
};
use candle_parallel::optim::{AdamW, AdamWConfig};
use candle_parallel::{launch, Launcher, MeshShape};
use candle_parallel_models::llama::{Llama, LlamaConfig};
use candle_parallel_models::testing::{seeded, write_random_llama};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const EXPERTS: &str = "model.layers.0.block_sparse_moe.experts.w1";
const EXPERT_DIMS: [usize; 3] = [4, 6, 8];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cp-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A random HF Llama checkpoint in `dtype`, plus a stacked experts tensor (split by expert).
fn hf_checkpoint(name: &str, dtype: DType) -> Result<(PathBuf, LlamaConfig)> {
    let dir = tmp(name);
    let cfg = LlamaConfig::tiny();
    write_random_llama(&dir, &cfg, 11)?;
    let st = unsafe { MmapedSafetensors::new(dir.join("model.safetensors"))? };
    let mut tensors: HashMap<String, Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, _)| Ok((n.clone(), st.load(&n, &Device::Cpu)?.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    tensors.insert(EXPERTS.into(), seeded(&EXPERT_DIMS, 5, dtype)?);
    drop(st);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok((dir, cfg))
}

/// Builds the model (and the experts tensor, split by expert over `ep`) from `vb` on this rank,
/// returning what a save needs.
fn build(
    vb: &ParallelVarBuilder,
    cfg: &LlamaConfig,
    mesh: &candle_parallel::DeviceMesh,
) -> Result<Vec<ShardedTensor>> {
    Llama::new(cfg, vb.clone(), mesh.tp())?;
    let shard = Placement::Split {
        dim: 0,
        rank: mesh.ep().rank(),
        parts: mesh.ep().size(),
    };
    vb.get(EXPERT_DIMS.as_slice(), EXPERTS, shard, Init::Const(0.0))?;
    Ok(vb.params().iter().map(ShardedTensor::from).collect())
}

/// Loads from `source` under `mesh` and saves to `dest`; returns each rank's bytes read.
fn reshard(
    source: &Path,
    from_hf: bool,
    mesh: MeshShape,
    dest: &Path,
    cfg: &LlamaConfig,
    dtype: DType,
) -> Result<Vec<u64>> {
    Launcher::new(mesh.world_size()).mesh(mesh).run(|ctx| {
        let vb = if from_hf {
            ParallelVarBuilder::from_hf_dir(source, dtype, &Device::Cpu)?
        } else {
            ParallelVarBuilder::from_checkpoint(source, dtype, &Device::Cpu)?
        }
        .trainable();
        let tensors = build(&vb, cfg, ctx.mesh()?)?;
        let opts = SaveOptions {
            step: 7,
            mesh: mesh.to_string(),
            config: serde_json::to_value(cfg).map_err(candle_core::Error::wrap)?,
            files: Vec::new(),
            interrupt_at: None,
        };
        save_checkpoint(dest, &tensors, &opts, ctx.comm())?;
        Ok(vb.bytes_read())
    })
}

/// Every tensor of `b` is byte-identical to the one of the same name in `a`.
fn assert_same_bytes(a: &[PathBuf], b: &[PathBuf]) -> Result<()> {
    let (a, b) = unsafe { (MmapedSafetensors::multi(a)?, MmapedSafetensors::multi(b)?) };
    let (ta, tb) = (a.tensors(), b.tensors());
    assert_eq!(ta.len(), tb.len(), "tensor count");
    for (name, va) in ta {
        let vb = b.get(&name)?;
        assert_eq!((va.dtype(), va.shape()), (vb.dtype(), vb.shape()), "{name}");
        assert!(va.data() == vb.data(), "{name}: bytes differ");
    }
    Ok(())
}

#[test]
fn hf_to_ep2_tp2_to_tp4_to_tp1_and_export_is_byte_identical() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let (hf, cfg) = hf_checkpoint(&format!("rt-{dtype:?}"), dtype)?;
        let (a, b, c) = (tmp("rt-a"), tmp("rt-b"), tmp("rt-c"));
        reshard(&hf, true, MeshShape::new().ep(2).tp(2), &a, &cfg, dtype)?;
        let meta = read_metadata(&a)?;
        assert_eq!(
            (meta.world_size, meta.mesh.as_str(), meta.step),
            (4, "ep=2,tp=2", 7)
        );
        assert_eq!(meta.tensors[EXPERTS].pieces.len(), 4); // each ep half held by two tp ranks
        reshard(&a, false, MeshShape::new().tp(4), &b, &cfg, dtype)?;
        reshard(&b, false, MeshShape::new().tp(1), &c, &cfg, dtype)?;
        let out = tmp("rt-out");
        let files = export_hf(&c, &out, None)?;
        assert!(files.iter().any(|f| f.ends_with("config.json")));
        assert_same_bytes(
            &[hf.join("model.safetensors")],
            &[out.join("model.safetensors")],
        )?;
        // The same export in files of at most 64 KiB, with an index.
        let split = tmp("rt-split");
        export_hf(&b, &split, Some(64 << 10))?;
        let parts = candle_parallel::checkpoint::hf_safetensors_files(&split)?;
        assert!(parts.len() > 2, "{parts:?}");
        assert_same_bytes(&[hf.join("model.safetensors")], &parts)?;
        // candle-transformers loads the split export and runs it.
        if dtype == DType::F32 {
            use candle_transformers::models::llama as ct;
            let ct_cfg: ct::LlamaConfig =
                serde_json::from_slice(&std::fs::read(split.join("config.json"))?)
                    .map_err(candle_core::Error::wrap)?;
            let ct_cfg = ct_cfg.into_config(false);
            let vb = unsafe {
                candle_nn::VarBuilder::from_mmaped_safetensors(&parts, DType::F32, &Device::Cpu)?
            };
            let model = ct::Llama::load(vb, &ct_cfg)?;
            let mut cache = ct::Cache::new(false, DType::F32, &ct_cfg, &Device::Cpu)?;
            let logits =
                model.forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?, 0, &mut cache)?;
            assert_eq!(logits.dims(), &[1, cfg.vocab_size]);
        }
        for d in [hf, a, b, c, out, split] {
            std::fs::remove_dir_all(d)?;
        }
    }
    Ok(())
}

/// The full-tensor elements a shard holds (padding excluded), as a rank must read them.
fn real_elems(shard: Placement, full: &[usize]) -> usize {
    let total: usize = full.iter().product();
    match shard {
        Placement::Replicated => total,
        Placement::Split { parts, .. } => total / parts,
        Placement::SplitPadded { dim, rank, parts } => {
            let c = full[dim].div_ceil(parts);
            let start = (rank * c).min(full[dim]);
            total / full[dim] * c.min(full[dim] - start)
        }
        Placement::Range { dim, len, .. } => total / full[dim] * len,
    }
}

#[test]
fn each_rank_reads_only_its_own_bytes() -> Result<()> {
    let (hf, cfg) = hf_checkpoint("bytes", DType::F32)?;
    let file_bytes: usize = unsafe { MmapedSafetensors::new(hf.join("model.safetensors"))? }
        .tensors()
        .iter()
        .map(|(_, v)| v.data().len())
        .sum();
    let dist = tmp("bytes-dist");
    reshard(&hf, true, MeshShape::new().tp(2), &dist, &cfg, DType::F32)?;
    for from_hf in [true, false] {
        let src = if from_hf { &hf } else { &dist };
        let reads = launch(4, |ctx| {
            let vb = if from_hf {
                ParallelVarBuilder::from_hf_dir(src, DType::F32, &Device::Cpu)?
            } else {
                ParallelVarBuilder::from_checkpoint(src, DType::F32, &Device::Cpu)?
            }
            .trainable();
            Llama::new(&cfg, vb.clone(), ctx.comm())?;
            let want: usize = vb
                .params()
                .iter()
                .map(|p| real_elems(p.placement, &p.full_dims) * 4)
                .sum();
            Ok((vb.bytes_read() as usize, want))
        })?;
        for (r, (read, want)) in reads.into_iter().enumerate() {
            assert_eq!(
                read, want,
                "rank {r} (from_hf={from_hf}) read {read} bytes, its shard is {want}"
            );
            assert!(
                read * 3 < file_bytes,
                "rank {r} read {read} of {file_bytes} bytes"
            );
        }
    }
    std::fs::remove_dir_all(hf)?;
    std::fs::remove_dir_all(dist)?;
    Ok(())
}

fn load_err(f: impl Fn() -> Result<()>) -> String {
    f().unwrap_err().to_string()
}

#[test]
fn bad_input_is_a_clear_error() -> Result<()> {
    let (hf, cfg) = hf_checkpoint("bad", DType::F32)?;
    let file = hf.join("model.safetensors");
    let cpu = &Device::Cpu;
    let vb = ParallelVarBuilder::from_hf_dir(&hf, DType::F32, cpu)?;
    // A missing tensor, and a shape that disagrees with the config.
    let e = load_err(|| {
        vb.get(
            (4, 4),
            "model.nope.weight",
            Placement::Replicated,
            Init::Const(0.0),
        )
        .map(|_| ())
    });
    assert!(
        e.contains("tensor model.nope.weight is missing from checkpoint"),
        "{e}"
    );
    let e = load_err(|| {
        vb.get(
            (64, 65),
            "model.norm.weight",
            Placement::Replicated,
            Init::Const(0.0),
        )
        .map(|_| ())
    });
    assert!(
        e.contains("model.norm.weight") && e.contains("[64]") && e.contains("[64, 65]"),
        "{e}"
    );
    // A split that does not divide.
    let e = load_err(|| {
        vb.get(
            64,
            "model.norm.weight",
            Placement::Split {
                dim: 0,
                rank: 0,
                parts: 3,
            },
            Init::Const(0.0),
        )
        .map(|_| ())
    });
    assert!(
        e.contains("model.norm.weight") && e.contains("cannot be split into 3 equal parts"),
        "{e}"
    );
    drop(vb);
    // A truncated file and a corrupt header.
    let bytes = std::fs::read(&file)?;
    std::fs::write(&file, &bytes[..bytes.len() / 2])?;
    let e = load_err(|| ParallelVarBuilder::from_hf_dir(&hf, DType::F32, cpu).map(|_| ()));
    assert!(e.contains("model.safetensors"), "{e}");
    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"!garbage");
    std::fs::write(&file, &corrupt)?;
    let e = load_err(|| ParallelVarBuilder::from_hf_dir(&hf, DType::F32, cpu).map(|_| ()));
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&file, &bytes)?;
    // An index that names a missing file.
    std::fs::write(
        hf.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}"#,
    )?;
    let e = load_err(|| ParallelVarBuilder::from_hf_dir(&hf, DType::F32, cpu).map(|_| ()));
    assert!(
        e.contains("model-00002-of-00002.safetensors which does not exist"),
        "{e}"
    );
    std::fs::remove_file(hf.join("model.safetensors.index.json"))?;
    // An incomplete checkpoint directory and a metadata version we do not know.
    let dist = tmp("bad-dist");
    reshard(&hf, true, MeshShape::new().tp(2), &dist, &cfg, DType::F32)?;
    let meta_text = std::fs::read_to_string(dist.join(METADATA_FILE))?;
    let written = format!("\"format_version\": {FORMAT_VERSION}");
    assert!(meta_text.contains(&written), "{meta_text}");
    std::fs::write(
        dist.join(METADATA_FILE),
        meta_text.replace(&written, "\"format_version\": 99"),
    )?;
    let e = load_err(|| ParallelVarBuilder::from_checkpoint(&dist, DType::F32, cpu).map(|_| ()));
    assert!(
        e.contains("format version 99 is not one this library reads"),
        "{e}"
    );
    // Version 1 (no region pieces, which this checkpoint has none of) still loads.
    std::fs::write(
        dist.join(METADATA_FILE),
        meta_text.replace(&written, "\"format_version\": 1"),
    )?;
    ParallelVarBuilder::from_checkpoint(&dist, DType::F32, cpu)?;
    std::fs::write(dist.join(METADATA_FILE), meta_text)?;
    std::fs::remove_file(dist.join(COMPLETE_FILE))?;
    let e = load_err(|| ParallelVarBuilder::from_checkpoint(&dist, DType::F32, cpu).map(|_| ()));
    assert!(e.contains("incomplete checkpoint"), "{e}");
    // Saving over a completed checkpoint is refused.
    std::fs::write(dist.join(COMPLETE_FILE), "step 7\n")?;
    let e = reshard(&hf, true, MeshShape::new().tp(2), &dist, &cfg, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds a completed checkpoint"), "{e}");
    std::fs::remove_dir_all(hf)?;
    std::fs::remove_dir_all(dist)?;
    Ok(())
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_loadable() -> Result<()> {
    let (hf, cfg) = hf_checkpoint("kill", DType::F32)?;
    let good = tmp("kill-good");
    reshard(&hf, true, MeshShape::new().tp(2), &good, &cfg, DType::F32)?;
    for stage in [
        SaveStage::RankFileWritten,
        SaveStage::RankFileRenamed,
        SaveStage::MetadataWritten,
    ] {
        let partial = tmp(&format!("kill-{stage:?}"));
        let res = launch(2, |ctx| {
            let vb =
                ParallelVarBuilder::from_checkpoint(&good, DType::F32, &Device::Cpu)?.trainable();
            Llama::new(&cfg, vb.clone(), ctx.comm())?;
            let tensors: Vec<ShardedTensor> = vb.params().iter().map(ShardedTensor::from).collect();
            let opts = SaveOptions {
                step: 8,
                files: Vec::new(),
                interrupt_at: Some(stage),
                ..Default::default()
            };
            save_checkpoint(&partial, &tensors, &opts, ctx.comm())
        });
        assert!(res.unwrap_err().to_string().contains("interrupted"));
        // The partial directory is recognisably incomplete...
        let e = ParallelVarBuilder::from_checkpoint(&partial, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("incomplete checkpoint"), "{stage:?}: {e}");
        // ... and the previous checkpoint still loads, with the same numbers.
        let logits = launch(2, |ctx| {
            let vb = ParallelVarBuilder::from_checkpoint(&good, DType::F32, &Device::Cpu)?;
            Llama::new(&cfg, vb, ctx.comm())?.forward(
                &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?,
                0,
                None,
            )
        })?;
        let want = launch(2, |ctx| {
            let vb = ParallelVarBuilder::from_hf_dir(&hf, DType::F32, &Device::Cpu)?;
            Llama::new(&cfg, vb, ctx.comm())?.forward(
                &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?,
                0,
                None,
            )
        })?;
        assert_eq!(
            logits[0].flatten_all()?.to_vec1::<f32>()?,
            want[0].flatten_all()?.to_vec1::<f32>()?
        );
        // Retrying the save into the partial directory completes it.
        launch(2, |ctx| {
            let vb =
                ParallelVarBuilder::from_checkpoint(&good, DType::F32, &Device::Cpu)?.trainable();
            Llama::new(&cfg, vb.clone(), ctx.comm())?;
            let tensors: Vec<ShardedTensor> = vb.params().iter().map(ShardedTensor::from).collect();
            save_checkpoint(
                &partial,
                &tensors,
                &SaveOptions {
                    step: 8,
                    ..Default::default()
                },
                ctx.comm(),
            )
        })?;
        assert_eq!(read_metadata(&partial)?.step, 8);
        std::fs::remove_dir_all(partial)?;
    }
    std::fs::remove_dir_all(hf)?;
    std::fs::remove_dir_all(good)?;
    Ok(())
}

/// Three AdamW steps, save, three more: equals six uninterrupted steps, bit for bit.
#[test]
fn resuming_from_a_checkpoint_is_bit_identical() -> Result<()> {
    let cfg = LlamaConfig::tiny();
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 3, 17, 42, 8]], &Device::Cpu)?;
    let dir = tmp("resume");
    let adamw = AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let train = |vb: ParallelVarBuilder,
                 resume: bool,
                 steps: usize,
                 save: bool,
                 comm: &candle_parallel::Comm|
     -> Result<Vec<Vec<f32>>> {
        let model = Llama::new(&cfg, vb.clone(), comm)?;
        let mut opt = AdamW::new(vb.params(), adamw)?;
        if resume {
            opt.load_state(&vb)?;
            assert_eq!(opt.step_count(), 3);
        }
        for _ in 0..steps {
            opt.backward_step(&model.loss(&ids)?)?;
        }
        if save {
            let mut tensors: Vec<ShardedTensor> =
                vb.params().iter().map(ShardedTensor::from).collect();
            tensors.extend(opt.state()?);
            save_checkpoint(
                &dir,
                &tensors,
                &SaveOptions {
                    step: 3,
                    ..Default::default()
                },
                comm,
            )?;
            for _ in 0..steps {
                opt.backward_step(&model.loss(&ids)?)?;
            }
        }
        vb.params()
            .iter()
            .map(|p| p.var.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect()
    };
    let straight = launch(2, |ctx| {
        train(
            ParallelVarBuilder::from_init(1, DType::F32, &Device::Cpu).trainable(),
            false,
            3,
            true,
            ctx.comm(),
        )
    })?;
    let resumed = launch(2, |ctx| {
        train(
            ParallelVarBuilder::from_checkpoint(&dir, DType::F32, &Device::Cpu)?.trainable(),
            true,
            3,
            false,
            ctx.comm(),
        )
    })?;
    assert_eq!(
        straight, resumed,
        "resumed parameters differ from the uninterrupted run"
    );
    let fresh = launch(2, |ctx| {
        train(
            ParallelVarBuilder::from_init(1, DType::F32, &Device::Cpu).trainable(),
            false,
            1,
            false,
            ctx.comm(),
        )
    })?;
    assert_ne!(fresh, resumed, "the comparison must be able to fail");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// f16 and bf16 on disk load as the requested dtype (here f32), values exactly converted.
#[test]
fn half_precision_on_disk_converts_to_the_requested_dtype() -> Result<()> {
    for dtype in [DType::F16, DType::BF16] {
        let dir = tmp(&format!("dtype-{dtype:?}"));
        std::fs::create_dir_all(&dir)?;
        let t = seeded(&[6, 4], 3, dtype)?;
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), t.clone())]),
            dir.join("model.safetensors"),
        )?;
        let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?;
        let got = vb.get(
            (6, 4),
            "w",
            Placement::Split {
                dim: 1,
                rank: 1,
                parts: 2,
            },
            Init::Const(0.0),
        )?;
        assert_eq!(got.dtype(), DType::F32);
        let want = t.to_dtype(DType::F32)?.narrow(1, 2, 2)?;
        assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert_eq!(
            vb.bytes_read(),
            6 * 2 * 2,
            "{dtype:?}: only the slice's bytes"
        );
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// Loads every tensor of the tp=2 checkpoint `dist` at tp=1 (the whole tensors).
fn load_all(dist: &Path, cfg: &LlamaConfig) -> Result<()> {
    launch(1, |ctx| {
        let vb = ParallelVarBuilder::from_checkpoint(dist, DType::F32, &Device::Cpu)?;
        Llama::new(cfg, vb, ctx.comm()).map(|_| ())
    })
    .map(|_| ())
}

/// Rewrites `dist`'s metadata with `edit` applied to the JSON.
fn edit_metadata(dist: &Path, edit: impl Fn(&mut serde_json::Value)) -> Result<String> {
    let path = dist.join(METADATA_FILE);
    let original = std::fs::read_to_string(&path)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&original).map_err(candle_core::Error::wrap)?;
    edit(&mut json);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&json).map_err(candle_core::Error::wrap)?,
    )?;
    Ok(original)
}

#[test]
fn corrupt_metadata_and_pieces_are_errors_not_wrong_values() -> Result<()> {
    let (hf, cfg) = hf_checkpoint("corrupt", DType::F32)?;
    let dist = tmp("corrupt-dist");
    reshard(&hf, true, MeshShape::new().tp(2), &dist, &cfg, DType::F32)?;
    load_all(&dist, &cfg)?;
    let q = "model.layers.0.self_attn.q_proj.weight";
    let rows = cfg.hidden_size / 2;
    // Rank 1's piece moved one row up in the metadata (overlapping rank 0's, the last row
    // uncovered): the rank file records where the piece belongs.
    let original = edit_metadata(&dist, |j| {
        j["tensors"][q]["pieces"][1]["split"] = serde_json::json!([0, rows - 1, rows]);
    })?;
    let e = load_all(&dist, &cfg).unwrap_err().to_string();
    assert!(
        e.contains(q) && e.contains("was edited or is corrupt"),
        "{e}"
    );
    // A dtype in the metadata that the rank files do not hold.
    std::fs::write(dist.join(METADATA_FILE), &original)?;
    edit_metadata(&dist, |j| j["tensors"][q]["dtype"] = "F16".into())?;
    let e = load_all(&dist, &cfg).unwrap_err().to_string();
    assert!(
        e.contains(q) && e.contains("stored as F32") && e.contains("F16"),
        "{e}"
    );
    // A split dim the tensor does not have: an error, not an index panic.
    std::fs::write(dist.join(METADATA_FILE), &original)?;
    edit_metadata(&dist, |j| {
        j["tensors"][q]["pieces"][0]["split"] = serde_json::json!([5, 0, rows]);
    })?;
    let e = load_all(&dist, &cfg).unwrap_err().to_string();
    assert!(e.contains(q) && e.contains("dim 5"), "{e}");
    let e = export_hf(&dist, &tmp("corrupt-export"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dim 5"), "{e}");
    // The cheap check finds a truncated rank file without reading the tensors.
    std::fs::write(dist.join(METADATA_FILE), &original)?;
    check_checkpoint(&dist)?;
    let rank1 = dist.join("rank-00001.safetensors");
    let bytes = std::fs::read(&rank1)?;
    std::fs::write(&rank1, &bytes[..bytes.len() - 100])?;
    let e = check_checkpoint(&dist).unwrap_err().to_string();
    assert!(e.contains("rank-00001.safetensors"), "{e}");
    std::fs::remove_dir_all(hf)?;
    std::fs::remove_dir_all(dist)?;
    Ok(())
}

#[test]
fn extra_files_are_written_before_the_completion_marker() -> Result<()> {
    let dir = tmp("extra-files");
    let save = |files: Vec<(String, Vec<u8>)>, at: Option<SaveStage>| {
        launch(1, |ctx| {
            let t = ShardedTensor {
                name: "w".into(),
                local: seeded(&[2, 2], 1, DType::F32)?,
                full_dims: vec![2, 2],
                placement: Placement::Replicated,
                region: None,
            };
            let opts = SaveOptions {
                files: files.clone(),
                interrupt_at: at,
                ..Default::default()
            };
            save_checkpoint(&dir, &[t], &opts, ctx.comm())
        })
        .map(|_| ())
    };
    let tok = ("tokenizer.json".to_string(), b"{\"model\": {}}".to_vec());
    // Interrupted right after the metadata: the file is already there, the marker is not.
    assert!(save(vec![tok.clone()], Some(SaveStage::MetadataWritten)).is_err());
    assert!(dir.join("tokenizer.json").is_file() && !dir.join(COMPLETE_FILE).exists());
    std::fs::remove_dir_all(&dir)?;
    save(vec![tok.clone()], None)?;
    assert_eq!(std::fs::read(dir.join("tokenizer.json"))?, tok.1);
    std::fs::remove_dir_all(&dir)?;
    for bad in ["../x", "checkpoint.json", "rank-00000.safetensors", ""] {
        let e = save(vec![(bad.to_string(), vec![])], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain file name"), "{bad}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The byte range of tensor `name`'s data in the safetensors file `bytes`.
fn data_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let o = &header[name]["data_offsets"];
    let (b, e) = (
        o[0].as_u64().unwrap() as usize,
        o[1].as_u64().unwrap() as usize,
    );
    8 + n + b..8 + n + e
}

#[test]
fn checksums_catch_flipped_bytes_and_swapped_files() -> Result<()> {
    let (hf, cfg) = hf_checkpoint("crc", DType::F32)?;
    let dist = tmp("crc-dist");
    reshard(&hf, true, MeshShape::new().tp(2), &dist, &cfg, DType::F32)?;
    let (checked, unchecked) = verify_checkpoint(&dist)?;
    assert!(checked > 0 && unchecked == 0);
    let q = "model.layers.0.self_attn.q_proj.weight";
    let rank0 = dist.join("rank-00000.safetensors");
    let good = std::fs::read(&rank0)?;
    // Four bytes flipped in the middle of a tensor: every reader refuses them.
    let mut bad = good.clone();
    let r = data_range(&good, q);
    let mid = (r.start + r.end) / 2;
    for b in &mut bad[mid..mid + 4] {
        *b ^= 0xFF;
    }
    std::fs::write(&rank0, &bad)?;
    let e = load_all(&dist, &cfg).unwrap_err().to_string();
    assert!(
        e.contains(q) && e.contains("rank-00000.safetensors") && e.contains("CRC-32C"),
        "{e}"
    );
    let e = verify_checkpoint(&dist).unwrap_err().to_string();
    assert!(e.contains(q) && e.contains("CRC-32C"), "{e}");
    check_checkpoint(&dist)?; // the cheap check reads no tensor data
                              // Rank 1's file copied over rank 0's: same size, other values.
    std::fs::copy(dist.join("rank-00001.safetensors"), &rank0)?;
    let e = load_all(&dist, &cfg).unwrap_err().to_string();
    assert!(e.contains("rank-00000.safetensors"), "{e}");
    // A checkpoint written before checksums (no crc32c, no file list) still loads.
    std::fs::write(&rank0, &good)?;
    edit_metadata(&dist, |j| {
        j.as_object_mut().unwrap().remove("files");
        j.as_object_mut().unwrap().remove("crc_block_bytes");
        for t in j["tensors"].as_object_mut().unwrap().values_mut() {
            for p in t["pieces"].as_array_mut().unwrap() {
                p.as_object_mut().unwrap().remove("crc32c");
            }
        }
    })?;
    load_all(&dist, &cfg)?;
    let (_, unchecked) = verify_checkpoint(&dist)?;
    assert!(unchecked > 0);
    // The metadata cannot move a piece: q's two tp pieces swapped in checkpoint.json (same
    // shapes, intact checksums) are refused by every reader, naming the file; so is a step
    // the rank files do not record.
    let original = edit_metadata(&dist, |j| {
        let pieces = j["tensors"][q]["pieces"].as_array_mut().unwrap();
        let (a, b) = (pieces[0]["split"].clone(), pieces[1]["split"].clone());
        pieces[0]["split"] = b;
        pieces[1]["split"] = a;
    })?;
    for e in [
        load_all(&dist, &cfg).unwrap_err().to_string(),
        check_checkpoint(&dist).unwrap_err().to_string(),
        verify_checkpoint(&dist).unwrap_err().to_string(),
    ] {
        assert!(
            e.contains("rank-0000") && e.contains(q) && e.contains("was edited or is corrupt"),
            "{e}"
        );
    }
    std::fs::write(dist.join(METADATA_FILE), &original)?;
    edit_metadata(&dist, |j| j["step"] = serde_json::json!(8))?;
    let e = check_checkpoint(&dist).unwrap_err().to_string();
    assert!(e.contains("says step 8") && e.contains("of step 7"), "{e}");
    // Nor the model config (a rope base changed: the same shapes, other numbers).
    std::fs::write(dist.join(METADATA_FILE), &original)?;
    edit_metadata(&dist, |j| {
        j["config"]["rope_theta"] = serde_json::json!(500000.0)
    })?;
    let e = check_checkpoint(&dist).unwrap_err().to_string();
    assert!(
        e.contains("model config is not what") && e.contains("rank-0000"),
        "{e}"
    );
    std::fs::write(dist.join(METADATA_FILE), &original)?;
    load_all(&dist, &cfg)?;
    // Pieces that leave a gap (one of q's two tp pieces dropped from the metadata): verify
    // refuses what every load refuses, so that a checkpoint that verifies, loads.
    edit_metadata(&dist, |j| {
        j["tensors"][q]["pieces"].as_array_mut().unwrap().pop();
    })?;
    let e = load_all(&dist, &cfg).unwrap_err().to_string();
    assert!(e.contains("gap"), "{e}");
    let e = verify_checkpoint(&dist).unwrap_err().to_string();
    assert!(e.contains(q) && e.contains("gap"), "{e}");
    std::fs::remove_dir_all(hf)?;
    std::fs::remove_dir_all(dist)?;
    Ok(())
}

/// A model written tensor by tensor on rank 0 (`write_model`) holds what `gather_model` gives
/// every rank, at ep × tp and with pipeline stages; the writer refuses tensors out of order
/// and leaves no file behind when it is not finished.
#[test]
fn write_model_streams_what_gather_model_gathers() -> Result<()> {
    use candle_parallel::checkpoint::{gather_model, write_model, SafetensorsWriter};
    use candle_parallel::moe::Dispatch;
    use candle_parallel::zero::{ZeroConfig, ZeroOptimizer};
    use candle_parallel::MeshDim;
    use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
    let dir = std::env::temp_dir().join(format!("cp-write-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = MixtralConfig::tiny();
    for shape in [MeshShape::new().ep(2).tp(2), MeshShape::new().pp(2).tp(2)] {
        let path = dir.join("model.safetensors");
        let out = Launcher::new(4).mesh(shape).run(|ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(3, DType::F32, &Device::Cpu).trainable();
            let layers = if mesh.pp().size() == 2 {
                [0..1, 1..2][mesh.pp().rank()].clone()
            } else {
                0..2
            };
            let _m = Mixtral::new_stage(
                &cfg,
                vb.clone(),
                mesh.ep(),
                mesh.tp(),
                Dispatch::AllToAll,
                layers,
            )?;
            let opt = ZeroOptimizer::new(vb.params(), mesh, &[MeshDim::Dp], ZeroConfig::default())?;
            let named = opt.named_params()?;
            let extra = [("step".to_string(), Tensor::new(7u32, &Device::Cpu)?)];
            let n = write_model(&named, mesh, &path, &extra, None)?;
            Ok((n, gather_model(&named, mesh)?))
        })?;
        let (n, gathered) = &out[0];
        assert_written(&path, *n, gathered)?;
    }
    // ZeRO 3 at dp 2 x ep 2: the optimizer writes one sharded layer at a time.
    let path = dir.join("zero3.safetensors");
    let out = Launcher::new(4)
        .mesh(MeshShape::new().dp(2).ep(2))
        .run(|ctx| {
            use candle_parallel::data_parallel::BatchGroups;
            use candle_parallel_models::mixtral::ShardedMixtral;
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(3, DType::F32, &Device::Cpu).trainable();
            let batch = BatchGroups::new(mesh, &[MeshDim::Dp, MeshDim::Ep])?;
            let m = ShardedMixtral::new(&cfg, vb.clone(), &batch, mesh, Dispatch::AllToAll)?;
            let zero = ZeroConfig {
                stage: 3,
                ..Default::default()
            };
            let opt = ZeroOptimizer::new_sharded(&m.units(), vb.params(), &batch, mesh, zero)?;
            let extra = [("step".to_string(), Tensor::new(7u32, &Device::Cpu)?)];
            let n = opt.write_model(&path, &extra, None)?;
            Ok((n, gather_model(&opt.named_params()?, mesh)?))
        })?;
    let (n, gathered) = &out[0];
    assert_written(&path, *n, gathered)?;
    // Out of order, and unfinished.
    let path = dir.join("partial.safetensors");
    let t = Tensor::new(&[1f32], &Device::Cpu)?;
    let mut w = SafetensorsWriter::create(
        &path,
        vec![
            ("a".into(), DType::F32, vec![1]),
            ("b".into(), DType::F32, vec![1]),
        ],
    )?;
    let err = w.write("b", &t).unwrap_err().to_string();
    assert!(err.contains("expected a"), "{err}");
    w.write("a", &t)?;
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("1 of 2 tensors written"), "{err}");
    assert!(!path.exists() && !dir.join("partial.safetensors.tmp").exists());
    let reserved = vec![("__metadata__".to_string(), DType::F32, vec![1])];
    let err = SafetensorsWriter::create(&path, reserved)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("reserved"), "{err}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// The file at `path` holds `n` model tensors equal to `gathered`, and rank 0's `step`.
fn assert_written(path: &Path, n: usize, gathered: &[(String, Tensor)]) -> Result<()> {
    let written = candle_core::safetensors::load(path, &Device::Cpu)?;
    assert_eq!(written.len(), n + 1);
    assert_eq!(written["step"].to_scalar::<u32>()?, 7);
    assert_eq!(gathered.len(), n);
    for (name, t) in gathered {
        let w = &written[name];
        assert_eq!(w.dims(), t.dims(), "{name}");
        let diff = (w - t)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}");
    }
    Ok(())
}

/// ZeRO 3 reads from a checkpoint only the rows its partition needs of each parameter: at dp 3
/// (partitions that cut parameters mid-row), alone and beside tp 2 (a column slice and a
/// padded row slice), a rank reads its partition's bytes plus at most one row's worth at each
/// of its partition's two ends, the ranks together read each byte once (and the cut rows
/// twice), and the parameters gathered back equal the checkpoint's slices. (A parameter
/// a partition cut was read whole before.)
#[test]
fn zero3_reads_only_the_rows_of_its_partition() -> Result<()> {
    use candle_parallel::checkpoint::ModelPart;
    use candle_parallel::data_parallel::BatchGroups;
    use candle_parallel::mesh::MeshDim;
    use candle_parallel::zero::ShardedModule;
    let dir = tmp("zero3-rows");
    std::fs::create_dir_all(&dir)?;
    let full = HashMap::from([
        ("fc.weight".to_string(), seeded(&[37, 16], 4, DType::F32)?),
        ("fc.bias".to_string(), seeded(&[37], 5, DType::F32)?),
        ("fc.emb".to_string(), seeded(&[37, 16], 6, DType::F32)?),
    ]);
    candle_core::safetensors::save(&full, dir.join("model.safetensors"))?;
    for tp in [1, 2] {
        let out = Launcher::new(3 * tp)
            .mesh(MeshShape::new().dp(3).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb =
                    ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
                let batch = BatchGroups::new(mesh, &[MeshDim::Dp])?;
                let tpc = mesh.tp().clone();
                let fc = ShardedModule::new("fc", &vb.pp("fc"), &batch, mesh, move |vb| {
                    let (cols, rows) = (
                        Placement::split_over(1, &tpc),
                        Placement::split_padded_over(0, &tpc),
                    );
                    vb.get((37, 16), "weight", cols, Init::Const(0.0))?;
                    vb.get(37, "bias", Placement::Replicated, Init::Const(0.0))?;
                    vb.get((37, 16), "emb", rows, Init::Const(0.0))?;
                    Ok(candle_nn::func(|x| Ok(x.clone())))
                })?;
                let read = vb.bytes_read() as usize;
                let params: Vec<(String, Vec<f32>)> = fc
                    .materialise()?
                    .into_iter()
                    .map(|(t, _)| Ok((t.name, t.local.flatten_all()?.to_vec1::<f32>()?)))
                    .collect::<Result<_>>()?;
                Ok((read, fc.shard().elem_count(), mesh.tp().rank(), params))
            })?;
        let total = (37 * 16 + 37 + 37 * 16) * 4;
        let row = 16 * 4;
        for (r, (read, part, t, params)) in out.iter().enumerate() {
            assert!(
                *read <= part * 4 + 2 * row,
                "tp {tp} rank {r}: read {read} bytes for a partition of {} bytes",
                part * 4
            );
            assert_eq!(params.len(), 3);
            for (name, got) in params {
                let f = &full[name];
                let want = match (name.as_str(), tp) {
                    (_, 1) | ("fc.bias", _) => f.clone(),
                    ("fc.weight", _) => f.narrow(1, 8 * t, 8)?,
                    // Rows 19 per rank, the last one's 19th padding.
                    _ => match t {
                        0 => f.narrow(0, 0, 19)?,
                        _ => Tensor::cat(
                            &[
                                f.narrow(0, 19, 18)?,
                                Tensor::zeros((1, 16), DType::F32, &Device::Cpu)?,
                            ],
                            0,
                        )?,
                    },
                };
                assert_eq!(
                    got,
                    &want.flatten_all()?.to_vec1::<f32>()?,
                    "tp {tp} rank {r}: {name}"
                );
            }
        }
        // Every tp rank reads its own slices; over dp each byte once, cut rows twice.
        let sum: usize = out.iter().map(|o| o.0).sum();
        assert!(
            sum >= total && sum <= total + 2 * 2 * tp * row,
            "tp {tp}: the ranks read {sum} bytes of {total}"
        );
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
