//! Training metrics for people and scripts: [`MetricsWriter`] appends each step's scalars to a
//! `metrics.jsonl` (one JSON object a line) and, optionally, to TensorBoard event files
//! (scalars, and histograms such as the expert load of each layer).
//!
//! The event files are TensorBoard's own format, written here: TFRecord framing (the length,
//! its masked CRC-32C, the bytes, their masked CRC-32C) around `Event` protocol buffers holding
//! a `Summary` of `simple_value`s or `HistogramProto`s. The Rust crates that write them are
//! unmaintained and pull an old protobuf runtime; the few fields needed are encoded directly.
//!
//! ```
//! use candle_parallel::metrics::MetricsWriter;
//!
//! let dir = std::env::temp_dir().join(format!("metrics-doc-{}", std::process::id()));
//! let mut m = MetricsWriter::create(&dir.join("metrics.jsonl"), Some(&dir.join("tb")))?;
//! m.scalars(1, &[("loss", 2.5), ("lr", 1e-3)])?;
//! m.histogram(1, "expert_load/layer_0", &[10.0, 12.0, 9.0, 11.0])?;
//! m.flush()?;
//! let line = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
//! assert!(line.starts_with(r#"{"step":1,"loss":2.5,"lr":0.001}"#));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use candle_core::Result;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Appends metrics to `metrics.jsonl` and, optionally, TensorBoard event files.
pub struct MetricsWriter {
    jsonl: BufWriter<File>,
    events: Option<EventWriter>,
}

impl MetricsWriter {
    /// Writes JSON lines to `jsonl` (created or appended to: a resumed job goes on) and, with
    /// `tensorboard`, event files into that directory (created), as TensorBoard reads them
    /// (`tensorboard --logdir DIR`).
    pub fn create(jsonl: &Path, tensorboard: Option<&Path>) -> Result<Self> {
        if let Some(dir) = jsonl.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                candle_core::Error::msg(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(jsonl)
            .map_err(|e| {
                candle_core::Error::msg(format!("cannot open {}: {e}", jsonl.display()))
            })?;
        Ok(Self {
            jsonl: BufWriter::new(file),
            events: tensorboard.map(EventWriter::create).transpose()?,
        })
    }

    /// The event file being written, if any.
    pub fn event_file(&self) -> Option<&Path> {
        self.events.as_ref().map(|e| e.path.as_path())
    }

    /// Step `step`'s scalars: one JSON line, one TensorBoard scalar each.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let fields: Vec<(&str, serde_json::Value)> =
            values.iter().map(|(t, v)| (*t, json_number(*v))).collect();
        self.line(step, &fields)?;
        if let Some(e) = &mut self.events {
            for (tag, v) in values {
                e.write(&scalar_event(step, tag, *v))?;
            }
        }
        Ok(())
    }

    /// A histogram of `values` at `step` (TensorBoard only; the JSON line holds the values
    /// under `tag`).
    pub fn histogram(&mut self, step: u64, tag: &str, values: &[f64]) -> Result<()> {
        let list: Vec<serde_json::Value> = values.iter().map(|&v| json_number(v)).collect();
        self.line(step, &[(tag, list.into())])?;
        if let Some(e) = &mut self.events {
            e.write(&histogram_event(step, tag, values))?;
        }
        Ok(())
    }

    /// One JSON line: the step first, then the fields in the order given.
    fn line(&mut self, step: u64, fields: &[(&str, serde_json::Value)]) -> Result<()> {
        let mut text = format!("{{\"step\":{step}");
        for (tag, v) in fields {
            let tag = serde_json::to_string(tag).map_err(candle_core::Error::wrap)?;
            text.push_str(&format!(",{tag}:{v}"));
        }
        text.push('}');
        writeln!(self.jsonl, "{text}").map_err(candle_core::Error::wrap)
    }

