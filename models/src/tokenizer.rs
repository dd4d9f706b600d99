//! Tokenizers that need no download: a byte-level one (any text) and a word-level one (a fixed
//! vocabulary), as `tokenizers::Tokenizer`s that save to and load from `tokenizer.json`.
use candle_core::Result;

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
