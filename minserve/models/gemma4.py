"""Gemma 4's language model in plain torch (Gemma4ForCausalLM, and the text stack of
Gemma4ForConditionalGeneration checkpoints): Gemma 3's layout (models/gemma3.py) plus per-layer
input embeddings (PLE), KV sharing (the last num_kv_shared_layers layers read the cache of the
last earlier layer of their kind and write none), global layers with their own head size and kv
heads (and v = k where attention_k_eq_v), proportional (partial) RoPE on the global layers, plain
(w, not 1 + w) RMSNorms, and a learned scalar per layer. The MoE variant (enable_moe_block, as
gemma-4-26B-A4B) runs routed experts (models/moe.py) beside the dense MLP on every layer. The
vision and audio towers are not built."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minserve import kernels
from minserve.config import ConfigError, ModelConfig
from minserve.hf_config import MoeConfig
from minserve.kernels import AttnMetadata, LoRAMapping
from minserve.kernels.fused_moe import DenseExperts
from minserve.models import parallel
from minserve.models.gemma3 import (
    GEMMA3_TEXT_DEFAULTS,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3MLP,
    check_gemma_text,
)
from minserve.models.layers import Attention, RMSNorm, apply_rotary
from minserve.models.linear import (
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from minserve.models.llama import linear_method
from minserve.models.moe import FusedMoE, load_slice

# transformers' Gemma4TextConfig defaults (a text_config names only what differs), where they
# differ from Gemma 3's
GEMMA4_TEXT_DEFAULTS = {
    **GEMMA3_TEXT_DEFAULTS, "vocab_size": 262_144, "num_hidden_layers": 30,
    "sliding_window": 512, "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1_000_000.0}},
}


@dataclass
class Gemma4Config(Gemma3Config):
    """head_dim / num_key_value_heads are the sliding layers'; the global ones' follow."""
    global_head_dim: int = 512
    num_global_key_value_heads: int = 0
    attention_k_eq_v: bool = False
    kv_sources: list[int] = field(default_factory=list)   # per layer: whose KV cache it reads
    hidden_size_per_layer_input: int = 0                   # 0: no per-layer inputs
    vocab_size_per_layer_input: int = 0
    use_double_wide_mlp: bool = False

    @classmethod
    def from_dict(cls, top: dict[str, Any]) -> Gemma4Config:
        is_wrapper = "text_config" in top
        text = {**GEMMA4_TEXT_DEFAULTS, **(top["text_config"] if is_wrapper else top)}
        check_gemma4_text(text)
        arch = (top.get("architectures") or ["Gemma4ForCausalLM"])[0]
        num_layers = int(text["num_hidden_layers"])
        if text.get("layer_types") is None:
            text["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                   for i in range(num_layers)]
        text["layer_types"] = [*text["layer_types"][:num_layers - 1], "full_attention"]
        base = Gemma3Config.from_dict({**text, "architectures": [arch],
                                       "query_pre_attn_scalar": 1.0,
                                       "use_bidirectional_attention": None})
        base.quantization_config = top.get("quantization_config") or base.quantization_config
        base.hf_config = top if is_wrapper else {}
        head_dim, kv_heads = global_shape(text)
        base.moe = moe_config(text, base.quantization_config)
        return cls(**vars(base), global_head_dim=head_dim, num_global_key_value_heads=kv_heads,
                   attention_k_eq_v=bool(text.get("attention_k_eq_v")),
                   kv_sources=kv_sources(text["layer_types"],
                                         int(text.get("num_kv_shared_layers") or 0)),
                   hidden_size_per_layer_input=int(text.get("hidden_size_per_layer_input") or 0),
                   vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or 0),
                   use_double_wide_mlp=bool(text.get("use_double_wide_mlp")))

    def layer_shape(self, layer: int) -> tuple[int, int]:
        """(kv heads, head dim) of a layer, before tensor parallelism."""
        if self.is_sliding(layer):
            return self.num_key_value_heads, self.head_dim
        return self.num_global_key_value_heads, self.global_head_dim

    def projection_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection the checkpoint has in `layer` (LoRA's shape
        checks): a KV-sharing layer has no k/v, a global layer whose v is k no v."""
        kv_heads, d = self.layer_shape(layer)
        h, q, kv = self.hidden_size, self.num_attention_heads * d, kv_heads * d
        shared = self.kv_sources[layer] != layer
        i = self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1)
        shapes = {"q_proj": (h, q), "o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i),
                  "down_proj": (i, h)}
        if not shared:
            shapes["k_proj"] = (h, kv)
            if not (self.attention_k_eq_v and not self.is_sliding(layer)):
                shapes["v_proj"] = (h, kv)
        return shapes

    def rotary_dim_of(self, sliding: bool) -> int:
        return self.head_dim if sliding else self.global_head_dim


