//! Fine-tuning data files: JSONL and Parquet (one file, row groups, a directory of zstd shards)
//! give the same rows and examples; the stream's order is seeded and replays, a pass takes every
//! training example once and never a held-out one; packing fills rows with whole examples
//! (overflow split, dropped or refused); bad rows are named by file and line or row; and a
//! large file streams in bounded memory (the counting allocator).
use candle_parallel::memory::{self, CountingAlloc};
use candle_parallel_models::chat::ChatTemplate;
use candle_parallel_models::data::{
    data_files, ExampleStream, Overflow, RowFormat, RowReader, Split, Tokenize,
};
use candle_parallel_models::llama::IGNORE_INDEX;
use candle_parallel_models::tokenizer::byte_tokenizer;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cp-data-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rows(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut r = RowReader::new(files, 1 << 20);
    let mut out = Vec::new();
    while let Some(row) = r.next_row().unwrap() {
        out.push(row.value.unwrap());
    }
    out
}

#[test]
fn parquet_and_jsonl_give_the_same_rows_and_examples() {
    let jsonl = vec![fixture("data/chat.jsonl")];
    let parquet = vec![fixture("data/chat.parquet")];
    let shards = data_files(&[fixture("data/shards")]).unwrap();
    assert_eq!(shards.len(), 2, "{shards:?}");
    let want = rows(&jsonl);
    assert_eq!(want.len(), 12);
    assert_eq!(rows(&parquet), want);
    for codec in ["gzip", "lz4"] {
        let f = vec![fixture(&format!("data/chat-{codec}.parquet"))];
        assert_eq!(rows(&f), want, "{codec}");
    }
    assert_eq!(rows(&shards), want);
    assert_eq!(RowFormat::detect(&parquet).unwrap(), RowFormat::Messages);
    let pc = vec![fixture("data/prompt-completion.parquet")];
    assert_eq!(RowFormat::detect(&pc).unwrap(), RowFormat::PromptCompletion);

    // Chat rows through Qwen's template: the same examples from either file.
    let dir = fixture("chat/qwen");
    let template = ChatTemplate::from_model(&dir, None).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let t = Tokenize::new(RowFormat::Messages, &tok, Some(&template), None, 256);
    let all = |files: &[PathBuf]| {
        ExampleStream::new(files, &t, Split::All, 0, 1, false)
            .first(100)
            .unwrap()
            .into_iter()
            .map(|e| (e.ids, e.learn))
            .collect::<Vec<_>>()
    };
    let a = all(&jsonl);
    assert_eq!(a.len(), 12);
    assert_eq!(all(&parquet), a);
    assert_eq!(all(&shards), a);
    // The assistant turns are learnt: two runs in the four-turn conversations.
    for (i, (_, learn)) in a.iter().enumerate() {
        let runs = learn.windows(2).filter(|w| !w[0] && w[1]).count();
        assert_eq!(runs, if i % 3 == 0 { 2 } else { 1 }, "conversation {i}");
    }
}

/// Prompt/completion rows `i + 1 =` for i in 0..n, as JSONL.
fn numbers(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("n.jsonl");
    let text: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"prompt": "{i} + 1 =", "completion": " {}"}}"#, i + 1))
        .collect();
    std::fs::write(&p, text.join("\n")).unwrap();
    p
}

