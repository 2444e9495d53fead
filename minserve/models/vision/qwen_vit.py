"""The Qwen2-VL and Qwen2.5-VL vision transformers: any image size (the processor cuts it into
14x14 patches, 2x2 of which the merger folds into one language-model token), 2D rotary position
embedding over each patch's (row, column), and in 2.5 window attention in all but a few blocks.

Patch order (from the processor): merge blocks row-major, the 2x2 patches of a block together:

    image 4x4 patches     flat order        window attention (2.5) regroups the merge blocks
    a b | c d             a b e f c d g h   window by window, attends within each window, and
    e f | g h             i j m n k l o p   the merger's output is put back in this order
    ----+----
    i j | k l
    m n | o p
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minserve.models.layers import RMSNorm
from minserve.models.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from minserve.models.vision.vit import VisionMLP, activation, varlen_attention, with_defaults

QWEN2_VL_VISION_DEFAULTS = {
    "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu",
    "mlp_ratio": 4, "num_heads": 16, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2,
}
QWEN2_5_VL_VISION_DEFAULTS = {
    "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420,
    "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def patch_rotary(grids: list[tuple[int, int, int]], merge_size: int, inv_freq: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] from each patch's (row, col) in the flat patch order: the row
    rotates the first half of the frequencies, the column the second (Qwen2-VL, Qwen3-VL)."""
    m = merge_size
    rows, cols = [], []
    for t, h, w in grids:
        hpos = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        wpos = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        rows.append(hpos.transpose(1, 2).reshape(-1).repeat(t))
        cols.append(wpos.transpose(1, 2).reshape(-1).repeat(t))
    pos = torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1).to(device)   # [N, 2]
    freqs = pos[..., None].float() * inv_freq.to(device)                       # [N, 2, rot/2]
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def frame_seqlens(grids: list[tuple[int, int, int]]) -> list[int]:
    """cu_seqlens of full attention: every frame of every image attends within itself."""
    cu = [0]
    for t, h, w in grids:
        for _ in range(t):
            cu.append(cu[-1] + h * w)
    return cu


class QwenVisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = ColumnParallelLinear(dim, 3 * dim, bias=True)
        self.proj = RowParallelLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, D]
        # NOTE: the rotation runs in float32, as transformers' apply_rotary_pos_emb_vision.
        c, s = cos[:, None].float(), sin[:, None].float()
        q = (q.float() * c + rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(x.dtype)
        o = varlen_attention(q, k, v, cu_seqlens, self.head_dim ** -0.5)
        return self.proj(o.reshape(n, -1))


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: dict, v2_5: bool) -> None:
        super().__init__()
        dim = cfg["hidden_size"] if v2_5 else cfg["embed_dim"]
        if v2_5:
            self.norm1, self.norm2 = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
            self.mlp = QwenVisionGatedMLP(dim, cfg["intermediate_size"], cfg["hidden_act"])
        else:
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.mlp = VisionMLP(dim, int(dim * cfg["mlp_ratio"]), cfg["hidden_act"])
        self.attn = QwenVisionAttention(dim, cfg["num_heads"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class QwenVisionGatedMLP(nn.Module):
    """Qwen2.5-VL: act(gate) * up -> down, all with bias (gate|up fused as gate_up_proj)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=True)
        self.act = activation(act)
        self.down_proj = RowParallelLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class QwenPatchMerger(nn.Module):
    """norm, then each 2x2 block of patches (consecutive in the flat order) -> one token."""

    def __init__(self, out_dim: int, context_dim: int, merge_size: int, v2_5: bool) -> None:
        super().__init__()
        self.hidden_size = context_dim * merge_size ** 2
        self.ln_q = RMSNorm(context_dim, 1e-6) if v2_5 else nn.LayerNorm(context_dim, eps=1e-6)
        # "mlp.0" / "mlp.2" as in the checkpoint (an nn.Sequential with a GELU between).
        self.mlp = nn.ModuleList([ColumnParallelLinear(self.hidden_size, self.hidden_size),
                                  nn.GELU(),
                                  RowParallelLinear(self.hidden_size, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.hidden_size)
        return self.mlp[2](F.gelu(self.mlp[0](x)))


class QwenVisionTower(nn.Module):
    def __init__(self, vision_config: dict, v2_5: bool) -> None:
        super().__init__()
        cfg = with_defaults(vision_config,
                            QWEN2_5_VL_VISION_DEFAULTS if v2_5 else QWEN2_VL_VISION_DEFAULTS)
        self.v2_5 = v2_5
        dim = cfg["hidden_size"] if v2_5 else cfg["embed_dim"]
        self.out_hidden_size = cfg["out_hidden_size"] if v2_5 else cfg["hidden_size"]
        self.merge_size = int(cfg["spatial_merge_size"])
        self.patch_size = int(cfg["patch_size"])
        self.head_dim = dim // cfg["num_heads"]
        self.window_size = int(cfg.get("window_size") or 0)
        self.fullatt_block_indexes = set(cfg.get("fullatt_block_indexes") or [])
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(
            cfg["in_channels"], dim,
            kernel_size=(cfg["temporal_patch_size"], self.patch_size, self.patch_size),
            stride=(cfg["temporal_patch_size"], self.patch_size, self.patch_size), bias=False)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg, v2_5) for _ in range(cfg["depth"]))
        self.merger = QwenPatchMerger(self.out_hidden_size, dim, self.merge_size, v2_5)
        theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        rot = self.head_dim // 2
        self.rope_inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32,
                                                            device="cpu") / rot))

    def _rotary(self, grids: list[tuple[int, int, int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return patch_rotary(grids, self.merge_size, self.rope_inv_freq, device)

    def _window_index(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """Qwen2.5-VL: the merge-block order that groups blocks window by window, and the
        windows' cumulative patch counts (transformers' get_window_index)."""
        win = self.window_size // self.merge_size // self.patch_size
        unit = self.merge_size ** 2
        index, cu, offset = [], [0], 0
        for t, h, w in grids:
            gh, gw = h // self.merge_size, w // self.merge_size
            ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
            pad_h, pad_w = win - gh % win, win - gw % win
            nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
            padded = F.pad(ids, (0, pad_w, 0, pad_h), value=-100)
            padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4)
            padded = padded.reshape(t, nh * nw, win, win)
            counts = (padded != -100).sum([2, 3]).reshape(-1)
            flat = padded.reshape(-1)
            index.append(flat[flat != -100] + offset)
            for c in counts.tolist():
                if c:
                    cu.append(cu[-1] + c * unit)
            offset += t * gh * gw
        return torch.cat(index), cu

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
                ) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] (the processor's flat patches of every image, in order),
        grids: each image's (t, h, w) in patches -> [N / merge^2, out_hidden_size]."""
        w = self.patch_embed.proj.weight
        hidden = F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))   # [N, E]
        cos, sin = self._rotary(grids, hidden.device)
        cu_full = frame_seqlens(grids)
        cu_window, reverse = cu_full, None
        if self.v2_5:
            order, cu_window = self._window_index(grids)
            order = order.to(hidden.device)
            unit = self.merge_size ** 2
            n = hidden.shape[0]

            def permute(x: torch.Tensor) -> torch.Tensor:
                return x.view(n // unit, unit, -1)[order].reshape(n, -1)

            hidden, cos, sin = permute(hidden), permute(cos), permute(sin)
            reverse = torch.argsort(order)
        for i, block in enumerate(self.blocks):
            full = not self.v2_5 or i in self.fullatt_block_indexes
            hidden = block(hidden, cos, sin, cu_full if full else cu_window)
        merged = self.merger(hidden)
        return merged if reverse is None else merged[reverse]