def check_gemma4_text(text: dict[str, Any]) -> None:
    check_gemma_text({**text, "use_bidirectional_attention": None})
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError("use_bidirectional_attention 'all' (an embedding Gemma) is not "
                          "supported for generation")
    params = text.get("rope_parameters") or {}
    if "full_attention" not in params and "sliding_attention" not in params:
        raise ConfigError("a Gemma 4 config needs rope_parameters by layer type")


def moe_config(text: dict[str, Any], quantization: dict | None) -> MoeConfig | None:
    """The routed experts of an enable_moe_block config (every layer has them), else None."""
    if not text.get("enable_moe_block"):
        return None
    if quantization:
        raise ConfigError("a quantized Gemma 4 MoE checkpoint is not supported (its fused expert "
                          "tensors load unquantized only); serve the bf16 checkpoint")
    try:
        num_experts, top_k = int(text["num_experts"]), int(text["top_k_experts"])
        inter = int(text["moe_intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("a Gemma 4 config with enable_moe_block needs num_experts, "
                          "top_k_experts and moe_intermediate_size") from None
    return MoeConfig(num_experts, top_k, inter, "softmax_topk_norm")


def global_shape(text: dict[str, Any]) -> tuple[int, int]:
    """(head dim, kv heads) of the global layers: transformers' per_layer_config, or
    global_head_dim and num_global_key_value_heads (the latter only where attention_k_eq_v)."""
    per_layer = text.get("per_layer_config") or {}
    full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    shapes = {(int(o.get("head_dim", text["head_dim"])),
               int(o.get("num_key_value_heads", text["num_key_value_heads"])))
              for i in full for o in [per_layer.get(str(i), per_layer.get(i, {}))]}
    if per_layer and len(shapes) == 1:
        return shapes.pop()
    if per_layer:
        raise ConfigError(f"Gemma 4 global layers of different shapes {sorted(shapes)} are not "
                          "supported")
    kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v", True) else None
    return int(text.get("global_head_dim") or 512), int(kv or text["num_key_value_heads"])


def kv_sources(layer_types: list[str], num_shared: int) -> list[int]:
    """For each layer, the layer whose KV cache it attends over: itself, or for the last
    num_shared layers the last earlier (non-shared) layer of the same kind."""
    first_shared = len(layer_types) - num_shared
    if num_shared and not 0 < first_shared:
        raise ConfigError(f"num_kv_shared_layers {num_shared} leaves no layer to write the cache")
    out = list(range(len(layer_types)))
    for i in range(first_shared, len(layer_types)):
        producers = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not producers:
            raise ConfigError(f"layer {i} ({layer_types[i]}) shares the KV cache of an earlier "
                              "layer of its kind, and there is none")
        out[i] = producers[-1]
    return out


class Gemma4Attention(nn.Module):
    def __init__(self, config: Gemma4Config, prefix: str, layer: int) -> None:
        super().__init__()
        h, (k, d) = config.num_attention_heads, config.layer_shape(layer)
        tp = parallel.tp_rank(), parallel.tp_size()
        self.is_sliding = config.is_sliding(layer)
        self.is_kv_shared = config.kv_sources[layer] != layer
        self.k_eq_v = config.attention_k_eq_v and not self.is_sliding
        shard_ids = "q" if self.is_kv_shared else "qk" if self.k_eq_v else "qkv"
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, h, k, config.attention_bias,
                                          linear_method(config, f"{prefix}.qkv_proj"), *tp,
                                          shard_ids=shard_ids)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim, self.eps = d, config.rms_norm_eps
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, config.attention_bias,
                                        linear_method(config, f"{prefix}.o_proj"), *tp)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = None if self.is_kv_shared else RMSNorm(d, config.rms_norm_eps)
        # q/k norms take the place of the 1/sqrt(D) scale
        self.attn = Attention(self.num_heads, self.num_kv_heads, d,
                              config.sliding_window if self.is_sliding else None, scale=1.0)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attn: AttnMetadata, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        out = self.qkv_proj(hidden, lora_mapping)   # [T, (H + K + K) * D], less v or k and v
        num_tokens, d = hidden.shape[0], self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        q = self.q_norm(out[:, :q_size].reshape(-1, d)).view(num_tokens, self.num_heads, d)
        if self.is_kv_shared:
            return self.o_proj(self.attn(apply_rotary(q, *cos_sin), None, None, attn),
                               lora_mapping)
        k = out[:, q_size:q_size + kv_size].reshape(-1, d)
        v = k if self.k_eq_v else out[:, q_size + kv_size:].reshape(-1, d)
        v = F.rms_norm(v, (d,), eps=self.eps).view(num_tokens, self.num_kv_heads, d)
        k = self.k_norm(k).view(num_tokens, self.num_kv_heads, d)
        q, k = apply_rotary(torch.cat((q, k), dim=1), *cos_sin).split(
            [self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, attn), lora_mapping)


