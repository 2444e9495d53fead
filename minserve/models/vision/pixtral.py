"""Pixtral's vision transformer (Mistral 3's tower): any image size, each image cut into its own
raster of patches, RMSNorm blocks with a gated MLP, and 2D rotary position embedding over each
patch's (row, column): the row rotates the even frequencies, the column the odd ones. Every image
attends only within itself (one packed sequence, cut at the images' edges)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minserve.models.layers import RMSNorm, apply_rotary
from minserve.models.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from minserve.models.vision.vit import activation, varlen_attention, with_defaults

# transformers' PixtralVisionConfig defaults
PIXTRAL_VISION_DEFAULTS = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 1024, "patch_size": 16,
    "hidden_act": "gelu",
}


class PixtralAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv_proj = QKVParallelLinear(dim, self.head_dim, num_heads, num_heads, bias=False)
        self.o_proj = RowParallelLinear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        qk, v = self.qkv_proj(x).view(n, 3 * self.num_heads, self.head_dim).split(
            [2 * self.num_heads, self.num_heads], dim=1)
        q, k = apply_rotary(qk, cos, sin).chunk(2, dim=1)                        # [N, H, D]
        o = varlen_attention(q, k, v, cu_seqlens, self.head_dim ** -0.5)
        return self.o_proj(o.reshape(n, -1))


class PixtralMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=False)
        self.act = activation(act)
        self.down_proj = RowParallelLinear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class PixtralLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.attention_norm = RMSNorm(dim, 1e-5)
        self.attention = PixtralAttention(dim, cfg["num_attention_heads"])
        self.ffn_norm = RMSNorm(dim, 1e-5)
        self.feed_forward = PixtralMLP(dim, cfg["intermediate_size"], cfg["hidden_act"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralVisionTower(nn.Module):
    def __init__(self, vision_config: dict, num_layers: int) -> None:
        """num_layers: how many layers to build (the deepest one read)."""
        super().__init__()
        cfg = with_defaults(vision_config, PIXTRAL_VISION_DEFAULTS)
        self.num_hidden_layers = int(cfg["num_hidden_layers"])
        self.hidden_size, self.patch_size = int(cfg["hidden_size"]), int(cfg["patch_size"])
        self.patch_conv = nn.Conv2d(cfg["num_channels"], self.hidden_size, self.patch_size,
                                    stride=self.patch_size, bias=False)
        self.ln_pre = RMSNorm(self.hidden_size, 1e-5)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(PixtralLayer(cfg) for _ in range(num_layers))
        head_dim = self.hidden_size // cfg["num_attention_heads"]
        theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.rope_inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                            device="cpu") / head_dim))

    def _rotary(self, grids: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, 1, head_dim] for every image's patches in raster order."""
        inv_freq = self.rope_inv_freq.to(device)
        freqs = []
        for h, w in grids:
            rows = torch.arange(h, device=device).float()[:, None, None] * inv_freq[0::2]
            cols = torch.arange(w, device=device).float()[None, :, None] * inv_freq[1::2]
            freqs.append(torch.cat([rows.expand(h, w, -1), cols.expand(h, w, -1)], dim=-1)
                         .reshape(h * w, -1))
        emb = torch.cat(freqs).repeat(1, 2)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, images: list[torch.Tensor], feature_layers: list[int]
                ) -> list[torch.Tensor]:
        """images: each [C, H, W] (H, W multiples of the patch) -> the hidden states after each
        layer in feature_layers (0 = the patch embeddings after ln_pre), each [N, E] for the N
        patches of all images, image after image, each in raster order."""
        w = self.patch_conv.weight
        grids, patches = [], []
        for image in images:
            conv = F.conv2d(image[None].to(w.dtype), w, stride=self.patch_size)[0]   # [E, h, w]
            grids.append(tuple(conv.shape[1:]))
            patches.append(conv.flatten(1).t())
        hidden = self.ln_pre(torch.cat(patches))
        cos, sin = self._rotary(grids, hidden.device, hidden.dtype)
        cu_seqlens = [0]
        for h, w_ in grids:
            cu_seqlens.append(cu_seqlens[-1] + h * w_)
        states = {0: hidden}
        for i, layer in enumerate(self.transformer.layers, start=1):
            hidden = layer(hidden, cos, sin, cu_seqlens)
            states[i] = hidden
        return [states[i] for i in feature_layers]
