"""Kernel dispatch: Triton on CUDA, native C or the plain-torch reference elsewhere (CPU, no
triton, or MINSERVE_NO_TRITON=1: minserve/env.py). Every public op has the same signature and the
same results (to rounding) on every path; callers never branch on the device themselves, and the
weight layouts each device runs fastest are chosen here too (prepare_int_weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minserve import env
from minserve.kernels.attention import AttnMetadata, paged_attention_ref, paged_attention_triton
from minserve.kernels.cache import store_kv_ref, store_kv_triton
from minserve.kernels.fp8_gemm import (
    Fp8Weight,
    fp8_gemm_ref,
    fp8_gemm_triton,
    fp8_scaled_mm,
    scaled_mm_supported,
)
from minserve.kernels import cpu_gemm, cpu_native
from minserve.kernels.cpu_native import CpuIntExperts, CpuIntWeight
from minserve.kernels.cpu_native import int_gemm as cpu_int_gemm
from minserve.kernels.fused_moe import (
    DenseExperts,
    ExpertList,
    ExpertWeights,
    Fp8Experts,
    IntExperts,
    fused_experts_grouped,
    fused_experts_triton,
    select_experts,  # noqa: F401  (re-exported: minserve.kernels.select_experts)
    triton_supports,
)
from minserve.kernels.gdn import (
    causal_conv1d_torch,
    causal_conv1d_triton,
    gated_delta_rule_torch,
    gated_delta_rule_triton,
)
from minserve.kernels.gguf_blocks import GgufBlockWeight, to_int_weight
from minserve.kernels.jit import triton
from minserve.kernels.layer_ops import (
    gelu_tanh_and_mul_ref,
    rms_norm_ref,
    silu_and_mul_ref,
    swiglu_oai_ref,
)
from minserve.kernels.mxfp4 import (
    Mxfp4Weight,
    mxfp4_gemm_cpu,
    mxfp4_gemm_ref,
    mxfp4_gemm_triton,
)
from minserve.kernels.quant_gemm import (
    CpuInt4Weight,
    IntWeight,
    cpu_int4_gemm,
    cpu_int4_supported,
    int_gemm_ref,
    int_gemm_triton,
    to_cpu_int4,
)
from minserve.kernels.lora import (
    LoRAMapping,
    lora_fused_cpu,
    lora_expand_triton,
    lora_shrink_triton,
)

_TRITON = triton is not None and not env.NO_TRITON
# GGUF types repacked into the int layout on CPU rather than served from their blocks: the
# repack reads and holds 1.2-1.8x the bytes, but at one row its kernel took 0.6-0.7x the time
# of the block kernel (which first turns each row into bytes and its scales into floats) on a
# loaded 2-vCPU AVX2 box, one thread, where these kernels are bound by instructions, not by
# DRAM (bench/gguf_blocks.py; retake idle before changing this). Retaken 2026-12-08 with int8
# activations (load average 15 on the 2 vCPUs, one thread, [4608, 768]): the repacked side still
# took 0.28-0.50x the block side's time at one row and 0.57-0.76x at four, Q6_K included (0.46x
# at one row), so the int8 path changes no choice. Q6_K stays in its blocks: the int layout
# takes groups of 32 (cpu_native.supported; only its few-rows kernel reads groups of 16), and
# the repack would hold 12 bits a value instead of 6.6 (issue 35's resident-memory target).
CPU_REPACKED_GGUF = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"})


def triton_enabled(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttnMetadata,
    scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [T, H, D], caches [NB, BS, K, D] -> [T, H, D] (written into `out` when given). An fp8
    cache holds k / k_scale and v / v_scale. sinks [H]: one more softmax term per head
    (gpt-oss's learned attention sinks); softcap: logits capped to softcap * tanh(s / softcap)
    (Gemma's attn_logit_softcapping; attention.py)."""
    if triton_enabled(q):
        return paged_attention_triton(q, k_cache, v_cache, attn, scale, sliding_window,
                                      out=out, k_scale=k_scale, v_scale=v_scale, sinks=sinks,
                                      softcap=softcap)
    if out is None:
        out = torch.empty_like(q)
    rest = None
    if q.device.type == "cpu" and k_scale == 1.0 and v_scale == 1.0:
        rest = _native_decode_rows(q, k_cache, v_cache, attn, scale, out, sliding_window, sinks,
                                   softcap)
    if rest != []:
        paged_attention_ref(q, k_cache, v_cache, attn, scale, sliding_window, k_scale, v_scale,
                            rows=rest, out=out, sinks=sinks, softcap=softcap)
    return out


