"""Phi-3.5-vision image preprocessing, as its hub processor computes it: the HD transform (the
image, turned to landscape, scaled to the most 336-pixel columns whose rows fit num_crops crops,
bilinear; its height padded with white to whole 336-pixel rows, centred; turned back), rescale
and CLIP normalize; cut into row-major 336x336 crops, and a global view: the whole normalized
image bicubic-resized to 336x336 (torch's bicubic, which the processor uses). The prompt names
images with <|image_1|>, <|image_2|>, ... tags: the text between them is tokenized piece by
piece, each piece with its own <s> (the processor's way), and each tag becomes the image's
tokens: (crops + 1) * 144 + 1 + (rows + 1) * 12 of them at 336 pixels."""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from PIL import Image

from minserve.config import read_json
from minserve.models.vision.processor import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    ProcessedImage,
    rescale_normalize,
    to_chw,
)
from minserve.multimodal.image import MediaError

TAG = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TOKEN_ID = 32044   # a free id of the 32064 (vLLM's choice); no text tokenizes to it


def hd_size(width: int, height: int, num_crops: int, side: int) -> tuple[int, int, int, int]:
    """(resized width, height, padded width, height) of the HD transform."""
    turned = width < height
    if turned:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    new_w = int((scale - 1) * side)
    new_h = int(new_w / ratio)
    padded_h = int(math.ceil(new_h / side) * side)
    sizes = (new_w, new_h, new_w, padded_h)
    return (sizes[1], sizes[0], sizes[3], sizes[2]) if turned else sizes


def bicubic_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] float64: torch's bicubic (align_corners=False, A = -0.75, edge taps
    clamped), as one matrix per axis."""
    a = -0.75
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(src)
    t = src - base
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)               # distance to each of 4 taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    coeffs = np.where(d <= 1, near, far)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, size_in - 1)
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.repeat(np.arange(size_out), 4), taps.reshape(-1)), coeffs.reshape(-1))
    return weights


class Phi3VImageProcessor(ImageProcessor):
    def __init__(self, folder: str, hf_config: dict[str, Any], tokenizer: Any) -> None:
        pp = read_json(folder, "preprocessor_config.json")
        self.num_crops = int(pp.get("num_crops", 4))
        vision = (hf_config.get("img_processor") or {}).get("vision_config", {})
        self.side = int(vision.get("image_size", 336))
        self.tokens_per_side = self.side // int(vision.get("patch_size", 14)) // 2
        self.read_normalization(pp, CLIP_MEAN, CLIP_STD)
        self.image_token_id = self.placeholder_token_id = int(
            hf_config.get("image_token_id", IMAGE_TOKEN_ID))
        self.placeholder = "<|image_{n}|>"
        self.tokenizer = tokenizer

    def encode_text(self, text: str) -> list[int]:
        """The processor's tokenization: each piece between <|image_N|> tags with its own <s>,
        one placeholder token per tag. Tags must number the images 1, 2, ... in order."""
        pieces = TAG.split(text)
        numbers = [int(n) for n in pieces[1::2]]
        if numbers != list(range(1, len(numbers) + 1)):
            raise MediaError(f"image tags must be <|image_1|>, <|image_2|>, ... in order; this "
                             f"prompt has {', '.join(f'<|image_{n}|>' for n in numbers)}")
        ids: list[int] = []
        for i, piece in enumerate(pieces[::2]):
            if i:
                ids.append(self.placeholder_token_id)
            ids += self.tokenizer.encode(piece, add_special_tokens=True)
        return ids

    def process(self, image: Image.Image) -> ProcessedImage:
        # NOTE: a portrait image is turned, resized and padded, then turned back, as the hub
        # processor does (Pillow resizes one axis after the other, rounding in between)
        turned = image.width < image.height
        if turned:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        w, h, padded_w, padded_h = hd_size(*image.size, self.num_crops, self.side)
        canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
        canvas.paste(image.resize((w, h), Image.Resampling.BILINEAR), (0, (padded_h - h) // 2))
        if turned:
            canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
            padded_w, padded_h = padded_h, padded_w
        hd = rescale_normalize(to_chw(canvas), self.scale, self.mean, self.std)
        s = self.side
        rows, cols = padded_h // s, padded_w // s
        crops = hd.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
        resize_h, resize_w = bicubic_weights(padded_h, s), bicubic_weights(padded_w, s)
        glob = resize_h @ hd.astype(np.float64) @ resize_w.T        # [3, side, side]
        num = self._count(rows, cols)
        return ProcessedImage(
            {"pixel_values": np.concatenate([glob[None].astype(np.float32), crops]),
             "crop_grid": np.array([rows, cols], dtype=np.int64)},
            [self.image_token_id] * num, num)

    def _count(self, rows: int, cols: int) -> int:
        """Tokens of a rows x cols crop grid: each crop row with its separator, then the global
        view's rows with theirs, and the separator between the two."""
        n = self.tokens_per_side
        return rows * n * (cols * n + 1) + 1 + n * (n + 1)

    def num_image_tokens(self, width: int, height: int) -> int:
        turned = width < height
        if turned:
            width, height = height, width
        _, _, padded_w, padded_h = hd_size(width, height, self.num_crops, self.side)
        if turned:
            padded_w, padded_h = padded_h, padded_w
        return self._count(padded_h // self.side, padded_w // self.side)

    def largest_image_size(self) -> tuple[int, int]:
        return self.side, self.side * self.num_crops     # one column of crops: the most rows
