"""Qwen3-VL image preprocessing: Qwen2-VL's (smart_resize, flat patches in merge-block order,
M-RoPE positions) with Qwen3-VL's defaults: 16-pixel patches, so 32x32 pixels per language-model
token, between 256 and 16,384 tokens an image, and mean/std 0.5."""
from __future__ import annotations

from minserve.models.vision.processor import STANDARD_MEAN, STANDARD_STD
from minserve.models.vision.qwen2_vl_processor import Qwen2VLImageProcessor


class Qwen3VLImageProcessor(Qwen2VLImageProcessor):
    # the checkpoints' preprocessor_config.json size: shortest_edge / longest_edge (in pixels)
    defaults = (65536, 16777216), STANDARD_MEAN, STANDARD_STD, 16
