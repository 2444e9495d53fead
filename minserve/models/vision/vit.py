"""Vision-transformer building blocks shared by the towers (CLIP, SigLIP/Idefics3, Qwen2-VL):
activations by their HF names, bidirectional attention over images of any length, the
pre-norm encoder layer. Weights load through linear.py's weight_loaders like the text models'."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minserve.config import ConfigError
from minserve.models.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"vision activation {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: list[int], scale: float) -> torch.Tensor:
    """Bidirectional attention within each segment [cu_seqlens[i], cu_seqlens[i+1]) of the flat
    token axis: q/k/v [N, H, D] -> [N, H, D]. Segments of equal length (an image's windows, a
    step's same-size images) run as one batched SDPA call."""
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        if end > start:
            by_len.setdefault(end - start, []).append(start)
    for length, starts in by_len.items():
        idx = (torch.tensor(starts, device=q.device)[:, None]
               + torch.arange(length, device=q.device)[None, :])     # [S, L]
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))      # [S, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[idx] = o.transpose(1, 2)
    return out


class VisionAttention(nn.Module):
    """q/k/v/out projections with bias (CLIP, SigLIP); the checkpoint's q_proj/k_proj/v_proj load
    into qkv_proj through the wrapper's packed_modules_mapping."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"vision hidden_size {hidden_size} is not divisible by "
                              f"num_attention_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_heads,
                                          bias=True)
        self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, E] (B images of S patches each) -> [B, S, E]."""
        b, s, e = x.shape
        q, k, v = self.qkv_proj(x).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), scale=self.scale)
        return self.out_proj(o.transpose(1, 2).reshape(b, s, e))


class VisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(hidden_size, intermediate_size, bias=True)
        self.act = activation(act)
        self.fc2 = RowParallelLinear(intermediate_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer layer with CLIP's/SigLIP's module names."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, act: str,
                 eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = VisionAttention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = VisionMLP(hidden_size, intermediate_size, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def encoder_layers(cfg: dict, num_layers: int) -> nn.Module:
    """An `encoder` holding num_layers VisionEncoderLayers as `layers` (the checkpoints' names)."""
    encoder = nn.Module()
    encoder.layers = nn.ModuleList(
        VisionEncoderLayer(cfg["hidden_size"], cfg["intermediate_size"],
                           cfg["num_attention_heads"], cfg["hidden_act"], cfg["layer_norm_eps"])
        for _ in range(num_layers))
    return encoder


def with_defaults(cfg: dict, defaults: dict) -> dict:
    """A vision_config with transformers' defaults where the checkpoint leaves a field out."""
    return {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
