"""MXFP4 weights (OCP microscaling FP4, gpt-oss's experts), served from their 4-bit blocks: the
layout, the plain-torch reference, the Triton tile every MXFP4 GEMM decodes (a plain GEMM here,
the fused MoE's expert tiles in fused_moe.py) and the CPU native kernel's wrapper
(cpu_mxfp4.c). Nothing here reads a checkpoint or picks a device (dispatch.py does).

A weight of N output rows and K input columns (K % 32 == 0), as the checkpoints store it:

    blocks  uint8 [N, K // 2]    byte j of row n holds values 2j (low nibble) and 2j + 1 (high)
    scales  uint8 [N, K // 32]   e8m0: the 32 values k = 32g .. 32g + 31 are scaled by 2^(s - 127)

    nibble = s | e e | m   (sign, 2 exponent bits, 1 mantissa bit: e2m1)
    value  = (-1)^s * (e == 0 ? m / 2 : (1 + m / 2) * 2^(e - 1))
           -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minserve.kernels.jit import jit, tl

GROUP = 32                     # values per e8m0 scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(slots=True)
class Mxfp4Weight:
    blocks: torch.Tensor       # uint8 [N, K // 2]
    scales: torch.Tensor       # uint8 [N, K // 32]

    @property
    def in_features(self) -> int:
        return self.blocks.shape[-1] * 2

    @property
    def out_features(self) -> int:
        return self.blocks.shape[-2]

    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()


@dataclass(slots=True)
class Mxfp4Experts:
    """Every local expert's projection, stacked: blocks [E, N, K // 2], scales [E, N, K // 32]
    (a fused_moe stack: num_experts, expert(e), nbytes())."""
    blocks: torch.Tensor
    scales: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.blocks.shape[0]

    def expert(self, e: int) -> Mxfp4Weight:
        return Mxfp4Weight(self.blocks[e], self.scales[e])

    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()


def dequantize_mxfp4(w: Mxfp4Weight | Mxfp4Experts) -> torch.Tensor:
    """The reference: [..., N, K] float32."""
    lut = torch.tensor(FP4_VALUES, device=w.blocks.device)
    codes = torch.stack((w.blocks & 0x0F, w.blocks >> 4), dim=-1).flatten(-2).long()
    values = lut[codes].unflatten(-1, (-1, GROUP))                       # [..., N, K/32, 32]
    scale = torch.exp2(w.scales.float() - 127)[..., None]
    return (values * scale).flatten(-2)


def mxfp4_gemm_ref(x: torch.Tensor, w: Mxfp4Weight, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x's dtype, in float32."""
    out = torch.nn.functional.linear(x.float(), dequantize_mxfp4(w))
    return (out if bias is None else out + bias.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
@jit
def mxfp4_tile(blocks_ptr, scales_ptr, offs_k, offs_n, mask_kn, stride_bn, stride_sn):
    """The [BLOCK_K, BLOCK_N] tile of W^T at (offs_k, offs_n), decoded to float32. blocks_ptr /
    scales_ptr point at one weight's (or expert's) row 0; offs_k even and odd pairs share a
    byte, read twice (from L1) rather than shuffled."""
    byte = tl.load(blocks_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] // 2,
                   mask=mask_kn, other=0).to(tl.int32)
    nib = (byte >> ((offs_k[:, None] % 2) * 4)) & 0xF
    e = (nib >> 1) & 3
    m = (nib & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
    value = tl.where((nib & 8) != 0, -mag, mag)
    s = tl.load(scales_ptr + offs_n[None, :].to(tl.int64) * stride_sn + offs_k[:, None] // 32,
                mask=mask_kn, other=127).to(tl.float32)
    return value * tl.exp2(s - 127.0)


@jit
def _mxfp4_gemm_kernel(
    x_ptr,        # [M, K]
    blocks_ptr,   # [N, K // 2] uint8
    scales_ptr,   # [N, K // 32] uint8
    bias_ptr,     # [N] or unused
    y_ptr,        # [M, N]
    M, N, K, stride_xm, stride_bn, stride_sn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), float32 accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = mxfp4_tile(blocks_ptr, scales_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :],
                       stride_bn, stride_sn)
        if x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def mxfp4_gemm_triton(x: torch.Tensor, w: Mxfp4Weight, bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype: one launch, the weight decoded tile by tile."""
    from minserve.kernels.jit import triton

    x = x.contiguous()
    m, k = x.shape
    n = w.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _mxfp4_gemm_kernel[grid](
        x, w.blocks, w.scales, bias if bias is not None else y, y, m, n, k, x.stride(0),
        w.blocks.stride(0), w.scales.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64)
    return y


# ---------------------------------------------------------------------------------------------
# CPU: the native kernel (cpu_mxfp4.c, built with the others by cpu_native.py)
# ---------------------------------------------------------------------------------------------
MAX_NATIVE_ROWS = 16    # more rows: decode the weight once (natively) and run one sgemm


def mxfp4_gemm_cpu(x: torch.Tensor, w: Mxfp4Weight, bias: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """x [M, K] @ W.T on CPU in float32 (None where the native library is not built: the caller
    runs the reference)."""
    from minserve.kernels import cpu_native

    lib = cpu_native.library()
    if lib is None or not (w.blocks.is_contiguous() and w.scales.is_contiguous()):
        return None
    dtype = x.dtype
    x = x.float().contiguous()
    m, k = x.shape
    n = w.out_features
    threads = torch.get_num_threads()
    if m > MAX_NATIVE_ROWS:
        dense = torch.empty(n, k)
        lib.mxfp4_dequantize(w.blocks.data_ptr(), w.scales.data_ptr(), k, n, dense.data_ptr(),
                             threads)
        y = torch.nn.functional.linear(x, dense)
    else:
        y = torch.empty(m, n)
        lib.mxfp4_gemm(x.data_ptr(), m, k, w.blocks.data_ptr(), w.scales.data_ptr(), n,
                       y.data_ptr(), threads)
    if bias is not None:
        y += bias.float()
    return y.to(dtype)
