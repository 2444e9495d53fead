"""Kernel dispatch: Triton on CUDA, the plain-torch reference elsewhere (CPU, no triton, or
MINSERVE_NO_TRITON=1, read once at import). Every public op has the same signature and the same
results (to rounding) on both paths; callers never branch on the device themselves."""
from __future__ import annotations

import os

import torch
from minserve.kernels.attention import AttnMetadata, paged_attention_ref, paged_attention_triton
from minserve.kernels.cache import store_kv_ref, store_kv_triton
from minserve.kernels.jit import triton
from minserve.kernels.lora import (
    LoRAMapping,
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
)

__all__ = ["AttnMetadata", "LoRAMapping", "lora_expand", "lora_shrink", "paged_attention",
           "store_kv", "triton_enabled"]

_TRITON = triton is not None and os.environ.get("MINSERVE_NO_TRITON", "") != "1"


def triton_enabled(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttnMetadata,
    scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D], caches [NB, BS, K, D] -> [T, H, D] (written into `out` when given)."""
    if triton_enabled(q):
        return paged_attention_triton(q, k_cache, v_cache, attn, scale, sliding_window, out=out)
    result = paged_attention_ref(q, k_cache, v_cache, attn, scale, sliding_window)
    if out is None:
        return result
    out.copy_(result)
    return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, K, D] -> cache slots slot_mapping[T] (int64; -1 skips the token)."""
    if triton_enabled(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRAMapping,
                y: torch.Tensor) -> None:
    """x [T, IN], lora_a [S, R, IN] -> y [T, R] = x @ A[slot]^T for tokens with an adapter."""
    if triton_enabled(x):
        lora_shrink_triton(x, lora_a, mapping, y)
    else:
        lora_shrink_ref(x, lora_a, mapping, y)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping,
                out: torch.Tensor) -> None:
    """out [T, N] += y [T, R] @ B[slot]^T (lora_b [S, N, R]) for tokens with an adapter."""
    if triton_enabled(y):
        lora_expand_triton(y, lora_b, mapping, out)
    else:
        lora_expand_ref(y, lora_b, mapping, out)
