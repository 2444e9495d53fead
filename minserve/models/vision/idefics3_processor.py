"""Idefics3 / SmolVLM image preprocessing: longest edge to size["longest_edge"] (Lanczos), then
up to multiples of the encoder's tile size, cut into row-major tiles plus the whole image shrunk
to one tile; rescale and normalize each. The placeholder becomes transformers' prompt text for
that grid (fake-token / <row_i_col_j> / <global-img> markers around image_seq_len <image>
tokens per tile), tokenized as transformers tokenizes it."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from minserve.config import read_json
from minserve.models.vision.processor import (
    STANDARD_MEAN,
    STANDARD_STD,
    ImageProcessor,
    ProcessedImage,
    resample_filter,
    resize,
    resized_chw,
    to_chw,
    token_id,
)

MAX_IMAGE_SIZE = 4096
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _to_tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder sizes."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


class Idefics3ImageProcessor(ImageProcessor):
    def __init__(self, folder: str, hf_config: dict[str, Any], tokenizer: Any) -> None:
        pp = read_json(folder, "preprocessor_config.json")
        proc = read_json(folder, "processor_config.json")
        vision = hf_config.get("vision_config", {})
        self.tile = int((pp.get("max_image_size") or {}).get("longest_edge")
                        or vision.get("image_size", 364))
        self.longest_edge = int((pp.get("size") or {}).get("longest_edge", 4 * self.tile))
        self.do_resize = pp.get("do_resize", True)
        self.do_split = pp.get("do_image_splitting", True)
        self.read_normalization(pp, STANDARD_MEAN, STANDARD_STD)
        self.resample = resample_filter(pp.get("resample"), 1)
        patch = int(vision.get("patch_size", 32))
        scale = int(hf_config.get("scale_factor", 2))
        self.image_seq_len = int(proc.get("image_seq_len")
                                 or (int(vision.get("image_size", 224)) // patch) ** 2
                                 // (scale * scale))
        self.image_token_id = self.placeholder_token_id = int(hf_config.get("image_token_id",
                                                                            128257))
        self.placeholder = tokenizer.backend.id_to_token(self.image_token_id) or "<image>"
        for special in (FAKE, GLOBAL):
            token_id(tokenizer, special)
        self.tokenizer = tokenizer
        self._expansion = lru_cache(maxsize=64)(self._expand)

    def _sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((height, width) after the first resize, after the resize to whole tiles)."""
        h, w = height, width
        if self.do_resize:
            h, w = _scale_below(*_rescale_to_max_len(h, w, self.longest_edge), MAX_IMAGE_SIZE)
        first = (h, w)
        if self.do_split:
            h, w = _to_tile_multiple(h, w, self.tile)
        return first, (h, w)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles; (0, 0): the image is one tile."""
        if not self.do_split or (height <= self.tile and width <= self.tile):
            return 0, 0
        return (height - self.tile) // self.tile + 1, (width - self.tile) // self.tile + 1

    def num_image_tokens(self, width: int, height: int) -> int:
        return len(self._expansion(*self._grid(*self._sizes(width, height)[1])))

    def process(self, image: Image.Image) -> ProcessedImage:
        (h, w), (tiled_h, tiled_w) = self._sizes(*image.size)
        # PERF: the full-size image is resized by Pillow before any array is made
        arr = resized_chw(image, h, w, self.resample) if self.do_resize else to_chw(image)
        rows = cols = 0
        if self.do_split:
            h, w = tiled_h, tiled_w
            arr = resize(arr, h, w, self.resample)
            tiles = [arr]
            rows, cols = self._grid(h, w)
            if rows:
                t = self.tile
                tiles = [arr[:, r * t:(r + 1) * t, c * t:(c + 1) * t]
                         for r in range(rows) for c in range(cols)]
                tiles.append(resize(arr, t, t, self.resample))
        else:
            tiles = [resize(arr, self.tile, self.tile, self.resample)]
        pixel_values = np.stack([self.normalize(t) for t in tiles])
        token_ids = self._expansion(rows, cols)
        return ProcessedImage({"pixel_values": pixel_values}, list(token_ids),
                              len(tiles) * self.image_seq_len)

    def prompt_text(self, rows: int, cols: int) -> str:
        """transformers' Idefics3Processor text for one image of rows x cols tiles."""
        image = self.placeholder * self.image_seq_len
        if rows == 0 and cols == 0:
            return f"{FAKE}{GLOBAL}{image}{FAKE}"
        text = "".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{image}" + ("\n" if c == cols - 1 else "")
                       for r in range(rows) for c in range(cols))
        return text + f"\n{FAKE}{GLOBAL}{image}{FAKE}"

    def _expand(self, rows: int, cols: int) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(self.prompt_text(rows, cols), add_special_tokens=False))

    def largest_image_size(self) -> tuple[int, int]:
        side = self.longest_edge if self.do_split else self.tile
        return side, side
