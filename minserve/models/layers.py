"""Building blocks of the decoder models, in torch: RMSNorm (with the fused residual add) and
Gemma's (1 + weight) variant, rotary embedding (default, linear, llama3, yarn, Phi-3's longrope,
Gemma 4's proportional; partial rotary), SiLU-and-mul and GELU(tanh)-and-mul, logit softcapping,
and the Attention module that writes the paged KV cache and reads it back. The linear layers live
in linear.py. Device paths are minserve.kernels' choice: nothing here branches on the device."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minserve import kernels
from minserve.config import ConfigError
from minserve.kernels import AttnMetadata


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual), the pre-norm step of
        every decoder layer in one call."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm, norm(x) * (1 + w): the checkpoint's w is stored as 1 + w at load, so the
    forward is RMSNorm's (one fused call, no add per step). llama.cpp folds the 1 in the same way
    (the GGUF converter takes it out again)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = _load_plus_one


def _load_plus_one(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ConfigError(f"checkpoint shape {tuple(loaded_weight.shape)} != model shape "
                          f"{tuple(param.shape)}")
    param.data.copy_(loaded_weight.float() + 1.0)


class SiluAndMul(nn.Module):
    """[T, 2*I] (gate | up) -> [T, I] = silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)


class GeluAndMul(nn.Module):
    """[T, 2*I] (gate | up) -> [T, I] = gelu_tanh(gate) * up (GeGLU: Gemma's
    gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gelu_tanh_and_mul(x)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's final-logit softcapping); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
                     max_position_embeddings: int, max_model_len: int | None = None
                     ) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] float32, attention_scaling), following transformers' rope init functions.
    head_dim is the rotated size (a partial rotary's first dims). max_model_len: the engine's
    context, which picks longrope's factors (vLLM's rule)."""
    inv_freq = 1.0 / (
        rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    rope_type = (
        (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or "default"
    )
    if rope_type == "default":
        return inv_freq, 1.0
    sc = rope_scaling or {}
    if rope_type == "linear":
        return inv_freq / float(sc["factor"]), 1.0
    if rope_type == "llama3":
        factor, low, high = (
            float(sc["factor"]),
            float(sc["low_freq_factor"]),
            float(sc["high_freq_factor"]),
        )
        old_len = float(sc["original_max_position_embeddings"])
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, rope_theta, sc, max_position_embeddings)
    if rope_type in ("longrope", "su"):
        return _longrope_inv_freq(head_dim, rope_theta, sc, max_position_embeddings,
                                  max_model_len)
    if rope_type == "proportional":
        # Gemma 4's global layers: the first partial_rotary_factor of the D/2 frequencies at
        # their full-head spacing, the rest 0 (cos 1, sin 0: those dims pass unrotated).
        rotated = int(float(sc.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv_freq = torch.cat((inv_freq[:rotated], torch.zeros(head_dim // 2 - rotated)))
        return inv_freq / float(sc.get("factor", 1.0)), 1.0
    raise ConfigError(
        f"rope scaling type {rope_type!r} is not supported "
        "(supported: default, linear, llama3, yarn, longrope, proportional)"
    )


def _longrope_inv_freq(dim: int, base: float, sc: dict[str, Any], max_position_embeddings: int,
                       max_model_len: int | None) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: per-frequency divisors, short_factor within the pretraining context,
    long_factor beyond it. As vLLM does, one set serves every position: the long one when the
    engine's context (max_model_len) goes past original_max_position_embeddings."""
    missing = [k for k in ("original_max_position_embeddings", "long_factor", "short_factor")
               if sc.get(k) is None]
    if missing:
        raise ConfigError(f"longrope rope_scaling needs {', '.join(missing)} in config.json")
    orig = int(sc["original_max_position_embeddings"])
    use_long = (max_model_len or max_position_embeddings) > orig
    ext = torch.tensor(sc["long_factor" if use_long else "short_factor"], dtype=torch.float32)
    if ext.numel() != dim // 2:
        raise ConfigError(f"longrope factors have {ext.numel()} entries; the rotary dim "
                          f"{dim} needs {dim // 2}")
    factor = sc.get("factor") or max_position_embeddings / orig
    scaling = sc.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    inv_freq = 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, float(scaling)


def _yarn_inv_freq(
    dim: int, base: float, sc: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    orig = sc.get("original_max_position_embeddings") or max_position_embeddings
    factor = sc.get("factor") or max_position_embeddings / orig

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = sc.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = sc.get("mscale"), sc.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for the step's positions, computed on the fly from inv_freq (no position cache,
    so no length limit and nothing to index out of range): [T, 1, D] each, in the model dtype."""

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
                 max_position_embeddings: int, max_model_len: int | None = None) -> None:
        super().__init__()
        self.args = (head_dim, rope_theta, rope_scaling, max_position_embeddings, max_model_len)
        # NOTE: on the CPU even in a meta-device build, where this math would import torch._dynamo
        # (see kernels/jit.py); _apply() recomputes it wherever the model lands.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = compute_inv_freq(*self.args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module signature)
        # NOTE: model.to(bf16) would round inv_freq and to_empty() would leave it garbage, so
        # recompute it in float32 on whatever device the buffer lands.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = compute_inv_freq(*self.args)[0].to(self.inv_freq.device)
        return self

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]: broadcast over heads
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal rotary embedding: positions [3, T] (temporal, row, column; the same
    number thrice for text), and the D/2 frequencies split by mrope_section, section i rotated by
    position row i. interleaved (Qwen3-VL): frequency j takes row 1 when j % 3 == 1 and row 2
    when j % 3 == 2 (within 3 * that row's section), row 0 otherwise. 1-D positions [T] mean
    text only (all three rows equal)."""

    def __init__(self, head_dim: int, rope_theta: float, max_position_embeddings: int,
                 mrope_section: list[int], interleaved: bool = False) -> None:
        super().__init__(head_dim, rope_theta, None, max_position_embeddings)
        if sum(mrope_section) != head_dim // 2:
            raise ConfigError(f"mrope_section {mrope_section} does not add up to head_dim / 2 "
                              f"({head_dim // 2})")
        self.mrope_section = list(mrope_section)
        if interleaved:
            rows = [next((i for i in (1, 2) if j % 3 == i and j < 3 * mrope_section[i]), 0)
                    for j in range(head_dim // 2)]
        else:
            rows = [i for i, n in enumerate(mrope_section) for _ in range(n)]
        # which position row rotates each frequency: [1, 1, D/2] for a gather over the rows
        # (kept beside the list, which _apply() turns back into it wherever the model lands)
        self.row_list = rows
        self.register_buffer("rows", torch.tensor(rows, device="cpu")[None, None, :],
                             persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module signature)
        super()._apply(fn, recurse)
        if self.rows.device.type != "meta":
            self.rows = torch.tensor(self.row_list, device=self.rows.device)[None, None, :]
        return self

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, dtype)
        freqs = positions.float()[:, :, None] * self.inv_freq.float()  # [3, T, D/2]
        freqs = freqs.gather(0, self.rows.expand(1, freqs.shape[1], -1))[0]   # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D] rotated in HF's rotate_half layout (first half | second half of each head);
    cos/sin [T, 1, R] as RotaryEmbedding returns them. R < D (a partial rotary, Phi-4-mini):
    the first R dims rotate, the rest pass through."""
    if cos.dim() == 2:            # [T, D] (the multimodal rotary's shape): broadcast over heads
        cos, sin = cos[:, None, :], sin[:, None, :]
    if cos.shape[-1] < x.shape[-1]:
        rot, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
        return torch.cat((apply_rotary(rot, cos, sin), rest), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


class Attention(nn.Module):
    """Stores the step's K/V through the slot mapping, then attends over the paged cache.

    k_cache / v_cache ([NB, BS, K, D]) are plain attributes set by the runner through
    model.set_kv_caches(); they are not parameters and never enter the state dict."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None,
        scale: float | None = None, softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap      # Gemma's attn_logit_softcapping (None: logits uncapped)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # An fp8 cache stores k / k_scale and v / v_scale; 1.0 unless the checkpoint calibrated
        # them (plain floats: the kernels take them as scalars, no device sync).
        self.k_scale = self.v_scale = 1.0

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, attn: AttnMetadata,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # q [T, H, D], k/v [T, K, D] -> [T, H*D]; sinks [H]: gpt-oss's per-head attention sinks.
        # k/v None: the layer reads a cache another layer wrote this step (Gemma 4's KV sharing)
        # and stores nothing.
        if k is not None:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, attn.slot_mapping,
                             self.k_scale, self.v_scale)
        out = kernels.paged_attention(
            q, self.k_cache, self.v_cache, attn, self.scale, self.sliding_window,
            k_scale=self.k_scale, v_scale=self.v_scale, sinks=sinks, softcap=self.softcap,
        )
        return out.reshape(q.shape[0], -1)