class Gemma4MoE(FusedMoE):
    """Gemma 4's routed experts (GeGLU, no biases). The router reads the residual stream, not the
    experts' input: RMS-normed, times a learned scale and 1/sqrt(hidden); its renormalized top-k
    weights are then scaled per expert. The checkpoint stores the experts fused:
    experts.gate_up_proj [E, 2I, H] (gate | up) and experts.down_proj [E, H, I]; router.proj,
    router.scale and router.per_expert_scale (the loader renames them: map_weight_name)."""

    def __init__(self, config: Gemma4Config, prefix: str) -> None:
        moe, hidden = config.moe, config.hidden_size
        super().__init__(moe.num_experts, moe.top_k, hidden, moe.intermediate_size, prefix,
                         router=moe.router, activation=kernels.gelu_tanh_and_mul,
                         expert_parallel=moe.expert_parallel, checkpoint_experts=False)
        self.eps = config.rms_norm_eps
        self.scale = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(moe.num_experts), requires_grad=False)
        rank, size = (0, 1) if self.expert_parallel else (parallel.tp_rank(), parallel.tp_size())
        inter, e = moe.intermediate_size, len(self.local)
        i, experts = inter // size, (self.local.start, len(self.local))
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden), requires_grad=False)
        self.gate_up_proj.weight_loader = functools.partial(
            _load_gate_up, experts=experts, rows=(i * rank, i), inter=inter)
        self.down_proj = nn.Parameter(torch.empty(e, hidden, i), requires_grad=False)
        self.down_proj.weight_loader = functools.partial(
            load_slice, dims={0: experts, 2: (i * rank, i)})

    def forward(self, x: torch.Tensor, router_input: torch.Tensor) -> torch.Tensor:
        scores = self.gate(kernels.rms_norm(router_input, self.scale, self.eps)
                           * self.scale.shape[0] ** -0.5)
        topk_weights, topk_ids = kernels.select_experts(scores, self.top_k, self.router)
        topk_weights = topk_weights * self.per_expert_scale[topk_ids]
        out = kernels.fused_experts(x, self.weights, topk_weights, topk_ids, self.activation)
        return parallel.all_reduce(out) if self.reduce_results else out

    @torch.no_grad()
    def finish_loading(self) -> None:
        if self.weights is None:
            self.set_experts(kernels.ExpertWeights(DenseExperts(self.gate_up_proj.data),
                                                   DenseExperts(self.down_proj.data)))


def _load_gate_up(param: nn.Parameter, loaded: torch.Tensor, experts: tuple[int, int],
                  rows: tuple[int, int], inter: int) -> None:
    """This rank's rows of both halves of a fused [E, 2I, H] gate | up tensor."""
    if loaded.dim() != 3 or loaded.shape[1] != 2 * inter:
        raise ConfigError(f"experts.gate_up_proj of shape {tuple(loaded.shape)}: expected "
                          f"[num_experts, {2 * inter}, hidden]")
    gate, up = loaded.split(inter, dim=1)
    both = torch.cat([half.narrow(1, *rows) for half in (gate, up)], dim=1)
    load_slice(param, both, {0: experts})


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, config: Gemma4Config, prefix: str, layer: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Gemma4Attention(config, f"{prefix}.self_attn", layer)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        wide = config.use_double_wide_mlp and self.self_attn.is_kv_shared
        self.mlp = Gemma3MLP(config, f"{prefix}.mlp", config.intermediate_size * (1 + wide))
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.moe = None if config.moe is None else Gemma4MoE(config, f"{prefix}.moe")
        if self.moe is not None:     # the dense MLP's and the experts' own norms
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        ple = config.hidden_size_per_layer_input
        if ple:
            self.per_layer_input_gate = ReplicatedLinear(
                hidden, ple, False, linear_method(config, f"{prefix}.per_layer_input_gate"))
            self.per_layer_projection = ReplicatedLinear(
                ple, hidden, False, linear_method(config, f"{prefix}.per_layer_projection"))
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, hidden: torch.Tensor, per_layer_input: torch.Tensor | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttnMetadata,
                lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(hidden), cos_sin, attn, lora_mapping)
        x, hidden = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), hidden)
        x = self.mlp(x, lora_mapping)
        if self.moe is not None:
            routed = self.moe(self.pre_feedforward_layernorm_2(hidden), hidden)
            x = self.post_feedforward_layernorm_1(x) + self.post_feedforward_layernorm_2(routed)
        hidden = hidden + self.post_feedforward_layernorm(x)
        if per_layer_input is not None:
            gate = F.gelu(self.per_layer_input_gate(hidden), approximate="tanh")
            x = self.per_layer_projection(gate * per_layer_input)
            hidden = hidden + self.post_per_layer_input_norm(x)
        return hidden * self.layer_scalar


