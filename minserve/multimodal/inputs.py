"""A tokenized prompt with one placeholder token per image -> the prompt the model runs: each
placeholder replaced by that image's tokens, and one MultiModalItem per image saying where its
tokens sit, which of them take embeddings, its content hash and the encoder's inputs (plus M-RoPE
positions for Qwen2-VL). Images come in three steps, so a request's cost is known before it is
paid: load (fetch URLs; read each header: size and pixel budget), then the caller checks the
prompt's length, then decode one image at a time, each dropped once its encoder inputs are made.
The same functions serve the server and LLM; torch-free."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from minserve.engine.request import MultiModalItem
from minserve.multimodal.budget import PixelBudget, check_request_pixels
from minserve.multimodal.fetch import fetch_async, fetch_media
from minserve.multimodal.image import (
    MediaError,
    check_image,
    decode_image,
    image_hash,
    probe_image,
)

if TYPE_CHECKING:
    from minserve.models.vision.processor import ProcessedImage

# ---------------------------------------------------------------- image parts -> images

@dataclass(slots=True)
class ImageInput:
    """One image part, fetched and measured from its header, not decoded yet."""
    ref: Any                 # its chat.ImageRef (param names the part)
    data: bytes | None       # the encoded image; None: ref.image, a Pillow image
    width: int               # as decoded (EXIF orientation applied)
    height: int


class DecodedImage(NamedTuple):
    """What remains of an image once decoded: the encoder's inputs and the pixels' hash."""
    processed: ProcessedImage
    hash: str


async def load_images(refs: list[Any], policy: Any) -> list[ImageInput]:
    """chat.ImageRefs -> ImageInputs: every http(s)/file URL fetched at once in the fetch threads
    (data: URLs never wait there: they are decoded from base64 with the headers), then every
    header read in a worker thread and the request's pixels checked against its budget."""
    async def fetch(ref: Any) -> bytes | None:
        if ref.url is None or ref.url[:5].lower() == "data:":
            return None
        try:
            return await fetch_async(ref.url, policy)
        except MediaError as e:
            raise MediaError(f"{ref.param}: {e}", ref.param) from None

    results = await asyncio.gather(*(fetch(r) for r in refs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return await asyncio.to_thread(measure_images, refs, results, policy)


def measure_images(refs: list[Any], fetched: list[bytes | None], policy: Any
                   ) -> list[ImageInput]:
    """Each image's size from its header (data: URLs base64-decoded here); MediaError when one
    is not an image or over the per-image cap, or all together pass the request's budget."""
    out = []
    for ref, data in zip(refs, fetched, strict=True):
        if ref.url is None:
            image = _named(ref, check_image, ref.image)
            out.append(ImageInput(ref, None, image.width, image.height))
            continue
        if data is None:
            data = _named(ref, fetch_media, ref.url, policy)
        out.append(ImageInput(ref, data, *_named(ref, probe_image, data)))
    check_request_pixels([(i.width, i.height) for i in out], policy.max_request_pixels)
    return out


def num_prompt_tokens(num_tokens: int, images: list[ImageInput], processor: Any) -> int:
    """The prompt's length once each of its placeholders is expanded: known before decoding."""
    return num_tokens - len(images) + sum(
        _named(i.ref, processor.num_image_tokens, i.width, i.height) for i in images)


def decode(image: ImageInput, processor: Any) -> DecodedImage:
    """Decode one image and make its encoder inputs; the full-size pixels are dropped here."""
    pil = _named(image.ref, check_image, image.ref.image) if image.data is None else \
        _named(image.ref, decode_image, image.data)
    return _named(image.ref, process_image, pil, processor)


async def decode_images(images: list[ImageInput], processor: Any, budget: PixelBudget
                        ) -> list[DecodedImage]:
    """One at a time in a worker thread, each within the server's PixelBudget."""
    out = []
    for image in images:
        async with budget.reserve(image.width * image.height):
            out.append(await asyncio.to_thread(decode, image, processor))
    return out


def load_images_sync(refs: list[Any], policy: Any, processor: Any) -> list[DecodedImage]:
    """LLM.chat's images: fetched in this thread, measured, then decoded one at a time."""
    return [decode(i, processor) for i in measure_images(refs, [None] * len(refs), policy)]


def process_image(image: Image.Image, processor: Any) -> DecodedImage:
    return DecodedImage(processor.process(image), image_hash(image))


def _named(ref: Any, fn: Any, *args: Any) -> Any:
    """fn(*args), its MediaError naming the image's part of the request."""
    try:
        return fn(*args)
    except MediaError as e:
        if e.param is not None:     # named already (the request's pixel budget)
            raise
        raise MediaError(f"{ref.param}: {e}", ref.param) from None


def check_image_count(num_images: int, limit: int) -> None:
    """--limit-mm-per-prompt (vLLM's message)."""
    if num_images > limit:
        raise MediaError(f"At most {limit} image(s) may be provided in one prompt "
                         f"(--limit-mm-per-prompt); this one has {num_images}", "messages")


def attach_images(request: Any, images: list[Image.Image | DecodedImage], processor: Any
                  ) -> None:
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


def expand_prompt(token_ids: list[int], images: list[Image.Image | DecodedImage],
                  processor: Any) -> MultiModalPrompt:
    """Replace the i-th placeholder token with images[i]'s tokens (processor: the model's
    ImageProcessor, models/vision/; a Pillow image is processed here). The numbers must agree:
    a prompt with more or fewer placeholders than images is the caller's error (MediaError)."""
    placeholder = processor.placeholder_token_id
    at = [i for i, t in enumerate(token_ids) if t == placeholder]
    if len(at) != len(images):
        raise MediaError(f"the prompt has {len(at)} image placeholder(s) "
                         f"({processor.placeholder!r}) but {len(images)} image(s) were given")
    out: list[int] = []
    items: list[MultiModalItem] = []
    start = 0
    for pos, image in zip(at, images, strict=True):
        processed, content_hash = image if isinstance(image, DecodedImage) else \
            process_image(image, processor)
        out += token_ids[start:pos]
        mask = np.asarray(processed.token_ids) == processor.image_token_id
        items.append(MultiModalItem(len(out), len(processed.token_ids), content_hash,
                                    processed.data, None if mask.all() else mask))
        out += processed.token_ids
        start = pos + 1
    out += token_ids[start:]
    prompt = MultiModalPrompt(out, items)
    if processor.uses_mrope:
        prompt.mrope_positions, prompt.mrope_position_delta = processor.mrope_positions(
            len(out), items)
    return prompt
