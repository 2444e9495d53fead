"""Paged attention over the block-table KV cache: prefill chunks and decodes of one step in one
call. This file holds the metadata the runner builds and the plain-torch reference; the Triton
kernel that replaces the reference on CUDA lives beside it.

Per request r (a row of the batch), in token positions:

    |<------------- seq_len = seq_lens[r] ------------->|
    |<---- context_len (already in cache) ---->|<-query_len->|
                                                ^ query_start_loc[r] .. query_start_loc[r+1] in q

Query token i of request r sits at absolute position context_len + i and may attend keys at
positions <= context_len + i (and > context_len + i - sliding_window, when there is a window).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttnMetadata:
    query_start_loc: torch.Tensor        # [R+1] int32, prefix sums of query lengths
    seq_lens: torch.Tensor               # [R] int32, context_len + query_len
    block_table: torch.Tensor            # [R, max_blocks] int32
    slot_mapping: torch.Tensor           # [T] int64, flat cache slot per new token; -1 = skip
    max_query_len: int
    max_seq_len: int
    # Host copies, so the torch reference never syncs with the device.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_host)


def paged_attention_ref(
    q: torch.Tensor,         # [T, H, D]
    k_cache: torch.Tensor,   # [NB, BS, K, D]
    v_cache: torch.Tensor,   # [NB, BS, K, D]
    attn: AttnMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:           # [T, H, D]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    qsl, seq_lens = attn.query_start_loc_host, attn.seq_lens_host
    for r in range(len(seq_lens)):
        start, end, seq_len = qsl[r], qsl[r + 1], seq_lens[r]
        query_len = end - start
        if query_len == 0:
            continue
        context_len = seq_len - query_len
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = attn.block_table[r, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]          # [S, K, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)             # [S, H, D]
            v = v.repeat_interleave(group, dim=1)
        qr = q[start:end].float()                             # [Q, H, D]
        scores = torch.einsum("qhd,shd->hqs", qr, k.float()) * scale
        q_pos = torch.arange(context_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqs,shd->qhd", probs, v.float()).to(q.dtype)
    return out
