"""The Qwen3-VL vision transformer: 16x16 patches (the processor's flat patches, in Qwen2-VL's
merge-block order), a learned position table resampled to each image's grid, 2D rotary over
(row, column), LayerNorm blocks, and DeepStack: the hidden states after a few blocks go through
their own 2x2 patch mergers, beside the final merger's output.

    blocks:    0    1 ... 8 ... 16 ... 24 ... 26
    deepstack:           |      |      |          -> mergers 0, 1, 2  (added to LM layers 0-2)
    merger:                                  |    -> the image's embeddings
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minserve.models.linear import ColumnParallelLinear, RowParallelLinear
from minserve.models.vision.qwen_vit import QwenVisionAttention, frame_seqlens, patch_rotary
from minserve.models.vision.vit import activation, with_defaults

# transformers' Qwen3VLVisionConfig defaults
QWEN3_VL_VISION_DEFAULTS = {
    "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 4304, "num_heads": 16, "in_channels": 3, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
    "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
}


class Qwen3VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(dim, hidden, bias=True)
        self.act = activation(act)
        self.linear_fc2 = RowParallelLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionBlock(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = QwenVisionAttention(dim, cfg["num_heads"])
        self.mlp = Qwen3VisionMLP(dim, cfg["intermediate_size"], cfg["hidden_act"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class Qwen3PatchMerger(nn.Module):
    """Each 2x2 block of patches (consecutive in the flat order) -> one token: LayerNorm per patch
    (the final merger) or over the four patches together (the DeepStack mergers), then an MLP."""

    def __init__(self, dim: int, out_dim: int, merge_size: int, norm_after_merge: bool) -> None:
        super().__init__()
        self.hidden_size = dim * merge_size ** 2
        self.norm_after_merge = norm_after_merge
        self.norm = nn.LayerNorm(self.hidden_size if norm_after_merge else dim, eps=1e-6)
        self.linear_fc1 = ColumnParallelLinear(self.hidden_size, self.hidden_size)
        self.linear_fc2 = RowParallelLinear(self.hidden_size, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            x = self.norm(x.view(-1, self.hidden_size))
        else:
            x = self.norm(x).view(-1, self.hidden_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VisionTower(nn.Module):
    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        cfg = with_defaults(vision_config, QWEN3_VL_VISION_DEFAULTS)
        dim = cfg["hidden_size"]
        self.merge_size = int(cfg["spatial_merge_size"])
        self.patch_size = int(cfg["patch_size"])
        self.out_hidden_size = int(cfg["out_hidden_size"])
        self.deepstack_indexes = list(cfg["deepstack_visual_indexes"])
        self.num_grid_per_side = int(cfg["num_position_embeddings"] ** 0.5)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(
            cfg["in_channels"], dim,
            kernel_size=(cfg["temporal_patch_size"], self.patch_size, self.patch_size),
            stride=(cfg["temporal_patch_size"], self.patch_size, self.patch_size), bias=True)
        self.pos_embed = nn.Embedding(cfg["num_position_embeddings"], dim)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(cfg) for _ in range(cfg["depth"]))
        self.merger = Qwen3PatchMerger(dim, self.out_hidden_size, self.merge_size, False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(dim, self.out_hidden_size, self.merge_size, True)
            for _ in self.deepstack_indexes)
        theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        rot = dim // cfg["num_heads"] // 2
        self.rope_inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32,
                                                            device="cpu") / rot))

    def _position_embeddings(self, grids: list[tuple[int, int, int]], device: torch.device
                             ) -> torch.Tensor:
        """[N, dim]: the square position table bilinearly resampled (align_corners) to each
        image's h x w patches, in the flat patch order; the same for every frame."""
        side, m = self.num_grid_per_side, self.merge_size
        table = self.pos_embed.weight
        out = []
        for t, h, w in grids:
            rows, row_w = _bilinear_taps(h, side, device)      # [h, 2] each
            cols, col_w = _bilinear_taps(w, side, device)      # [w, 2]
            idx = rows[:, None, :, None] * side + cols[None, :, None, :]            # [h, w, 2, 2]
            weight = row_w[:, None, :, None] * col_w[None, :, None, :]
            grid = (table[idx.flatten(2)] * weight.flatten(2)[..., None].to(table.dtype)).sum(2)
            grid = grid.view(h // m, m, w // m, m, -1).transpose(1, 2).reshape(h * w, -1)
            out.append(grid.repeat(t, 1))
        return torch.cat(out)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [N, C*T*P*P] (the processor's flat patches of every image, in order),
        grids: each image's (t, h, w) in patches -> the merged tokens [N / merge^2, out_hidden]
        and the DeepStack features, one [N / merge^2, out_hidden] per deepstack index."""
        w = self.patch_embed.proj.weight
        hidden = F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1),
                          self.patch_embed.proj.bias)                                   # [N, E]
        hidden = hidden + self._position_embeddings(grids, hidden.device)
        cos, sin = patch_rotary(grids, self.merge_size, self.rope_inv_freq, hidden.device)
        cu_seqlens = frame_seqlens(grids)
        deepstack = []
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, cos, sin, cu_seqlens)
            if i in self.deepstack_indexes:
                merger = self.deepstack_merger_list[self.deepstack_indexes.index(i)]
                deepstack.append(merger(hidden))
        return self.merger(hidden), deepstack


def _bilinear_taps(size: int, side: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For `size` output positions over a `side`-long table (align_corners): the two source
    indices [size, 2] (clamped at the edge) and their weights [size, 2] float32."""
    src = torch.arange(size, device=device, dtype=torch.float32) * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    taps = floor.long()[:, None] + torch.arange(2, device=device)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2, device=device)).abs())
    return taps.clamp(0, side - 1), weights.clamp(min=0)
