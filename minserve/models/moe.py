"""The mixture-of-experts layer every MoE model uses: a router (`gate`, a replicated linear,
never quantized) scores the experts, kernels.select_experts keeps each token's top_k, and
kernels.fused_experts runs every token through its experts only. Device paths are the kernels'.

Loading: a checkpoint that stores one module per expert (Qwen, Mixtral, GGUF files once
converted: `experts.{e}.gate_proj` ...) loads into ExpertMLP modules through the linear layers'
own loaders, so every quantization format and its tensor-parallel slicing work as for a dense
MLP; finish_loading() then stacks them into kernels.ExpertWeights and drops them. A model whose
checkpoint stores the experts fused (gpt-oss's [E, ...] tensors, MXFP4 blocks) passes
checkpoint_experts=False, loads them itself and hands them over with set_experts().

Parallelism (tp ranks): by default each expert's intermediate dim is split (gate|up rows and
down columns, as a dense MLP's), and the partial sums are all-reduced; with expert_parallel each
rank holds num_experts / tp whole experts, contiguous (rank r: [r * E/tp, (r+1) * E/tp)), adds
only the pairs routed to them, and the same all-reduce sums the ranks.

    FusedMoE(num_experts, top_k, hidden_size, intermediate_size, prefix,
             router="softmax_topk" | "softmax_topk_norm" | "topk_softmax",
             activation=None (silu(gate) * up) | a callable [M, 2I] -> [M, I],
             bias=False (experts' gate_up / down biases), router_bias=False,
             quant_config=None, expert_parallel=False, checkpoint_experts=True)
    forward(x [T, H], lora_mapping=None) -> [T, H]      (LoRA never reaches the experts)
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minserve import kernels
from minserve.config import ConfigError
from minserve.kernels import ExpertWeights, LoRAMapping
from minserve.kernels.fused_moe import check_router
from minserve.models import parallel
from minserve.models.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

_EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert a checkpoint tensor belongs to ("...mlp.experts.7.up_proj.weight" -> 7)."""
    m = _EXPERT_NAME.search(name)
    return None if m is None else int(m.group(1))


def local_experts(num_experts: int, expert_parallel: bool) -> range:
    """The experts this rank holds: all of them, or its contiguous share under expert
    parallelism (num_experts divides by tp: parallel.check_divisible)."""
    tp_rank, tp_size = parallel.tp_rank(), parallel.tp_size()
    if not expert_parallel or tp_size == 1:
        return range(num_experts)
    per_rank = num_experts // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def load_slice(param: nn.Parameter, loaded: torch.Tensor, dims: dict[int, tuple[int, int]],
                transpose: bool = False) -> None:
    """Copy part (start, size) of each dim in `dims` of a checkpoint tensor into param
    (transposing its last two dims first when asked)."""
    for dim, (start, size) in dims.items():
        if loaded.shape[dim] < start + size:
            raise ConfigError(f"checkpoint tensor of shape {tuple(loaded.shape)} has no rows "
                              f"{start}..{start + size} along dim {dim}")
        loaded = loaded.narrow(dim, start, size)
    if transpose:
        loaded = loaded.transpose(-1, -2)
    if param.shape != loaded.shape:
        raise ConfigError(f"checkpoint shape {tuple(loaded.shape)} != model shape "
                          f"{tuple(param.shape)}")
    param.data.copy_(loaded)


def _linear_method(quant_config: Any, prefix: str) -> Any:
    return None if quant_config is None else quant_config.get_linear_method(prefix)