# Rows with this few query tokens (a decode, or a speculative row: its last token and up to 16
# drafts) run as that many decode queries on the native kernel, each over the keys up to its own
# position (causal); longer ones (prefill chunks) go to the reference's SDPA.
# PERF: SmolLM2-135M, one stream, 5-token verification rows at ~370 keys, 3 steps under the
# torch profiler: the reference's per-row K/V gather (index_select) and SDPA were 5.3 s of the
# 5.4 s of torch-op CPU time; as decode queries, 0.22 s in all (a loaded 2-core machine, load
# ~12: the ratio, not the times; bench/RESULTS.md "Speculative decoding").
_NATIVE_MAX_QUERY = 17


def _native_decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        attn: AttnMetadata, scale: float, out: torch.Tensor,
                        sliding_window: int | None, sinks: torch.Tensor | None,
                        softcap: float | None) -> list[int] | None:
    """The short rows (decode, speculative verification) through the native CPU kernel, all in
    one call, one query token per kernel row; returns the rows left for the reference (None:
    all of them). With image spans (Gemma 3) only one-token rows: the kernel is causal."""
    if attn.native_plan is None:
        attn.native_plan = _plan_native_rows(attn)
    plan = attn.native_plan
    if plan is _NO_SHORT_ROWS:
        return None
    index, block_table, lens, rest = plan
    if index is None:   # every token is a short row's, in order: q and out as they are
        done = cpu_native.decode_attention(q, k_cache, v_cache, block_table, lens, scale, out,
                                           sliding_window, sinks, softcap)
        return [] if done else None
    part = torch.empty(index.shape[0], *q.shape[1:], dtype=q.dtype)
    if not cpu_native.decode_attention(q.index_select(0, index), k_cache, v_cache, block_table,
                                       lens, scale, part, sliding_window, sinks, softcap):
        return None
    out.index_copy_(0, index, part)
    return rest


_NO_SHORT_ROWS = ()


