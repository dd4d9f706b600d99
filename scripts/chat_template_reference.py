"""Reference for `tests/chat.rs`: conversations rendered by transformers' `apply_chat_template`
and the tokens of their assistant turns, for Mixtral-Instruct's template and Qwen2's ChatML one.

For each template it writes a directory under `tests/fixtures/chat/` with a `tokenizer.json`
(a small byte-level BPE trained here, with the template's special tokens), the
`tokenizer_config.json` transformers reads (`chat_template`, `bos_token`, `eos_token`) and
`expected.json`: per conversation the rendered text, the token ids, the rendering of all but
the last turn with the generation prompt, and the assistant mask. The mask comes from
transformers itself (`return_assistant_tokens_mask=True`) for the templates carrying
`{% generation %}` markers (the `*-markers` variants, the same text with the assistant turn
tagged); for the others it is computed here from transformers' renderings of the turns (the
text that rendering turn i adds after the generation prompt of the turns before it),
mapped to tokens by their character offsets.

    python3 -m venv /tmp/venv-chat && /tmp/venv-chat/bin/pip install transformers jinja2 tokenizers
    /tmp/venv-chat/bin/python scripts/chat_template_reference.py --out tests/fixtures/chat

CI never runs it.
"""

import argparse
import json
import os

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

# From mistralai/Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json.
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
# From Qwen/Qwen2-7B-Instruct's tokenizer_config.json.
QWEN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same texts with the assistant turns tagged for transformers' own assistant mask.
MIXTRAL_MARKERS = MIXTRAL.replace(
    "{{ message['content'] + eos_token}}",
    "{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}",
)
QWEN_MARKERS = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7."},
    ],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in French, with an accent?"},
        {"role": "assistant", "content": "Vert, or \u00e9carlate \U0001f600."},
    ],
    [
        {"role": "user", "content": "  spaces around  "},
        {"role": "assistant", "content": "\nA reply\non two lines\n"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
]
SYSTEM = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hi."},
]


def make_tokenizer(specials, bos, eos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for c in CONVERSATIONS + [SYSTEM] for m in c] * 4
    corpus += ["[INST] hello [/INST] system user assistant You are a helpful assistant."] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    return tok, fast


def prefix_mask(fast, convo, enc):
    """The assistant mask from transformers' renderings turn by turn."""
    full = fast.apply_chat_template(convo, tokenize=False)
    spans = []
    for i, m in enumerate(convo):
        if m["role"] != "assistant":
            continue
        before = fast.apply_chat_template(convo[:i], tokenize=False, add_generation_prompt=True)
        upto = fast.apply_chat_template(convo[: i + 1], tokenize=False)
        assert upto.startswith(before) and full.startswith(upto)
        spans.append((len(before), len(upto)))
    return [
        int(any(a < e and b > s for (s, e) in spans)) for (a, b) in enc["offset_mapping"]
    ]


def write(out, name, template, specials, bos, eos, convos, markers):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    tok, fast = make_tokenizer(specials, bos, eos)
    fast.chat_template = template
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "bos_token": bos, "eos_token": eos}, f, indent=1)
    cases = []
    for convo in convos:
        text = fast.apply_chat_template(convo, tokenize=False)
        enc = fast(text, add_special_tokens=False, return_offsets_mapping=True)
        if markers:
            out_ = fast.apply_chat_template(
                convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = out_["input_ids"], out_["assistant_masks"]
            assert ids == enc["input_ids"]
        else:
            ids, mask = enc["input_ids"], prefix_mask(fast, convo, enc)
        prompt = fast.apply_chat_template(convo[:-1], tokenize=False, add_generation_prompt=True)
        cases.append(
            {"messages": convo, "text": text, "ids": ids, "mask": mask, "generation_prompt": prompt}
        )
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="tests/fixtures/chat")
    a = p.parse_args()
    mx = (["<s>", "</s>"], "<s>", "</s>")
    qw = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>")
    write(a.out, "mixtral", MIXTRAL, *mx, CONVERSATIONS, False)
    write(a.out, "mixtral-markers", MIXTRAL_MARKERS, *mx, CONVERSATIONS, True)
    write(a.out, "qwen", QWEN, *qw, CONVERSATIONS + [SYSTEM], False)
    write(a.out, "qwen-markers", QWEN_MARKERS, *qw, CONVERSATIONS + [SYSTEM], True)


if __name__ == "__main__":
    main()
