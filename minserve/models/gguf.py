"""Convert a llama.cpp .gguf into an HF folder the loader and tokenizer already read: config.json,
model.safetensors (Q/K rows back in HF order), tokenizer.json, tokenizer_config.json and
generation_config.json. Weights are dequantized to float32, or (quantized=True) the linear
projections keep their GGUF blocks as raw bytes beside their type id, with a
`quantization_config: {quant_method: gguf}` that quant/gguf.py serves from. Runs once per file;
never loads a model."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

from minserve.config import ConfigError
from minserve.models.registry import lookup_gguf
from minserve.tokenizer import bytes_to_unicode

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # mixture of experts (Mixtral too: its model reads these Qwen-MoE names as well)
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# [E, N, K] tensors holding every expert of a layer: written as one HF tensor per expert
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                 "ffn_down_exps": "down_proj"}
# Where an architecture's tensors differ from Llama's names: Gemma 3's four norms per layer
# (its ffn_norm is the pre-feedforward one), Phi-3's fused q|k|v and gate|up.
_ARCH_LAYER_NAMES = {
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
# llama.cpp's converter stores Gemma's (1 + w) norm weights with the 1 added
_NORM_SHIFT = {"gemma3": 1.0}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def gguf_to_hf_folder(gguf_path: str, out_dir: str, quantized: bool = False) -> None:
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, set(tensors))
    os.makedirs(out_dir, exist_ok=True)
    types = _write_weights(reader, config, meta, os.path.join(out_dir, "model.safetensors"),
                           quantized)
    if quantized:
        config["quantization_config"] = {"quant_method": "gguf", "types": types}
    _write_json(os.path.join(out_dir, "config.json"), config)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        # a SentencePiece GGUF (Gemma 3, Phi-3): the weights serve with --tokenizer pointing at
        # the HF tokenizer; without it, loading names the fix (tokenizer.py)
        _write_json(os.path.join(out_dir, "generation_config.json"),
                    {"eos_token_id": _eos_ids(meta)})
        return
    tokenizer_json, tokenizer_config, generation_config = gguf_tokenizer(meta)
    _write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_json)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    _write_json(os.path.join(out_dir, "generation_config.json"), generation_config)


def _field_value(field: Any) -> Any:
    # Token and merge arrays are large; read them through contents() like everything else,
    # which returns python lists of str/int.
    try:
        return field.contents()
    except (ValueError, UnicodeDecodeError):
        return None


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------- config.json


def gguf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    hf_arch = lookup_gguf(arch).name

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    vocab_size = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    sliding_window = get("attention.sliding_window")
    if arch == "llama" and sliding_window:
        hf_arch = "MistralForCausalLM"
    eos_ids = _eos_ids(meta)
    config: dict[str, Any] = {
        "architectures": [hf_arch], "model_type": hf_arch[: -len("ForCausalLM")].lower(),
        "vocab_size": int(vocab_size), "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or num_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids, "torch_dtype": "float32",
    }
    if sliding_window:
        config["sliding_window"] = int(sliding_window)
        if arch.startswith("qwen2"):
            config["use_sliding_window"] = True
    if get("expert_count"):
        config.update(_moe_config(get, config, tensor_names))
    _arch_config(arch, get, config)
    scaling_type = get("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        config["rope_scaling"] = {
            "rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": int(get(
                "rope.scaling.original_context_length", config["max_position_embeddings"]))}
    return config


def _moe_config(get: Any, config: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A mixture-of-experts file's config.json keys. llama.cpp writes Mixtral as "llama" with
    experts; its Qwen MoE files mark the sparse layers by their router (ffn_gate_inp) alone."""
    num_experts, top_k = int(get("expert_count")), int(get("expert_used_count"))
    if config["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM"):
        config["architectures"] = ["MixtralForCausalLM"]
        config["model_type"] = "mixtral"
        return {"num_local_experts": num_experts, "num_experts_per_tok": top_k}
    layers = range(config["num_hidden_layers"])
    out = {"num_experts": num_experts, "num_experts_per_tok": top_k,
           "moe_intermediate_size": int(get("expert_feed_forward_length")),
           # qwen3moe renormalizes the top-k weights, qwen2moe does not (llama.cpp's graphs)
           "norm_topk_prob": bool(get("expert_weights_norm",
                                      config["model_type"] == "qwen3moe")),
           "mlp_only_layers": [i for i in layers if f"blk.{i}.ffn_gate_inp.weight"
                               not in tensor_names]}
    if get("expert_shared_feed_forward_length"):
        out["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    return out


def _arch_config(arch: str, get: Any, config: dict[str, Any]) -> None:
    """config.json settings llama.cpp keeps as metadata, or as its own fixed rules, per arch."""
    if arch == "smollm3":
        config["no_rope_layer_interval"] = 4       # llama.cpp's n_no_rope_layer_step
    elif arch == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        rotary = int(get("rope.dimension_count") or head_dim)
        config.update(head_dim=head_dim, partial_rotary_factor=rotary / head_dim)
        orig = get("rope.scaling.original_context_length")
        if orig:
            config["original_max_position_embeddings"] = int(orig)
    elif arch == "gemma3":
        heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
        # llama.cpp's rule: the 27B (62 layers) scales by hidden / heads, the others by head_dim
        config.update(
            query_pre_attn_scalar=config["hidden_size"] // heads if layers == 62
            else config["head_dim"], hidden_activation="gelu_pytorch_tanh",
            rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
            final_logit_softcapping=get("final_logit_softcapping"))
        pattern = get("attention.sliding_window_pattern", 6)     # every 6th global by default
        if isinstance(pattern, list):                            # or a flag per layer
            config["layer_types"] = ["sliding_attention" if swa else "full_attention"
                                     for swa in pattern]
        else:
            config["sliding_window_pattern"] = int(pattern)


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def _llama3_scaling_from_rope_freqs(config: dict[str, Any], rope_freqs: np.ndarray) -> None:
    """llama.cpp stores Llama 3.1's rope scaling as a per-frequency divisor tensor instead of
    metadata. Every Llama 3.x release uses low/high freq factors 1/4 over an 8192 context, so
    rebuild that dict and check it reproduces the tensor before trusting it."""
    import torch

    from minserve.models.layers import compute_inv_freq

    sc = {"rope_type": "llama3", "factor": float(rope_freqs.max()), "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base, _ = compute_inv_freq(config["head_dim"], config["rope_theta"], None, 0)
    scaled, _ = compute_inv_freq(config["head_dim"], config["rope_theta"], sc, 0)
    if not torch.allclose(base / torch.from_numpy(rope_freqs.astype(np.float32)), scaled,
                          rtol=1e-3):
        raise ConfigError("this GGUF stores rope_freqs that are not Llama 3 rope scaling; "
                          "load the original HF folder instead")
    config["rope_scaling"] = sc


# ----------------------------------------------- model.safetensors


def hf_tensor_name(name: str, arch: str = "llama") -> str | None:
    """The HF name; an [E, N, K] expert tensor gets one with "{e}" for the expert's number."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    if m and m.group(2) in _EXPERT_NAMES:
        return f"model.layers.{m.group(1)}.mlp.experts.{{e}}.{_EXPERT_NAMES[m.group(2)]}.weight"
    return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permute: within each head, rows were interleaved
    (r0, r_half, r1, r_half+1, ...) for GGML's rope; put them back in HF's (first half | second
    half) order. Works for weights [rows, in] and biases [rows]."""
    head_rows = w.shape[0] // num_heads
    return w.reshape(num_heads, head_rows // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The linear projections, which quantized=True keeps in their GGUF blocks.
_LINEAR_SUFFIXES = tuple(f".{n}.weight" for n in (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
    "gate_up_proj"))


def _write_weights(reader: Any, config: dict[str, Any], meta: dict[str, Any], path: str,
                   quantized: bool = False) -> list[str]:
    """Write model.safetensors; returns the GGUF type names of the linear weights kept raw."""
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    from minserve.models.quant.gguf import GGML_TYPES, QUANTIZED_TYPES

    arch = meta["general.architecture"]
    permuted = lookup_gguf(arch).gguf_permuted_qk
    out: dict[str, np.ndarray] = {}
    kept: set[str] = set()
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy (and HF) order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        name = hf_tensor_name(t.name, arch)
        type_name = GGML_TYPES.get(int(t.tensor_type), ("",))[0]
        matrix = len(shape) == (3 if name is not None and "{e}" in name else 2)
        if (quantized and name is not None and name.endswith(_LINEAR_SUFFIXES)
                and matrix and type_name in QUANTIZED_TYPES):
            # Rows stay whole blocks ([N, K / block * bytes]), so the Q/K row permutation
            # below applies to raw rows as it does to dequantized ones.
            data = np.ascontiguousarray(t.data).reshape(*shape[:-1], -1).view(np.uint8)
            out[name.removesuffix(".weight") + ".weight_type"] = np.array(
                int(t.tensor_type), dtype=np.int32)
            kept.add(type_name)
        else:
            data = np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(shape),
                                        dtype=np.float32)
            if quantized and name is not None and name.endswith(_LINEAR_SUFFIXES):
                # Not served from its blocks (F16/F32 rows, Q2_K, Q3_K, IQ*, ...): float32 rows,
                # served dense.
                out[name.removesuffix(".weight") + ".weight_type"] = np.array(0, dtype=np.int32)
                data = data.view(np.uint8).reshape(*shape[:-1], -1)
                label = type_name or getattr(t.tensor_type, "name", str(t.tensor_type))
                kept.add(f"{label} (dequantized)")
        if t.name == "rope_freqs.weight":
            _llama3_scaling_from_rope_freqs(config, data)
            continue
        if t.name in ("rope_factors_long.weight", "rope_factors_short.weight"):   # Phi-3
            sc = config.setdefault("rope_scaling", {"rope_type": "longrope"})
            sc["long_factor" if "long" in t.name else "short_factor"] = data.tolist()
            continue
        if name is not None and name.endswith("norm.weight") and arch in _NORM_SHIFT:
            data = data - _NORM_SHIFT[arch]
        if name is None:
            raise ConfigError(f"GGUF tensor {t.name!r} has no HF counterpart; this GGUF "
                              "variant is not supported")
        if permuted and ".q_proj." in name:
            data = unpermute_qk(data, config["num_attention_heads"])
        elif permuted and ".k_proj." in name:
            data = unpermute_qk(data, config["num_key_value_heads"])
        elif name.endswith(".shared_expert_gate.weight"):
            data = data.reshape(1, -1)         # llama.cpp stores the [1, H] gate as [H]
        if "{e}" in name:                      # one layer's experts: one tensor each
            out.update(_split_experts(out, name, data))
            continue
        out[name] = data
    save_file(out, path, metadata={"format": "pt"})
    return sorted(kept)


def _split_experts(out: dict[str, np.ndarray], name: str, data: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """[E, N, ...] -> {expert e's name: [N, ...]}, its weight_type (kept GGUF blocks) beside."""
    parts = {name.format(e=e): np.ascontiguousarray(data[e]) for e in range(data.shape[0])}
    type_name = name.removesuffix(".weight") + ".weight_type"
    if type_name in out:
        weight_type = out.pop(type_name)
        parts.update({n.removesuffix(".weight") + ".weight_type": weight_type for n in list(parts)})
    return parts


# ---- tokenizer.json, tokenizer_config.json, generation_config.json

# Pre-tokenizer splits by tokenizer.ggml.pre (the regexes of the HF tokenizers they came from).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _byte_level(add_prefix_space: bool, trim_offsets: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space,
            "trim_offsets": trim_offsets, "use_regex": True}


def _byte_level_pre_tokenizer(pre: str | None) -> dict[str, Any]:
    byte_level = _byte_level(False, True)
    if pre in _SPLITS:
        split = {"type": "Split", "pattern": {"Regex": _SPLITS[pre]}, "behavior": "Isolated",
                 "invert": False}
        return {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    if pre == "smollm":
        # SmolLM's own tokenizer.json (and llama.cpp's "smollm" pre) split digits one by one
        # before the GPT-2 regex.
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    return byte_level  # "gpt2", "default" and unknown: the plain GPT-2 regex


def gguf_tokenizer(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(tokenizer.json, tokenizer_config.json, generation_config.json) as dicts."""
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {model_type!r} is not supported (only "
                          "byte-level BPE, 'gpt2'); pass the original HF folder instead")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    added = []
    for i, (token, token_type) in enumerate(zip(tokens, token_types, strict=False)):
        if token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False,
                          "special": token_type == _TOKEN_CONTROL})
        elif not set(token) <= alphabet:  # spelled with raw characters: respell byte-level
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        a, b = ({"Sequence": {"id": seq, "type_id": i}} for i, seq in enumerate("AB"))
        bos0, bos1 = ({"SpecialToken": {"id": bos, "type_id": i}} for i in range(2))
        post = {"type": "TemplateProcessing", "single": [bos0, a], "pair": [bos0, a, bos1, b],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    else:
        post = _byte_level(True, False)
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre")),
        "post_processor": post, "decoder": _byte_level(True, True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                  "merges": [m.split(" ", 1) for m in merges]},
    }

    def token_str(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    eos_ids = _eos_ids(meta)
    tokenizer_config = {
        "bos_token": token_str("bos_token_id"),
        "eos_token": token_str("eos_token_id"),
        "pad_token": token_str("padding_token_id"),
        "unk_token": token_str("unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length") or 2048),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in added},
    }
    generation_config: dict[str, Any] = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1
                                         else eos_ids}
    if bos_id is not None:
        generation_config["bos_token_id"] = bos_id
    for key, hf_key in (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                        ("min_p", "min_p"), ("penalty_repeat", "repetition_penalty")):
        value = meta.get(f"general.sampling.{key}")
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            generation_config[hf_key] = value
    return tokenizer_json, tokenizer_config, generation_config
