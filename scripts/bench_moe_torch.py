"""PyTorch baseline for the MoE layer benchmark.

Times Hugging Face transformers' `MixtralSparseMoeBlock` (`--family mixtral`) or
`Qwen3MoeSparseMoeBlock` (`--family qwen3_moe`, `norm_topk_prob` as Qwen3-30B-A3B's) on the
CPU, in float32, at the shapes of `examples/bench_moe.rs` (2048 tokens as batch 8 x seq 256;
hidden, ffn, experts and top-k as given): a forward pass under `torch.no_grad()`, then a forward + backward pass
(loss `out.pow(2).sum()`, router/gate gradient included). Each is run `--warmup` times
untimed, then `--reps` times timed with `time.perf_counter`; all forward reps come first.

Prints exactly one line of JSON on stdout (anything else goes to stderr):

    {"torch": "...", "transformers": "...", "threads": N, "tokens": T,
     "forward_s": [...], "forward_backward_s": [...]}

It is run by our Rust benchmark, which parses that line:

    cargo run --release --example bench_moe -- --torch /path/to/venv/bin/python

CI never runs it. The virtual env lives outside the checkout:

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch
    /work/venv-torch/bin/pip install transformers

(`--index-url https://download.pytorch.org/whl/cpu` gives a CPU-only torch where that index is
reachable; the PyPI wheel also pulls the CUDA libraries, a venv of about 6 GB, and runs the same.)
"""

import argparse
import contextlib
import json
import sys
import time

import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--family", choices=["mixtral", "qwen3_moe"], default="mixtral")
    # What a model loaded with from_pretrained runs (transformers 5 picks grouped_mm where it
    # can); a block built alone falls back to the per-expert loop ("eager").
    p.add_argument("--experts-impl", choices=["eager", "grouped_mm", "batched_mm"], default="grouped_mm")
    args = p.parse_args()
    if args.tokens % args.batch:
        p.error("--tokens must be a multiple of --batch")
    return args


def build_block(args):
    if args.family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = transformers.Qwen3MoeConfig(
            hidden_size=args.hidden,
            moe_intermediate_size=args.ffn,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            norm_topk_prob=True,
        )
        block = Qwen3MoeSparseMoeBlock(config)
    else:
        config = transformers.MixtralConfig(
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_local_experts=args.experts,
            num_experts_per_tok=args.top_k,
        )
        block = MixtralSparseMoeBlock(config)
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = args.experts_impl
    # Recent versions allocate the weights with torch.empty and leave initialisation to
    # PreTrainedModel; initialise every parameter the same way whatever the version.
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, config.initializer_range)
    return block


def hidden_out(result):
    # Older versions return (hidden_states, router_logits), newer ones the tensor alone.
    return result[0] if isinstance(result, tuple) else result


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens // args.batch, args.hidden)
    block = build_block(args)

    def forward():
        with torch.no_grad():
            block(x)

    xg = x.clone().requires_grad_(True)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        xg.grad = None
        hidden_out(block(xg)).pow(2).sum().backward()

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "experts_impl": args.experts_impl,
        "tokens": args.tokens,
        "forward_s": timed(forward, args.warmup, args.reps),
        "forward_backward_s": timed(forward_backward, args.warmup, args.reps),
    }


def main():
    args = parse_args()
    # Whatever the libraries print goes to stderr: stdout carries the JSON line alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
