"""The vision encoder's outputs, kept by image content hash: a prefill chunk that cuts an image in
two, and a later request with the same image, reuse the embeddings instead of encoding again.
And the merge of a step's image embeddings into its inputs_embeds. Runs on the runner's thread.

One row of a step, a prefill chunk that ends inside an image (positions in the prompt):

    prompt:     t t t [i i i i i i i i] t t        item.offset = 3, item.length = 8
    this step:      |<------->|                   context_len = 2, query_len = 5
    overlap:          [i i i]                     prompt 3..5 <- encoder rows 0..2
    next step:               [i i i i i] t t      prompt 6..10 <- encoder rows 3..7 (cached)
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from minserve.engine.request import MultiModalItem


class EncoderCache:
    """LRU of content_hash -> embeddings [num_embeds, hidden], bounded by the rows it holds. An
    entry evicted while a prompt still needs it is only encoded again, never wrong."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.num_rows = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_encoded = 0    # images run through the encoder (for tests and stats)

    def get(self, content_hash: str) -> torch.Tensor | None:
        out = self.entries.get(content_hash)
        if out is not None:
            self.entries.move_to_end(content_hash)
        return out

    def put(self, content_hash: str, embeds: torch.Tensor) -> None:
        if content_hash in self.entries:
            return
        self.entries[content_hash] = embeds
        self.num_rows += embeds.shape[0]
        while self.num_rows > self.max_rows and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.num_rows -= old.shape[0]

    def lookup_or_encode(self, items: list[MultiModalItem],
                         encode: Callable[[list[MultiModalItem]], list[torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """Every item's embeddings; the uncached ones (each distinct image once) in one
        encode() call. The step's own dict keeps them even if the cache evicts one."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, MultiModalItem] = {}
        for item in items:
            if item.content_hash in found or item.content_hash in missing:
                continue
            cached = self.get(item.content_hash)
            if cached is None:
                missing[item.content_hash] = item
            else:
                found[item.content_hash] = cached
        if missing:
            outs = encode(list(missing.values()))
            self.num_encoded += len(missing)
            for (content_hash, item), out in zip(missing.items(), outs, strict=True):
                if out.shape[0] != item.num_embeds:
                    raise ValueError(f"the vision encoder made {out.shape[0]} embeddings for an "
                                     f"image with {item.num_embeds} placeholder tokens")
                self.put(content_hash, out)
                found[content_hash] = out
        return found


def merge_embeddings(inputs_embeds: torch.Tensor, mm_inputs: list[tuple[int, MultiModalItem]],
                     embeds: dict[str, torch.Tensor], query_start_loc: list[int],
                     num_computed_tokens: list[int]) -> None:
    """Write each image's embeddings into the rows of inputs_embeds [T, hidden] that hold its
    placeholder tokens this step (in place)."""
    dst_rows, srcs = [], []
    for r, item in mm_inputs:
        ctx = num_computed_tokens[r]
        end = ctx + query_start_loc[r + 1] - query_start_loc[r]
        start, stop = max(ctx, item.offset), min(end, item.offset + item.length)
        if start >= stop:
            continue
        rel = np.arange(start - item.offset, stop - item.offset)   # positions inside the item
        if item.embed_mask is None:
            src = rel
        else:
            selected = item.embed_mask[rel]
            src = (np.cumsum(item.embed_mask) - 1)[rel][selected]
            rel = rel[selected]
        dst_rows.append(query_start_loc[r] + item.offset - ctx + rel)
        srcs.append(embeds[item.content_hash][torch.from_numpy(src).to(inputs_embeds.device)])
    if dst_rows:
        dst = torch.from_numpy(np.concatenate(dst_rows)).to(inputs_embeds.device)
        inputs_embeds.index_copy_(0, dst, torch.cat(srcs).to(inputs_embeds.dtype))


def image_span_ends(mm_inputs: list[tuple[int, MultiModalItem]], query_start_loc: list[int],
                    num_computed_tokens: list[int], num_tokens: int) -> np.ndarray:
    """AttnMetadata.image_span_end for the step (kernels/attention.py): [T] int32, for each
    scheduled token inside an image's run of embedding tokens the run's end, else 0."""
    out = np.zeros(num_tokens, dtype=np.int32)
    for r, item in mm_inputs:
        ctx = num_computed_tokens[r]
        end = ctx + query_start_loc[r + 1] - query_start_loc[r]
        for start, stop in item.embed_runs():
            lo, hi = max(start, ctx), min(stop, end)
            if lo < hi:
                out[query_start_loc[r] + lo - ctx:query_start_loc[r] + hi - ctx] = stop
    return out


def to_tensors(data: dict[str, Any], device: torch.device, dtype: torch.dtype
               ) -> dict[str, torch.Tensor]:
    """An item's numpy inputs on the device: floats in the model dtype, integers as they are."""
    out = {}
    for name, value in data.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        out[name] = t.to(device, dtype if t.is_floating_point() else t.dtype, non_blocking=True)
    return out
