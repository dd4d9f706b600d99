//! Fine-tuning data as people keep it: JSONL and Parquet files (one, several, or a directory of
//! shards as Hugging Face datasets keep them), rows of chat `messages`, `prompt`/`completion`
//! or `text`, read and tokenized as needed (memory bounded by a shuffle buffer, not by the
//! dataset), in a seeded order that a resumed job replays, batched one example per padded row
//! or packed several per row ([`crate::packing`]).
//!
//! Bad rows are named by file and line (JSONL) or row (Parquet) with what is wrong: not UTF-8,
//! not JSON, longer than the sequence could hold (refused from its byte length, before parsing
//! or tokenizing), lacking a field, an unknown role, no assistant turn, too many tokens.
//!
//! ```no_run
//! use candle_parallel_models::data::{data_files, ExampleStream, RowFormat, Split, Tokenize};
//! # fn main() -> candle_core::Result<()> {
//! let files = data_files(&["data/".into()])?;
//! let tok = tokenizers::Tokenizer::from_file("model/tokenizer.json").unwrap();
//! let tokenize = Tokenize::new(RowFormat::detect(&files)?, &tok, None, Some(2), 512);
//! let mut stream = ExampleStream::new(&files, &tokenize, Split::Train, 0, 10_000, false);
//! let batch = stream.padded_batch(8, 512, 2)?;
//! # Ok(()) }
//! ```
use crate::chat::{parse_messages, untruncated, ChatTemplate};
use crate::llama::IGNORE_INDEX;
use candle_core::{bail, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// One tokenized example: its tokens, which of them the loss counts, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub learn: Vec<bool>,
    /// `file:line` or `file:row N`.
    pub at: String,
}

/// The data files `paths` name: files as given, directories searched (recursively, sorted) for
/// `*.jsonl`, `*.json` (JSON lines) and `*.parquet`.
pub fn data_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| {
                candle_core::Error::msg(format!("cannot read --data {}: {e}", dir.display()))
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if matches!(extension(&p).as_str(), "jsonl" | "json" | "parquet") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = out.len();
            walk(p, &mut out)?;
            if out.len() == before {
                bail!(
                    "--data {}: a directory without *.jsonl or *.parquet files",
                    p.display()
                )
            }
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("--data {}: no such file or directory", p.display())
        }
    }
    if out.is_empty() {
        bail!("--data names no files")
    }
    Ok(out)
}

/// The file name's extension, lower case (`.JSONL` is JSONL).
fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// One row of a data file: where it is, and its JSON (a text file's line is `{"text": line}`)
/// or why it is not usable.
pub struct Row {
    pub at: String,
    pub value: std::result::Result<serde_json::Value, String>,
}

enum FileRows {
    Lines {
        path: PathBuf,
        reader: BufReader<std::fs::File>,
        line: usize,
        /// Plain text: each line is `{"text": line}`, of any length.
        text: bool,
    },
    Parquet {
        path: PathBuf,
        rows: parquet::record::reader::RowIter<'static>,
        row: usize,
    },
}

/// The rows of `files` in order, read as needed: JSONL line by line (a line longer than
/// `max_bytes` is refused and skipped over without being held), Parquet row group by row
/// group.
pub struct RowReader {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<FileRows>,
    max_bytes: usize,
}

impl RowReader {
    pub fn new(files: &[PathBuf], max_bytes: usize) -> Self {
        Self {
            files: files.to_vec(),
            next_file: 0,
            current: None,
            max_bytes,
        }
    }

