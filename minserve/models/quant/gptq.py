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


def act_order_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """None when g_idx is the plain k // G; otherwise the stable sort that makes every group's
    rows contiguous (the kernel's layout needs groups of exactly G consecutive rows)."""
    k = g_idx.numel()
    plain = torch.arange(k, device=g_idx.device) // group_size
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, plain):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], plain):
        raise config_error(f"g_idx groups are not all of size {group_size}; this act-order "
                           "layout is not supported")
    return perm


def gptq_to_int(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int,
                zeros_offset_by_one: bool) -> IntWeight:
    q = unpack_int(qweight, bits)                                     # [K, N]
    zeros = unpack_int(qzeros.t().contiguous(), bits).t().float()     # [G', N]
    if zeros_offset_by_one:
        zeros = zeros + 1
    k, n = q.shape
    if scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise config_error(f"GPTQ shapes qweight {tuple(qweight.shape)}, qzeros "
                           f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not match "
                           f"{bits} bits, group_size {group_size}")
    perm = None if g_idx is None else act_order_perm(g_idx, group_size)
    if perm is not None:
        qweight = pack_int(q.index_select(0, perm), bits)
    s = scales.float()
    return IntWeight(qweight.contiguous(), s, -zeros * s, bits, group_size, perm)


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
