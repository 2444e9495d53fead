"""Rotary position embedding, neox style (HF Llama's rotate_half), applied to q and k in place
from a precomputed cos/sin cache. Frequency scaling ("llama3", linear, ...) lives only in how the
caller builds inv_freq; this file never reads a model config."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference still works, the kernel is never called
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


def make_cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """inv_freq [rot_dim / 2] -> cos_sin_cache [max_position, rot_dim] fp32 = [cos | sin]."""
    t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rotary_ref(
    positions: torch.Tensor,      # [T] long
    q: torch.Tensor,              # [T, H, D], rotated in place
    k: torch.Tensor,              # [T, K, D], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rot_dim], rot_dim <= D; dims past it untouched
) -> None:
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x[..., :2 * half] = rotated.to(x.dtype)


@_jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, cos, sin,
                  NUM_HEADS: tl.constexpr, HEADS_P: tl.constexpr, HALF: tl.constexpr,
                  HALF_P: tl.constexpr):
    offs_h = tl.arange(0, HEADS_P)
    offs_d = tl.arange(0, HALF_P)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    ptr1 = x_ptr + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@_jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_sin_ptr, positions_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_P: tl.constexpr,
    KV_HEADS_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
):
    """Grid (num_tokens,): one program rotates every q and k head of one token."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HALF_P)
    cs_mask = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=cs_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=cs_mask, other=0.0)[None, :]
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    _rotate_heads(q_ptr, token, stride_q_t, stride_q_h, cos, sin, NUM_HEADS, HEADS_P, HALF, HALF_P)
    _rotate_heads(k_ptr, token, stride_k_t, stride_k_h, cos, sin, NUM_KV_HEADS, KV_HEADS_P, HALF,
                  HALF_P)


def rotary_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
) -> None:
    """Same contract as rotary_ref; q and k may be strided views with a unit last stride."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_triton rotates in place: q and k need a unit last stride")
    half = cos_sin_cache.shape[-1] // 2
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    _rotary_kernel[(q.shape[0],)](
        q, k, cos_sin_cache, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEADS_P=triton.next_power_of_2(num_heads), KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_P=triton.next_power_of_2(half),
    )
