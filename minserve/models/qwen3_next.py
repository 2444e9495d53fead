"""Qwen3-Next and Qwen3.5 (dense and MoE): hybrid stacks where, as config.json's layer_types says,
most layers are Gated DeltaNet (linear attention: a fixed-size recurrent state per request, no
K/V) and every few is gated full attention (an output gate from q_proj, partial RoPE, q/k norm).
Norms are zero-centred (weight stored as 1 + w at load); MoE layers (models/moe.py) carry a
shared expert gated by sigmoid(shared_expert_gate(x)).

    GDN layer, per token:  qkv = conv1d(in_proj(x)) (causal, depthwise, silu; its last K-1
        inputs are the conv state), z, b, a = gates; beta = sigmoid(b),
        g = -exp(A_log) * softplus(a + dt_bias);  o = gated_delta_rule(q, k, v, g, beta)
        (kernels/gdn.py; the matrix state per value head); out_proj(rmsnorm(o) * silu(z))

Qwen3-Next's checkpoint fuses q|k|v|z (and b|a) interleaved per key head; Qwen3.5 stores
in_proj_qkv, in_proj_z, in_proj_b, in_proj_a apart. Tensor parallelism splits the key and value
heads (each rank: its heads' projections, conv channels, states); the recurrent states live in
the engine's state cache (engine/state_cache.py), handed over by set_state_caches()."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minserve import kernels
from minserve.config import ConfigError, ModelConfig
from minserve.kernels import AttnMetadata, LoRAMapping
from minserve.models import parallel
from minserve.models.layers import Attention, GemmaRMSNorm, apply_rotary
from minserve.models.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    _copy,
    _narrow,
)
from minserve.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel, linear_method
from minserve.models.moe import expert_index, local_experts
from minserve.models.qwen_moe import Qwen2MoeSparseBlock, moe_block

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass
class HybridConfig(ModelConfig):
    """ModelConfig plus the Gated DeltaNet layers' shapes."""
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    split_projections: bool = False     # Qwen3.5: in_proj_qkv / z / b / a apart
    attn_output_gate: bool = True       # q_proj yields a gate per head (LoRA's q_proj shape)

    @classmethod
    def from_dict(cls, top: dict[str, Any]) -> HybridConfig:
        base = ModelConfig.from_dict(top)
        d = top.get("text_config") or top
        arch = base.architecture
        rope = d.get("rope_parameters") or {}
        if "partial_rotary_factor" not in d and "partial_rotary_factor" not in rope:
            base.partial_rotary_factor = 0.25      # the config classes' default
        n = base.num_hidden_layers
        interval = int(d.get("full_attention_interval") or 4)
        base.layer_types = list(d.get("layer_types") or [
            FULL if (i + 1) % interval == 0 else LINEAR for i in range(n)])[:n]
        if set(base.layer_types) - {LINEAR, FULL}:
            raise ConfigError(f"layer_types {sorted(set(base.layer_types))}: a hybrid model "
                              f"takes {LINEAR!r} and {FULL!r} layers only")
        if base.moe is not None and (arch.startswith("Qwen3_5") or d.get("norm_topk_prob", True)):
            base.moe.router = "softmax_topk_norm"    # Qwen3.5-MoE always renormalises
        base.mrope_section = None       # text only: the three M-RoPE rows are one position
        fields = {k: int(d[k]) for k in ("linear_num_key_heads", "linear_num_value_heads",
                                          "linear_key_head_dim", "linear_value_head_dim",
                                          "linear_conv_kernel_dim") if d.get(k) is not None}
        return cls(**vars(base), **fields, split_projections=arch.startswith("Qwen3_5"))


def _load_conv(param: nn.Parameter, loaded: torch.Tensor, sizes: list[int], rank: int,
               tp: int) -> None:
    """conv1d.weight [C, 1, K], C = q | k | v channels: this rank's heads of each part."""
    loaded = loaded.reshape(loaded.shape[0], -1)
    parts = [_narrow(p, 0, rank, s // tp, tp) for p, s in zip(loaded.split(sizes), sizes,
                                                               strict=True)]
    _copy(param.data, torch.cat(parts))


def _load_heads(param: nn.Parameter, loaded: torch.Tensor, rank: int, tp: int) -> None:
    """A_log, dt_bias [Hv]: this rank's value heads."""
    _copy(param.data, _narrow(loaded, 0, rank, param.shape[0], tp))