    fn open(path: &Path) -> Result<FileRows> {
        let file = std::fs::File::open(path).map_err(|e| {
            candle_core::Error::msg(format!("cannot read --data {}: {e}", path.display()))
        })?;
        Ok(match extension(path).as_str() {
            "parquet" => {
                let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)
                    .map_err(|e| {
                        candle_core::Error::msg(format!(
                            "{}: not a readable Parquet file: {e}",
                            path.display()
                        ))
                    })?;
                FileRows::Parquet {
                    path: path.to_path_buf(),
                    rows: reader.into_iter(),
                    row: 0,
                }
            }
            ext => FileRows::Lines {
                path: path.to_path_buf(),
                reader: BufReader::new(file),
                line: 0,
                text: !matches!(ext, "jsonl" | "json"),
            },
        })
    }

    /// The next row, `None` after the last file's last; an error for a file that cannot be read.
    pub fn next_row(&mut self) -> Result<Option<Row>> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                self.next_file += 1;
                self.current = Some(Self::open(path)?);
            }
            let max = self.max_bytes;
            let row = match self.current.as_mut().expect("opened above") {
                FileRows::Lines {
                    path,
                    reader,
                    line,
                    text,
                } => read_line(path, reader, line, *text, max)?,
                FileRows::Parquet { path, rows, row } => match rows.next() {
                    None => None,
                    Some(r) => {
                        *row += 1;
                        let at = format!("{}:row {}", path.display(), *row);
                        // A row group that cannot be decoded (a codec or type this build does
                        // not read) ends the file's reading: an error, not a bad row, as the
                        // reader would meet it again at every next row.
                        let v = r
                            .map_err(|e| {
                                candle_core::Error::msg(format!(
                                    "{at}: cannot read this Parquet file's rows: {e} (snappy, zstd, lz4 and gzip are read; rewrite it with one of them)"
                                ))
                            })?
                            .to_json_value();
                        let n = text_bytes(&v);
                        let value = if n > max {
                            Err(too_long(n, max))
                        } else {
                            Ok(v)
                        };
                        Some(Row { at, value })
                    }
                },
            };
            match row {
                Some(r) => return Ok(Some(r)),
                None => self.current = None,
            }
        }
    }
}

fn too_long(n: usize, max: usize) -> String {
    format!(
        "a row of {n} bytes, longer than the {max} bytes that --seq-len could hold (raise --seq-len or split the row)"
    )
}

/// The bytes of the strings in `v` (what tokenizing it would read).
fn text_bytes(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::String(s) => s.len(),
        serde_json::Value::Array(a) => a.iter().map(text_bytes).sum(),
        serde_json::Value::Object(o) => o.values().map(text_bytes).sum(),
        _ => 0,
    }
}

/// The next non-blank line of a JSONL or text file as a row (`None` at its end).
fn read_line(
    path: &Path,
    reader: &mut BufReader<std::fs::File>,
    line: &mut usize,
    text: bool,
    max: usize,
) -> Result<Option<Row>> {
    loop {
        let mut buf = Vec::new();
        *line += 1;
        let io = |e: std::io::Error| {
            candle_core::Error::msg(format!("reading --data {}: {e}", path.display()))
        };
        // At most max + 2 bytes are held (a line of max bytes and its "\r\n"); the rest of a
        // longer line is skipped over.
        let n = reader
            .by_ref()
            .take(max.saturating_add(2) as u64)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            return Ok(None);
        }
        let mut len = buf.len();
        if buf.last() != Some(&b'\n') && buf.len() > max {
            loop {
                let chunk = reader.fill_buf().map_err(io)?;
                if chunk.is_empty() {
                    break;
                }
                // Counted without the line ending.
                let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (chunk.len(), false),
                };
                let cr = end && take >= 2 && chunk[take - 2] == b'\r';
                len += take - usize::from(end) - usize::from(cr);
                reader.consume(take);
                if end {
                    break;
                }
            }
        }
        let at = format!("{}:{}", path.display(), *line);
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        // The line's length without its line ending (what was skipped over included).
        let len = len - (buf.len() - body.len());
        if len <= max && body.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let value = if len > max {
            Err(too_long(len, max))
        } else {
            std::str::from_utf8(body)
                .map_err(|e| {
                    format!(
                        "not UTF-8 (an invalid byte at byte {} of the line)",
                        e.valid_up_to() + 1
                    )
                })
                .and_then(|s| {
                    if text {
                        Ok(serde_json::json!({ "text": s }))
                    } else {
                        serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
                    }
                })
        };
        return Ok(Some(Row { at, value }));
    }
}

/// What the rows hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// `{"messages": [{"role", "content"}, ...]}`, rendered by the chat template; the loss
    /// counts every assistant turn.
    Messages,
    /// `{"prompt", "completion"}`; the loss counts the completion (and the end-of-sequence
    /// token after it).
    PromptCompletion,
    /// `{"text"}` (or plain text lines): every token counts.
    Text,
}

