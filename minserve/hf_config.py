"""What a Hugging Face config.json says about a model family beyond the Llama fields:
mixture-of-experts settings, per-layer switches (sliding or full attention, NoPE layers) and a
vision-language wrapper's text settings. ModelConfig.from_dict (config.py) calls these."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minserve.errors import ConfigError

# transformers' LlamaConfig defaults: llava-1.5's text_config names only what differs from them.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
}


@dataclass
class MoeConfig:
    """A mixture-of-experts model's experts (config.json) and where this engine puts them:
    expert_parallel (--enable-expert-parallel) gives each tensor-parallel rank whole experts
    instead of a slice of every expert's intermediate dim."""
    num_experts: int
    top_k: int
    intermediate_size: int             # each expert's
    router: str = "softmax_topk"       # a kernels.fused_moe.ROUTERS name
    sparse_layers: tuple[int, ...] | None = None   # None: every layer; else the others are dense
    shared_expert_intermediate_size: int = 0       # Qwen2-MoE's gated shared expert (0: none)
    expert_parallel: bool = False

    def is_sparse(self, layer: int) -> bool:
        return self.sparse_layers is None or layer in self.sparse_layers


def moe_config(d: dict[str, Any], arch: str) -> MoeConfig | None:
    """Qwen2/3-MoE (num_experts, moe_intermediate_size, norm_topk_prob, decoder_sparse_step,
    mlp_only_layers), Mixtral (num_local_experts, every layer sparse, renormalized top-k)."""
    num_experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
    top_k = int(d.get("num_experts_per_tok") or d.get("experts_per_token") or 0)
    if not num_experts or not top_k:
        return None
    scoring = d.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"MoE router scoring_func {scoring!r} is not supported (supported: "
                          "softmax)")
    if arch.startswith("Mixtral"):
        return MoeConfig(num_experts, top_k, int(d["intermediate_size"]), "softmax_topk_norm")
    step = int(d.get("decoder_sparse_step") or 1)
    dense = set(d.get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(int(d["num_hidden_layers"]))
                   if i not in dense and (i + 1) % step == 0)
    return MoeConfig(num_experts, top_k, int(d.get("moe_intermediate_size")
                                             or d["intermediate_size"]),
                     "softmax_topk_norm" if d.get("norm_topk_prob") else "softmax_topk",
                     sparse, int(d.get("shared_expert_intermediate_size") or 0))


def no_rope_layers(d: dict[str, Any], num_layers: int) -> list[int] | None:
    """SmolLM3: 1 where a layer applies RoPE, 0 for a NoPE layer (every
    no_rope_layer_interval-th layer when the list is not written out)."""
    if d.get("no_rope_layers") is not None:
        return [int(v) for v in d["no_rope_layers"][:num_layers]]
    interval = d.get("no_rope_layer_interval")
    if interval is None:
        return None
    return [int((i + 1) % int(interval) != 0) for i in range(num_layers)]


def layer_types(d: dict[str, Any], arch: str, num_layers: int,
                 has_window: bool) -> list[str] | None:
    """Which layers are sliding-window ones; None: all alike. SmolLM3 slides on its NoPE layers
    when use_sliding_window is set (its config class's rule, for configs that do not list them)."""
    if d.get("layer_types") is not None:
        return list(d["layer_types"][:num_layers])
    if arch.startswith("SmolLM3") and has_window:
        nope = no_rope_layers(d, num_layers) or [1] * num_layers
        return ["sliding_attention" if not rope else "full_attention" for rope in nope]
    return None


def text_config(top: dict[str, Any], arch: str) -> dict[str, Any]:
    """A vision-language config's language-model settings, as a text model's config.json."""
    text = top.get("text_config") or {}
    if arch.startswith("Qwen2"):
        # Older Qwen2-VL checkpoints keep the text settings at the top level.
        flat = {k: v for k, v in top.items() if k not in ("vision_config", "text_config")}
        return {**flat, **text}
    out = {**_LLAMA_DEFAULTS, **text}
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in top:
        out["tie_word_embeddings"] = top["tie_word_embeddings"]
    return out
