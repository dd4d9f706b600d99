#!/usr/bin/env bash
# Builds the `nccl` feature here (no GPU needed) and packs what a GPU machine runs into
# gpu-bin/ (ignored by git): bundle.tar.xz with the NCCL test binary, the examples that run on
# GPUs, the rendezvous probe, cuda-run-env.sh and run-all.sh. On the GPU machine (no Rust
# toolchain there), in the carried folder:
#
#     tar xJf bundle.tar.xz && ./run-all.sh
#
# PTX makes each binary 40-60 MB; xz brings the bundle to about a tenth of that.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch --quiet
# shellcheck source=/dev/null
source .ci/cuda-env.sh
set -u
export CARGO_TARGET_DIR="$HOME/.cache/candle-parallel-nccl-target"
out=gpu-bin
rm -rf "$out" && mkdir -p "$out/stage"
cargo build --release --features nccl --tests --examples --workspace --message-format=json \
    > "$out/build.json"
python3 - "$out/build.json" "$out/stage" <<'PY'
import json, shutil, sys
want_tests = {"nccl"}
want_examples = {"bench_collectives", "launch", "finetune_mixtral", "quickstart", "rendezvous_probe"}
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    name, kinds, harness = t["name"], t["kind"], m["profile"]["test"]
    # `--tests` also builds test harnesses of bins and examples: take the programs themselves.
    if ("test" in kinds and name in want_tests) or (not harness and (
            "example" in kinds and name in want_examples)):
        shutil.copy(m["executable"], f"{sys.argv[2]}/{name}")
PY
cp .ci/cuda-run-env.sh "$out/stage/"
cat > "$out/stage/run-all.sh" <<EOF
#!/usr/bin/env bash
# Runs on the GPU machine: every NCCL test (the abort and timeout paths included), the
# collective benchmark and the main job as a process rank and as a thread rank, once more with
# checked arguments; with 2 or more GPUs, the benchmark at every GPU and, with 4 or more, the
# main job's default 4-rank layout (ep 2 x tp 2) as processes and as threads.
cd "\$(dirname "\$0")"
source ./cuda-run-env.sh
# The tests find the probe here rather than in a cargo build directory.
export CANDLE_PARALLEL_PROBE="\$PWD/rendezvous_probe"
export CANDLE_PARALLEL_TIMEOUT_SECS=120
gpus=\$(nvidia-smi -L | wc -l)
echo "GPUs: \$gpus"
status=0
./nccl --test-threads=1 || status=1
./bench_collectives --backend nccl --ranks 1 --max-bytes 268435456 || status=1
./launch --nproc 1 -- finetune_mixtral --mesh ep=1,tp=1 --model /tmp/cp-model --out /tmp/cp-ckpt || status=1
CANDLE_PARALLEL_BACKEND=nccl ./finetune_mixtral --mesh ep=1,tp=1 --model /tmp/cp-model --out /tmp/cp-ckpt-threads || status=1
CANDLE_PARALLEL_CHECK_COLLECTIVES=1 CANDLE_PARALLEL_BACKEND=nccl ./finetune_mixtral --mesh ep=1,tp=1 --model /tmp/cp-model --out /tmp/cp-ckpt-checked || status=1
if [ "\$gpus" -ge 2 ]; then
  ./bench_collectives --backend nccl --ranks "1,\$gpus" --max-bytes 268435456 || status=1
fi
if [ "\$gpus" -ge 4 ]; then
  ./launch --nproc 4 -- finetune_mixtral --model /tmp/cp-model --out /tmp/cp-ckpt-4p || status=1
  CANDLE_PARALLEL_CHECK_COLLECTIVES=1 CANDLE_PARALLEL_BACKEND=nccl ./finetune_mixtral --model /tmp/cp-model --out /tmp/cp-ckpt-4t || status=1
fi
exit \$status
EOF
chmod +x "$out/stage/run-all.sh"
tar -C "$out/stage" -cf - . | xz -T0 -6 > "$out/bundle.tar.xz"
rm -rf "$out/stage" "$out/build.json"
ls -la "$out"
