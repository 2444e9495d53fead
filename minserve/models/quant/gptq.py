"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum): 4- or 8-bit weights packed along the INPUT
dim, zero points packed along the output dim, scales per group, and `g_idx` mapping each input
row to its group (act-order / desc_act shuffles it). Repacked at load into the int GEMM layout.

    qweight int32 [K // P, N]      P = 32 // bits; row k in word k // P at bits (k % P) * bits
    qzeros  int32 [G', N // P]     column n in word n // P at bits (n % P) * bits
    scales  fp16  [G', N]          w[k, n] = (q[k, n] - z[g, n]) * s[g, n], g = g_idx[k]
    g_idx   int32 [K]

checkpoint_format "gptq" (v1, AutoGPTQ and most hub checkpoints) stores z - 1; "gptq_v2"
(GPTQModel) stores z itself.
"""
from __future__ import annotations

from typing import Any

import torch

from minserve.kernels.quant_gemm import IntWeight, pack_int, unpack_int
from minserve.models.quant.base import IntConfig, check_group_size, config_error
from minserve.models.quant.sharding import plain_groups


def grouped_weight(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                   g_idx: torch.Tensor | None, bits: int, group_size: int) -> IntWeight:
    """q [K, N] with g_idx [K] naming each input row's row of scales/bias [groups, N] ->
    the int GEMM layout, whose groups are G consecutive rows. Plain g_idx (k // G): as is.
    Act-order: rows sorted by group (the permutation applied to x). A tensor-parallel shard of
    an act-order layer holds only some rows of each group: each group is padded to G rows that
    read a zero column appended to x (part_forward), so results stay exact; the padding costs
    up to G - 1 rows per group present."""
    k, n = q.shape
    local_groups = scales.shape[0] * group_size == k
    g = None if g_idx is None else g_idx.to(torch.int64)
    if g is not None and local_groups and g.numel():
        g = g - g.min()     # a row shard of a plain layout: its groups, numbered from 0
    if g is None or (local_groups and plain_groups(g, group_size)):
        if not local_groups:
            raise config_error(f"{k} input rows do not make {scales.shape[0]} groups of "
                               f"{group_size}")
        return IntWeight(pack_int(q, bits), scales, bias, bits, group_size)
    if g.numel() != k or int(g.min()) < 0 or int(g.max()) >= scales.shape[0]:
        raise config_error(f"g_idx of {g.numel()} rows (groups {int(g.min())}..{int(g.max())}) "
                           f"does not fit {k} rows and {scales.shape[0]} groups")
    perm = torch.argsort(g, stable=True)
    groups, counts = torch.unique_consecutive(g[perm], return_counts=True)
    if bool((counts == group_size).all()):
        rows, q_rows = perm, q.index_select(0, perm)
    else:
        if bool((counts > group_size).any()):
            raise config_error(f"g_idx groups are not all of size {group_size} (one holds "
                               f"{int(counts.max())} rows); this act-order layout is not "
                               "supported")
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.repeat_interleave(torch.arange(groups.numel()), counts) * group_size
        dest = slot + torch.arange(k) - torch.repeat_interleave(starts, counts)
        rows = torch.full((groups.numel() * group_size,), k, dtype=torch.int64)
        rows[dest] = perm
        q_rows = torch.zeros(rows.numel(), n, dtype=q.dtype, device=q.device)
        q_rows[dest] = q.index_select(0, perm)
    return IntWeight(pack_int(q_rows, bits), scales[groups].contiguous(),
                     bias[groups].contiguous(), bits, group_size, rows.to(q.device))


def gptq_to_int(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int,
                zeros_offset_by_one: bool) -> IntWeight:
    q = unpack_int(qweight, bits)                                     # [K, N]
    zeros = unpack_int(qzeros.t().contiguous(), bits).t().float()     # [G', N]
    if zeros_offset_by_one:
        zeros = zeros + 1
    n = q.shape[1]
    if scales.shape[1] != n or zeros.shape != scales.shape:
        raise config_error(f"GPTQ shapes qweight {tuple(qweight.shape)}, qzeros "
                           f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not match "
                           f"{bits} bits, group_size {group_size}")
    s = scales.float()
    return grouped_weight(q, s, -zeros * s, g_idx, bits, group_size)


def int_layouts(name: str, g_idx_name: str, group_size: int, shard: dict[str, torch.Tensor],
                specs: dict[str, tuple[Any, Any]]) -> tuple[Any, Any]:
    """specs[name] for GPTQ-like formats, except that an act-order layer keeps its group
    tensors whole on a row split (a rank's rows belong to groups all over the K range)."""
    n_spec, k_spec = specs.get(name, (None, None))
    g_idx = shard.get(g_idx_name)
    if (k_spec is not None and k_spec[1] == group_size and g_idx is not None
            and not plain_groups(g_idx, group_size)):
        k_spec = None
    return n_spec, k_spec


class GptqConfig(IntConfig):
    name = "gptq"
    param_names = ("qweight", "qzeros", "scales", "g_idx")
    optional_params = ("g_idx",)

    def __init__(self, *, zeros_offset_by_one: bool = True, desc_act: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.zeros_offset_by_one = zeros_offset_by_one
        self.desc_act = desc_act

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> GptqConfig:
        bits = int(cfg.get("bits", 4))
        if bits not in (4, 8):
            raise config_error(f"GPTQ with {bits} bits is not supported (only 4 and 8)")
        group_size = int(cfg.get("group_size", 128))
        check_group_size("GPTQ", group_size)
        fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise config_error(f"GPTQ checkpoint_format {fmt!r} is not supported "
                               "(gptq, gptq_v2)")
        return cls(bits=bits, group_size=group_size, zeros_offset_by_one=fmt == "gptq",
                   desc_act=bool(cfg.get("desc_act", False)),
                   skip_modules=list(cfg.get("modules_to_not_convert") or []))

    def to_int(self, shard: dict[str, torch.Tensor], in_features: int) -> IntWeight:
        group = in_features if self.group_size == -1 else self.group_size
        return gptq_to_int(shard["qweight"], shard["qzeros"], shard["scales"],
                           shard.get("g_idx"), self.bits, group, self.zeros_offset_by_one)

    def layouts(self, name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        per_word, g = 32 // self.bits, self.group_size
        groups = None if g == -1 else (0, g, 1)
        return int_layouts(name, "g_idx", g, shard, {
            "qweight": ((1, 1, 1), (0, per_word, 1)), "qzeros": ((1, per_word, 1), groups),
            "scales": ((1, 1, 1), groups), "g_idx": (None, (0, 1, 1))})
