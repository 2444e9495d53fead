"""compressed-tensors checkpoints, as llm-compressor writes them (`quant_method:
compressed-tensors`): per-layer schemes from `config_groups` (targets, ignore list), in two
formats:

  pack-quantized (int4/int8 weight-only, W4A16/W8A16):
    weight_packed      int32 [N, K // P]   element k of a row at bits (k % P) * bits of word k // P,
                                           stored as q + 2^(bits-1) (q signed)
    weight_scale       [N, K // G] (group) or [N, 1] (channel)
    weight_zero_point  int32 [N // P, K // G], packed along N, stored as zp + 2^(bits-1)
                                           (asymmetric only)
    weight_g_idx       int32 [K]           (actorder, optional)
    w[n, k] = (q[n, k] - zp[n, g]) * scale[n, g]

  float-quantized (FP8 W8A8): weight float8_e4m3fn [N, K], weight_scale [1] / [N, 1] /
    [N // BN, K // BK] (tensor / channel / block), input_scale for static activations.

The packed int rows are already the int GEMM's words, transposed, so repacking is a transpose."""
from __future__ import annotations

from typing import Any

import torch

from minserve.kernels.quant_gemm import IntWeight, unpack_int
from minserve.models.quant.base import (
    IntConfig,
    LinearMethod,
    QuantConfig,
    check_group_size,
    config_error,
    prefix_matches,
)
from minserve.models.quant.fp8 import Fp8LinearMethod, fp8_layouts, shard_to_fp8
from minserve.models.quant.gptq import grouped_weight, int_layouts

SUPPORTED_FORMATS = ("pack-quantized", "float-quantized")


def pack_quantized_to_int(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                          weight_zero_point: torch.Tensor | None,
                          weight_g_idx: torch.Tensor | None, bits: int,
                          group_size: int) -> IntWeight:
    n = weight_packed.shape[0]
    q = unpack_int(weight_packed.t().contiguous(), bits)              # [K, N]
    scale = weight_scale.float().reshape(n, -1).t().contiguous()      # [groups, N]
    offset = float(1 << (bits - 1))
    if weight_zero_point is not None:
        # packed like the weights: zp + 2^(bits-1), along N
        zp = unpack_int(weight_zero_point.contiguous(), bits)[:n].t().float() - offset
    else:
        zp = torch.zeros_like(scale)
    if weight_g_idx is None and scale.shape[0] * group_size != q.shape[0]:
        raise config_error(f"compressed-tensors weight_scale {tuple(weight_scale.shape)} does "
                           f"not fit K={q.shape[0]} in groups of {group_size}")
    return grouped_weight(q, scale, -(zp + offset) * scale, weight_g_idx, bits, group_size)


