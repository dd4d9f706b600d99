"""PyTorch baseline for the whole training step of `examples/bench_data_parallel.rs`.

Builds Hugging Face transformers' `MixtralForCausalLM` of the benchmark's shape (hidden, expert
ffn, experts with top-2, layers, vocabulary; float32, eager attention, the experts
implementation `from_pretrained` gives, router aux loss 0.02 as our model's config) and times
what our step does on one device: forward with the load-balancing loss, backward,
`clip_grad_norm_(params, 1.0)`, one `torch.optim.AdamW` step, on the batch our benchmark trains
(`--batch` rows of `--seq` tokens, token `(row * 131 + j * 31) % vocab`). `--warmup` untimed
steps, then `--reps` timed with `time.perf_counter`.

Prints exactly one line of JSON on stdout (anything else goes to stderr):

    {"torch": "...", "transformers": "...", "threads": N, "params": P, "step_s": [...]}

It is run by our Rust benchmark, which parses that line:

    cargo run --release --example bench_data_parallel -- --torch /path/to/venv/bin/python

CI never runs it; see bench_moe_torch.py for the virtual env.
"""

import argparse
import contextlib
import json
import sys
import time

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with contextlib.redirect_stdout(sys.stderr):
        torch.manual_seed(0)
        # The shape of our MixtralConfig::tiny() scaled as bench_data_parallel scales it.
        cfg = MixtralConfig(
            hidden_size=a.hidden,
            intermediate_size=a.ffn,
            num_local_experts=a.experts,
            num_experts_per_tok=2,
            num_hidden_layers=a.layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=a.vocab,
            max_position_embeddings=max(a.seq, 64),
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            sliding_window=None,
            tie_word_embeddings=False,
        )
        cfg._attn_implementation = "eager"
        model = MixtralForCausalLM(cfg).float()
        model.train()
        ids = torch.tensor(
            [[(r * 131 + j * 31) % a.vocab for j in range(a.seq)] for r in range(a.batch)],
            dtype=torch.long,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        times = []
        for i in range(a.warmup + a.reps):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in params),
                "step_s": times,
            }
        )
    )


if __name__ == "__main__":
    main()
