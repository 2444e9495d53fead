"""Write the step's new K/V into the paged cache through the slot mapping (slot -1 = padding,
skipped). Plain-torch reference for CPU and a Triton kernel for CUDA; it must not allocate.
An fp8 cache (--kv-cache-dtype fp8) stores k / k_scale and v / v_scale, saturated to +-448."""
from __future__ import annotations

import torch

from minserve.kernels.jit import jit, tl, triton


def store_kv_ref(
    k: torch.Tensor,             # [T, K, D]
    v: torch.Tensor,             # [T, K, D]
    k_cache: torch.Tensor,       # [NB, BS, K, D]
    v_cache: torch.Tensor,       # [NB, BS, K, D]
    slot_mapping: torch.Tensor,  # [T] int64
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    # PERF: index_copy_ without the boolean mask when no token is padding (the CPU runner never
    # pads): 21 instead of 47 us per layer at one token, 145 instead of 356 at 200 (1 thread).
    # The any() is a host sync, which only this reference (CPU, tests) pays.
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = to_cache(x, cache.dtype, scale)
        if cache.dtype == torch.float8_e4m3fn:   # index_copy_ has no fp8 kernel: copy the bytes
            x, cache = x.view(torch.uint8), cache.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x)


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    if dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


FP8_MAX = 448.0


@jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    k_scale, v_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Grid (num_tokens,): one program copies all kv heads of one token to its slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :],
                mask=mask)
    v = tl.load(v_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :],
                mask=mask)
    if KV_FP8:
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    kc = k_cache_ptr + block * stride_kc_b + in_block * stride_kc_s
    vc = v_cache_ptr + block * stride_vc_b + in_block * stride_vc_s
    tl.store(kc + offs_h[:, None] * stride_kc_h + offs_d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + offs_h[:, None] * stride_vc_h + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Same contract as store_kv_ref; k/v may be strided views (e.g. slices of a fused qkv)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scale, v_scale,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        HEADS_P=triton.next_power_of_2(num_kv_heads), HEAD_DIM_P=triton.next_power_of_2(head_dim),
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
    )
