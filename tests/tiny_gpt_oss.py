"""Tiny gpt-oss folders for the tests: a byte-level BPE whose special tokens are harmony's, the
harmony chat template (tests/harmony_template.jinja), and a random GptOssForCausalLM written by
transformers (the reference its logits are checked against); its experts quantized to MXFP4
(blocks + e8m0 scales, as the gpt-oss checkpoints ship them) beside the dequantized reference."""
from __future__ import annotations

import json
import os

import torch

from tests.tiny import CORPUS

HERE = os.path.dirname(os.path.abspath(__file__))
HARMONY_SPECIALS = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                    "<|constrain|>", "<|return|>", "<|call|>"]
HARMONY_CORPUS = [
    "<|channel|>analysis<|message|>The user asks about the weather. We should call the tool.",
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"city": "Paris", "unit": "celsius"}',
    "<|channel|>final<|message|>It is sunny in Paris today, 21 degrees.",
]
TINY_GPT_OSS = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
    "num_experts_per_tok": 2, "sliding_window": 8, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "swiglu_limit": 3.0,     # below the widened experts' ~5: it clamps
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                        "truncate": False, "original_max_position_embeddings": 64,
                        "rope_theta": 150000.0},
}


def harmony_template() -> str:
    with open(os.path.join(HERE, "harmony_template.jinja"), encoding="utf-8") as f:
        return f.read()


def make_harmony_tokenizer(folder: str, vocab_size: int = 400) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json (the harmony template) and generation_config.json
    (stop at <|return|>, <|call|>, <|endoftext|>) in `folder`; returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=HARMONY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((CORPUS + HARMONY_CORPUS) * 3, trainer=trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in HARMONY_SPECIALS}
    config = {"bos_token": None, "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "chat_template": harmony_template(),
              "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]],
                   "pad_token_id": ids["<|endoftext|>"]}, f)
    return ids


@torch.no_grad()
def _widen(model: torch.nn.Module) -> None:
    """transformers' N(0, 0.02) init gives near-flat logits and sinks that do nothing: widen
    every weight, and give the sinks and router biases a real say."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("sinks"):
            p.normal_(0.0, 1.5)
        elif p.dim() > 1:
            p.normal_(0.0, 0.15)
        else:
            p.normal_(0.0, 0.1)


def make_tiny_gpt_oss(folder: str, seed: int = 0, **overrides) -> str:
    """A tiny random GptOssForCausalLM (float32) and the harmony tokenizer in `folder`."""
    import transformers

    ids = make_harmony_tokenizer(folder)
    cfg = {**TINY_GPT_OSS, **overrides, "eos_token_id": ids["<|return|>"],
           "pad_token_id": ids["<|endoftext|>"]}
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**cfg)).float().eval()
    _widen(model)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------- MXFP4 (OCP microscaling)
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (K a multiple of 32) -> (blocks uint8 [..., N, K/32, 16], scales uint8
    [..., N, K/32]): per 32 values one power-of-two scale 2^(e - 127) with the group's absmax
    at most 6 * scale, each value the nearest e2m1 code (low nibble first), as the gpt-oss
    checkpoints store their experts."""
    *lead, n, k = w.shape
    groups = w.float().reshape(*lead, n, k // 32, 32)
    absmax = groups.abs().amax(-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(absmax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(-1).to(torch.uint8)   # [..., 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse: [..., N, K/32, 16] + [..., N, K/32] -> float32 [..., N, K]."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    values = FP4_VALUES[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2)


def make_mxfp4_pair(src: str, quantized: str, reference: str) -> None:
    """From a tiny gpt-oss folder: `quantized` with MXFP4 experts (gate_up_proj_blocks/_scales
    [E, 2I, H/32, 16] / [E, 2I, H/32], down_proj_* [E, H, I/32, ...], biases as they are,
    quantization_config mxfp4), and `reference` with those experts dequantized (transformers'
    bf16 layout, float32), which transformers loads as a plain model."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    quant, ref = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2))      # [E, out, in]
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
            ref[name] = dequantize_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        else:
            quant[name] = ref[name] = t
    for folder, weights in ((quantized, quant), (reference, ref)):
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(src):
            if f != "model.safetensors":
                shutil.copy(os.path.join(src, f), folder)
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(quantized, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}
    with open(os.path.join(quantized, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
