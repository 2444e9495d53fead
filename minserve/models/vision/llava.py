"""LLaVA (LLaVA-1.5 and its kin): CLIP's hidden states at vision_feature_layer (the class token
dropped by the "default" strategy), a two-layer MLP projector, a Llama language model. Each image
becomes (image_size / patch_size)^2 embeddings at its <image> placeholder tokens."""
from __future__ import annotations

import torch
from torch import nn

from minserve.config import ConfigError, ModelConfig
from minserve.models.linear import ColumnParallelLinear, RowParallelLinear
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.clip import CLIP_VISION_DEFAULTS, CLIPVisionTower
from minserve.models.vision.vit import activation


def feature_layers(vision_feature_layer: int | list[int], num_layers: int) -> list[int]:
    """HF's hidden_states indices (0 = embeddings, i = after layer i; negative from the end)."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) \
        else list(vision_feature_layer)
    out = [i if i >= 0 else num_layers + 1 + i for i in layers]
    if any(not 0 <= i <= num_layers for i in out):
        raise ConfigError(f"vision_feature_layer {vision_feature_layer} is out of range for a "
                          f"{num_layers}-layer vision tower")
    return out


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = ColumnParallelLinear(in_dim, out_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = RowParallelLinear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    weight_prefixes = (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
        ("vision_tower.vision_model.", "vision_tower."),
    )
    vision_modules = ("vision_tower.", "multi_modal_projector.")

    def build_vision(self, config: ModelConfig) -> None:
        hf = config.hf_config
        vision = {**CLIP_VISION_DEFAULTS, **hf.get("vision_config", {})}
        self.strategy = hf.get("vision_feature_select_strategy", "default")
        if self.strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {self.strategy!r} is not "
                              "supported (default, full)")
        self.feature_layers = feature_layers(hf.get("vision_feature_layer", -2),
                                             int(vision["num_hidden_layers"]))
        self.num_built_layers = max(self.feature_layers)
        self.vision_tower = CLIPVisionTower(vision, self.num_built_layers)
        self.multi_modal_projector = LlavaMultiModalProjector(
            self.vision_tower.hidden_size * len(self.feature_layers), config.hidden_size,
            hf.get("projector_hidden_act", "gelu"), bool(hf.get("multimodal_projector_bias", True)))

    def keep_weight(self, name: str) -> str | None:
        if name.startswith("vision_tower.post_layernorm."):
            return None
        if name.startswith("vision_tower.encoder.layers."):
            if int(name.split(".")[3]) >= self.num_built_layers:
                return None
        return name

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        pixel_values = torch.stack([image["pixel_values"] for image in images])  # [B, C, H, W]
        states = self.vision_tower(pixel_values, self.feature_layers)
        if self.strategy == "default":
            states = [s[:, 1:] for s in states]    # drop the class token
        return list(self.multi_modal_projector(torch.cat(states, dim=-1)))

