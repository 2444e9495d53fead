"""Tensor parallelism for quantized layers: each rank's part of a checkpoint's packed tensors.
A column-parallel layer splits the output features (N), a row-parallel one the input features
(K); each format says, per checkpoint tensor, which stored dim runs along N and along K and how
many logical features one stored step covers (a Spec), so the split lands on the same features
as the dense weight's:

    AWQ qweight [K, N // 8]          N: (1, 8, 1)    K: (0, 1, 1)
    GPTQ scales [K // G, N]          N: (1, 1, 1)    K: (0, G, 1)
    FP8 weight_scale_inv [N/BN, K/BK] N: (0, BN, 1)  K: (1, BK, 1)
    GGUF Q4_K rows [N, K / 256 * 144] N: (0, 1, 1)   K: (1, 256, 144)   (bytes)

A tensor without a dim along the split (a per-tensor scale, per-channel scales on a row split)
is whole on every rank. A rank's features must start and end on a step boundary (a packed word,
a group, an FP8 block): otherwise a start-up error with the numbers. Only the rank's slice of
the memory-mapped checkpoint is copied."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from minserve.config import ConfigError

Spec = tuple[int, int, int]   # (stored dim, logical features, stored elements per step)
# (name, tensor, the shard's tensors) -> (Spec along N or None, Spec along K or None)
Layouts = Callable[[str, torch.Tensor, dict[str, torch.Tensor]], tuple[Spec | None, Spec | None]]


def config_error(message: str) -> ConfigError:
    return ConfigError(f"quantization: {message}")   # base.config_error's (no import cycle)


def checkpoint_part(layer: nn.Module, index: int) -> tuple[int, int]:
    """(part, number of parts) of checkpoint shard `index` this rank holds along the split."""
    part = getattr(layer, "checkpoint_part", None)
    return part(index) if part is not None else (0, 1)


def split_along(layer: nn.Module) -> str:
    return "k" if getattr(layer, "split_dim", "output_dim") == "input_dim" else "n"


def narrow_shard(layer: nn.Module, index: int, shard: dict[str, torch.Tensor],
                 layouts: Layouts) -> dict[str, torch.Tensor]:
    """This rank's slice of every tensor of checkpoint shard `index` (views; no copy)."""
    part, num_parts = checkpoint_part(layer, index)
    if num_parts == 1:
        return shard
    along = split_along(layer)
    local = layer.quant_output_sizes[index] if along == "n" else layer.quant_input_size
    out = {}
    for name, t in shard.items():
        spec = layouts(name, t, shard)[0 if along == "n" else 1]
        out[name] = t if spec is None else _narrow(name, t, spec, part, num_parts, local, along)
    return out


def split_fused(layer: nn.Module, fused: dict[str, torch.Tensor],
                layouts: Layouts) -> list[dict[str, torch.Tensor]]:
    """A checkpoint's fused q|k|v (or gate|up) tensors -> each shard's tensors (views), split
    along N at the shards' checkpoint sizes; a tensor with no N dim (a per-tensor scale, g_idx)
    belongs to every shard."""
    sizes = layer.checkpoint_sizes()
    parts: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
    for name, t in fused.items():
        spec = layouts(name, t, fused)[0]
        offset = 0
        for part, size in zip(parts, sizes, strict=True):
            if spec is None:
                part[name] = t
                continue
            dim, features, stored = spec
            if offset % features or size % features or t.shape[dim] != sum(sizes) // features \
                    * stored:
                raise config_error(f"fused {name} {tuple(t.shape)} does not split into the "
                                   f"layer's shards {sizes} on {features}-feature steps")
            part[name] = t.narrow(dim, offset // features * stored, size // features * stored)
            offset += size
    return parts


def _narrow(name: str, t: torch.Tensor, spec: Spec, part: int, num_parts: int, local: int,
            along: str) -> torch.Tensor:
    dim, features, stored = spec
    what = "output" if along == "n" else "input"
    if local % features:
        raise config_error(
            f"{name} {tuple(t.shape)}: tensor parallelism gives each of {num_parts} ranks "
            f"{local} {what} features, not a multiple of the {features} that one quantized step "
            f"(packed word, group or block) spans; use a --tensor-parallel-size that splits on "
            f"{features}-feature boundaries")
    size = local // features * stored
    if t.shape[dim] < num_parts * size:
        raise config_error(f"{name} {tuple(t.shape)} holds {t.shape[dim]} along dim {dim}, "
                           f"{num_parts} ranks need {num_parts * size}")
    return t.narrow(dim, part * size, size)


def plain_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """g_idx is k // G (no act-order shuffle)."""
    k = g_idx.numel()
    return torch.equal(g_idx.to(torch.int64), torch.arange(k, device=g_idx.device) // group_size)