class GatedDeltaNet(nn.Module):
    def __init__(self, config: HybridConfig, prefix: str) -> None:
        super().__init__()
        rank, tp = parallel.tp_rank(), parallel.tp_size()
        hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
        if hk % tp or hv % tp or hv % hk:
            raise ConfigError(f"linear attention: {hk} key and {hv} value heads do not split "
                              f"over tensor_parallel_size {tp}")
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.hk, self.hv = hk // tp, hv // tp          # this rank's
        self.kernel_size = config.linear_conv_kernel_dim
        self.split = config.split_projections
        key_dim, value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        h = config.hidden_size

        def method(name: str) -> Any:
            return linear_method(config, f"{prefix}.{name}")

        if self.split:
            self.in_proj_qkv = MergedColumnParallelLinear(
                h, [hk * self.dk, hk * self.dk, hv * self.dv], False, method("in_proj_qkv"),
                rank, tp)
            self.in_proj_z = ColumnParallelLinear(h, hv * self.dv, False, method("in_proj_z"),
                                                  rank, tp)
            self.in_proj_b = ColumnParallelLinear(h, hv, False, None, rank, tp)
            self.in_proj_a = ColumnParallelLinear(h, hv, False, None, rank, tp)
        else:   # per key head: q | k | v | z (and b | a) of its value heads, interleaved
            self.in_proj_qkvz = ColumnParallelLinear(
                h, 2 * hk * self.dk + 2 * hv * self.dv, False, method("in_proj_qkvz"), rank, tp)
            self.in_proj_ba = ColumnParallelLinear(h, 2 * hv, False, None, rank, tp)
        sizes = [hk * self.dk, hk * self.dk, hv * self.dv]
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.kernel_size))
        self.conv_weight.weight_loader = lambda p, w: _load_conv(p, w, sizes, rank, tp)
        self.A_log = nn.Parameter(torch.empty(self.hv))
        self.dt_bias = nn.Parameter(torch.empty(self.hv))
        for p in (self.A_log, self.dt_bias):
            p.weight_loader = lambda p, w: _load_heads(p, w, rank, tp)
        self.norm_weight = nn.Parameter(torch.empty(self.dv))
        self.eps = config.rms_norm_eps
        self.out_proj = RowParallelLinear(hv * self.dv, h, False, method("out_proj"), rank, tp)
        # [S, conv_dim, K-1] and [S, Hv, Dk, Dv] float32: set by set_state_caches
        self.conv_state = self.ssm_state = torch.empty(0)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.conv_dim, self.kernel_size - 1), (self.hv, self.dk, self.dv)

    def _project(self, x: torch.Tensor, lora_mapping: LoRAMapping | None
                 ) -> tuple[torch.Tensor, ...]:
        """-> qkv [T, conv_dim] (q | k | v, the conv's channel order), z [T, Hv, Dv], b, a
        [T, Hv]."""
        T = x.shape[0]
        if self.split:
            return (self.in_proj_qkv(x, lora_mapping),
                    self.in_proj_z(x, lora_mapping).view(T, self.hv, self.dv),
                    self.in_proj_b(x), self.in_proj_a(x))
        g = self.hv // self.hk
        qkvz = self.in_proj_qkvz(x, lora_mapping).view(T, self.hk, -1)
        q, k, v, z = qkvz.split([self.dk, self.dk, g * self.dv, g * self.dv], dim=-1)
        b, a = self.in_proj_ba(x).view(T, self.hk, 2 * g).split([g, g], dim=-1)
        qkv = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=-1)
        return qkv, z.reshape(T, self.hv, self.dv), b.reshape(T, -1), a.reshape(T, -1)

    def forward(self, x: torch.Tensor, attn: AttnMetadata,
                lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        T = x.shape[0]
        qkv, z, b, a = self._project(x, lora_mapping)
        qkv = kernels.causal_conv1d(qkv, self.conv_weight, self.conv_state, attn)
        q, k, v = qkv.split([self.hk * self.dk, self.hk * self.dk, self.hv * self.dv], dim=-1)
        beta = torch.sigmoid(b.float())
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o = kernels.gated_delta_rule(q.reshape(T, self.hk, self.dk), k.reshape(T, self.hk, self.dk),
                                     v.reshape(T, self.hv, self.dv), g, beta, self.ssm_state,
                                     attn)
        # the gated RMSNorm, per value head: norm(o) * w * silu(z), in float32 as the reference
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (self.norm_weight * of.to(x.dtype)).float() * F.silu(z.float())
        return self.out_proj(out.to(x.dtype).reshape(T, -1), lora_mapping)


class GatedAttention(nn.Module):
    """Full attention whose q_proj also yields a per-head output gate: q_proj's rows are
    [q_h | gate_h] per head, so they load as 2H heads of head_dim (a rank's share keeps pairs
    whole) and o = o_proj(attn * sigmoid(gate))."""

    def __init__(self, config: HybridConfig, prefix: str, layer: int) -> None:
        super().__init__()
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        tp = parallel.tp_rank(), parallel.tp_size()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, 2 * h, kv, config.attention_bias,
                                          linear_method(config, f"{prefix}.qkv_proj"), *tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads // 2, self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, config.attention_bias,
                                        linear_method(config, f"{prefix}.o_proj"), *tp)
        self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attn: AttnMetadata, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        T, H, K, D = hidden.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qg, k, v = self.qkv_proj(hidden, lora_mapping).split([2 * H * D, K * D, K * D], dim=-1)
        q, gate = qg.view(T, H, 2 * D).split([D, D], dim=-1)
        q, k = self.q_norm(q.contiguous()), self.k_norm(k.reshape(T, K, D))
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attn(q, k, v.reshape(T, K, D), attn)
        return self.o_proj(o * torch.sigmoid(gate.reshape(T, H * D)), lora_mapping)