def _plan_native_rows(attn: AttnMetadata) -> tuple:
    """-> (the short rows' token index, None when they are all the tokens; their kernel rows'
    block tables; their key counts; the rows left for the reference), or _NO_SHORT_ROWS.
    Token i of a row of Q query tokens sees the keys up to its own position: S - Q + 1 + i."""
    qsl, seq_lens = attn.query_start_loc_host, attn.seq_lens_host
    most = 1 if attn.image_span_end is not None else _NATIVE_MAX_QUERY
    short = [r for r in range(len(seq_lens)) if 1 <= qsl[r + 1] - qsl[r] <= most]
    if not short:
        return _NO_SHORT_ROWS
    if len(short) == len(seq_lens) and all(qsl[r + 1] - qsl[r] == 1 for r in short):
        return None, attn.block_table, attn.seq_lens, []       # a pure decode step
    counts = torch.tensor([qsl[r + 1] - qsl[r] for r in short])
    rows = torch.repeat_interleave(torch.tensor(short), counts)
    tokens = [t for r in short for t in range(qsl[r], qsl[r + 1])]
    lens = torch.tensor([seq_lens[r] - qsl[r + 1] + 1 + t for r in short
                         for t in range(qsl[r], qsl[r + 1])], dtype=torch.int32)
    whole = len(short) == len(seq_lens)
    done = set(short)
    return (None if whole else torch.tensor(tokens), attn.block_table[rows].contiguous(), lens,
            [r for r in range(len(seq_lens)) if r not in done])


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> norm(x) * weight, or with `residual`: (norm(x + residual) * weight,
    x + residual), the pre-norm step of a decoder layer in one call on CPU."""
    if x.device.type == "cpu":
        fused = cpu_native.rms_norm(x, weight, eps, residual)
        if fused is not None:
            return fused
    return rms_norm_ref(x, weight, eps, residual)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                  attn: AttnMetadata) -> torch.Tensor:
    """x [T, C], weight [C, K], conv_states [S, C, K-1] -> silu(causal depthwise conv) [T, C];
    each row reads and advances its own slot (attn.state_slots; kernels/gdn.py)."""
    if triton_enabled(x):
        return causal_conv1d_triton(x, weight, conv_states, attn.state_slots,
                                    attn.query_start_loc)
    return causal_conv1d_torch(x, weight, conv_states, attn.state_slots_host,
                               attn.query_start_loc_host)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, ssm_states: torch.Tensor,
                     attn: AttnMetadata) -> torch.Tensor:
    """q, k [T, Hk, Dk], v [T, Hv, Dv], g (log decay), beta [T, Hv], ssm_states [S, Hv, Dk, Dv]
    float32 -> o [T, Hv, Dv]; each row continues from its own slot (kernels/gdn.py)."""
    if triton_enabled(v):
        return gated_delta_rule_triton(q, k, v, g, beta, ssm_states, attn.state_slots,
                                       attn.query_start_loc)
    return gated_delta_rule_torch(q, k, v, g, beta, ssm_states, attn.state_slots_host,
                                  attn.query_start_loc_host)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2*I] (gate | up) -> [T, I] = silu(gate) * up."""
    if x.device.type == "cpu":
        fused = cpu_native.silu_and_mul(x)
        if fused is not None:
            return fused
    return silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2*I] (gate | up) -> [T, I] = gelu_tanh(gate) * up (Gemma's GeGLU)."""
    if x.device.type == "cpu":
        fused = cpu_native.gelu_tanh_and_mul(x)
        if fused is not None:
            return fused
    return gelu_tanh_and_mul_ref(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           owner: object) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias) -> [..., N], a dense linear layer. On CPU, batches
    of float32 rows run on oneDNN with a packed copy of the weight that `owner` (the layer)
    keeps (cpu_gemm.py)."""
    if x.device.type == "cpu":
        out = cpu_gemm.linear(x, weight, bias, owner)
        if out is not None:
            return out
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor, owner: object) -> torch.Tensor:
    """x [N, hidden] @ the output layer's weight [V, hidden].T -> [N, V]. On CPU an exactly
    8-bit weight (a GGUF Q8_0 embedding) runs on the native int kernel (cpu_gemm.int8_weight)."""
    if x.device.type == "cpu":
        w8 = cpu_gemm.int8_weight(weight, owner)
        if w8 is not None:
            return cpu_int_gemm(x.reshape(-1, x.shape[-1]), w8)
    return linear(x, weight, None, owner)


def prepare_int_weight(w: IntWeight | GgufBlockWeight | torch.Tensor
                       ) -> (IntWeight | CpuIntWeight | CpuInt4Weight | GgufBlockWeight
                             | torch.Tensor):
    """A loaded int weight -> the layout int_gemm runs fastest where it lives: on CPU the native
    kernel's row-major one where the library builds, else torch's int4 tiles for int4 (the
    reference would dequantize the whole weight on every call); a GGUF weight stays in its
    blocks for the native kernel, else is repacked (losslessly) as an int weight. Anything else
    as it is."""
    if isinstance(w, GgufBlockWeight):
        if (w.blocks.device.type == "cpu" and cpu_native.available()
                and w.type_name not in CPU_REPACKED_GGUF):
            return w
        w = to_int_weight(w)
    if isinstance(w, IntWeight):
        if cpu_native.supported(w) and cpu_native.available():
            return cpu_native.to_cpu_int(w)
        if cpu_int4_supported(w):
            return to_cpu_int4(w)
    return w


def int_gemm_fast(device: torch.device) -> bool:
    """Whether int weights serve at least as fast as dequantized float ones on `device`: not on
    a CPU without the native library, where torch's int kernels measured slower than the fp32
    matmul (bench/RESULTS.md, "Native CPU decode kernels")."""
    return device.type != "cpu" or cpu_native.available()


def int_gemm(x: torch.Tensor, w: IntWeight | CpuIntWeight | CpuInt4Weight | GgufBlockWeight,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ int4/int8 weight [N, K].T -> [..., N] (weight-only, group-wise scales)."""
    if isinstance(w, CpuIntWeight):
        return _on_rows(cpu_int_gemm, x, w, bias)
    if isinstance(w, GgufBlockWeight):
        return _on_rows(cpu_native.block_gemm, x, w, bias)
    if isinstance(w, CpuInt4Weight):
        return _on_rows(cpu_int4_gemm, x, w, bias)
    return _on_rows(int_gemm_triton if triton_enabled(x) else int_gemm_ref, x, w, bias)


