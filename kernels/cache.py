"""Write the step's new K/V into the paged cache through the slot mapping (slot -1 = padding,
skipped). Reference in plain torch; the Triton kernel beside it replaces it on CUDA."""
from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor,             # [T, K, D]
    v: torch.Tensor,             # [T, K, D]
    k_cache: torch.Tensor,       # [NB, BS, K, D]
    v_cache: torch.Tensor,       # [NB, BS, K, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
