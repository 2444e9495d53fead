"""Phi-3.5-vision (Phi3VForCausalLM, hub remote code; no transformers class): CLIP ViT-L/14-336's
penultimate layer over the global 336x336 view and each 336x336 crop of the HD transform
(phi3v_processor.py), each crop's 24x24 patches folded 2x2 into 12x12 tokens of 4 x the width,
the crops laid out as the image's grid with a learned separator (sub_GN) closing every row, then a
learned separator (glb_GN) and the global view, likewise; a two-layer MLP projects all of it into
a Phi-3 language model:

    crops 2x1 (h x w)      rows 0..23 of [c0 | c0 ... | sub]  then  glb  then rows 0..11 of
    c0 c0 ... sub          (each crop 12 tokens wide)               [global ... | sub]
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minserve.config import ConfigError, ModelConfig
from minserve.models.linear import ColumnParallelLinear, RowParallelLinear
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.clip import CLIPVisionTower
from minserve.models.vision.llava import feature_layers

# the tower the checkpoints name (img_processor.model_name), which their code builds whatever
# the config says; a config may set "vision_config" inside img_processor (tiny test models)
CLIP_VIT_L_336 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 336, "patch_size": 14,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


class Phi3VConfig(ModelConfig):
    """Phi-3's settings at the top level of config.json, beside img_processor and embd_layer,
    which the wrapper reads from hf_config."""

    @classmethod
    def from_dict(cls, top: dict[str, Any]) -> Phi3VConfig:
        config = super().from_dict(top)
        config.hf_config = top
        return config


def vision_settings(hf: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the CLIP config, hidden_states index read) from config.json's img_processor."""
    proc = hf.get("img_processor") or {}
    embd = hf.get("embd_layer") or {}
    if proc.get("name", "clip_vision_model") != "clip_vision_model" \
            or proc.get("type_feature", "patch") != "patch" \
            or embd.get("hd_transform_order", "sub_glb") != "sub_glb" \
            or embd.get("projection_cls", "mlp") != "mlp" or not embd.get("use_hd_transform"):
        raise ConfigError("this Phi-3-vision layout is not supported (supported: a CLIP "
                          "img_processor, patch features, the HD transform in sub_glb order, "
                          "an mlp projection)")
    return {**CLIP_VIT_L_336, **proc.get("vision_config", {})}, int(proc.get("layer_idx", -2))


class Phi3VForCausalLM(VisionLanguageModel):
    config_class = Phi3VConfig
    weight_prefixes = (
        ("model.vision_embed_tokens.img_processor.vision_model.", "img_processor."),
        ("model.vision_embed_tokens.", ""),
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    )
    vision_modules = ("img_processor.", "img_projection.", "glb_GN", "sub_GN")

    def build_vision(self, config: ModelConfig) -> None:
        vision, layer = vision_settings(config.hf_config)
        self.feature_layers = feature_layers(layer, int(vision["num_hidden_layers"]))
        self.img_processor = CLIPVisionTower(vision, max(self.feature_layers))
        dim = 4 * self.img_processor.hidden_size          # 2x2 patches folded into one token
        self.glb_GN = nn.Parameter(torch.empty(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, dim))
        # "img_projection.0" / ".2" as in the checkpoint (a Sequential with a GELU between)
        self.img_projection = nn.ModuleList([
            ColumnParallelLinear(dim, config.hidden_size, bias=True), nn.GELU(),
            RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)])

    def keep_weight(self, name: str) -> str | None:
        if name.startswith(("img_processor.post_layernorm.", "img_processor.head.")):
            return None
        if name.startswith("img_processor.encoder.layers."):
            if int(name.split(".")[3]) >= max(self.feature_layers):
                return None
        return name

    def _grid(self, crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """crops [rows * cols, P*P, E] (row-major) -> [rows * P/2 * (cols * P/2 + 1), 4E]:
        each crop's patches folded 2x2, the crops side by side, sub_GN closing every row."""
        n, num_patches, e = crops.shape
        side = int(num_patches ** 0.5)
        half = side // 2
        x = crops.view(n, half, 2, half, 2, e).permute(0, 1, 3, 2, 4, 5).reshape(n, half, half,
                                                                                  4 * e)
        x = x.view(rows, cols, half, half, 4 * e).permute(0, 2, 1, 3, 4)
        x = x.reshape(rows * half, cols * half, 4 * e)
        newline = self.sub_GN.reshape(1, 1, 4 * e).expand(rows * half, 1, 4 * e)
        return torch.cat([x, newline.to(x.dtype)], dim=1).reshape(-1, 4 * e)

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        views = [image["pixel_values"] for image in images]      # each [1 + crops, C, S, S]
        (states,) = self.img_processor(torch.cat(views), self.feature_layers)
        features = states[:, 1:].split([v.shape[0] for v in views])   # the class token dropped
        rows = []
        for image, feats in zip(images, features, strict=True):
            num_rows, num_cols = (int(x) for x in image["crop_grid"].reshape(2).tolist())
            rows.append(torch.cat([self._grid(feats[1:], num_rows, num_cols),
                                   self.glb_GN.reshape(1, -1).to(feats.dtype),
                                   self._grid(feats[:1], 1, 1)]))
        proj = self.img_projection
        out = proj[2](F.gelu(proj[0](torch.cat(rows))))
        return list(out.split([r.shape[0] for r in rows]))
