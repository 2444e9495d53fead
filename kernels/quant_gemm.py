"""Weight-only int4/int8 GEMM: y = x @ W.T with W stored as packed integers and group-wise scales
and offsets. Every int checkpoint format (AWQ, GPTQ, compressed-tensors, GGUF Q4/Q8/K-quants) is
repacked at load into this ONE layout; nothing here knows any checkpoint format.

The layout, for a weight of N output rows and K input columns, P = 32 // bits values per word:

    qweight  int32 [K // P, N]   value q[k, n] sits in word k // P at bits (k % P) * bits
    scales   float [K // G, N]   G = group_size (G = K: one scale per output channel)
    bias     float [K // G, N]   w[k, n] = q[k, n] * scales[k // G, n] + bias[k // G, n]
    perm     int64 [K] | None    act-order: rows of qweight are input columns perm[0], perm[1], ...
                                 so y = x[:, perm] @ w_sorted

    k:    0 1 ... P-1 | P ... 2P-1 | ...           (rows of q, one input column each)
    word: [  row 0    ] [  row 1   ] ...            (little end first: k % P = 0 in bits 0..)

q is unsigned (0..2^bits-1); a signed or zero-pointed format folds its offset into `bias`
(GPTQ/AWQ: bias = -zero * scale; Q4_0: bias = -8 * d; Q4_1: bias = m).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minserve.kernels.jit import jit, tl, triton


@dataclass(slots=True)
class IntWeight:
    qweight: torch.Tensor            # [K // P, N] int32
    scales: torch.Tensor             # [K // G, N] float
    bias: torch.Tensor               # [K // G, N] float, same dtype as scales
    bits: int
    group_size: int
    perm: torch.Tensor | None = None  # [K] int64, act-order input permutation

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * (32 // self.bits)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales, self.bias]
        if self.perm is not None:
            tensors.append(self.perm)
        return sum(t.numel() * t.element_size() for t in tensors)


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] integers in 0..2^bits-1 -> qweight [K // P, N] int32 (the layout above)."""
    per_word = 32 // bits
    k, n = q.shape
    if k % per_word:
        raise ValueError(f"K={k} is not a multiple of {per_word} ({bits}-bit packing)")
    q = q.to(torch.int64).view(k // per_word, per_word, n)
    shifts = (torch.arange(per_word, device=q.device) * bits).view(1, per_word, 1)
    words = (q << shifts).sum(dim=1)                                 # [K // P, N], < 2^32
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_int(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight [K // P, N] int32 -> q [K, N] int32 (inverse of pack_int)."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits)
    q = (qweight[:, None, :] >> shifts.view(1, per_word, 1)) & ((1 << bits) - 1)
    return q.reshape(-1, qweight.shape[1])


def dequantize_int(w: IntWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layout back to a dense weight [N, K] in HF row order (perm undone), computed in fp32."""
    q = unpack_int(w.qweight, w.bits)                                 # [K, N]
    k, n = q.shape
    groups = q.view(k // w.group_size, w.group_size, n).float()      # [K // G, G, N]
    dense = torch.addcmul(w.bias.float()[:, None], groups, w.scales.float()[:, None])
    dense = dense.view(k, n)                                          # sorted rows
    if w.perm is not None:
        dense = torch.empty_like(dense).index_copy_(0, w.perm, dense)
    return dense.t().to(dtype)


@dataclass(slots=True)
class CpuInt4Weight:
    """An int4 IntWeight in torch's CPU int4 GEMM layout (`_convert_weight_to_int4pack_for_cpu`:
    opaque tiles), with torch's (scale, zero) pairs: w = (q - 8) * scale + zero. Made from an
    IntWeight at load on CPU; its own layout, so the IntWeight is not kept beside it."""
    packed: torch.Tensor             # uint8, torch's tiles of the [N, K] int4 values
    scales_zeros: torch.Tensor       # [K // G, N, 2] bfloat16
    group_size: int
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [self.packed, self.scales_zeros] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)


def cpu_int4_supported(w: IntWeight) -> bool:
    return (w.bits == 4 and w.group_size in CPU_INT4_GROUP_SIZES and w.qweight.device.type == "cpu"
            and w.out_features % 16 == 0   # torch's packing works on 16-row tiles
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def to_cpu_int4(w: IntWeight) -> CpuInt4Weight:
    q = unpack_int(w.qweight, 4).t().contiguous()                     # [N, K] int32
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # q * s + b = (q - 8) * s + (b + 8 s)
    zeros = w.bias.float() + 8 * w.scales.float()
    scales_zeros = torch.stack([w.scales.float(), zeros], dim=-1).to(torch.bfloat16).contiguous()
    return CpuInt4Weight(packed, scales_zeros, w.group_size, w.in_features, w.out_features,
                         w.perm)


def cpu_int4_gemm(x: torch.Tensor, w: CpuInt4Weight, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x [M, K] -> [M, N] through torch's CPU int4 kernel, which wants bf16 activations.
    PERF: bench/quant.py --device cpu: at M=1 about the time of the dense fp32 matmul for a
    quarter of its weight bytes; its fp32-activation variant was 10-100x slower."""
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16).contiguous(), w.packed, w.group_size, w.scales_zeros).to(x.dtype)
    return out if bias is None else out + bias


def int_gemm_ref(x: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N]: dequantize, then one matmul in x's dtype (what CPU serves with).
    Act-order: x's columns in the weight's sorted row order, as the kernels read them (a
    padded tensor-parallel shard's pad rows read the zero column past K)."""
    if w.perm is not None:
        x, w = x.index_select(1, w.perm), dataclasses.replace(w, perm=None)
    return torch.nn.functional.linear(x, dequantize_int(w, x.dtype), bias)


@jit
def _int_gemm_kernel(
    x_ptr,          # [M, K] activations (fp16/bf16/fp32), row stride stride_xm
    qw_ptr,         # [K // P, N] int32
    s_ptr,          # [K // G, N] scales
    b_ptr,          # [K // G, N] offsets
    out_ptr,        # [M, N] fp32 when SPLIT_K > 1 (atomic adds), else the output dtype
    M, N, K, stride_xm, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K). Each program owns a [BLOCK_M, BLOCK_N]
    tile and every SPLIT_K-th BLOCK_K slice of K: unpack -> scale -> dot, accumulated in fp32."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)          # [BM, BK]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qw_ptr + (offs_k[:, None] // PER_WORD).to(tl.int64) * N + offs_n[None, :],
                        mask=mask_kn, other=0)                                  # [BK, BN]
        q = (words >> ((offs_k[:, None] % PER_WORD) * BITS)) & ((1 << BITS) - 1)
        group_off = (offs_k[:, None] // GROUP_SIZE).to(tl.int64) * N + offs_n[None, :]
        s = tl.load(s_ptr + group_off, mask=mask_kn, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + group_off, mask=mask_kn, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s + b                                            # [BK, BN]
        if x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out_offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
    else:
        tl.atomic_add(out_ptr + out_offs, acc, mask=mask_mn)


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K). Decode (skinny M) is bound by reading the weight:
    small M tiles and split-K so enough programs stream it; prefill uses square-ish tiles."""
    if m <= 16:
        block_m, block_n, block_k = 16, 64, 128
        tiles = triton.cdiv(n, block_n)
        split_k = max(1, min(8, 256 // max(tiles, 1), triton.cdiv(k, block_k)))
        return block_m, block_n, block_k, split_k
    if m <= 64:
        return 32, 64, 64, 1
    return 64, 128, 64, 1


def int_gemm_triton(x: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None,
                    config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.out_features
    block_m, block_n, block_k, split_k = config or _config(m, n, k)
    if split_k > 1:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _int_gemm_kernel[grid](
        x, w.qweight, w.scales, w.bias, out, m, n, k, x.stride(0), out.stride(0),
        BITS=w.bits, GROUP_SIZE=w.group_size, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    out = out.to(x.dtype)
    return out if bias is None else out + bias