impl RowFormat {
    /// The format of `files`, from the first rows that parse (a bad first row does not decide
    /// it): `messages`, `prompt` or `text`; plain text files (not `.jsonl`, `.json` or
    /// `.parquet`) are text.
    pub fn detect(files: &[PathBuf]) -> Result<Self> {
        let mut rows = RowReader::new(files, 1 << 24);
        let mut seen = 0;
        while let Some(r) = rows.next_row()? {
            if let Ok(v) = r.value {
                for (key, format) in [
                    ("messages", Self::Messages),
                    ("prompt", Self::PromptCompletion),
                    ("text", Self::Text),
                ] {
                    if v.get(key).is_some() {
                        return Ok(format);
                    }
                }
            }
            seen += 1;
            if seen == 16 {
                break;
            }
        }
        bail!(
            "--data {}: its first rows have no \"messages\", \"prompt\" (with \"completion\") or \"text\" field or column",
            files[0].display()
        )
    }
}

/// How rows become examples: the format, the tokenizer, the chat template (for messages), the
/// end-of-sequence token appended to completions and texts, and the longest example (`None`:
/// any length, for packing that splits or drops them itself).
pub struct Tokenize<'a> {
    pub format: RowFormat,
    /// Without the truncation or padding a `tokenizer.json` may carry.
    pub tokenizer: std::borrow::Cow<'a, tokenizers::Tokenizer>,
    pub template: Option<&'a ChatTemplate>,
    pub eos: Option<u32>,
    pub max_tokens: Option<usize>,
    /// The longest row (bytes) read: rows beyond it are refused before parsing.
    pub max_bytes: usize,
}

/// The longest row (bytes) that `seq_len` tokens could come from: no token of a tokenizer spans
/// more than 64 bytes, with room for the JSON (or chat markup) around the text.
pub fn max_row_bytes(seq_len: usize) -> usize {
    seq_len * 64 + 4096
}

impl<'a> Tokenize<'a> {
    pub fn new(
        format: RowFormat,
        tokenizer: &'a tokenizers::Tokenizer,
        template: Option<&'a ChatTemplate>,
        eos: Option<u32>,
        seq_len: usize,
    ) -> Self {
        Self {
            format,
            tokenizer: untruncated(tokenizer),
            template,
            eos,
            max_tokens: Some(seq_len),
            max_bytes: max_row_bytes(seq_len),
        }
    }

    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizer: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// The example of row `v`, or why there is none.
    pub fn example(&self, v: &serde_json::Value, at: &str) -> std::result::Result<Example, String> {
        let field = |k: &str, need: &str| {
            v.get(k)
                .and_then(|f| f.as_str())
                .ok_or(format!("no string field \"{k}\" (rows need {need})"))
        };
        let (ids, learn) = match self.format {
            RowFormat::Messages => {
                let messages = parse_messages(v)?;
                let template = self
                    .template
                    .ok_or("chat rows need the model's chat template")?;
                let (ids, learn) = template
                    .tokenize(&self.tokenizer, &messages)
                    .map_err(|e| e.to_string())?;
                if !learn.iter().skip(1).any(|&l| l) {
                    return Err("the assistant turns render to no tokens (nothing to learn)".into());
                }
                (ids, learn)
            }
            RowFormat::PromptCompletion => {
                let need = "\"prompt\" and \"completion\"";
                let p = self.encode(field("prompt", need)?)?;
                let mut c = self.encode(field("completion", need)?)?;
                if c.is_empty() {
                    return Err("the completion is empty (nothing to learn)".into());
                }
                if p.is_empty() {
                    return Err("the prompt encodes to no tokens (the first completion token needs one before it)".into());
                }
                // The end of the answer is learnt too, so that generation knows when to stop.
                c.extend(self.eos);
                let learn = [vec![false; p.len()], vec![true; c.len()]].concat();
                ([p, c].concat(), learn)
            }
            RowFormat::Text => {
                let mut t = self.encode(field("text", "\"text\"")?)?;
                if t.len() < 2 {
                    return Err("the text encodes to fewer than 2 tokens (nothing to learn)".into());
                }
                t.extend(self.eos);
                let n = t.len();
                (t, vec![true; n])
            }
        };
        if let Some(max) = self.max_tokens {
            if ids.len() > max {
                return Err(format!("{} tokens do not fit --seq-len {max}", ids.len()));
            }
        }
        Ok(Example {
            ids,
            learn,
            at: at.to_string(),
        })
    }
}