class Gemma4Model(nn.Module):
    def __init__(self, config: Gemma4Config) -> None:
        super().__init__()
        tp = parallel.tp_rank(), parallel.tp_size()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, *tp)
        self.embed_scale = config.hidden_size ** 0.5
        self.num_layers, self.ple = config.num_hidden_layers, config.hidden_size_per_layer_input
        if self.ple:
            self.vocab_size_per_layer_input = config.vocab_size_per_layer_input
            self.embed_tokens_per_layer = VocabParallelEmbedding(
                config.vocab_size_per_layer_input, self.num_layers * self.ple, *tp)
            self.per_layer_model_projection = ReplicatedLinear(
                config.hidden_size, self.num_layers * self.ple, False,
                linear_method(config, "model.per_layer_model_projection"))
            self.per_layer_projection_norm = RMSNorm(self.ple, config.rms_norm_eps)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(config, f"model.layers.{i}", i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = config.rotary(sliding=False)
        self.rotary_emb_local = config.rotary(sliding=True)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """[T, L, P]: each token's own per-layer embedding (ids past the PLE table's vocab, the
        multimodal ones, read row 0) mixed with a projection of its input embedding."""
        ids = torch.where(input_ids < self.vocab_size_per_layer_input, input_ids, 0)
        own = self.embed_tokens_per_layer(ids).view(-1, self.num_layers, self.ple)
        own = own * torch.tensor(self.ple ** 0.5, dtype=own.dtype)
        proj = self.per_layer_model_projection(embeds) * self.embed_scale ** -1
        proj = self.per_layer_projection_norm(proj.reshape(-1, self.ple))
        return (proj.view(-1, self.num_layers, self.ple) + own) * 2 ** -0.5

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn: AttnMetadata, inputs_embeds: torch.Tensor | None = None,
                lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.ple and input_ids is None:
            raise ValueError("Gemma 4's per-layer inputs need the token ids")
        ple = self.per_layer_inputs(input_ids, hidden) if self.ple else None
        rope = {False: self.rotary_emb(positions, hidden.dtype),
                True: self.rotary_emb_local(positions, hidden.dtype)}
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, None if ple is None else ple[:, i],
                           rope[layer.self_attn.is_sliding], attn, lora_mapping)
        return self.norm(hidden)


# the MoE block's checkpoint names -> Gemma4MoE's (FusedMoE calls the router's linear `gate`)
_MOE_RENAMES = {".router.proj.": ".moe.gate.", ".router.scale": ".moe.scale",
                ".router.per_expert_scale": ".moe.per_expert_scale",
                ".experts.gate_up_proj": ".moe.gate_up_proj",
                ".experts.down_proj": ".moe.down_proj"}
_MOE_NAMES = re.compile("(" + "|".join(re.escape(k) for k in _MOE_RENAMES) + ")")


class Gemma4ForCausalLM(Gemma3ForCausalLM):
    """Also the text stack of a Gemma4ForConditionalGeneration checkpoint (its towers'
    tensors are dropped; images are refused as on any text-only model)."""
    config_class = Gemma4Config
    # the multimodal checkpoint's names of the language model, and the parts not built
    wrapper_prefix = "model.language_model."
    towers = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
              "model.embed_audio.")

    def build_model(self, config: ModelConfig) -> nn.Module:
        return Gemma4Model(config)

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith(self.towers):
            return None
        if name.startswith(self.wrapper_prefix):
            name = "model." + name[len(self.wrapper_prefix):]
        name = _MOE_NAMES.sub(lambda m: _MOE_RENAMES[m.group(1)], name)
        parts = name.split(".")
        if (len(parts) > 4 and parts[1] == "layers" and parts[3] == "self_attn"
                and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm")
                and self.model.layers[int(parts[2])].self_attn.is_kv_shared):
            return None      # a KV-sharing layer's unused projections
        return super().map_weight_name(name)

    def kv_cache_layout(self) -> list[tuple[int, int]]:
        """(this rank's kv heads, head dim) of each layer that writes a cache, in order."""
        return [(layer.self_attn.num_kv_heads, layer.self_attn.head_dim)
                for layer in self.model.layers if not layer.self_attn.is_kv_shared]

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        writers = [i for i, layer in enumerate(self.model.layers)
                   if not layer.self_attn.is_kv_shared]
        if len(kv_caches) != len(writers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(writers)} layers")
        cache_of = dict(zip(writers, kv_caches, strict=True))
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn.attn
            attn.k_cache, attn.v_cache = cache_of[self.config.kv_sources[i]]