    /// Flushes both files (they are flushed on drop too).
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl.flush().map_err(candle_core::Error::wrap)?;
        if let Some(e) = &mut self.events {
            e.file.flush().map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }
}

/// A JSON number (non-finite values as null: JSON has no NaN).
fn json_number(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into)
}

/// One TensorBoard event file.
struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            candle_core::Error::msg(format!("cannot create {}: {e}", dir.display()))
        })?;
        let secs = wall_time() as u64;
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.candle-parallel.{}",
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| {
            candle_core::Error::msg(format!("cannot create {}: {e}", path.display()))
        })?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        // The first event names the format version.
        let mut first = Vec::new();
        put_double(&mut first, 1, wall_time());
        put_bytes(&mut first, 3, b"brain.Event:2");
        w.write(&first)?;
        Ok(w)
    }

    /// One TFRecord: length, its masked CRC, the bytes, their masked CRC.
    fn write(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&out).map_err(candle_core::Error::wrap)
    }
}

/// TFRecord's masked CRC-32C.
pub(crate) fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `Event { wall_time: 1, step: 2, summary: 5 { value: 1 { tag: 1, simple_value: 2 } } }`.
fn scalar_event(step: u64, tag: &str, v: f64) -> Vec<u8> {
    let mut value = Vec::new();
    put_bytes(&mut value, 1, tag.as_bytes());
    put_float(&mut value, 2, v as f32);
    event_with_value(step, &value)
}

/// `Value { tag: 1, histo: 5 HistogramProto { min 1, max 2, num 3, sum 4, sum_squares 5,
/// bucket_limit 6, bucket 7 } }` with 30 equal buckets from the minimum to the maximum.
fn histogram_event(step: u64, tag: &str, values: &[f64]) -> Vec<u8> {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (min, max) = if values.is_empty() {
        (0.0, 0.0)
    } else {
        (min, max)
    };
    let buckets = 30;
    let width = (max - min) / buckets as f64;
    let limits: Vec<f64> = match width > 0.0 {
        true => (1..=buckets).map(|i| min + width * i as f64).collect(),
        false => vec![max],
    };
    let mut counts = vec![0f64; limits.len()];
    for &v in values {
        let i = limits
            .iter()
            .position(|&l| v <= l)
            .unwrap_or(limits.len() - 1);
        counts[i] += 1.0;
    }
    let mut h = Vec::new();
    put_double(&mut h, 1, min);
    put_double(&mut h, 2, max);
    put_double(&mut h, 3, values.len() as f64);
    put_double(&mut h, 4, values.iter().sum());
    put_double(&mut h, 5, values.iter().map(|v| v * v).sum());
    put_packed_doubles(&mut h, 6, &limits);
    put_packed_doubles(&mut h, 7, &counts);
    let mut value = Vec::new();
    put_bytes(&mut value, 1, tag.as_bytes());
    put_bytes(&mut value, 5, &h);
    event_with_value(step, &value)
}

fn event_with_value(step: u64, value: &[u8]) -> Vec<u8> {
    let mut summary = Vec::new();
    put_bytes(&mut summary, 1, value);
    let mut event = Vec::new();
    put_double(&mut event, 1, wall_time());
    put_varint_field(&mut event, 2, step);
    put_bytes(&mut event, 5, &summary);
    event
}

