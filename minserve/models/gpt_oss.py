"""gpt-oss (GptOssForCausalLM) in plain torch: the Llama-family layers with learned attention
sinks per head, a sliding window on the layers layer_types says (alternate ones), YaRN rope,
biases on q/k/v/o, and a mixture of experts (models/moe.py's FusedMoE) routed by the top-k
logits' softmax, whose experts carry biases and run gpt-oss's clamped SwiGLU over interleaved
gate/up columns. The experts come fused in the checkpoint ([E, ...] tensors: bf16, or MXFP4
blocks and scales that stay 4-bit, kernels/mxfp4.py); GptOssExperts loads them into the expert
stacks itself. Never reads a checkpoint (loader.py does) or picks a device path (kernels/ does).

Checkpoint expert tensors, per layer (E experts, H hidden, I intermediate; gate|up interleaved:
row/column 2i is gate i, 2i + 1 up i):

    bf16   gate_up_proj [E, H, 2I]   down_proj [E, I, H]           (loaded transposed: [E, N, K])
    mxfp4  gate_up_proj_blocks [E, 2I, H/32, 16], _scales [E, 2I, H/32]
           down_proj_blocks    [E, H, I/32, 16],  _scales [E, H, I/32]
    both   gate_up_proj_bias [E, 2I], down_proj_bias [E, H]

Tensor parallelism splits each expert's I (gate|up pairs stay whole; MXFP4 needs I/tp to hold
whole 32-value groups); --enable-expert-parallel gives each rank whole experts instead."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minserve import kernels
from minserve.config import ConfigError, ModelConfig
from minserve.kernels.fused_moe import DenseExperts
from minserve.kernels.mxfp4 import Mxfp4Experts
from minserve.models import parallel
from minserve.models.linear import RowParallelLinear
from minserve.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    linear_method,
)
from minserve.models.moe import FusedMoE, load_slice

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class GptOssConfig(ModelConfig):
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @classmethod
    def from_dict(cls, top: dict[str, Any]) -> GptOssConfig:
        base = ModelConfig.from_dict(top)
        if base.moe is None:
            raise ConfigError("a gpt-oss config.json needs num_local_experts and "
                              "num_experts_per_tok")
        n = base.num_hidden_layers
        layer_types = list(top.get("layer_types")
                           or [LAYER_TYPES[i % 2] for i in range(n)])   # transformers' default
        if len(layer_types) != n or not set(layer_types) <= set(LAYER_TYPES):
            raise ConfigError(f"layer_types must name {n} layers, each one of "
                              f"{', '.join(LAYER_TYPES)}; got {layer_types}")
        base.moe.router = "topk_softmax"        # softmax over the top-k router logits
        base.attention_bias = True
        base.layer_types = layer_types        # the window on sliding layers (is_sliding)
        return cls(**vars(base), swiglu_alpha=float(top.get("swiglu_alpha", 1.702)),
                   swiglu_limit=float(top.get("swiglu_limit", 7.0)))


class GptOssAttention(LlamaAttention):
    """Llama's attention (with this layer's window: layer_types) plus a bias on o_proj and
    sinks [H / tp]."""

    def __init__(self, config: GptOssConfig, prefix: str, layer: int) -> None:
        super().__init__(config, prefix, layer)
        tp = parallel.tp_rank(), parallel.tp_size()
        h, d = config.num_attention_heads, config.head_dim
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, True,
                                        linear_method(config, f"{prefix}.o_proj"), *tp)
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.sinks.weight_loader = functools.partial(
            load_slice, dims={0: (tp[0] * self.num_heads, self.num_heads)})


class GptOssExperts(nn.Module):
    """This rank's experts as the checkpoint stores them (bf16, or MXFP4 blocks and scales),
    loaded straight into the kernel layouts; stacks() hands them to FusedMoE."""

    def __init__(self, config: GptOssConfig, local: range, expert_split: tuple[int, int],
                 mxfp4: bool) -> None:
        super().__init__()
        rank, size = expert_split
        hidden, inter = config.hidden_size, config.moe.intermediate_size
        if inter % size:
            raise ConfigError(f"intermediate_size ({inter}) is not divisible by "
                              f"--tensor-parallel-size {size}")
        i = inter // size
        if mxfp4 and (i % 32 or hidden % 32):
            raise ConfigError(f"MXFP4 experts: each rank's share of intermediate_size ({inter} / "
                              f"{size} = {i}) and hidden_size ({hidden}) must be multiples of 32 "
                              "(one e8m0 scale per 32 values); use a tensor-parallel size that "
                              "keeps them so, or --enable-expert-parallel")
        self.mxfp4 = mxfp4
        e = len(local)
        experts = (local.start, e)
        gate_up = {0: experts, 1: (2 * i * rank, 2 * i)}     # gate|up pairs of this rank's I
        if mxfp4:
            self._add("gate_up_proj_blocks", (e, 2 * i, hidden // 32, 16), gate_up)
            self._add("gate_up_proj_scales", (e, 2 * i, hidden // 32), gate_up)
            self._add("down_proj_blocks", (e, hidden, i // 32, 16),
                      {0: experts, 2: (i // 32 * rank, i // 32)})
            self._add("down_proj_scales", (e, hidden, i // 32),
                      {0: experts, 2: (i // 32 * rank, i // 32)})
        else:   # the checkpoint's [E, K, N], stored [E, N, K]
            self._add("gate_up_proj", (e, 2 * i, hidden), {0: experts, 2: gate_up[1]}, True)
            self._add("down_proj", (e, hidden, i), {0: experts, 1: (i * rank, i)}, True)
        self._add("gate_up_proj_bias", (e, 2 * i), gate_up)
        self._add("down_proj_bias", (e, hidden), {0: experts})

    def _add(self, name: str, shape: tuple[int, ...], dims: dict[int, tuple[int, int]],
             transpose: bool = False) -> None:
        packed = name.endswith(("_blocks", "_scales"))
        param = nn.Parameter(torch.empty(shape, dtype=torch.uint8 if packed else None),
                             requires_grad=False)
        param.weight_loader = functools.partial(load_slice, dims=dims, transpose=transpose)
        if packed:
            param.init_dummy = _dummy_blocks if name.endswith("_blocks") else _dummy_scales
        self.register_parameter(name, param)

    def stacks(self, with_down_bias: bool) -> kernels.ExpertWeights:
        if self.mxfp4:
            w13 = Mxfp4Experts(self.gate_up_proj_blocks.data.flatten(-2),
                               self.gate_up_proj_scales.data)
            w2 = Mxfp4Experts(self.down_proj_blocks.data.flatten(-2), self.down_proj_scales.data)
        else:
            w13, w2 = DenseExperts(self.gate_up_proj.data), DenseExperts(self.down_proj.data)
        return kernels.ExpertWeights(w13, w2, self.gate_up_proj_bias.data,
                                     self.down_proj_bias.data if with_down_bias else None)


def _dummy_blocks(param: torch.Tensor, gen: torch.Generator) -> None:
    param.random_(0, 256, generator=gen)


def _dummy_scales(param: torch.Tensor, gen: torch.Generator) -> None:
    # 2^-7 .. 2^-6: random e2m1 values (|v| ~ 2.6 on average) times that are about N(0, 0.02)
    param.random_(120, 122, generator=gen)


class GptOssMoE(FusedMoE):
    """The router (checkpoint `router`, here `gate`: FusedMoE's name) and GptOssExperts."""

    def __init__(self, config: GptOssConfig, prefix: str) -> None:
        moe = config.moe
        act: Callable[[torch.Tensor], torch.Tensor] = functools.partial(
            kernels.swiglu_oai, alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        super().__init__(moe.num_experts, moe.top_k, config.hidden_size, moe.intermediate_size,
                         prefix, router=moe.router, activation=act, bias=True,
                         router_bias=True, expert_parallel=moe.expert_parallel,
                         checkpoint_experts=False)
        split = (0, 1) if self.expert_parallel else (parallel.tp_rank(), parallel.tp_size())
        quant = config.quant_config
        self.experts = GptOssExperts(config, self.local, split,
                                     quant is not None and quant.name == "mxfp4")

    @torch.no_grad()
    def finish_loading(self) -> None:
        if self.weights is None and self.experts is not None:
            self.set_experts(self.experts.stacks(self.adds_down_bias))


class GptOssDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: GptOssConfig, prefix: str = "", layer: int = 0) -> None:
        super().__init__(config, prefix, layer)
        self.self_attn = GptOssAttention(config, f"{prefix}.self_attn", layer)

    def build_mlp(self, config: GptOssConfig, prefix: str) -> nn.Module:
        return GptOssMoE(config, prefix)


class GptOssForCausalLM(LlamaForCausalLM):
    config_class = GptOssConfig
    decoder_layer = GptOssDecoderLayer

    def map_weight_name(self, name: str) -> str | None:
        return super().map_weight_name(name.replace(".mlp.router.", ".mlp.gate."))
