"""Idefics3's SigLIP vision transformer (SmolVLM's tower): patch embedding with bias, position
ids bucketed over the patch grid (NaViT style, as transformers computes them), encoder layers and
post-LayerNorm. Every tile the processor makes is full size, so no patch is padding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minserve.models.vision.vit import encoder_layers, with_defaults

# transformers' Idefics3VisionConfig defaults
IDEFICS3_VISION_DEFAULTS = {
    "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        e, p = cfg["hidden_size"], cfg["patch_size"]
        self.patch_size = p
        self.num_patches_per_side = cfg["image_size"] // p
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], e, p, stride=p, bias=True)
        self.position_embedding = nn.Module()
        self.position_embedding.weight = nn.Parameter(
            torch.empty(self.num_patches_per_side ** 2, e))

    def position_ids(self, num_h: int, num_w: int, device: torch.device) -> torch.Tensor:
        """[num_h * num_w] ids into the position table: each patch's fractional coordinate
        bucketed onto the table's grid (the identity when the tile is full size)."""
        n = self.num_patches_per_side
        # NOTE: the same float32 arithmetic as transformers, so the buckets match exactly.
        boundaries = torch.arange(1 / n, 1.0, 1 / n, device=device)
        h = torch.arange(num_h, device=device, dtype=torch.float32) * (1.0 / torch.tensor(
            float(num_h), device=device))
        w = torch.arange(num_w, device=device, dtype=torch.float32) * (1.0 / torch.tensor(
            float(num_w), device=device))
        bh = torch.bucketize(h.clamp(max=1.0 - 1e-6), boundaries, right=True)
        bw = torch.bucketize(w.clamp(max=1.0 - 1e-6), boundaries, right=True)
        return (bh[:, None] * n + bw[None, :]).reshape(-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> [B, H/P * W/P, E]."""
        conv = self.patch_embedding
        patches = F.conv2d(pixel_values.to(conv.weight.dtype), conv.weight, conv.bias,
                           stride=self.patch_size)                          # [B, E, h, w]
        num_h, num_w = patches.shape[-2:]
        ids = self.position_ids(num_h, num_w, patches.device)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight[ids]


class SiglipVisionTower(nn.Module):
    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        cfg = with_defaults(vision_config, IDEFICS3_VISION_DEFAULTS)
        self.image_size, self.patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = encoder_layers(cfg, cfg["num_hidden_layers"])
        self.post_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] (B tiles) -> [B, patches, E]."""
        hidden = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return self.post_layernorm(hidden)
