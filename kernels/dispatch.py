"""Kernel dispatch: Triton on CUDA, native C or the plain-torch reference elsewhere (CPU, no
triton, or MINSERVE_NO_TRITON=1, read once at import). Every public op has the same signature and
the same results (to rounding) on every path; callers never branch on the device themselves."""
from __future__ import annotations

import os

import torch
from minserve.kernels.attention import AttnMetadata, paged_attention_ref, paged_attention_triton
from minserve.kernels.cache import store_kv_ref, store_kv_triton
from minserve.kernels.fp8_gemm import (
    Fp8Weight,
    fp8_gemm_ref,
    fp8_gemm_triton,
    fp8_scaled_mm,
    scaled_mm_supported,
)
from minserve.kernels import cpu_native
from minserve.kernels.cpu_native import CpuIntWeight
from minserve.kernels.cpu_native import int_gemm as cpu_int_gemm
from minserve.kernels.jit import triton
from minserve.kernels.quant_gemm import (
    CpuInt4Weight,
    IntWeight,
    cpu_int4_gemm,
    int_gemm_ref,
    int_gemm_triton,
)
from minserve.kernels.lora import (
    LoRAMapping,
    lora_expand_ref,
    lora_fused_cpu,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
)

__all__ = ["AttnMetadata", "CpuIntWeight", "Fp8Weight", "IntWeight", "LoRAMapping", "fp8_gemm",
           "int_gemm", "lora_add", "lora_expand", "lora_shrink", "paged_attention",
           "store_kv", "triton_enabled"]

_TRITON = triton is not None and os.environ.get("MINSERVE_NO_TRITON", "") != "1"


def triton_enabled(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttnMetadata,
    scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q [T, H, D], caches [NB, BS, K, D] -> [T, H, D] (written into `out` when given). An fp8
    cache holds k / k_scale and v / v_scale."""
    if triton_enabled(q):
        return paged_attention_triton(q, k_cache, v_cache, attn, scale, sliding_window,
                                      out=out, k_scale=k_scale, v_scale=v_scale)
    if out is None:
        out = torch.empty_like(q)
    rest = None
    if q.device.type == "cpu" and sliding_window is None and k_scale == 1.0 and v_scale == 1.0:
        rest = _native_decode_rows(q, k_cache, v_cache, attn, scale, out)
    if rest != []:
        paged_attention_ref(q, k_cache, v_cache, attn, scale, sliding_window, k_scale, v_scale,
                            rows=rest, out=out)
    return out


def _native_decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        attn: AttnMetadata, scale: float, out: torch.Tensor) -> list[int] | None:
    """The decode rows (one query token) through the native CPU kernel, all in one call; returns
    the rows left for the reference (None: all of them)."""
    qsl, seq_lens = attn.query_start_loc_host, attn.seq_lens_host
    decode = [r for r in range(len(seq_lens)) if qsl[r + 1] - qsl[r] == 1]
    if not decode:
        return None
    if len(decode) == len(seq_lens) and len(qsl) - 1 == q.shape[0]:   # a pure decode step
        done = cpu_native.decode_attention(q, k_cache, v_cache, attn.block_table, attn.seq_lens,
                                           scale, out)
        return [] if done else None
    tokens = torch.tensor([qsl[r] for r in decode])
    part = torch.empty(len(decode), *q.shape[1:], dtype=q.dtype)
    if not cpu_native.decode_attention(q.index_select(0, tokens).contiguous(), k_cache, v_cache,
                                       attn.block_table[decode], attn.seq_lens[decode], scale,
                                       part):
        return None
    out.index_copy_(0, tokens, part)
    decoded = set(decode)
    return [r for r in range(len(seq_lens)) if r not in decoded]


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """k, v [T, K, D] -> cache slots slot_mapping[T] (int64; -1 skips the token)."""
    if triton_enabled(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    elif not (k_scale == 1.0 and v_scale == 1.0
              and cpu_native.store_kv(k, v, k_cache, v_cache, slot_mapping)):
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def int_gemm(x: torch.Tensor, w: IntWeight | CpuIntWeight | CpuInt4Weight,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ int4/int8 weight [N, K].T -> [..., N] (weight-only, group-wise scales)."""
    if isinstance(w, CpuIntWeight):
        return _on_rows(cpu_int_gemm, x, w, bias)
    if isinstance(w, CpuInt4Weight):
        return _on_rows(cpu_int4_gemm, x, w, bias)
    return _on_rows(int_gemm_triton if triton_enabled(x) else int_gemm_ref, x, w, bias)


def fp8_gemm(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ fp8 weight [N, K].T -> [..., N]: torch._scaled_mm on fp8 GPUs (activations
    quantized per token or with the static scale), else the weight-only Triton kernel."""
    if x.is_cuda and scaled_mm_supported(w, x):
        return _on_rows(fp8_scaled_mm, x, w, bias)
    return _on_rows(fp8_gemm_triton if triton_enabled(x) else fp8_gemm_ref, x, w, bias)


def _on_rows(gemm, x: torch.Tensor, w: object, bias: torch.Tensor | None) -> torch.Tensor:
    """A [M, K] GEMM applied to x [..., K]."""
    out = gemm(x.reshape(-1, x.shape[-1]), w, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRAMapping,
                y: torch.Tensor) -> None:
    """x [T, IN], lora_a [S, R, IN] -> y [T, R] = x @ A[slot]^T for tokens with an adapter."""
    if triton_enabled(x):
        lora_shrink_triton(x, lora_a, mapping, y)
    else:
        lora_shrink_ref(x, lora_a, mapping, y)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping,
                out: torch.Tensor) -> None:
    """out [T, N] += y [T, R] @ B[slot]^T (lora_b [S, N, R]) for tokens with an adapter."""
    if triton_enabled(y):
        lora_expand_triton(y, lora_b, mapping, out)
    else:
        lora_expand_ref(y, lora_b, mapping, out)


def lora_add(x: torch.Tensor, lora_a: torch.Tensor, lora_bt: list[torch.Tensor],
             mapping: LoRAMapping, out: torch.Tensor) -> None:
    """A LoRA-wrapped linear's delta for a step that mixes adapters: for each slice i of a fused
    layer (its columns of out [T, sum N_i]), out += (x @ A[slot]^T)[:, i*R:(i+1)*R] @
    lora_bt[i][slot]. lora_a [S, n*R, IN], lora_bt n x [S, R, N_i] (B^T per slice). CUDA: one
    shrink, then one expand per slice; CPU: lora_fused_cpu (fewer, larger ops)."""
    if not triton_enabled(x):
        lora_fused_cpu(x, lora_a, lora_bt, mapping, out)
        return
    rank = lora_bt[0].shape[1]
    y = torch.empty(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    lora_shrink_triton(x, lora_a, mapping, y)
    offset = 0
    for i, bt in enumerate(lora_bt):
        size = bt.shape[2]
        lora_expand_triton(y[:, i * rank:(i + 1) * rank], bt.transpose(1, 2), mapping,
                           out[:, offset:offset + size])
        offset += size