#[test]
fn the_stream_is_seeded_covers_each_pass_and_holds_out_every_tenth() {
    let dir = tmp("order");
    let files = vec![numbers(&dir, 50)];
    let tok = byte_tokenizer().unwrap();
    let t = Tokenize::new(RowFormat::PromptCompletion, &tok, None, Some(256), 32);
    let take = |seed: u64, split: Split, n: usize| {
        let mut s = ExampleStream::new(&files, &t, split, seed, 8, false);
        let out: Vec<String> = (0..n).map(|_| s.next_example().unwrap().at).collect();
        (out, s.take_reports())
    };
    let (a, reports) = take(1, Split::Train, 90);
    assert_eq!(take(1, Split::Train, 90).0, a, "the same seed replays");
    assert_ne!(
        take(2, Split::Train, 90).0,
        a,
        "another seed, another order"
    );
    // 45 training examples a pass: the first pass takes each once, the second too, in
    // another order.
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].examples, 45);
    let mut first = a[..45].to_vec();
    let mut second = a[45..].to_vec();
    assert_ne!(first, second);
    first.sort();
    second.sort();
    assert_eq!(first, second);
    first.dedup();
    assert_eq!(first.len(), 45);
    // The held-out ones: lines 1, 11, 21, ...; none of them trained on.
    let mut s = ExampleStream::new(&files, &t, Split::Eval, 0, 8, false);
    let eval: Vec<String> = s.first(100).unwrap().into_iter().map(|e| e.at).collect();
    let lines: Vec<String> = [1, 11, 21, 31, 41]
        .iter()
        .map(|l| format!("{}:{l}", files[0].display()))
        .collect();
    assert_eq!(eval, lines);
    assert!(eval.iter().all(|e| !first.contains(e)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn packing_fills_rows_with_whole_examples() {
    let dir = tmp("pack");
    let p = dir.join("t.jsonl");
    // Texts of 3 to 11 bytes (+ eos): byte tokens.
    let texts: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"text": "{}"}}"#,
                "ab".repeat(1 + i % 5) + &"c".repeat(i % 2)
            )
        })
        .collect();
    std::fs::write(&p, texts.join("\n")).unwrap();
    let files = vec![p];
    let tok = byte_tokenizer().unwrap();
    let mut t = Tokenize::new(RowFormat::Text, &tok, None, Some(256), 16);
    t.max_tokens = None;
    let mut s = ExampleStream::new(&files, &t, Split::All, 3, 4, false);
    let b = s.packed_batch(6, 16, 0, Overflow::Error).unwrap();
    assert_eq!((b.rows(), b.ids.len()), (6, 96));
    let pos = b.positions.as_ref().unwrap();
    let mut segments = 0;
    for r in 0..6 {
        let row = &pos[r * 16..(r + 1) * 16];
        assert_eq!(row[0], 0);
        for i in 0..16 {
            let j = r * 16 + i;
            if row[i] == 0 {
                // An example's first token is never a target.
                assert_eq!(b.labels[j], IGNORE_INDEX);
                segments += usize::from(b.mask[j] == 1);
            } else {
                assert_eq!(row[i], row[i - 1] + 1);
                assert_eq!(b.mask[j], b.mask[j - 1].min(1));
            }
            if b.mask[j] == 0 {
                assert_eq!(b.labels[j], IGNORE_INDEX);
            }
        }
    }
    assert_eq!(segments, b.examples);
    assert!(b.examples > 6, "several examples a row: {}", b.examples);
    let padded = ExampleStream::new(&files, &t, Split::All, 3, 4, false)
        .padded_batch(6, 16, 0)
        .unwrap();
    assert!(
        b.padding_share() < padded.padding_share(),
        "{} vs {}",
        b.padding_share(),
        padded.padding_share()
    );

    // Longer than a row: an error naming it, dropped, or split.
    std::fs::write(
        &files[0],
        r#"{"text": "abcdefghijklmnopqrstuvwxyz"}"#.to_string() + "\n" + r#"{"text": "ab"}"#,
    )
    .unwrap();
    let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, false);
    let e = s
        .packed_batch(2, 16, 0, Overflow::Error)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.jsonl:1: an example of 27 tokens, longer than --seq-len 16"),
        "{e}"
    );
    let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, false);
    let b = s.packed_batch(1, 16, 0, Overflow::Drop).unwrap();
    // "ab" and the end token, pass after pass (the long one dropped each time).
    assert_eq!(b.tokens(), 15);
    assert!(s.take_reports().iter().map(|r| r.dropped).sum::<usize>() >= 4);
    let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, false);
    let b = s.packed_batch(2, 16, 0, Overflow::Split).unwrap();
    assert_eq!(
        &b.ids[..16],
        &tok.encode("abcdefghijklmnop", false).unwrap().get_ids()[..16]
    );
    assert_eq!(b.positions.as_ref().unwrap()[16], 0);
    assert_eq!(
        b.tokens(),
        16 + 11 + 3,
        "the rest of the long one, then the short one"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_rows_are_named_and_skipped() {
    let dir = tmp("bad");
    let p = dir.join("c.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    let mut bytes = Vec::new();
    for l in [
        good.as_bytes(),
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}",
        br#"{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
        br#"{"messages": [{"role": "user", "content": "only a question"}]}"#,
        format!(r#"{{"text": "{}"}}"#, "x".repeat(3_000_000)).as_bytes(),
        good.as_bytes(),
    ] {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    std::fs::write(&p, &bytes).unwrap();
    let files = vec![p.clone()];
    let template = ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        "",
        "",
    )
    .unwrap();
    let tok = byte_tokenizer().unwrap();
    let t = Tokenize::new(RowFormat::Messages, &tok, Some(&template), None, 64);
    let err = |n: usize| {
        let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, false);
        for _ in 0..n {
            s.next_example().unwrap();
        }
        s.next_example().unwrap_err().to_string()
    };
    let e = err(1);
    assert!(e.contains("c.jsonl:2: not UTF-8"), "{e}");
    let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, true);
    memory::set_thread_rank(Some(2));
    memory::reset_peak(2).unwrap();
    let before = memory::rank(2).unwrap().current;
    for _ in 0..3 {
        s.next_example().unwrap();
    }
    // The 3 MB row was refused from its length without being held.
    let peak = memory::rank(2).unwrap().peak - before;
    assert!(peak < 1 << 20, "{peak} bytes held reading past a 3 MB row");
    let r = s.take_reports();
    assert_eq!((r[0].examples, r[0].skipped), (2, 4), "{r:?}");
    // Each bad row's reason, by line.
    for (line, what) in [
        (3, "unknown role \"robot\""),
        (4, "no assistant turn"),
        (5, "a row of 3000012 bytes"),
    ] {
        let mut only = bytes
            .split(|&b| b == b'\n')
            .map(|l| l.to_vec())
            .collect::<Vec<_>>();
        only[1] = good.as_bytes().to_vec();
        for l in only.iter_mut().take(line - 1).skip(1) {
            *l = good.as_bytes().to_vec();
        }
        std::fs::write(&p, only.join(&b'\n')).unwrap();
        let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, false);
        let e = (0..line)
            .find_map(|_| s.next_example().err())
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("c.jsonl:{line}: ")) && e.contains(what),
            "{e}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_large_file_streams_in_bounded_memory() {
    let dir = tmp("large");
    let p = dir.join("big.jsonl");
    // About 64 MB of prompt/completion rows.
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        let filler = "lorem ipsum ".repeat(40);
        for i in 0..130_000 {
            writeln!(f, r#"{{"prompt": "{i} {filler}", "completion": " ok"}}"#).unwrap();
        }
    }
    let size = std::fs::metadata(&p).unwrap().len();
    assert!(size > 60 << 20, "{size}");
    let files = vec![p];
    let tok = byte_tokenizer().unwrap();
    let t = Tokenize::new(RowFormat::PromptCompletion, &tok, None, Some(256), 1024);
    // This thread's allocations only (the other tests run beside it).
    memory::set_thread_rank(Some(1));
    memory::reset_peak(1).unwrap();
    let before = memory::rank(1).unwrap().current;
    let mut s = ExampleStream::new(&files, &t, Split::Train, 0, 256, false);
    // A whole pass over the file, and into the next.
    let mut passes = Vec::new();
    while passes.is_empty() {
        let b = s.padded_batch(8, 1024, 0).unwrap();
        assert_eq!(b.rows(), 8);
        passes = s.take_reports();
    }
    assert_eq!(passes[0].examples, 117_000);
    let peak = memory::rank(1).unwrap().peak - before;
    // 256 buffered examples of ~500 tokens and a batch: a few MB, not the 64 MB file read.
    assert!(
        peak < 8 << 20,
        "{} MiB held streaming a {} MiB file",
        peak >> 20,
        size >> 20
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// What a review found: a CRLF line of exactly the limit is accepted; upper-case `.JSONL` is
/// JSONL; a Parquet codec this build does not read is an error naming the file, not an endless
/// run of bad rows; packing that drops every example stops with an error instead of reading
/// forever; a padded batch cuts an example longer than a row; a tokenizer.json's truncation
/// does not cut examples.
#[test]
fn edge_cases_end_in_clear_outcomes() {
    let dir = tmp("edges");
    let tok = byte_tokenizer().unwrap();
    // The limit for --seq-len 4 is 4 * 64 + 4096 bytes.
    let max = candle_parallel_models::data::max_row_bytes(4);
    let body = format!(r#"{{"text": "{}"}}"#, "y".repeat(max - 12));
    assert_eq!(body.len(), max);
    let p = dir.join("crlf.JSONL");
    std::fs::write(&p, format!("{body}\r\n{body}x\r\n")).unwrap();
    let files = data_files(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(files, vec![p.clone()], "upper-case .JSONL is found");
    let mut r = RowReader::new(&files, max);
    assert!(
        r.next_row().unwrap().unwrap().value.is_ok(),
        "a CRLF line of exactly the limit"
    );
    let e = r.next_row().unwrap().unwrap().value.unwrap_err();
    assert!(e.contains(&format!("a row of {} bytes", max + 1)), "{e}");
    assert!(r.next_row().unwrap().is_none());
    std::fs::remove_file(&p).unwrap();

    let brotli = vec![fixture("data/chat-brotli.parquet")];
    let e = RowReader::new(&brotli, 1 << 20)
        .next_row()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("chat-brotli.parquet:row 1: cannot read this Parquet file's rows"),
        "{e}"
    );

    let p = dir.join("long.jsonl");
    std::fs::write(
        &p,
        r#"{"text": "abcdefghijklmnopqrstuvwxyz"}"#.to_string()
            + "\n"
            + r#"{"text": "0123456789abcdef"}"#,
    )
    .unwrap();
    let files = vec![p];
    let mut t = Tokenize::new(RowFormat::Text, &tok, None, Some(256), 8);
    t.max_tokens = None;
    let mut s = ExampleStream::new(&files, &t, Split::All, 0, 1, false);
    let e = s
        .packed_batch(1, 8, 0, Overflow::Drop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("every example is longer than a row"), "{e}");
    let b = ExampleStream::new(&files, &t, Split::All, 0, 1, false)
        .padded_batch(2, 8, 0)
        .unwrap();
    assert_eq!(
        (b.rows(), b.tokens()),
        (2, 16),
        "each example cut to its row"
    );

    // A tokenizer that would truncate to 4 tokens and pad: examples stay whole.
    let mut short = byte_tokenizer().unwrap();
    short
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 4,
            ..Default::default()
        }))
        .unwrap();
    short.with_padding(Some(tokenizers::PaddingParams::default()));
    let t = Tokenize::new(RowFormat::Text, &short, None, Some(256), 64);
    let e = ExampleStream::new(&files, &t, Split::All, 0, 1, false)
        .first(1)
        .unwrap();
    assert_eq!(e[0].ids.len(), 27, "26 letters and the end token");
    std::fs::remove_dir_all(dir).unwrap();
}
