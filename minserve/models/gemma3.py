"""Gemma 3's language model in plain torch (Gemma3ForCausalLM, and the text stack inside
Gemma3ForConditionalGeneration checkpoints): what differs from Llama is written out here, the rest
is models/llama.py's. Sliding-window (local) and global layers interleave, each kind with its own
RoPE base; q/k RMSNorm; four norms per layer, all Gemma's (1 + w); GeGLU; embeddings scaled by
sqrt(hidden); attention scaled by query_pre_attn_scalar; optional final-logit softcapping.

Gemma 2 (Gemma2ForCausalLM) is the same stack without the q/k norms, with one RoPE base for both
kinds of layer and attention-logit softcapping (attn_logit_softcapping: the attention kernels cap
each logit). Gemma 3's config may name attn_logit_softcapping too; transformers' Gemma 3 never
applies it, and neither does this one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minserve.config import ConfigError, ModelConfig
from minserve.kernels import AttnMetadata, LoRAMapping
from minserve.models import parallel
from minserve.models.layers import (
    Attention,
    GeluAndMul,
    GemmaRMSNorm,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    softcap,
)
from minserve.models.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from minserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, linear_method

# transformers' Gemma3TextConfig defaults: a Gemma3ForConditionalGeneration's text_config names
# only what differs from them.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "eos_token_id": 1, "bos_token_id": 2,
}
# transformers' Gemma2Config defaults, where they differ from Gemma 3's
GEMMA2_TEXT_DEFAULTS = {
    **GEMMA3_TEXT_DEFAULTS, "vocab_size": 256_000, "max_position_embeddings": 8192,
    "rope_theta": 10_000.0, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
    "sliding_window_pattern": 2,
}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass
class Gemma3Config(ModelConfig):
    """ModelConfig's rope_theta / rope_scaling are the global layers'; the local (sliding)
    layers have their own."""
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None     # Gemma 2 only (see the module's note)
    local_rope_theta: float = 10_000.0
    local_rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, top: dict[str, Any]) -> Gemma3Config:
        is_wrapper = "vision_config" in top or "text_config" in top
        arch = (top.get("architectures") or ["Gemma3ForCausalLM"])[0]
        gemma2 = arch == "Gemma2ForCausalLM"
        defaults = GEMMA2_TEXT_DEFAULTS if gemma2 else GEMMA3_TEXT_DEFAULTS
        text = {**defaults, **(top.get("text_config") or {} if is_wrapper else top)}
        text.pop("vision_config", None)
        check_gemma_text(text)
        full, local = rope_by_layer_type(text)
        if gemma2:
            local = full
        num_layers = int(text["num_hidden_layers"])
        if text.get("layer_types") is None:
            pattern = int(text.get("sliding_window_pattern", 6))
            text["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                   for i in range(num_layers)]
        base = ModelConfig.from_dict({**text, "architectures": [arch], "rope_parameters": None,
                                      "rope_scaling": None, "rope_theta": full[0]})
        base.rope_scaling = full[1]
        base.quantization_config = top.get("quantization_config") or base.quantization_config
        base.hf_config = top if is_wrapper else {}
        base.qk_norm = not gemma2
        return cls(**vars(base), query_pre_attn_scalar=float(text["query_pre_attn_scalar"]),
                   final_logit_softcapping=text.get("final_logit_softcapping"),
                   attn_logit_softcapping=text.get("attn_logit_softcapping") if gemma2 else None,
                   local_rope_theta=local[0], local_rope_scaling=local[1])

    def rotary(self, sliding: bool) -> RotaryEmbedding:
        theta, scaling = ((self.local_rope_theta, self.local_rope_scaling) if sliding
                          else (self.rope_theta, self.rope_scaling))
        return RotaryEmbedding(self.rotary_dim_of(sliding), theta, scaling,
                               self.max_position_embeddings, self.max_model_len)

    def rotary_dim_of(self, sliding: bool) -> int:
        """The rotated dims of a layer kind (Gemma 4's global layers have their own)."""
        return self.rotary_dim


def check_gemma_text(text: dict[str, Any]) -> None:
    """Start-up errors for the Gemma text settings minserve does not implement."""
    act = text.get("hidden_activation") or text.get("hidden_act")
    if act not in GELU_TANH:
        raise ConfigError(f"Gemma hidden_activation {act!r} is not supported (only "
                          "gelu_pytorch_tanh)")
    if text.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention (an embedding Gemma) is not supported for "
                          "generation")


