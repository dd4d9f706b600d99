"""Writes the Parquet fixtures of `tests/data.rs` with pyarrow (what Hugging Face datasets
writes its files with): the same chat conversations as JSONL, as one snappy Parquet file in
row groups of 4, as gzip and lz4 files, and as a directory of two zstd shards named as the Hub names them; and
prompt/completion rows as Parquet. With --chat-sums FILE, also the README's chat dataset:
2000 conversations about digit sums modulo 10 of varied lengths (one to three questions,
some with a system turn, some wordy), as Parquet.

    /tmp/venv-chat/bin/pip install pyarrow
    /tmp/venv-chat/bin/python scripts/data_fixtures.py --out tests/fixtures/data

CI never runs it.
"""

import argparse
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq


def conversations():
    out = []
    for i in range(12):
        turns = [{"role": "user", "content": f"What is {i} + {i % 5}?"},
                 {"role": "assistant", "content": f"{i} + {i % 5} = {i + i % 5}."}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "And doubled?"},
                      {"role": "assistant", "content": f"{2 * (i + i % 5)}, caf\u00e9."}]
        out.append({"messages": turns})
    return out


def chat_sums(n):
    import random
    rng = random.Random(0)
    polite = ["", "Please, ", "Quick question: ", "If you would be so kind, tell me ",
              "I have been wondering for a while now, and my notes do not say: "]
    rows = []
    for _ in range(n):
        turns = []
        if rng.random() < 0.3:
            turns.append({"role": "system", "content": "You add digits modulo 10 and answer with one digit."})
        for k in range(rng.choice([1, 1, 2, 3])):
            a, b = rng.randrange(10), rng.randrange(10)
            q = f"{rng.choice(polite)}what is {a} + {b}?" if k == 0 else f"And {a} + {b}?"
            turns.append({"role": "user", "content": q})
            turns.append({"role": "assistant", "content": str((a + b) % 10)})
        rows.append({"messages": turns})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="tests/fixtures/data")
    p.add_argument("--chat-sums")
    a = p.parse_args()
    if a.chat_sums:
        pq.write_table(pa.Table.from_pylist(chat_sums(2000)), a.chat_sums)
    os.makedirs(os.path.join(a.out, "shards", "data"), exist_ok=True)
    rows = conversations()
    with open(os.path.join(a.out, "chat.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, os.path.join(a.out, "chat.parquet"), row_group_size=4, compression="snappy")
    # Brotli is a codec this library's build does not read: the test wants a clear error.
    pq.write_table(table, os.path.join(a.out, "chat-brotli.parquet"), compression="brotli")
    for codec in ["gzip", "lz4"]:
        pq.write_table(table, os.path.join(a.out, f"chat-{codec}.parquet"), compression=codec)
    half = len(rows) // 2
    for k, part in enumerate([rows[:half], rows[half:]]):
        pq.write_table(pa.Table.from_pylist(part),
                       os.path.join(a.out, "shards", "data", f"train-{k:05d}-of-00002.parquet"),
                       compression="zstd")
    pc = [{"prompt": f"{i} + 1 =", "completion": f" {(i + 1) % 10}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(pc), os.path.join(a.out, "prompt-completion.parquet"))


if __name__ == "__main__":
    main()