class CtIntScheme(IntConfig):
    """One config group's int weight-only scheme (the IntLinearMethod asks it to repack)."""

    name = "compressed-tensors"

    def __init__(self, *, symmetric: bool, strategy: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.symmetric, self.strategy = symmetric, strategy
        self.param_names = ("weight_packed", "weight_scale", "weight_shape") + (
            () if symmetric else ("weight_zero_point",)) + ("weight_g_idx",)
        self.optional_params = ("weight_g_idx", "weight_shape")

    def to_int(self, shard: dict[str, torch.Tensor], in_features: int) -> IntWeight:
        group = in_features if self.group_size == -1 else self.group_size
        return pack_quantized_to_int(shard["weight_packed"], shard["weight_scale"],
                                     shard.get("weight_zero_point"), shard.get("weight_g_idx"),
                                     self.bits, group)

    def layouts(self, name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        per_word, g = 32 // self.bits, self.group_size
        groups = None if g == -1 else (1, g, 1)
        return int_layouts(name, "weight_g_idx", g, shard, {
            "weight_packed": ((0, 1, 1), (1, per_word, 1)), "weight_scale": ((0, 1, 1), groups),
            "weight_zero_point": ((0, per_word, 1), groups), "weight_g_idx": (None, (0, 1, 1))})


def _scheme(group: dict[str, Any], fmt: str) -> QuantConfig | tuple[str, Any]:
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    wtype, bits = weights.get("type", "int"), int(weights.get("num_bits", 0))
    strategy = str(weights.get("strategy", "tensor"))
    fmt = group.get("format") or fmt
    if fmt not in SUPPORTED_FORMATS:
        raise config_error(f"compressed-tensors format {fmt!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_FORMATS)})")
    if wtype == "int":
        if fmt != "pack-quantized" or acts is not None:
            raise config_error("compressed-tensors int weights are supported weight-only "
                               "(W4A16/W8A16, pack-quantized); this scheme quantizes "
                               "activations too")
        if bits not in (4, 8):
            raise config_error(f"compressed-tensors int{bits} weights are not supported "
                               "(only 4 and 8 bits)")
        if strategy not in ("group", "channel"):
            raise config_error(f"compressed-tensors int strategy {strategy!r} is not supported "
                               "(group, channel)")
        group_size = int(weights.get("group_size") or -1) if strategy == "group" else -1
        check_group_size("compressed-tensors", group_size)
        return CtIntScheme(bits=bits, group_size=group_size, strategy=strategy,
                           symmetric=bool(weights.get("symmetric", True)))
    if wtype == "float":
        if bits != 8 or fmt != "float-quantized":
            raise config_error(f"compressed-tensors float{bits} ({fmt}) is not supported "
                               "(only FP8 float-quantized)")
        if strategy not in ("tensor", "channel", "block"):
            raise config_error(f"compressed-tensors FP8 strategy {strategy!r} is not supported")
        block = None
        if strategy == "block":
            block = tuple(int(b) for b in weights.get("block_structure") or (128, 128))
        static_input = acts is not None and not acts.get("dynamic", True)
        quantize_input = acts is not None
        return ("fp8", (block, static_input, quantize_input))
    raise config_error(f"compressed-tensors weight type {wtype!r} is not supported")


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], Any]], fmt: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups, self.fmt = groups, fmt

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CompressedTensorsConfig:
        fmt = str(cfg.get("format", "pack-quantized"))
        groups = []
        for group in (cfg.get("config_groups") or {}).values():
            groups.append((list(group.get("targets") or ["Linear"]), _scheme(group, fmt)))
        if not groups:
            raise config_error("compressed-tensors config has no config_groups")
        if cfg.get("sparsity_config"):
            raise config_error("compressed-tensors sparse checkpoints are not supported")
        return cls(groups, fmt, skip_modules=list(cfg.get("ignore") or []))

    def describe(self) -> str:
        kinds = sorted({s.describe() if isinstance(s, QuantConfig) else "fp8"
                        for _, s in self.groups})
        return f"compressed-tensors {self.fmt} ({', '.join(kinds)})"

    def _scheme_for(self, prefix: str) -> Any:
        for targets, scheme in self.groups:
            if "Linear" in targets or prefix_matches(prefix, [t for t in targets
                                                              if t != "Linear"]):
                return scheme
        return None

    def get_linear_method(self, prefix: str) -> LinearMethod | None:
        if prefix_matches(prefix, self.skip_modules):
            return None
        scheme = self._scheme_for(prefix)
        if scheme is None:
            return None
        if isinstance(scheme, CtIntScheme):
            return scheme.get_linear_method(prefix)
        block, static_input, quantize_input = scheme[1]
        names = ("weight", "weight_scale") + (("input_scale",) if static_input else ())

        def convert(shard: dict[str, torch.Tensor]) -> Any:
            if block is not None:
                shard = {**shard, "weight_scale_inv": shard["weight_scale"]}
            return shard_to_fp8(shard, block, static_input, quantize_input)

        return Fp8LinearMethod(names, convert, fp8_layouts(block, "weight_scale"))
