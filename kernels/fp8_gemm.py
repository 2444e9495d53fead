"""FP8 (e4m3) GEMM: y = x @ W.T with W stored in float8_e4m3fn and float32 scales over blocks of
W. Per-tensor, per-channel and block-wise (DeepSeek/Qwen3 128x128) scales are one shape here:

    weight  float8_e4m3fn [N, K]
    scale   float32 [ceil(N / BN), ceil(K / BK)]   w[n, k] = weight[n, k] * scale[n // BN, k // BK]
            per-tensor: [1, 1], (BN, BK) = (N, K); per-channel: [N, 1], (1, K); block: (128, 128)

Three ways to run it: torch._scaled_mm (fp8 tensor cores; activations quantized per token, or with
the checkpoint's static input_scale), a Triton kernel that dequantizes W tiles in registers and
keeps activations in 16 bits (any GPU, any block shape), and the plain-torch reference.
Nothing here reads checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from minserve.kernels.jit import jit, tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


@dataclass(slots=True)
class Fp8Weight:
    weight: torch.Tensor                  # [N, K] float8_e4m3fn
    scale: torch.Tensor                   # [ceil(N / BN), ceil(K / BK)] float32
    block: tuple[int, int]                # (BN, BK)
    input_scale: torch.Tensor | None = None  # [] float32, a static activation scale
    quantize_input: bool = True           # False: weight-only (activations stay 16-bit)

    @property
    def is_block_wise(self) -> bool:
        n, k = self.weight.shape
        return not (self.block == (n, k) or self.block == (1, k))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale))


def fp8_quantize_weight(w: torch.Tensor, amax: torch.Tensor | None = None) -> Fp8Weight:
    """Dense [N, K] -> FP8 with one scale per output channel (amax / 448), as `--quantization
    fp8` does at load for a 16-bit checkpoint. amax [N, 1]: the rows' absolute maxima when w
    is a tensor-parallel slice of them (default: w's own)."""
    if amax is None:
        amax = w.float().abs().amax(dim=1, keepdim=True)
    scale = amax.float().clamp(min=1e-12) / FP8_MAX                                 # [N, 1]
    weight = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(weight, scale, (1, w.shape[1]))


def dequantize_fp8(w: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = w.weight.shape
    bn, bk = w.block
    scale = w.scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w.weight.float() * scale).to(dtype)


def fp8_gemm_ref(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N], weight-only: dequantize, one matmul in x's dtype."""
    return torch.nn.functional.linear(x, dequantize_fp8(w, x.dtype), bias)


def quantize_input(x: torch.Tensor, static_scale: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale): the static per-tensor scale, else one per token."""
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1)
    else:
        scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [M, 1]
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scaled_mm_supported(w: Fp8Weight, x: torch.Tensor) -> bool:
    """torch._scaled_mm takes per-tensor or row-wise scales and dims that are multiples of 16;
    on CUDA it needs fp8 tensor cores (compute capability 8.9+)."""
    n, k = w.weight.shape
    if not w.quantize_input or w.is_block_wise or n % 16 or k % 16:
        return False
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device) >= (8, 9)
    return True


def fp8_scaled_mm(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] through torch._scaled_mm, activations quantized to fp8 first."""
    xq, x_scale = quantize_input(x, w.input_scale)
    n = w.weight.shape[0]
    w_scale = w.scale.reshape(1, n) if w.block[0] == 1 else w.scale.reshape(1, 1)
    if x_scale.numel() == 1 and w_scale.numel() > 1:   # row-wise needs both operands row-wise
        x_scale = x_scale.expand(x.shape[0], 1).contiguous()
    if x_scale.numel() > 1 and w_scale.numel() == 1:
        w_scale = w_scale.expand(1, n).contiguous()
    out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
    out = torch._scaled_mm(xq, w.weight.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=None, out_dtype=out_dtype).to(x.dtype)
    return out if bias is None else out + bias


def fp8_scaled_mm_ref(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """What fp8_scaled_mm computes, in plain fp32: quantize x, dequantize both, matmul."""
    xq, x_scale = quantize_input(x, w.input_scale)
    out = (xq.float() * x_scale) @ dequantize_fp8(w).t()
    out = out.to(x.dtype)
    return out if bias is None else out + bias


@jit
def _fp8_gemm_kernel(
    x_ptr,          # [M, K] fp16/bf16/fp32, row stride stride_xm
    w_ptr,          # [N, K] float8_e4m3fn
    s_ptr,          # [SN, SK] float32 block scales
    out_ptr,        # [M, N]
    M, N, K, stride_xm, stride_om, SK,
    SCALE_BN, SCALE_BK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): weight-only, W tiles dequantized in registers."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)       # [BM, BK]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None],
                    mask=mask_kn, other=0.0).to(tl.float32)                  # [BK, BN]
        s = tl.load(s_ptr + (offs_n[None, :] // SCALE_BN) * SK + offs_k[:, None] // SCALE_BK,
                    mask=mask_kn, other=0.0)
        w = w * s
        if x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_gemm_triton(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.weight.shape[0]
    block_m = 16 if m <= 16 else (32 if m <= 64 else 64)
    block_n, block_k = 64, 64
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        x, w.weight, w.scale, out, m, n, k, x.stride(0), out.stride(0), w.scale.shape[1],
        w.block[0], w.block[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out if bias is None else out + bias