// Protocol buffers' wire format: a key (field << 3 | type), then the value.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(out, (field << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u64, v: f32) {
    put_varint(out, (field << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_packed_doubles(out: &mut Vec<u8>, field: u64, values: &[f64]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    put_bytes(out, field, &bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of a protocol buffer message: number and value (varint, or the bytes of a
    /// length-delimited or fixed-width field).
    enum Field {
        Varint(u64),
        Bytes(Vec<u8>),
    }

    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let x = b[*at];
            *at += 1;
            v |= u64::from(x & 0x7f) << shift;
            if x < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    fn fields(b: &[u8]) -> Vec<(u64, Field)> {
        let (mut at, mut out) = (0, Vec::new());
        while at < b.len() {
            let key = varint(b, &mut at);
            let (n, kind) = (key >> 3, key & 7);
            let f = match kind {
                0 => Field::Varint(varint(b, &mut at)),
                1 => {
                    at += 8;
                    Field::Bytes(b[at - 8..at].to_vec())
                }
                5 => {
                    at += 4;
                    Field::Bytes(b[at - 4..at].to_vec())
                }
                2 => {
                    let len = varint(b, &mut at) as usize;
                    at += len;
                    Field::Bytes(b[at - len..at].to_vec())
                }
                k => panic!("wire type {k}"),
            };
            out.push((n, f));
        }
        out
    }

    fn bytes_of(fs: &[(u64, Field)], n: u64) -> Vec<u8> {
        fs.iter()
            .find_map(|(k, f)| match f {
                Field::Bytes(b) if *k == n => Some(b.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// The event file reads back as TensorBoard reads it: every record's length and data CRCs
    /// hold, the first event names the version, the scalars and the histogram carry their
    /// steps, tags and values.
    #[test]
    fn event_files_read_back_with_their_checksums() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("metrics-test-{}", std::process::id()));
        let mut m = MetricsWriter::create(&dir.join("m.jsonl"), Some(&dir.join("tb")))?;
        m.scalars(3, &[("loss", 1.25), ("grad_norm", 0.5)])?;
        m.histogram(3, "expert_load/layer_1", &[1.0, 2.0, 2.0, 5.0])?;
        m.flush()?;
        let bytes = std::fs::read(m.event_file().unwrap())?;
        let (mut at, mut events) = (0, Vec::new());
        while at < bytes.len() {
            let len = &bytes[at..at + 8];
            let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len), "length CRC");
            let data = &bytes[at + 12..at + 12 + n];
            let crc = u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into().unwrap());
            assert_eq!(crc, masked_crc(data), "data CRC");
            events.push(data.to_vec());
            at += 16 + n;
        }
        assert_eq!(events.len(), 4);
        assert_eq!(bytes_of(&fields(&events[0]), 3), b"brain.Event:2");
        let mut scalars = Vec::new();
        for e in &events[1..3] {
            let fs = fields(e);
            let step = fs.iter().find_map(|(k, f)| match f {
                Field::Varint(v) if *k == 2 => Some(*v),
                _ => None,
            });
            let value = fields(&bytes_of(&fields(&bytes_of(&fs, 5)), 1));
            let tag = String::from_utf8(bytes_of(&value, 1)).unwrap();
            let v = f32::from_le_bytes(bytes_of(&value, 2).try_into().unwrap());
            scalars.push((step, tag, v));
        }
        assert_eq!(
            scalars,
            [
                (Some(3), "loss".to_string(), 1.25),
                (Some(3), "grad_norm".to_string(), 0.5)
            ]
        );
        let value = fields(&bytes_of(&fields(&bytes_of(&fields(&events[3]), 5)), 1));
        assert_eq!(bytes_of(&value, 1), b"expert_load/layer_1");
        let h = fields(&bytes_of(&value, 5));
        let double = |n| f64::from_le_bytes(bytes_of(&h, n).try_into().unwrap());
        assert_eq!(
            (double(1), double(2), double(3), double(4)),
            (1.0, 5.0, 4.0, 10.0)
        );
        let counts: Vec<f64> = bytes_of(&h, 7)
            .chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(counts.iter().sum::<f64>(), 4.0);
        let lines = std::fs::read_to_string(dir.join("m.jsonl"))?;
        assert_eq!(
            lines.lines().collect::<Vec<_>>(),
            [
                r#"{"step":3,"loss":1.25,"grad_norm":0.5}"#,
                r#"{"step":3,"expert_load/layer_1":[1.0,2.0,2.0,5.0]}"#
            ]
        );
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }
}
