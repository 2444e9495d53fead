"""Idefics3 (SmolVLM): SigLIP over each tile of the image (the processor's row-major tiles, then
the whole image shrunk to one tile), a pixel-shuffle connector that folds scale_factor^2
neighbouring patches into one token, and a Llama language model."""
from __future__ import annotations

import torch
from torch import nn

from minserve.config import ModelConfig
from minserve.models.linear import ReplicatedLinear
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.siglip import SiglipVisionTower


class Idefics3Connector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, scale_factor: int) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = nn.Module()
        self.modality_projection.proj = ReplicatedLinear(vision_dim * scale_factor ** 2,
                                                         text_dim, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, E] -> [B, S / s^2, E * s^2], transformers' exact reshapes."""
        b, seq, e = x.shape
        s = self.scale_factor
        side = int(seq ** 0.5)
        x = x.view(b, side, side // s, e * s).permute(0, 2, 1, 3)
        x = x.reshape(b, side // s, side // s, e * s * s).permute(0, 2, 1, 3)
        return x.reshape(b, seq // (s * s), e * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(self.pixel_shuffle(x))


class Idefics3ForConditionalGeneration(VisionLanguageModel):
    weight_prefixes = (
        ("model.text_model.", "language_model.model."),
        ("model.vision_model.", "vision_model."),
        ("model.connector.", "connector."),
        ("lm_head.", "language_model.lm_head."),
    )
    vision_modules = ("vision_model.", "connector.")

    def build_vision(self, config: ModelConfig) -> None:
        hf = config.hf_config
        self.vision_model = SiglipVisionTower(hf.get("vision_config", {}))
        self.connector = Idefics3Connector(self.vision_model.hidden_size, config.hidden_size,
                                           int(hf.get("scale_factor", 2)))

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        tiles = torch.cat([image["pixel_values"] for image in images])   # [sum tiles, C, S, S]
        features = self.connector(self.vision_model(tiles))               # [tiles, n, hidden]
        counts = [image["pixel_values"].shape[0] for image in images]
        return [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]

