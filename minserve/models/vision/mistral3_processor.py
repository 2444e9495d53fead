"""Mistral 3 / Pixtral image preprocessing: the image shrunk (aspect kept) to fit
size["longest_edge"], then each side rounded up to a multiple of patch * spatial_merge (28
pixels), bicubic; rescale and CLIP normalize. The placeholder [IMG] becomes one [IMG] token per
28x28 cell, row by row, each row closed by [IMG_BREAK] and the last one by [IMG_END]."""
from __future__ import annotations

import math
from typing import Any

from PIL import Image

from minserve.config import read_json
from minserve.multimodal.image import MediaError
from minserve.models.vision.processor import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    ProcessedImage,
    resample_filter,
    resize,
    to_chw,
    token_id,
)


def fit_to_cells(height: int, width: int, longest_edge: int, cell: int) -> tuple[int, int]:
    """transformers' Pixtral get_resize_output_image_size: shrink to fit longest_edge x
    longest_edge (floor), then round each side up to whole cells."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((height - 1) // cell + 1) * cell, ((width - 1) // cell + 1) * cell


class Mistral3ImageProcessor(ImageProcessor):
    def __init__(self, folder: str, hf_config: dict[str, Any], tokenizer: Any) -> None:
        pp = read_json(folder, "preprocessor_config.json")
        vision = hf_config.get("vision_config", {})
        patch = int(vision.get("patch_size", 16))
        self.cell = patch * int(hf_config.get("spatial_merge_size", 1))
        self.longest_edge = int((pp.get("size") or {}).get("longest_edge", 1024))
        self.do_resize = pp.get("do_resize", True)
        self.read_normalization(pp, CLIP_MEAN, CLIP_STD)
        self.resample = resample_filter(pp.get("resample"), 3)
        self.image_token_id = self.placeholder_token_id = int(
            hf_config.get("image_token_index", hf_config.get("image_token_id", 10)))
        self.placeholder = tokenizer.backend.id_to_token(self.image_token_id) or "[IMG]"
        self.break_id = token_id(tokenizer, "[IMG_BREAK]")
        self.end_id = token_id(tokenizer, "[IMG_END]")

    def _size(self, width: int, height: int) -> tuple[int, int]:
        if self.do_resize:
            return fit_to_cells(height, width, self.longest_edge, self.cell)
        if height % self.cell or width % self.cell:
            raise MediaError(f"image size {width}x{height} is not a multiple of {self.cell}")
        return height, width

    def num_image_tokens(self, width: int, height: int) -> int:
        h, w = self._size(width, height)
        return (h // self.cell) * (w // self.cell + 1)     # a break (or the end) ends each row

    def process(self, image: Image.Image) -> ProcessedImage:
        arr = to_chw(image)
        h, w = self._size(arr.shape[2], arr.shape[1])
        if self.do_resize:
            arr = resize(arr, h, w, self.resample)
        rows, cols = h // self.cell, w // self.cell
        token_ids = ([self.image_token_id] * cols + [self.break_id]) * rows
        token_ids[-1] = self.end_id
        return ProcessedImage({"pixel_values": self.normalize(arr)}, token_ids, rows * cols)

    def largest_image_size(self) -> tuple[int, int]:
        return self.longest_edge, self.longest_edge
