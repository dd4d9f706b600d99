"""Reference for `cargo run --example mixtral -- train`: the same steps with Hugging Face
transformers' `MixtralForCausalLM` (or, by the config's `model_type`, `Qwen2MoeForCausalLM` /
`Qwen3MoeForCausalLM`) and PyTorch's AdamW, on one device, in float32.

Each step: loss = mean next-token cross-entropy over the whole batch (`labels=input_ids`, or
the batch file's "labels" with -100 where the loss does not count) + aux-coef x HF's
load-balancing loss (`output_router_logits=True`; over the tokens the batch file's
"attention_mask" keeps, if it has one), backward,
`clip_grad_norm_(params, clip)` (the norm before clipping is recorded), one
`torch.optim.AdamW` step (betas 0.9/0.999, eps 1e-8, decoupled weight decay).

Writes a safetensors file with every parameter after the last step under its HF name, plus
`loss.<i>` and `grad_norm.<i>` before step i: the layout of our `--out`.

    /work/venv-torch/bin/python scripts/mixtral_train_reference.py --model DIR \
        --batch FILE.json --steps 3 --lr 1e-3 --weight-decay 0.01 --clip 1.0 --out ref.safetensors

With `--generate N`, it also records `generated`: the model's greedy continuation (N tokens,
before any step) of the batch's first row, as `model.generate` gives it.

CI never runs it (the virtual env lives outside the checkout; see bench_moe_torch.py). It
wrote `tests/fixtures/mixtral_train_reference.safetensors`, which `tests/mixtral_train.rs`
compares our runs with, and with a batch file with labels and an attention mask,
`tests/fixtures/mixtral_train_padded_reference.safetensors`; and, for the Qwen families, the
`tests/fixtures/moe_families/*_train_reference.safetensors` of `tests/moe_families.rs`.
"""

import argparse
import json

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=None)
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(f"{a.model}/config.json") as f:
        model_type = json.load(f).get("model_type", "mixtral")
    # Where the checkpoint keeps a layer's MoE block, and its experts' projection names.
    if model_type == "mixtral":
        block, (gate_name, up_name, down_name) = "block_sparse_moe", ("w1", "w3", "w2")
    else:
        block, (gate_name, up_name, down_name) = "mlp", ("gate_proj", "up_proj", "down_proj")

    torch.manual_seed(0)
    # from_pretrained maps the per-expert w1/w2/w3 of the checkpoint onto transformers 5's
    # fused expert tensors.
    extra = {"router_aux_loss_coef": a.aux_coef} if a.aux_coef is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        a.model,
        torch_dtype=torch.float32,
        attn_implementation="eager",
        output_router_logits=True,
        **extra,
    )
    model.train()
    # No dropout in Mixtral's config by default; routing jitter is off.
    with open(a.batch) as f:
        batch = json.load(f)
    ids = torch.tensor(batch["batch"], dtype=torch.long)
    mask = batch.get("attention_mask")
    mask = torch.tensor(mask, dtype=torch.long) if mask is not None else None
    if "labels" in batch:
        labels = torch.tensor(batch["labels"], dtype=torch.long)
    elif mask is not None:
        # As HF's collators label padding (and `mixtral train` defaults to).
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = ids
    out = {}
    if a.generate:
        model.eval()
        with torch.no_grad():
            prompt = ids[:1]
            gen = model.generate(
                prompt,
                max_new_tokens=a.generate,
                do_sample=False,
                min_new_tokens=a.generate,
                pad_token_id=0,
            )
        out["generated"] = gen[0, prompt.shape[1] :].clone()
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay
    )
    for i in range(a.steps):
        opt.zero_grad()
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, a.clip)
        out[f"loss.{i}"] = res.loss.detach().clone().reshape(())
        out[f"grad_norm.{i}"] = norm.detach().clone().float().reshape(())
        opt.step()
    for name, p in model.named_parameters():
        p = p.detach().clone()
        if name.endswith(".mlp.experts.gate_up_proj"):
            # [experts, 2 * ffn, hidden]: the gate projection's rows first, then up's.
            base = name.replace(".mlp.experts.gate_up_proj", f".{block}.experts")
            ffn = p.shape[1] // 2
            for e in range(p.shape[0]):
                out[f"{base}.{e}.{gate_name}.weight"] = p[e, :ffn].contiguous()
                out[f"{base}.{e}.{up_name}.weight"] = p[e, ffn:].contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            base = name.replace(".mlp.experts.down_proj", f".{block}.experts")
            for e in range(p.shape[0]):
                out[f"{base}.{e}.{down_name}.weight"] = p[e].contiguous()
        else:
            out[name.replace(".mlp.gate.", f".{block}.gate.")] = p.contiguous()
    save_file(out, a.out)
    print(
        json.dumps(
            {
                "loss": [float(out[f"loss.{i}"]) for i in range(a.steps)],
                "grad_norm": [float(out[f"grad_norm.{i}"]) for i in range(a.steps)],
            }
        )
    )


if __name__ == "__main__":
    main()