def rope_by_layer_type(text: dict[str, Any]
                       ) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((theta, scaling) of the global layers, (theta, scaling) of the sliding ones), from
    transformers 5's rope_parameters by layer type or the older rope_theta, rope_scaling (global
    layers only) and rope_local_base_freq."""
    params = text.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    elif params:    # one set for every layer (Gemma 2)
        full = local = params
    else:
        full = {**(text.get("rope_scaling") or {}), "rope_theta": text.get("rope_theta", 1e6)}
        local = {"rope_theta": text.get("rope_local_base_freq", 10_000.0)}

    def split(p: dict[str, Any], default_theta: float) -> tuple[float, dict | None]:
        kind = p.get("rope_type") or p.get("type") or "default"
        return float(p.get("rope_theta") or default_theta), None if kind == "default" else p

    return split(full, 1_000_000.0), split(local, 10_000.0)


class Gemma3Attention(nn.Module):
    def __init__(self, config: Gemma3Config, prefix: str, layer: int) -> None:
        super().__init__()
        h, k, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        tp = parallel.tp_rank(), parallel.tp_size()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, h, k, config.attention_bias,
                                          linear_method(config, f"{prefix}.qkv_proj"), *tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, config.attention_bias,
                                        linear_method(config, f"{prefix}.o_proj"), *tp)
        self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.is_sliding = config.is_sliding(layer)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d,
                              config.sliding_window if self.is_sliding else None,
                              scale=config.query_pre_attn_scalar ** -0.5,
                              softcap=config.attn_logit_softcapping)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attn: AttnMetadata, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        qkv = self.qkv_proj(hidden, lora_mapping)  # [T, (H + 2K) * D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = q.reshape(-1, self.head_dim), k.reshape(-1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        qk = apply_rotary(torch.cat((q, k), dim=1), *cos_sin)      # [T, H + K, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, attn), lora_mapping)


class Gemma3MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, intermediate_size: int | None = None
                 ) -> None:
        super().__init__()
        i = intermediate_size or config.intermediate_size
        tp = parallel.tp_rank(), parallel.tp_size()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [i, i], False, linear_method(config, f"{prefix}.gate_up_proj"),
            *tp)
        self.down_proj = RowParallelLinear(i, config.hidden_size, False,
                                           linear_method(config, f"{prefix}.down_proj"), *tp)
        self.act_fn = GeluAndMul()

    def forward(self, x: torch.Tensor, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x, lora_mapping)), lora_mapping)


class Gemma3DecoderLayer(LlamaDecoderLayer):
    """Llama's layer and carried residual with Gemma's four (1 + w) norms: each branch's output
    is normed (post_attention_layernorm, post_feedforward_layernorm) before its residual add,
    which happens inside the next pre-norm's fused call (pre_feedforward_layernorm feeds the
    MLP)."""
    norm_class = GemmaRMSNorm

    def __init__(self, config: Gemma3Config, prefix: str, layer: int) -> None:
        super().__init__(config, prefix, layer)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def build_attention(self, config: Gemma3Config, prefix: str, layer: int) -> nn.Module:
        return Gemma3Attention(config, prefix, layer)

    def build_mlp(self, config: Gemma3Config, prefix: str) -> nn.Module:
        return Gemma3MLP(config, prefix)

    @property
    def pre_mlp_norm(self) -> RMSNorm:
        return self.pre_feedforward_layernorm

    def post_norm(self, branch: str, x: torch.Tensor) -> torch.Tensor:
        if branch == "attn":
            return self.post_attention_layernorm(x)
        return self.post_feedforward_layernorm(x)


class Gemma3Model(nn.Module):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   parallel.tp_rank(), parallel.tp_size())
        self.embed_scale = config.hidden_size ** 0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, f"model.layers.{i}", i)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # one cos/sin pair per layer kind per step
        self.rotary_emb = config.rotary(sliding=False)
        self.rotary_emb_local = config.rotary(sliding=True)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden], scaled by sqrt(hidden) rounded to the weights' dtype (as HF)."""
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn: AttnMetadata, inputs_embeds: torch.Tensor | None = None,
                lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        rope = {False: self.rotary_emb(positions, hidden.dtype),
                True: self.rotary_emb_local(positions, hidden.dtype)}
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope[layer.self_attn.is_sliding], attn,
                                     lora_mapping)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM's loading, logits and KV-cache plumbing around Gemma3Model. A wrapper
    (Gemma3ForConditionalGeneration) builds it from a Gemma3Config as LLaVA builds Llama."""
    config_class = Gemma3Config

    def build_model(self, config: ModelConfig) -> nn.Module:
        return Gemma3Model(config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        return None if logits is None else softcap(logits, self.config.final_logit_softcapping)

