"""A decoder layer's small per-token ops in plain torch: RMSNorm (with the fused residual add),
SiLU-and-mul, GELU(tanh)-and-mul and gpt-oss's clamped SwiGLU. The path on every device but a
CPU with the native library, and the reference that
cpu_layer_ops.c is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> norm(x) * weight, or with `residual`: (norm(x + residual) * weight,
    x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    # NOTE: normalise in float32 and cast back before the weight multiply, as HF does, so
    # bf16/fp16 logits match the reference bit for bit in the norm.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, residual)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[T, 2*I] (gate | up) -> [T, I] = silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[T, 2*I] (gate | up) -> [T, I] = gelu_tanh(gate) * up (GeGLU)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def swiglu_oai_ref(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's experts' activation: x [T, 2I] holds gate and up interleaved (column 2i is
    gate i, 2i + 1 up i); gate clamped above at limit, up to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate) -> [T, I] (transformers' GptOssExperts)."""
    gate = x[..., 0::2].clamp(max=limit)
    up = x[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