/// Which examples a stream yields: the held-out split takes every tenth usable example (the
/// 1st, 11th, 21st, ...), the training split the others; `All` takes every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    All,
    Train,
    Eval,
}

/// A small deterministic generator (splitmix64): the data order's, the same on every rank
/// and run for the same seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// What one pass over the data found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EpochReport {
    /// 1 for the first pass.
    pub epoch: usize,
    /// Examples this split took.
    pub examples: usize,
    /// Bad rows skipped (`skip_bad`).
    pub skipped: usize,
    /// Examples packing dropped (`--pack-overflow drop`).
    pub dropped: usize,
}

/// Examples of `files` in a seeded order, pass after pass: each row read and tokenized when
/// needed, shuffled through a buffer of `buffer` examples (a new order every pass; the same for
/// the same seed, so a resumed job that replays its steps continues the same order).
pub struct ExampleStream<'a> {
    files: Vec<PathBuf>,
    tokenize: &'a Tokenize<'a>,
    split: Split,
    seed: u64,
    capacity: usize,
    skip_bad: bool,
    reader: Option<RowReader>,
    buffer: Vec<Example>,
    rng: SplitMix64,
    /// Usable examples of this pass so far (both splits).
    usable: usize,
    current: EpochReport,
    finished: Vec<EpochReport>,
    /// The examples packing carries to the next rows (an example it did not fit, or the
    /// parts of a split one).
    pending: std::collections::VecDeque<Example>,
    /// Examples packing dropped since it last placed one: a whole pass of them means that no
    /// example fits.
    dropped_in_a_row: usize,
}

impl<'a> ExampleStream<'a> {
    pub fn new(
        files: &[PathBuf],
        tokenize: &'a Tokenize<'a>,
        split: Split,
        seed: u64,
        buffer: usize,
        skip_bad: bool,
    ) -> Self {
        Self {
            files: files.to_vec(),
            tokenize,
            split,
            seed,
            capacity: buffer.max(1),
            skip_bad,
            reader: None,
            buffer: Vec::new(),
            rng: SplitMix64(0),
            usable: 0,
            current: EpochReport::default(),
            finished: Vec::new(),
            pending: std::collections::VecDeque::new(),
            dropped_in_a_row: 0,
        }
    }

    /// The passes finished since the last call.
    pub fn take_reports(&mut self) -> Vec<EpochReport> {
        std::mem::take(&mut self.finished)
    }

    /// The next usable example of this split from the files (`None` at the end of the pass).
    fn read_one(&mut self) -> Result<Option<Example>> {
        let reader = self.reader.as_mut().expect("a pass is open");
        while let Some(row) = reader.next_row()? {
            let example = row.value.and_then(|v| self.tokenize.example(&v, &row.at));
            match example {
                Ok(e) => {
                    let held_out = self.usable.is_multiple_of(10);
                    self.usable += 1;
                    let keep = match self.split {
                        Split::All => true,
                        Split::Train => !held_out,
                        Split::Eval => held_out,
                    };
                    if keep {
                        self.current.examples += 1;
                        return Ok(Some(e));
                    }
                }
                Err(_) if self.skip_bad => self.current.skipped += 1,
                Err(e) => bail!("{}: {e} (--skip-bad-rows skips such rows)", row.at),
            }
        }
        Ok(None)
    }

