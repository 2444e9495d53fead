"""Qwen2-VL and Qwen2.5-VL: their vision transformer (qwen_vit.py) and a Qwen2 language model
with M-RoPE, whose positions [3, T] the runner builds from the request's mrope positions. Each
image becomes (h / 28) * (w / 28) embeddings at its <|image_pad|> tokens."""
from __future__ import annotations

import torch

from minserve.config import ModelConfig
from minserve.models.layers import MRotaryEmbedding
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.qwen_vit import QwenVisionTower


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    uses_mrope = True
    is_v2_5 = False
    weight_prefixes = (
        ("model.visual.", "visual."),
        ("visual.", "visual."),
        ("model.language_model.", "language_model.model."),
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    )
    vision_modules = ("visual.",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.language_model.model.rotary_emb = MRotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings,
            config.mrope_section or [config.head_dim // 2, 0, 0])

    def build_vision(self, config: ModelConfig) -> None:
        self.visual = QwenVisionTower(config.hf_config.get("vision_config", {}), self.is_v2_5)

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        pixel_values = torch.cat([image["pixel_values"] for image in images])   # [N, C*T*P*P]
        grids = [tuple(int(x) for x in image["image_grid_thw"].reshape(3).tolist())
                 for image in images]
        merged = self.visual(pixel_values, grids)
        unit = self.visual.merge_size ** 2
        return list(merged.split([t * h * w // unit for t, h, w in grids]))


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    is_v2_5 = True
