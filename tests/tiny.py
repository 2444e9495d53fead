"""Tiny random models written as real HF folders (config.json, safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), so tests go through the real loader. transformers
is a test dependency only: it writes the weights and is the reference our logits are checked
against."""
from __future__ import annotations

import json
import os

import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "What is the capital of France? Paris is the capital of France.",
    "Hello world! Machine learning is fascinating; tokens, blocks and caches.",
    "def add(a, b):\n    return a + b\n# numbers 0123456789 and {\"json\": [1, 2.5, true, null]}",
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🙂🚀 and Ελληνικά.",
]

BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
ARCH_EXTRAS = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {"sliding_window": 24},
    "Qwen2ForCausalLM": {"tie_word_embeddings": True},
    "Qwen3ForCausalLM": {"head_dim": 32},
}


def make_tokenizer_json(path: str, vocab_size: int = 400) -> None:
    """A small byte-level BPE (GPT-2 style) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.save(path)


def make_tiny_model(path: str, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> str:
    """Write a tiny random model of `arch` into the folder `path` and return it."""
    import transformers

    os.makedirs(path, exist_ok=True)
    tok_path = os.path.join(path, "tokenizer.json")
    make_tokenizer_json(tok_path)
    with open(tok_path) as f:
        vocab = json.load(f)["model"]["vocab"]
    specials = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    if len(specials) != len(SPECIAL_TOKENS):  # added tokens live outside model.vocab
        with open(tok_path) as f:
            added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
        specials = {t: added[t] for t in SPECIAL_TOKENS}
    eos_id, endoftext_id = specials["<|im_end|>"], specials["<|endoftext|>"]

    cfg = {**BASE, **ARCH_EXTRAS.get(arch, {}), **overrides}
    cfg.update(bos_token_id=endoftext_id, eos_token_id=eos_id)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).to(torch.float32).eval()
    # Random init of transformers is N(0, 0.02): logits are nearly flat. Scale up so greedy
    # choices are well separated and float32 comparisons are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() > 1:
                p.normal_(0.0, 0.15)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)

    tok_cfg = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML,
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos_id, endoftext_id], "bos_token_id": endoftext_id}, f)
    return path
