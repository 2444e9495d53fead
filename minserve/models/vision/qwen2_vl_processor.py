"""Qwen2-VL / Qwen2.5-VL image preprocessing: smart_resize to multiples of patch * merge (28)
within [min_pixels, max_pixels], bicubic, rescale, CLIP normalize, then cut into the flat
14x14 patches the ViT takes (duplicated over temporal_patch_size frames). And M-RoPE positions:
text counts up one by one, an image's tokens take (t, row, col) offsets from where it starts."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from minserve.config import read_json
from minserve.models.vision.processor import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    ProcessedImage,
    resample_filter,
    resized_chw,
    token_id,
)
from minserve.multimodal.image import MediaError

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """transformers' smart_resize (the same arithmetic, so the same sizes)."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"image aspect ratio must be below 200 for this model, got "
                         f"{max(height, width) / min(height, width):.0f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLImageProcessor(ImageProcessor):
    uses_mrope = True
    # where preprocessor_config.json says nothing: (min_pixels, max_pixels), mean, std, patch
    defaults = (MIN_PIXELS, MAX_PIXELS), CLIP_MEAN, CLIP_STD, 14

    def __init__(self, folder: str, hf_config: dict[str, Any], tokenizer: Any) -> None:
        pp = read_json(folder, "preprocessor_config.json")
        size = pp.get("size") or {}
        (min_pixels, max_pixels), mean, std, patch = self.defaults
        self.min_pixels = int(pp.get("min_pixels") or size.get("shortest_edge") or min_pixels)
        self.max_pixels = int(pp.get("max_pixels") or size.get("longest_edge") or max_pixels)
        vision = hf_config.get("vision_config", {})
        self.patch = int(pp.get("patch_size") or vision.get("patch_size", patch))
        self.merge = int(pp.get("merge_size") or vision.get("spatial_merge_size", 2))
        self.temporal = int(pp.get("temporal_patch_size") or vision.get("temporal_patch_size", 2))
        self.do_resize = pp.get("do_resize", True)
        self.read_normalization(pp, mean, std)
        self.resample = resample_filter(pp.get("resample"), 3)
        self.image_token_id = self.placeholder_token_id = int(hf_config.get("image_token_id",
                                                                            151655))
        self.vision_start_id = hf_config.get("vision_start_token_id")
        pad = tokenizer.backend.id_to_token(self.image_token_id) or "<|image_pad|>"
        start = tokenizer.backend.id_to_token(self.vision_start_id) if self.vision_start_id \
            is not None else None
        end_id = hf_config.get("vision_end_token_id")
        end = tokenizer.backend.id_to_token(end_id) if end_id is not None else None
        self.placeholder = f"{start or '<|vision_start|>'}{pad}{end or '<|vision_end|>'}"
        token_id(tokenizer, pad)

    def _size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the image is resized to."""
        factor = self.patch * self.merge
        if self.do_resize:
            return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        if height % factor or width % factor:
            raise MediaError(f"image size {width}x{height} is not a multiple of {factor}")
        return height, width

    def num_image_tokens(self, width: int, height: int) -> int:
        h, w = self._size(width, height)
        return (h // self.patch) * (w // self.patch) // (self.merge * self.merge)

    def process(self, image: Image.Image) -> ProcessedImage:
        h, w = self._size(*image.size)
        x = self.normalize(resized_chw(image, h, w, self.resample))
        gh, gw, m, p = h // self.patch, w // self.patch, self.merge, self.patch
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], self.temporal, p, p))
        pixel_values = np.ascontiguousarray(x).reshape(gh * gw, 3 * self.temporal * p * p)
        num = gh * gw // (m * m)
        return ProcessedImage({"pixel_values": pixel_values,
                               "image_grid_thw": np.array([[1, gh, gw]], dtype=np.int64)},
                              [self.image_token_id] * num, num)

    def largest_image_size(self) -> tuple[int, int]:
        factor = self.patch * self.merge
        side = max(factor, math.isqrt(self.max_pixels) // factor * factor)
        return side, side

    def mrope_positions(self, num_tokens: int, items: list[Any]) -> tuple[np.ndarray, int]:
        return mrope_positions(num_tokens, [(item.offset, item.data["image_grid_thw"], self.merge)
                                            for item in items])


def mrope_positions(num_tokens: int, images: list[tuple[int, np.ndarray, int]]
                    ) -> tuple[np.ndarray, int]:
    """([3, num_tokens] int64 positions, delta) for a prompt whose images sit at the given
    (offset, image_grid_thw [1, 3], merge_size); tokens after the prompt take position
    index + delta on all three rows (transformers' get_rope_index)."""
    out = np.empty((3, num_tokens), dtype=np.int64)
    pos = text_start = 0
    for offset, grid, merge in sorted(images, key=lambda x: x[0]):
        n = offset - text_start
        out[:, text_start:offset] = np.arange(pos, pos + n)
        pos += n
        t, h, w = (int(v) for v in grid.reshape(3))
        gh, gw = h // merge, w // merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        length = t * gh * gw
        out[0, offset:offset + length] = tt.reshape(-1) + pos
        out[1, offset:offset + length] = hh.reshape(-1) + pos
        out[2, offset:offset + length] = ww.reshape(-1) + pos
        pos += max(gh, gw)
        text_start = offset + length
    out[:, text_start:] = np.arange(pos, pos + num_tokens - text_start)
    delta = int(out.max()) + 1 - num_tokens if num_tokens else 0
    return out, delta
