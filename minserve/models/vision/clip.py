"""CLIP's vision transformer (LLaVA's tower): patch + class embeddings, pre-LayerNorm, encoder
layers. Built only as deep as the deepest feature layer the wrapper reads (LLaVA-1.5 reads the
penultimate one), so the unused last layers and post_layernorm are never loaded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minserve.models.vision.vit import encoder_layers, with_defaults

# transformers' CLIPVisionConfig defaults
CLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        e, p = cfg["hidden_size"], cfg["patch_size"]
        self.patch_size = p
        self.num_patches = (cfg["image_size"] // p) ** 2
        self.class_embedding = nn.Parameter(torch.empty(e))
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], e, p, stride=p, bias=False)
        self.position_embedding = nn.Module()
        self.position_embedding.weight = nn.Parameter(torch.empty(self.num_patches + 1, e))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> [B, 1 + H/P * W/P, E] (class token first)."""
        w = self.patch_embedding.weight
        patches = F.conv2d(pixel_values.to(w.dtype), w, stride=self.patch_size)   # [B, E, h, w]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_config: dict, num_layers: int) -> None:
        """num_layers: how many encoder layers to build (the deepest one read)."""
        super().__init__()
        cfg = with_defaults(vision_config, CLIP_VISION_DEFAULTS)
        self.num_hidden_layers = int(cfg["num_hidden_layers"])
        self.image_size, self.patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        self.encoder = encoder_layers(cfg, num_layers)

    def forward(self, pixel_values: torch.Tensor, feature_layers: list[int]) -> list[torch.Tensor]:
        """The hidden states after each layer in feature_layers (0 = the embeddings after the
        pre-norm, as HF's hidden_states[0]), each [B, 1 + patches, E]."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: hidden}
        for i, layer in enumerate(self.encoder.layers, start=1):
            hidden = layer(hidden)
            states[i] = hidden
        return [states[i] for i in feature_layers]