class HybridDecoderLayer(nn.Module):
    def __init__(self, config: HybridConfig, prefix: str = "", layer: int = 0) -> None:
        super().__init__()
        self.is_linear = config.layer_types[layer] == LINEAR
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, f"{prefix}.linear_attn")
        else:
            self.self_attn = GatedAttention(config, f"{prefix}.self_attn", layer)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe
        if moe is None or not moe.is_sparse(layer):
            self.mlp = LlamaMLP(config, f"{prefix}.mlp")
        elif moe.shared_expert_intermediate_size:
            self.mlp = Qwen2MoeSparseBlock(config, f"{prefix}.mlp")
        else:
            self.mlp = moe_block(config, f"{prefix}.mlp")

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttnMetadata,
                lora_mapping: LoRAMapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if self.is_linear:
            hidden = self.linear_attn(hidden, attn, lora_mapping)
        else:
            hidden = self.self_attn(hidden, cos_sin, attn, lora_mapping)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, lora_mapping), residual


class HybridModel(LlamaModel):
    def __init__(self, config: HybridConfig, decoder_layer: type = HybridDecoderLayer) -> None:
        super().__init__(config, decoder_layer)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


_CHECKPOINT_RENAMES = (
    (re.compile(r"\.linear_attn\.conv1d\.weight$"), ".linear_attn.conv_weight"),
    (re.compile(r"\.linear_attn\.norm\.weight$"), ".linear_attn.norm_weight"),
)


class Qwen3NextForCausalLM(LlamaForCausalLM):
    """Qwen3-Next, Qwen3.5 and Qwen3.5-MoE (their ...ForConditionalGeneration checkpoints: the
    language model; the vision tower is not built). The checkpoint's MTP layers (mtp.*) load
    into models/qwen3_next_mtp.py's head when speculative decoding asks for it; here they are
    skipped."""
    config_class = HybridConfig
    decoder_layer = HybridDecoderLayer

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        moe = config.moe
        self.local_experts = (local_experts(moe.num_experts, moe.expert_parallel)
                              if moe is not None else range(0))
        self.nests_experts = moe is not None and bool(moe.shared_expert_intermediate_size)

    def build_model(self, config: ModelConfig) -> nn.Module:
        return HybridModel(config, self.decoder_layer)

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith(("mtp.", "model.visual.", "visual.", "model.mtp.")):
            return None
        name = name.replace("model.language_model.", "model.", 1)
        e = expert_index(name)
        if e is not None and e not in self.local_experts:
            return None
        if self.nests_experts:
            name = re.sub(r"\.mlp\.(gate|experts)\.", r".mlp.moe.\1.", name)
        for pattern, new in _CHECKPOINT_RENAMES:
            name = pattern.sub(new, name)
        return super().map_weight_name(name)

    @property
    def eagle3_aux_hidden_state_layers(self) -> tuple[int, ...]:
        raise ConfigError("EAGLE-3 is not supported for hybrid linear-attention models")

    # ---- caches: K/V for the attention layers, recurrent states for the linear ones ---------
    def _attention_layers(self) -> list[GatedAttention]:
        return [layer.self_attn for layer in self.model.layers if not layer.is_linear]

    def _linear_layers(self) -> list[GatedDeltaNet]:
        return [layer.linear_attn for layer in self.model.layers if layer.is_linear]

    def kv_cache_layout(self) -> list[tuple[int, int]]:
        return [(a.num_kv_heads, a.head_dim) for a in self._attention_layers()]

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = self._attention_layers()
        if len(kv_caches) != len(layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(layers)} layers")
        for a, (k_cache, v_cache) in zip(layers, kv_caches, strict=True):
            a.attn.k_cache, a.attn.v_cache = k_cache, v_cache

    def state_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per linear-attention layer, one slot's (conv state, recurrent state) shapes."""
        return [layer.state_shapes() for layer in self._linear_layers()]

    def set_state_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per linear-attention layer (conv_states [S, ...], ssm_states [S, ...] float32)."""
        layers = self._linear_layers()
        if len(caches) != len(layers):
            raise ValueError(f"got {len(caches)} state caches for {len(layers)} layers")
        for layer, (conv, ssm) in zip(layers, caches, strict=True):
            layer.conv_state, layer.ssm_state = conv, ssm
