"""A tokenized prompt with one placeholder token per image -> the prompt the model runs: each
placeholder replaced by that image's tokens, and for each image where its tokens sit, which of
them take embeddings, its content hash and the encoder's inputs (plus M-RoPE positions for
Qwen2-VL). The same function serves the server and LLM; torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from minserve.multimodal.image import MediaError, image_hash
from minserve.multimodal.processor import ImageProcessor

# architecture -> (module in minserve.multimodal, processor class)
_PROCESSORS = {
    "LlavaForConditionalGeneration": ("llava", "LlavaImageProcessor"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLImageProcessor"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLImageProcessor"),
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3ImageProcessor"),
}


def get_image_processor(architecture: str, folder: str, hf_config: dict[str, Any],
                        tokenizer: Any) -> ImageProcessor | None:
    """The model's image processor, or None for a text-only architecture."""
    if architecture not in _PROCESSORS:
        return None
    import importlib

    module, name = _PROCESSORS[architecture]
    cls = getattr(importlib.import_module(f"minserve.multimodal.{module}"), name)
    return cls(folder, hf_config, tokenizer)


# ---------------------------------------------------------------- image parts -> images

def load_images_sync(refs: list[Any], policy: Any) -> list[Image.Image]:
    """chat.ImageRefs -> RGB images, fetching in this thread (LLM.chat)."""
    from minserve.multimodal.fetch import fetch_media

    out = []
    for ref in refs:
        try:
            data = fetch_media(ref.url, policy) if ref.url is not None else None
        except MediaError as e:
            raise MediaError(f"{ref.param}: {e}", ref.param) from None
        out.append(_decoded(ref, data))
    return out


async def load_images(refs: list[Any], policy: Any) -> list[Image.Image]:
    """chat.ImageRefs -> RGB images: every URL fetched at once in the fetch threads, then
    decoded in a worker thread (decoding holds the CPU, not the event loop)."""
    import asyncio

    from minserve.multimodal.fetch import fetch_async

    async def fetch(ref: Any) -> bytes | None:
        if ref.url is None:
            return None
        try:
            return await fetch_async(ref.url, policy)
        except MediaError as e:
            raise MediaError(f"{ref.param}: {e}", ref.param) from None

    results = await asyncio.gather(*(fetch(r) for r in refs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return await asyncio.to_thread(
        lambda: [_decoded(ref, data) for ref, data in zip(refs, results, strict=True)])


def _decoded(ref: Any, data: bytes | None) -> Image.Image:
    from minserve.multimodal.image import check_image, decode_image

    try:
        return decode_image(data) if data is not None else check_image(ref.image)
    except MediaError as e:
        raise MediaError(f"{ref.param}: {e}", ref.param) from None


def check_image_count(num_images: int, limit: int) -> None:
    """--limit-mm-per-prompt (vLLM's message)."""
    if num_images > limit:
        raise MediaError(f"At most {limit} image(s) may be provided in one prompt "
                         f"(--limit-mm-per-prompt); this one has {num_images}", "messages")


def attach_images(request: Any, images: list[Image.Image], processor: ImageProcessor) -> None:
    """Expand an EngineRequest's placeholders for `images`; its mm_items (and M-RoPE
    positions) are set from them."""
    from minserve.engine.request import MultiModalItem

    prompt = expand_prompt(request.prompt_token_ids, images, processor)
    request.prompt_token_ids = prompt.prompt_token_ids
    request.mm_items = [MultiModalItem(p.offset, p.length, p.content_hash, p.data, p.embed_mask)
                        for p in prompt.images]
    request.mrope_positions = prompt.mrope_positions
    request.mrope_position_delta = prompt.mrope_position_delta


# ---------------------------------------------------------------- prompt expansion

@dataclass(slots=True)
class PromptImage:
    """One image placed in a prompt: its tokens are prompt_token_ids[offset:offset + length]."""
    offset: int
    length: int
    content_hash: str
    data: dict[str, np.ndarray]       # the encoder's inputs
    embed_mask: np.ndarray | None     # [length] bool: which tokens take embeddings (None: all)

    @property
    def num_embeds(self) -> int:
        return self.length if self.embed_mask is None else int(self.embed_mask.sum())


@dataclass(slots=True)
class MultiModalPrompt:
    prompt_token_ids: list[int]
    images: list[PromptImage]
    mrope_positions: np.ndarray | None = None    # [3, P] int64 (Qwen2-VL)
    mrope_position_delta: int = 0


def expand_prompt(token_ids: list[int], images: list[Image.Image],
                  processor: ImageProcessor) -> MultiModalPrompt:
    """Replace the i-th placeholder token with images[i]'s tokens. The numbers must agree: a
    prompt with more or fewer placeholders than images is the caller's error (MediaError)."""
    placeholder = processor.placeholder_token_id
    at = [i for i, t in enumerate(token_ids) if t == placeholder]
    if len(at) != len(images):
        raise MediaError(f"the prompt has {len(at)} image placeholder(s) "
                         f"({processor.placeholder!r}) but {len(images)} image(s) were given")
    out: list[int] = []
    placed: list[PromptImage] = []
    start = 0
    for pos, image in zip(at, images, strict=True):
        processed = processor.process(image)
        out += token_ids[start:pos]
        mask = np.asarray(processed.token_ids) == processor.image_token_id
        placed.append(PromptImage(len(out), len(processed.token_ids), image_hash(image),
                                  processed.data, None if mask.all() else mask))
        out += processed.token_ids
        start = pos + 1
    out += token_ids[start:]
    prompt = MultiModalPrompt(out, placed)
    if processor.uses_mrope:
        from minserve.multimodal.qwen2_vl import mrope_positions

        prompt.mrope_positions, prompt.mrope_position_delta = mrope_positions(
            len(out), [(p.offset, p.data["image_grid_thw"], processor.merge) for p in placed])
    return prompt
