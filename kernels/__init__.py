"""Kernel dispatch: Triton on CUDA, the plain-torch reference elsewhere (CPU, or MINSERVE_NO_TRITON).
Every public op here has the same signature on both paths."""
from __future__ import annotations

import torch

from minserve.kernels.attention import AttnMetadata, paged_attention_ref
from minserve.kernels.cache import store_kv_ref

__all__ = ["AttnMetadata", "paged_attention", "store_kv"]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttnMetadata,
    scale: float, sliding_window: int | None = None,
) -> torch.Tensor:
    return paged_attention_ref(q, k_cache, v_cache, attn, scale, sliding_window)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
