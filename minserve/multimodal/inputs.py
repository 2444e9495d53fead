"""A tokenized prompt with one placeholder token per image -> the prompt the model runs: each
placeholder replaced by that image's tokens, and one MultiModalItem per image saying where its
tokens sit, which of them take embeddings, its content hash and the encoder's inputs (plus M-RoPE
positions for Qwen2-VL). The same function serves the server and LLM; torch-free."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from minserve.engine.request import MultiModalItem
from minserve.multimodal.fetch import fetch_async, fetch_media
from minserve.multimodal.image import MediaError, check_image, decode_image, image_hash

# ---------------------------------------------------------------- image parts -> images

def load_images_sync(refs: list[Any], policy: Any) -> list[Image.Image]:
    """chat.ImageRefs -> RGB images, fetching in this thread (LLM.chat)."""
    return [_decoded(ref, None if ref.url is None else _named(ref, fetch_media, ref.url, policy))
            for ref in refs]


async def load_images(refs: list[Any], policy: Any) -> list[Image.Image]:
    """chat.ImageRefs -> RGB images: every URL fetched at once in the fetch threads, then
    decoded in a worker thread (decoding holds the CPU, not the event loop)."""
    async def fetch(ref: Any) -> bytes | None:
        try:
            return await fetch_async(ref.url, policy) if ref.url is not None else None
        except MediaError as e:
            raise MediaError(f"{ref.param}: {e}", ref.param) from None

    results = await asyncio.gather(*(fetch(r) for r in refs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return await asyncio.to_thread(
        lambda: [_decoded(ref, data) for ref, data in zip(refs, results, strict=True)])


def _decoded(ref: Any, data: bytes | None) -> Image.Image:
    if data is None:
        return _named(ref, check_image, ref.image)
    return _named(ref, decode_image, data)


def _named(ref: Any, fn: Any, *args: Any) -> Any:
    """fn(*args), its MediaError naming the image's part of the request."""
    try:
        return fn(*args)
    except MediaError as e:
        raise MediaError(f"{ref.param}: {e}", ref.param) from None


def check_image_count(num_images: int, limit: int) -> None:
    """--limit-mm-per-prompt (vLLM's message)."""
    if num_images > limit:
        raise MediaError(f"At most {limit} image(s) may be provided in one prompt "
                         f"(--limit-mm-per-prompt); this one has {num_images}", "messages")


def attach_images(request: Any, images: list[Image.Image], processor: Any) -> None:
    """Expand an EngineRequest's placeholders for `images`; its mm_items (and M-RoPE
    positions) are set from them."""
    prompt = expand_prompt(request.prompt_token_ids, images, processor)
    request.prompt_token_ids = prompt.prompt_token_ids
    request.mm_items = prompt.items
    request.mrope_positions = prompt.mrope_positions
    request.mrope_position_delta = prompt.mrope_position_delta


# ---------------------------------------------------------------- prompt expansion

@dataclass(slots=True)
class MultiModalPrompt:
    prompt_token_ids: list[int]
    items: list[MultiModalItem]
    mrope_positions: np.ndarray | None = None    # [3, P] int64 (Qwen2-VL)
    mrope_position_delta: int = 0


def expand_prompt(token_ids: list[int], images: list[Image.Image], processor: Any
                  ) -> MultiModalPrompt:
    """Replace the i-th placeholder token with images[i]'s tokens (processor: the model's
    ImageProcessor, models/vision/). The numbers must agree: a prompt with more or fewer
    placeholders than images is the caller's error (MediaError)."""
    placeholder = processor.placeholder_token_id
    at = [i for i, t in enumerate(token_ids) if t == placeholder]
    if len(at) != len(images):
        raise MediaError(f"the prompt has {len(at)} image placeholder(s) "
                         f"({processor.placeholder!r}) but {len(images)} image(s) were given")
    out: list[int] = []
    items: list[MultiModalItem] = []
    start = 0
    for pos, image in zip(at, images, strict=True):
        processed = processor.process(image)
        out += token_ids[start:pos]
        mask = np.asarray(processed.token_ids) == processor.image_token_id
        items.append(MultiModalItem(len(out), len(processed.token_ids), image_hash(image),
                                    processed.data, None if mask.all() else mask))
        out += processed.token_ids
        start = pos + 1
    out += token_ids[start:]
    prompt = MultiModalPrompt(out, items)
    if processor.uses_mrope:
        prompt.mrope_positions, prompt.mrope_position_delta = processor.mrope_positions(
            len(out), items)
    return prompt
