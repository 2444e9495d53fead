"""LLaVA's image preprocessing (CLIPImageProcessor, or LlavaImageProcessor with do_pad): shortest
edge to `size`, center crop to `crop_size`, rescale, CLIP normalize. Every image becomes
(image_size / patch_size)^2 <image> tokens (one more with the "full" feature strategy)."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from minserve.config import read_json
from minserve.models.vision.processor import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    ProcessedImage,
    center_crop,
    resample_filter,
    resize,
    resized_chw,
    to_chw,
)


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


class LlavaImageProcessor(ImageProcessor):
    def __init__(self, folder: str, hf_config: dict[str, Any], tokenizer: Any) -> None:
        pp = read_json(folder, "preprocessor_config.json")
        vision = hf_config.get("vision_config", {})
        self.image_size = int(vision.get("image_size", 224))
        patch = int(vision.get("patch_size", 32))
        self.size = pp.get("size", {"shortest_edge": self.image_size})
        if isinstance(self.size, int):
            self.size = {"shortest_edge": self.size}
        crop = pp.get("crop_size", {"height": self.image_size, "width": self.image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.crop = (int(crop["height"]), int(crop["width"]))
        self.do_resize = pp.get("do_resize", True)
        self.do_center_crop = pp.get("do_center_crop", True)
        self.do_pad = bool(pp.get("do_pad", False))
        self.read_normalization(pp, CLIP_MEAN, CLIP_STD)
        self.resample = resample_filter(pp.get("resample"), 3)
        self.image_token_id = self.placeholder_token_id = int(hf_config["image_token_index"]
                                                              if "image_token_index" in hf_config
                                                              else hf_config["image_token_id"])
        self.placeholder = tokenizer.backend.id_to_token(self.image_token_id) or "<image>"
        full = hf_config.get("vision_feature_select_strategy", "default") == "full"
        self.num_tokens = (self.image_size // patch) ** 2 + (1 if full else 0)

    def num_image_tokens(self, width: int, height: int) -> int:
        return self.num_tokens

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            return shortest_edge_size(height, width, int(self.size["shortest_edge"]))
        return int(self.size["height"]), int(self.size["width"])

    def process(self, image: Image.Image) -> ProcessedImage:
        if self.do_pad:   # padding works on the array: it is made at full size
            arr = self._pad_to_square(to_chw(image))
            if self.do_resize:
                arr = resize(arr, *self._resized(*arr.shape[1:]), self.resample)
        elif self.do_resize:
            arr = resized_chw(image, *self._resized(image.height, image.width), self.resample)
        else:
            arr = to_chw(image)
        if self.do_center_crop:
            arr = center_crop(arr, *self.crop)
        pixel_values = self.normalize(arr)
        return ProcessedImage({"pixel_values": pixel_values},
                              [self.image_token_id] * self.num_tokens, self.num_tokens)

    def _pad_to_square(self, arr: np.ndarray) -> np.ndarray:
        """LlavaImageProcessor.pad_to_square: centred on a square of the mean colour."""
        c, h, w = arr.shape
        if h == w:
            return arr
        side = max(h, w)
        out = np.empty((c, side, side), dtype=arr.dtype)
        for i, m in enumerate(self.mean):
            out[i] = int(m * 255)
        top, left = (side - h) // 2, (side - w) // 2
        out[:, top:top + h, left:left + w] = arr
        return out

    def largest_image_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size