    /// The next example: from the shuffle buffer, refilled from the files; a new pass (in a new
    /// order) after the last. An error when a whole pass holds no example of this split.
    pub fn next_example(&mut self) -> Result<Example> {
        loop {
            if self.reader.is_none() {
                self.reader = Some(RowReader::new(&self.files, self.tokenize.max_bytes));
                self.current = EpochReport {
                    epoch: self.current.epoch + 1,
                    ..Default::default()
                };
                self.usable = 0;
                self.rng = SplitMix64(
                    self.seed ^ (self.current.epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407),
                );
            }
            let mut exhausted = false;
            while self.buffer.len() < self.capacity {
                match self.read_one()? {
                    Some(e) => self.buffer.push(e),
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            if !self.buffer.is_empty() {
                let j = self.rng.below(self.buffer.len());
                return Ok(self.buffer.swap_remove(j));
            }
            if exhausted {
                let report = self.current;
                if report.examples > 0 && self.dropped_in_a_row >= report.examples {
                    bail!(
                        "--data {}: every example is longer than a row (--pack-overflow drop drops them all): raise --seq-len or use --pack-overflow split",
                        self.files[0].display()
                    )
                }
                if report.examples == 0 {
                    bail!(
                        "--data {}{}: no usable {}example ({} bad rows skipped){}",
                        self.files[0].display(),
                        if self.files.len() > 1 {
                            format!(" and {} more files", self.files.len() - 1)
                        } else {
                            String::new()
                        },
                        match self.split {
                            Split::Eval => "held-out ",
                            Split::Train => "training ",
                            Split::All => "",
                        },
                        report.skipped,
                        if self.split == Split::Train {
                            ": the held-out set takes every tenth example, so at least 2 are needed"
                        } else {
                            ""
                        }
                    )
                }
                self.finished.push(report);
                self.reader = None;
            }
        }
    }

    /// The first `n` examples of this split, in file order (no shuffling): a held-out set read
    /// without reading the rest.
    pub fn first(&mut self, n: usize) -> Result<Vec<Example>> {
        self.reader = Some(RowReader::new(&self.files, self.tokenize.max_bytes));
        self.usable = 0;
        let mut out = Vec::new();
        while out.len() < n {
            match self.read_one()? {
                Some(e) => out.push(e),
                None => break,
            }
        }
        self.reader = None;
        self.current = EpochReport::default();
        Ok(out)
    }

    /// The longest buffered example of at most `room` tokens (the first of equals).
    fn take_fitting(&mut self, room: usize) -> Option<Example> {
        let (i, _) = self
            .buffer
            .iter()
            .enumerate()
            .filter(|(_, e)| e.ids.len() <= room)
            .fold(None, |best: Option<(usize, usize)>, (i, e)| match best {
                Some((_, n)) if n >= e.ids.len() => best,
                _ => Some((i, e.ids.len())),
            })?;
        Some(self.buffer.swap_remove(i))
    }

    /// `rows` examples, one per row of `seq_len` tokens padded with `pad` at the end.
    pub fn padded_batch(&mut self, rows: usize, seq_len: usize, pad: u32) -> Result<RowBatch> {
        let mut b = RowBatch::new(seq_len);
        for _ in 0..rows {
            let e = self.next_example()?;
            // One row each: a longer example (with no token limit) is cut.
            let n = e.ids.len().min(seq_len);
            b.place(&e.ids[..n], &e.learn[..n]);
            b.pad_row(pad);
        }
        Ok(b)
    }

    /// `rows` rows of `seq_len` tokens, each packed with whole examples, each with positions
    /// from 0 and, in the model, attention to itself only; the rest padding. Examples come in
    /// the stream's order; where the next does not fit, the longest one in the shuffle buffer
    /// that fits the rest of the row goes there (best fit). An example longer than a row goes
    /// by `overflow`.
    pub fn packed_batch(
        &mut self,
        rows: usize,
        seq_len: usize,
        pad: u32,
        overflow: Overflow,
    ) -> Result<RowBatch> {
        let mut b = RowBatch::new(seq_len);
        b.positions = Some(Vec::with_capacity(rows * seq_len));
        for _ in 0..rows {
            let mut used = 0;
            loop {
                let e = match self.pending.pop_front() {
                    Some(e) => e,
                    None => self.next_example()?,
                };
                if e.ids.len() > seq_len {
                    match overflow {
                        Overflow::Error => bail!(
                            "{}: an example of {} tokens, longer than --seq-len {seq_len} (--pack-overflow split or drop takes such examples)",
                            e.at,
                            e.ids.len()
                        ),
                        Overflow::Drop => {
                            self.current.dropped += 1;
                            self.dropped_in_a_row += 1;
                            continue;
                        }
                        Overflow::Split => {
                            // Its row-sized parts, each a sequence of its own, come next (a
                            // part too short to learn from goes).
                            let parts: Vec<Example> = e
                                .ids
                                .chunks(seq_len)
                                .zip(e.learn.chunks(seq_len))
                                .filter(|(ids, _)| ids.len() >= 2)
                                .map(|(ids, learn)| Example {
                                    ids: ids.to_vec(),
                                    learn: learn.to_vec(),
                                    at: e.at.clone(),
                                })
                                .collect();
                            for part in parts.into_iter().rev() {
                                self.pending.push_front(part);
                            }
                            continue;
                        }
                    }
                }
                if used + e.ids.len() > seq_len {
                    self.pending.push_front(e);
                    // The longest example waiting in the buffer that fills the rest of the row
                    // (best fit, as TRL's packing), if any.
                    match self.take_fitting(seq_len - used) {
                        Some(f) => {
                            b.place(&f.ids, &f.learn);
                            used += f.ids.len();
                            self.dropped_in_a_row = 0;
                            continue;
                        }
                        None => break,
                    }
                }
                b.place(&e.ids, &e.learn);
                used += e.ids.len();
                self.dropped_in_a_row = 0;
                if used == seq_len {
                    break;
                }
            }
            b.pad_row(pad);
        }
        Ok(b)
    }
}

/// What packing does with an example longer than a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Cut it into rows (each part a sequence of its own).
    #[default]
    Split,
    /// Leave it out (counted in the pass's report).
    Drop,
    /// Stop with an error naming it.
    Error,
}

impl std::str::FromStr for Overflow {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "split" => Ok(Self::Split),
            "drop" => Ok(Self::Drop),
            "error" => Ok(Self::Error),
            _ => Err(format!("--pack-overflow {s}: use split, drop or error")),
        }
    }
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Split => "split",
            Self::Drop => "drop",
            Self::Error => "error",
        })
    }
}

