"""Test-side writers of the AWQ and GPTQ checkpoint formats, following the producers' own
packing code (AutoAWQ WQLinear_GEMM.from_linear, AutoGPTQ QuantLinear.pack: the loops, not
vectorised, so a reader can hold them against the source), plus the group-wise round-to-nearest
quantizer both start from. Never imported by minserve."""
from __future__ import annotations

import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                    g_idx: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (intweight [N, K], scales [G, N] fp16, zeros [G, N] int, g_idx [K]) with
    w ~ (intweight - zeros[g]) * scales[g], g = g_idx[k] (min/max round-to-nearest)."""
    n, k = w.shape
    if g_idx is None:
        g_idx = torch.arange(k) // group_size
    num_groups = int(g_idx.max()) + 1
    maxq = 2 ** bits - 1
    scales = torch.empty(num_groups, n)
    zeros = torch.empty(num_groups, n)
    for g in range(num_groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            scales[g] = (2 * hi / maxq).clamp(min=1e-5)
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = ((hi - lo) / maxq).clamp(min=1e-5)
            zeros[g] = torch.round(-lo / scales[g])
    scales = scales.half()
    intweight = torch.empty(n, k, dtype=torch.int32)
    for col in range(k):
        g = g_idx[col]
        intweight[:, col] = torch.clamp(torch.round(w[:, col] / scales[g].float() + zeros[g]),
                                        0, maxq).to(torch.int32)
    return intweight, scales, zeros.to(torch.int32), g_idx.to(torch.int32)


def pack_awq(intweight: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ from_linear: intweight [N, K] -> qweight [K, N // 8]; zeros [G, N] -> [G, N // 8]."""
    iw = intweight.t().contiguous()                                   # [K, N]
    qweight = torch.zeros(iw.shape[0], iw.shape[1] // 8, dtype=torch.int32)
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= iw[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return qweight, qzeros


def pack_gptq(intweight: torch.Tensor, zeros: torch.Tensor, bits: int, v1: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ QuantLinear.pack: intweight [N, K] -> qweight [K // P, N] (uint32 math, stored
    int32); zeros [G, N] (minus one in the v1 format) -> qzeros [G, N // P]."""
    per_word = 32 // bits
    iw = intweight.t().contiguous().to(torch.int64)                   # [K, N]
    qweight = torch.zeros(iw.shape[0] // per_word, iw.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(per_word):
            qweight[row] |= iw[row * per_word + j] << (bits * j)
    z = zeros.to(torch.int64) - (1 if v1 else 0)
    z = z & (2 ** bits - 1)  # AutoGPTQ packs through uint32: a -1 zero wraps to all ones
    qzeros = torch.zeros(z.shape[0], z.shape[1] // per_word, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(per_word):
            qzeros[:, col] |= z[:, col * per_word + j] << (bits * j)
    as_int32 = lambda t: (t - (t >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)  # noqa: E731
    return as_int32(qweight), as_int32(qzeros)


def dequantize_groups(intweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor) -> torch.Tensor:
    """The producers' dequantization, (q - z[g]) * s[g], in fp16 as their torch paths do."""
    g = g_idx.long()
    return ((intweight - zeros[g].t()).half() * scales[g].t()).float()
