"""Kernel dispatch: Triton on CUDA, the plain-torch reference elsewhere (CPU, no triton, or
MINSERVE_NO_TRITON=1, read once at import). Every public op has the same signature and the same
results (to rounding) on both paths; callers never branch on the device themselves."""
from __future__ import annotations

import os

import torch
from minserve.kernels.attention import AttnMetadata, paged_attention_ref, paged_attention_triton
from minserve.kernels.cache import store_kv_ref, store_kv_triton
from minserve.kernels.jit import triton

__all__ = ["AttnMetadata", "paged_attention", "store_kv", "triton_enabled"]

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