class ExpertMLP(nn.Module):
    """One expert as the checkpoint stores it, for loading only (it has no forward)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, quant_config: Any,
                 prefix: str, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias,
            _linear_method(quant_config, f"{prefix}.gate_up_proj"), tp_rank, tp_size)
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias,
            _linear_method(quant_config, f"{prefix}.down_proj"), tp_rank, tp_size)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 prefix: str = "", *, router: str = "softmax_topk",
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 bias: bool = False, router_bias: bool = False, quant_config: Any = None,
                 expert_parallel: bool = False, checkpoint_experts: bool = True) -> None:
        super().__init__()
        try:
            check_router(router)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 < top_k <= num_experts:
            raise ConfigError(f"num_experts_per_tok {top_k} must be in 1..num_experts "
                              f"({num_experts})")
        tp_rank, tp_size = parallel.tp_rank(), parallel.tp_size()
        self.num_experts, self.top_k, self.router = num_experts, top_k, router
        self.activation = activation
        self.expert_parallel = expert_parallel and tp_size > 1
        self.local = local_experts(num_experts, self.expert_parallel)
        self.reduce_results = tp_size > 1
        # Row-parallel biases add once: on rank 0 of a split, on each expert's owner otherwise.
        self.adds_down_bias = bias and (self.expert_parallel or tp_rank == 0)
        self.gate = ReplicatedLinear(hidden_size, num_experts, router_bias)
        expert_tp = (0, 1) if self.expert_parallel else (tp_rank, tp_size)
        self.experts = nn.ModuleDict({
            str(e): ExpertMLP(hidden_size, intermediate_size, bias, quant_config,
                              f"{prefix}.experts.{e}", *expert_tp)
            for e in self.local}) if checkpoint_experts else None
        self.weights: ExpertWeights | None = None

    def forward(self, x: torch.Tensor, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        topk_weights, topk_ids = kernels.select_experts(self.gate(x), self.top_k, self.router)
        out = kernels.fused_experts(x, self.weights, topk_weights, topk_ids, self.activation)
        return parallel.all_reduce(out) if self.reduce_results else out

    @torch.no_grad()
    def finish_loading(self) -> None:
        """After the loader (models/loader.py calls it): the per-expert modules' weights, in
        their kernel layouts, stacked into ExpertWeights."""
        if self.weights is not None or self.experts is None:
            return
        experts = [self.experts[str(e)] for e in self.local]
        w13 = _stack([m.gate_up_proj for m in experts])
        w2 = _stack([m.down_proj for m in experts])
        b13 = b2 = None
        if experts[0].gate_up_proj.bias is not None:
            b13 = torch.stack([m.gate_up_proj.bias for m in experts])
            if self.adds_down_bias:
                b2 = torch.stack([m.down_proj.bias for m in experts])
        self.set_experts(ExpertWeights(w13, w2, b13, b2))

    def set_experts(self, weights: ExpertWeights) -> None:
        """This rank's experts, stacked (a model that loads its experts itself calls this)."""
        device = self.gate.weight.device
        if self.expert_parallel:
            expert_map = torch.full((self.num_experts,), -1, dtype=torch.long)
            expert_map[self.local.start:self.local.stop] = torch.arange(len(self.local))
            weights.expert_map = expert_map.to(device)
        self.weights = weights
        if not any(callable(w) for stack in (weights.w13, weights.w2)
                   for w in getattr(stack, "experts", ())):
            self.experts = None           # the stacks hold copies: free the modules' weights

    def nbytes(self) -> int:
        """The stacked experts' bytes (the start-up log's weight total)."""
        return 0 if self.weights is None else self.weights.nbytes()


def _stack(layers: list[nn.Module]) -> Any:
    """One projection of every local expert as a stack (kernels.stack_experts); experts with
    no single kernel weight (several parts, act-order) run through their own quant_method."""
    weights = [_kernel_weight(layer) for layer in layers]
    if any(w is None for w in weights):
        return kernels.stack_experts([functools.partial(layer.quant_method.apply, layer)
                                      for layer in layers])
    return kernels.stack_experts(weights)


def _kernel_weight(layer: nn.Module) -> Any:
    """The one weight a loaded linear layer multiplies by, in its kernel layout, or None."""
    if isinstance(layer.quant_method, UnquantizedLinearMethod):
        return layer.weight.detach()
    parts = getattr(layer, "parts", None)
    if parts is not None:
        if len(parts) != 1 or getattr(parts[0], "perm", None) is not None:
            return None
        return parts[0]
    return getattr(layer, "fp8_weight", None)