/// A batch of rows as HF passes them: `input_ids`, `labels` (the tokens the loss counts, the
/// others [`IGNORE_INDEX`]; an example's first token never counts, nothing before it in its
/// row predicts it), `attention_mask` (0 on the padding) and, packed, `position_ids`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBatch {
    pub seq_len: usize,
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub mask: Vec<u8>,
    pub positions: Option<Vec<u32>>,
    /// Examples (or parts of examples) placed.
    pub examples: usize,
}

impl RowBatch {
    fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            ids: Vec::new(),
            labels: Vec::new(),
            mask: Vec::new(),
            positions: None,
            examples: 0,
        }
    }

    /// `examples` one per row of `seq_len` tokens, padded with `pad` (a longer one cut to
    /// its first `seq_len` tokens): e.g. a held-out set.
    pub fn padded(examples: &[Example], seq_len: usize, pad: u32) -> Self {
        let mut b = Self::new(seq_len);
        for e in examples {
            let n = e.ids.len().min(seq_len);
            b.place(&e.ids[..n], &e.learn[..n]);
            b.pad_row(pad);
        }
        b
    }

    /// Rows so far.
    pub fn rows(&self) -> usize {
        self.ids.len() / self.seq_len
    }

    /// Tokens that are not padding.
    pub fn tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m == 1).count()
    }

    /// The share of the batch's tokens that are padding.
    pub fn padding_share(&self) -> f64 {
        1.0 - self.tokens() as f64 / self.ids.len().max(1) as f64
    }

    fn place(&mut self, ids: &[u32], learn: &[bool]) {
        for (i, (&t, &l)) in ids.iter().zip(learn).enumerate() {
            self.ids.push(t);
            self.labels
                .push(if l && i > 0 { t as i64 } else { IGNORE_INDEX });
            self.mask.push(1);
            if let Some(p) = self.positions.as_mut() {
                p.push(i as u32);
            }
        }
        self.examples += 1;
    }

    /// Pads the row being filled to `seq_len` (its own positions from 0).
    fn pad_row(&mut self, pad: u32) {
        let n = self.seq_len - self.ids.len() % self.seq_len;
        if n == self.seq_len && !self.ids.is_empty() {
            return;
        }
        for i in 0..n {
            self.ids.push(pad);
            self.labels.push(IGNORE_INDEX);
            self.mask.push(0);
            if let Some(p) = self.positions.as_mut() {
                p.push(i as u32);
            }
        }
    }
}
