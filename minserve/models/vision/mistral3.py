"""Mistral 3 (Mistral Small 3.1 / 3.2): the Pixtral tower (pixtral.py), a projector that RMS-norms
the patches, folds each 2x2 block of them into one (the patch merger), then a two-layer MLP, and a
Mistral language model. An image of h x w patches becomes h/2 * w/2 embeddings, row by row, at the
[IMG] tokens of its prompt text (each row closed by [IMG_BREAK], the last by [IMG_END])."""
from __future__ import annotations

import torch
from torch import nn

from minserve.config import ConfigError, ModelConfig
from minserve.models.layers import RMSNorm
from minserve.models.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.llava import feature_layers
from minserve.models.vision.pixtral import PIXTRAL_VISION_DEFAULTS, PixtralVisionTower
from minserve.models.vision.vit import activation, with_defaults


class Mistral3PatchMerger(nn.Module):
    def __init__(self, dim: int, merge_size: int) -> None:
        super().__init__()
        self.merge_size = merge_size
        self.merging_layer = ReplicatedLinear(dim * merge_size ** 2, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """x [N, E] (each image's patches in raster order) -> [N / m^2, E]: for each m x m block,
        raster order of blocks, the features laid out as torch's unfold lays them (E, then the
        block's rows and columns)."""
        m, out, start = self.merge_size, [], 0
        for h, w in grids:
            grid = x[start:start + h * w].view(h // m, m, w // m, m, -1)
            out.append(grid.permute(0, 2, 4, 1, 3).reshape(h // m * (w // m), -1))
            start += h * w
        return self.merging_layer(torch.cat(out))


class Mistral3MultiModalProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, merge_size: int, eps: float, act: str,
                 bias: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(vision_dim, eps)
        self.patch_merger = Mistral3PatchMerger(vision_dim, merge_size)
        self.linear_1 = ColumnParallelLinear(vision_dim, text_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = RowParallelLinear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self.patch_merger(self.norm(x), grids)
        return self.linear_2(self.act(self.linear_1(x)))


class Mistral3ForConditionalGeneration(VisionLanguageModel):
    weight_prefixes = (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    )
    vision_modules = ("vision_tower.", "multi_modal_projector.")

    def build_vision(self, config: ModelConfig) -> None:
        hf = config.hf_config
        vision = with_defaults(hf.get("vision_config", {}), PIXTRAL_VISION_DEFAULTS)
        layer = hf.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer {layer} (several layers) is not supported "
                              "for Mistral 3; one layer index is")
        self.feature_layers = feature_layers(layer, int(vision["num_hidden_layers"]))
        self.num_built_layers = max(self.feature_layers)
        self.vision_tower = PixtralVisionTower(vision, self.num_built_layers)
        self.merge_size = int(hf.get("spatial_merge_size", 2))
        self.multi_modal_projector = Mistral3MultiModalProjector(
            self.vision_tower.hidden_size, config.hidden_size, self.merge_size,
            config.rms_norm_eps, hf.get("projector_hidden_act", "gelu"),
            bool(hf.get("multimodal_projector_bias", False)))

    def keep_weight(self, name: str) -> str | None:
        if name.startswith("vision_tower.transformer.layers."):
            if int(name.split(".")[3]) >= self.num_built_layers:
                return None
        return name

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        pixels = [image["pixel_values"] for image in images]        # each [C, H, W]
        (features,) = self.vision_tower(pixels, self.feature_layers)
        p = self.vision_tower.patch_size
        grids = [(x.shape[1] // p, x.shape[2] // p) for x in pixels]
        embeds = self.multi_modal_projector(features, grids)
        m = self.merge_size
        return list(embeds.split([h // m * (w // m) for h, w in grids]))
