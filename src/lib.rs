//! Helpers shared by the examples and the integration tests of candle-parallel.
use candle_core::{DType, Device, Result, Tensor};

/// A deterministic tensor of `dims` with values in [-1, 1), different for each `seed`
/// (a 64-bit LCG: the same on every platform and run, no RNG crate needed).
pub fn seeded(dims: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// This rank's part of `full` as `shard` describes it (padding with zeros): the reference the
/// tests slice single-device results with, written independently of the library's loader.
pub fn slice_of(full: &Tensor, shard: candle_parallel::checkpoint::Shard) -> Result<Tensor> {
    use candle_parallel::checkpoint::Shard;
    Ok(match shard {
        Shard::Replicated => full.clone(),
        Shard::Split { dim, rank, parts } => {
            let c = full.dim(dim)? / parts;
            full.narrow(dim, rank * c, c)?
        }
        Shard::SplitPadded { dim, rank, parts } => {
            let size = full.dim(dim)?;
            let c = size.div_ceil(parts);
            let start = (rank * c).min(size);
            let len = c.min(size - start);
            full.narrow(dim, start, len)?
                .pad_with_zeros(dim, 0, c - len)?
        }
        Shard::Range { dim, start, len } => full.narrow(dim, start, len)?,
    })
}

/// max |a - b| / max(max |b|, tiny): the relative error of `a` against the reference `b`.
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims())
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
    Ok(diff / scale)
}

/// The README's code runs as a doctest, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Writes a random model in Hugging Face layout into `dir`: `config.json` (`cfg`) and
/// `model.safetensors` with the tensors `build` creates on one rank from the deterministic
/// initialisation of `seed`.
pub fn write_random_hf<C: serde::Serialize>(
    dir: &std::path::Path,
    cfg: &C,
    seed: u64,
    build: impl Fn(candle_parallel::checkpoint::ShardedVarBuilder, &candle_parallel::Comm) -> Result<()>
        + Sync,
) -> Result<()> {
    use candle_parallel::checkpoint::ShardedVarBuilder;
    std::fs::create_dir_all(dir)?;
    // Explicitly local: this helper also runs inside multi-process (NCCL) jobs.
    let params = candle_parallel::Launcher::new(1)
        .backend(candle_parallel::launch::BackendKind::Local)
        .run(|ctx| {
            let vb = ShardedVarBuilder::from_init(seed, DType::F32, &Device::Cpu).trainable();
            build(vb.clone(), ctx.comm())?;
            Ok(vb.params())
        })?;
    let tensors: std::collections::HashMap<String, Tensor> = params[0]
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let json = serde_json::to_string_pretty(cfg).map_err(candle_core::Error::wrap)?;
    std::fs::write(dir.join("config.json"), json)?;
    Ok(())
}

/// A random Llama-style checkpoint (see [`write_random_hf`]).
pub fn write_random_llama(
    dir: &std::path::Path,
    cfg: &candle_parallel_models::llama::LlamaConfig,
    seed: u64,
) -> Result<()> {
    write_random_hf(dir, cfg, seed, |vb, comm| {
        candle_parallel_models::llama::Llama::new(cfg, vb, comm).map(|_| ())
    })
}

/// A random Mixtral-style checkpoint (see [`write_random_hf`]).
pub fn write_random_mixtral(
    dir: &std::path::Path,
    cfg: &candle_parallel_models::mixtral::MixtralConfig,
    seed: u64,
) -> Result<()> {
    use candle_parallel::moe::Dispatch;
    write_random_hf(dir, cfg, seed, |vb, comm| {
        candle_parallel_models::mixtral::Mixtral::new(cfg, vb, comm, comm, Dispatch::AllReduce)
            .map(|_| ())
    })
}

fn tokenizer_err(e: tokenizers::Error) -> candle_core::Error {
    candle_core::Error::msg(format!("tokenizer: {e}"))
}

/// A byte-level BPE tokenizer with no merges: ids 0..256 are the bytes, 256 is `<eos>`.
pub fn byte_tokenizer() -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    chars.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(tokenizer_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(&[tokenizers::AddedToken::from("<eos>", true)]);
    Ok(tok)
}

/// A word-level tokenizer over `words` (split on whitespace), with `[UNK]` as id 0.
pub fn word_tokenizer(words: &[&str]) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    let mut vocab: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    vocab.insert("[UNK]".into(), 0);
    for w in words {
        let n = vocab.len() as u32;
        vocab.entry(w.to_string()).or_insert(n);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(tokenizer_err)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    Ok(tok)
}