def fp8_gemm(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ fp8 weight [N, K].T -> [..., N]: torch._scaled_mm on fp8 GPUs (activations
    quantized per token or with the static scale), else the weight-only Triton kernel."""
    if x.is_cuda and scaled_mm_supported(w, x):
        return _on_rows(fp8_scaled_mm, x, w, bias)
    return _on_rows(fp8_gemm_triton if triton_enabled(x) else fp8_gemm_ref, x, w, bias)


def mxfp4_gemm(x: torch.Tensor, w: Mxfp4Weight, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x [..., K] @ MXFP4 weight [N, K].T -> [..., N]: Triton on CUDA, the native kernel on CPU
    (kernels/cpu_mxfp4.c), else the reference (which dequantizes on every call)."""
    if triton_enabled(x):
        return _on_rows(mxfp4_gemm_triton, x, w, bias)
    if x.device.type == "cpu":
        out = _on_rows(mxfp4_gemm_cpu, x, w, bias) if cpu_native.available() else None
        if out is not None:
            return out
    return _on_rows(mxfp4_gemm_ref, x, w, bias)


def mxfp4_supported(device: torch.device) -> bool:
    """Whether MXFP4 weights have a kernel on `device`: Triton on CUDA, the native kernel (or,
    without a C compiler, the reference) on CPU. Elsewhere a checkpoint must be refused."""
    return device.type == "cpu" or (device.type == "cuda" and _TRITON)


def swiglu_oai(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: [T, 2I] with gate and up interleaved -> [T, I]."""
    return swiglu_oai_ref(x, alpha, limit)


def _on_rows(gemm, x: torch.Tensor, w: object, bias: torch.Tensor | None) -> torch.Tensor:
    """A [M, K] GEMM applied to x [..., K]."""
    out = gemm(x.reshape(-1, x.shape[-1]), w, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


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


# ---- mixture of experts (kernels/fused_moe.py) ----------------------------------------------
def fused_experts(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation=None) -> torch.Tensor:
    """x [T, H] -> [T, H]: each token through its top_k experts (topk_ids [T, k], global ids),
    summed with topk_weights [T, k]. CUDA: the Triton grouped GEMMs for dense, int and fp8
    stacks; elsewhere (and for other stacks) one GEMM per routed expert over its rows, a single
    native call for int stacks on CPU. activation: [M, 2I] -> [M, I], default silu(gate) * up."""
    activation = activation or silu_and_mul
    if triton_enabled(x) and triton_supports(weights):
        return fused_experts_triton(x, weights, topk_weights, topk_ids, activation)
    return fused_experts_grouped(x, weights, topk_weights, topk_ids, activation, grouped_gemm)


def grouped_gemm(x: torch.Tensor, stack: object, groups: list[tuple[int, int, int]]
                 ) -> torch.Tensor:
    """x [M, K] (rows sorted by expert) -> [M, N]: rows [start, end) of each (expert, start,
    end) group times that expert's weight."""
    if isinstance(stack, CpuIntExperts):
        return cpu_native.moe_int_gemm(x, stack, groups).to(x.dtype)
    parts = [expert_gemm(x[start:end], stack.expert(e)) for e, start, end in groups]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def expert_gemm(x: torch.Tensor, w: object) -> torch.Tensor:
    """One expert's rows x [M, K] @ its weight [N, K].T, whatever form the weight takes."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    if isinstance(w, (IntWeight, CpuIntWeight, CpuInt4Weight, GgufBlockWeight)):
        return int_gemm(x, w)
    if isinstance(w, Fp8Weight):
        return fp8_gemm(x, w)
    if isinstance(w, Mxfp4Weight):
        return mxfp4_gemm(x, w)
    if callable(w):            # a layer's own quant_method (ExpertList of callables)
        return w(x)
    raise TypeError(f"no GEMM for an expert weight of type {type(w).__name__}")


def stack_experts(weights: list) -> object:
    """Per-expert weights (each [N, K], as prepare_int_weight / the loaders leave them) -> the
    stack the fused path runs: one tensor per field with a leading expert dim where every
    expert shares a layout, else an ExpertList."""
    first = weights[0]
    same = all(type(w) is type(first) for w in weights)
    if same and isinstance(first, torch.Tensor) and all(w.shape == first.shape for w in weights):
        return DenseExperts(torch.stack(weights))
    if same and isinstance(first, (IntWeight, CpuIntWeight)) and all(
            w.perm is None and (w.bits, w.group_size, w.scales.dtype, w.out_features)
            == (first.bits, first.group_size, first.scales.dtype, first.out_features)
            for w in weights):
        if isinstance(first, IntWeight):
            return IntExperts(*(torch.stack([getattr(w, f) for w in weights])
                                for f in ("qweight", "scales", "bias")),
                              first.bits, first.group_size)
        return CpuIntExperts(*(torch.stack([getattr(w, f) for w in weights])
                               for f in ("q", "scales", "bias")), first.bits, first.group_size)
    if same and isinstance(first, Fp8Weight) and all(
            w.block == first.block and w.weight.shape == first.weight.shape
            and w.input_scale is None for w in weights):
        return Fp8Experts(torch.stack([w.weight for w in weights]),
                          torch.stack([w.scale for w in weights]), first.block)
    return ExpertList(list(weights))
