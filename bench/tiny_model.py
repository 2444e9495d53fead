"""The near-free model of issue 40 (bench/RESULTS.md, "the HTTP side at engine speed"): a tiny
random Llama (hidden 64, 2 layers) with a 512-word WordLevel tokenizer whose words include
bench/serve.py's prompt words, so a prompt of N words is N tokens. Built with tokenizers and
transformers into a folder (no committed weights):

    python bench/tiny_model.py /tmp/tiny-llama
"""
from __future__ import annotations

import json
import os
import sys

VOCAB_SIZE = 512


def build(folder: str) -> str:
    """Write config.json, the random weights and tokenizer.json into `folder` (made if missing)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    from serve import WORDS

    os.makedirs(folder, exist_ok=True)
    words = ["<unk>", "<s>", "</s>", *WORDS]
    words += [f"w{i}" for i in range(VOCAB_SIZE - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": False,
                   "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}, f)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    # NOTE: bench/kernels.py would shadow the `kernels` package transformers imports
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    print(build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/minserve-tiny-llama"))
