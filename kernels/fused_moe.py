"""Mixture-of-experts: routing, the step's (token, slot) pairs grouped by expert, and the two
grouped GEMMs (gate|up, then down) over only the experts each token was routed to. Nothing here
reads checkpoints or chooses a device path (dispatch.fused_experts does).

A step of T tokens, each routed to top_k experts, has P = T * top_k pairs; pair p is token
p // top_k's slot p % top_k. Grouped by expert and each group padded to BLOCK_M rows (the Triton
path; the CPU path groups without padding):

    sorted_ids   [ e0 pairs | pad  ][ e2 pairs ...  | pad ][ e5 ...   ]   (pad = P: no pair)
    expert_ids   [    0     ][    2     ][    2     ][    5     ] -1 -1    one per BLOCK_M rows
                 (experts 1, 3, 4 got no token: no block; -1 past the end, skipped)

    out[t] = sum_j  w[t, j] * (act(x[t] @ W13[e].T + b13[e]) @ W2[e].T + b2[e]),  e = ids[t, j]

The expert weights (ExpertWeights): w13 holds each expert's gate|up rows [E, 2I, H], w2 its
down [E, H, I], in one of the stack formats below; `activation` maps [M, 2I] -> [M, I] (default
silu(gate) * up; gpt-oss passes its clamped SwiGLU over interleaved gate/up). A new weight
format (MXFP4) is a stack class with num_experts / expert(e) / nbytes(), a case in
dispatch.expert_gemm for its per-expert weight, and optionally a FORMAT branch in _b_tile.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from minserve.kernels.fp8_gemm import Fp8Weight, dequantize_fp8
from minserve.kernels.jit import jit, tl, triton
from minserve.kernels.mxfp4 import Mxfp4Experts, Mxfp4Weight, dequantize_mxfp4, mxfp4_tile
from minserve.kernels.quant_gemm import IntWeight, dequantize_int

# softmax_topk:      softmax over all E logits, keep the top k (Qwen2-MoE, Qwen3-MoE without
#                    norm_topk_prob)
# softmax_topk_norm: the same, renormalized to sum 1 (Qwen3-MoE norm_topk_prob, Mixtral)
# topk_softmax:      the top k logits, softmax over those k (gpt-oss; the same numbers as
#                    softmax_topk_norm up to rounding)
ROUTERS = ("softmax_topk", "softmax_topk_norm", "topk_softmax")


def check_router(router: str) -> None:
    """A start-up error (ValueError; the model layer makes it a ConfigError) for an unknown
    routing variant."""
    if router not in ROUTERS:
        raise ValueError(f"unknown MoE router variant {router!r} (known: {', '.join(ROUTERS)})")


def select_experts(router_logits: torch.Tensor, top_k: int, router: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64)."""
    if router == "topk_softmax":
        values, ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.softmax(values.float(), dim=-1), ids
    check_router(router)
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if router == "softmax_topk_norm":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# ---- expert weight stacks: every local expert's projection in one format --------------------
@dataclass(slots=True)
class DenseExperts:
    weight: torch.Tensor                 # [E, N, K] in the model dtype

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def expert(self, e: int) -> torch.Tensor:
        return self.weight[e]

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass(slots=True)
class IntExperts:
    """IntWeight's layout (kernels/quant_gemm.py) with a leading expert dim; no act-order."""
    qweight: torch.Tensor                # [E, K // P, N] int32
    scales: torch.Tensor                 # [E, K // G, N]
    bias: torch.Tensor                   # [E, K // G, N]
    bits: int
    group_size: int

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def expert(self, e: int) -> IntWeight:
        return IntWeight(self.qweight[e], self.scales[e], self.bias[e], self.bits,
                         self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.bias))


@dataclass(slots=True)
class Fp8Experts:
    """Fp8Weight's layout (kernels/fp8_gemm.py) with a leading expert dim; weight-only."""
    weight: torch.Tensor                 # [E, N, K] float8_e4m3fn
    scale: torch.Tensor                  # [E, ceil(N / BN), ceil(K / BK)] float32
    block: tuple[int, int]               # (BN, BK)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def expert(self, e: int) -> Fp8Weight:
        return Fp8Weight(self.weight[e], self.scale[e], self.block, None, False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale))


@dataclass(slots=True)
class ExpertList:
    """Per-expert weights that share no stacked layout (mixed GGUF types, act-order GPTQ,
    torch's CPU int4 tiles) or a callable x [M, K] -> [M, N] per expert (a layer's own
    quant_method): run one GEMM per routed expert."""
    experts: list[Any]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert(self, e: int) -> Any:
        return self.experts[e]

    def nbytes(self) -> int:
        return sum(_nbytes(w) for w in self.experts)


def _nbytes(w: Any) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes() if hasattr(w, "nbytes") else 0


@dataclass(slots=True)
class ExpertWeights:
    """Both projections of this rank's experts. Under tensor parallelism each expert's
    intermediate dim is this rank's slice (2I / tp rows of w13, I / tp columns of w2; b2 only on
    rank 0); under expert parallelism this rank holds whole experts, and expert_map sends a
    global expert id to its local index (-1: another rank's expert, which adds nothing here)."""
    w13: Any                             # [E, 2I, H] gate | up
    w2: Any                              # [E, H, I] down
    b13: torch.Tensor | None = None      # [E, 2I]
    b2: torch.Tensor | None = None       # [E, H]
    expert_map: torch.Tensor | None = None   # [E_total] int64

    @property
    def num_experts(self) -> int:
        return self.w13.num_experts

    def nbytes(self) -> int:
        extra = [t for t in (self.b13, self.b2) if t is not None]
        return self.w13.nbytes() + self.w2.nbytes() + sum(_nbytes(t) for t in extra)


def dense_experts(stack: Any) -> torch.Tensor:
    """Any stack -> [E, N, K] float32 (the reference's weights)."""
    if isinstance(stack, DenseExperts):
        return stack.weight.float()
    out = []
    for e in range(stack.num_experts):
        w = stack.expert(e)
        if isinstance(w, IntWeight):
            out.append(dequantize_int(w))
        elif isinstance(w, Fp8Weight):
            out.append(dequantize_fp8(w))
        elif isinstance(w, Mxfp4Weight):
            out.append(dequantize_mxfp4(w))
        elif isinstance(w, torch.Tensor):
            out.append(w.float())
        else:
            raise TypeError(f"no dense form for a {type(w).__name__} expert")
    return torch.stack(out)


# ---- routing -> pairs grouped by expert -----------------------------------------------------
def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """[T, k] global ids -> [P] local ids (-1: not on this rank)."""
    flat = topk_ids.reshape(-1).long()
    return flat if expert_map is None else expert_map[flat]


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int,
                         expert_map: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [num_blocks * block_m] int32, expert_ids [num_blocks] int32) as drawn in the
    module docstring, with num_blocks an upper bound known without a device sync."""
    flat = local_expert_ids(topk_ids, expert_map)
    num_pairs, device = flat.numel(), flat.device
    key = torch.where(flat >= 0, flat, num_experts)            # other ranks' pairs sort last
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    e = sorted_key.clamp(max=num_experts - 1)
    rank_in_expert = torch.arange(num_pairs, device=device) - start[e]
    num_blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    dump = num_blocks * block_m                                # one slot past the end
    dest = torch.where(sorted_key < num_experts, pad_end[e] - padded[e] + rank_in_expert, dump)
    sorted_ids = torch.full((dump + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(pad_end, block_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids[:dump], expert_ids


# ---- the plain-torch reference --------------------------------------------------------------
def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  activation: Callable[[torch.Tensor], torch.Tensor],
                  b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], dense w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in x's dtype, computed in float32
    expert by expert, as transformers' MoE blocks loop."""
    num_tokens, top_k = topk_ids.shape
    local = local_expert_ids(topk_ids, expert_map).view(num_tokens, top_k)
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slots = torch.nonzero(local == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens].float() @ w13[e].float().t()
        if b13 is not None:
            h = h + b13[e].float()
        y = activation(h) @ w2[e].float().t()
        if b2 is not None:
            y = y + b2[e].float()
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


# ---- grouped per-expert GEMMs over the routed tokens only (CPU, and any stack) --------------
Groups = list[tuple[int, int, int]]     # (local expert, first row, end row) of the sorted rows
GroupedGemm = Callable[[torch.Tensor, Any, Groups], torch.Tensor]


def fused_experts_grouped(x: torch.Tensor, w: ExpertWeights, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor],
                      grouped_gemm: GroupedGemm) -> torch.Tensor:
    """The pairs sorted by expert (no padding); grouped_gemm(rows [M, K], stack, groups) runs
    each expert's rows against its weight (dispatch: one native call for int stacks on CPU).
    Never touches an expert no token was routed to."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w.num_experts
    key = local_expert_ids(topk_ids, w.expert_map)
    key = torch.where(key >= 0, key, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    groups, start = [], 0
    for e, count in enumerate(counts):
        if count:
            groups.append((e, start, start + count))
            start += count
    out = torch.zeros(num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
    if not groups:
        return out
    order = order[:start]
    rows = order // top_k                                      # the token of each sorted pair
    h = grouped_gemm(x.index_select(0, rows).contiguous(), w.w13, groups)   # [M, 2I]
    if w.b13 is not None:
        h = h + w.b13.index_select(0, key[order]).to(h.dtype)
    y = grouped_gemm(activation(h).contiguous(), w.w2, groups)              # [M, H]
    if w.b2 is not None:
        y = y + w.b2.index_select(0, key[order]).to(y.dtype)
    y = y * topk_weights.reshape(-1)[order].to(y.dtype)[:, None]
    return out.index_add_(0, rows, y)


# ---- the Triton path: both grouped GEMMs, each expert's block of rows against its weight ------
FORMATS = {DenseExperts: 0, IntExperts: 1, Fp8Experts: 2, Mxfp4Experts: 3}


@jit
def _b_tile(b_ptr, s_ptr, z_ptr, expert, offs_n, offs_k, mask_kn, N, K, stride_be, stride_se,
            SK, SCALE_BN, SCALE_BK,
            FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Expert `expert`'s [BLOCK_K, BLOCK_N] tile of W^T, dequantized to float32."""
    e = expert.to(tl.int64)
    if FORMAT == 1:   # int: qweight [E, K // P, N], scales and offsets [E, K // G, N]
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(b_ptr + e * stride_be + (offs_k[:, None] // PER_WORD).to(tl.int64) * N
                        + offs_n[None, :], mask=mask_kn, other=0)
        q = (words >> ((offs_k[:, None] % PER_WORD) * BITS)) & ((1 << BITS) - 1)
        group = e * stride_se + (offs_k[:, None] // GROUP_SIZE).to(tl.int64) * N + offs_n[None, :]
        s = tl.load(s_ptr + group, mask=mask_kn, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + group, mask=mask_kn, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s + z
    elif FORMAT == 3:   # mxfp4 (kernels/mxfp4.py): blocks [E, N, K // 2], scales [E, N, K // 32]
        w = mxfp4_tile(b_ptr + e * stride_be, s_ptr + e * stride_se, offs_k, offs_n, mask_kn,
                       K // 2, K // 32)
    else:             # dense or fp8: [E, N, K]
        w = tl.load(b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * K + offs_k[:, None],
                    mask=mask_kn, other=0.0).to(tl.float32)
        if FORMAT == 2:   # fp8 scales [E, SN, SK], one per [SCALE_BN, SCALE_BK] block
            s = tl.load(s_ptr + e * stride_se + (offs_n[None, :] // SCALE_BN) * SK
                        + offs_k[:, None] // SCALE_BK, mask=mask_kn, other=0.0)
            w = w * s
    return w


@jit
def _fused_moe_kernel(
    a_ptr,            # [rows, K] activations: x [T, H] (TOP_K = k) or act(h) [P, I] (TOP_K = 1)
    b_ptr,            # the stack's weight (see _b_tile), [E, ...]
    s_ptr, z_ptr,     # int: scales, offsets; fp8: scales; dense: unused
    bias_ptr,         # [E, N] or unused
    c_ptr,            # [P, N] output rows, one per (token, slot) pair
    topk_weights_ptr,  # [P] float32
    sorted_ids_ptr,   # [num_blocks * BLOCK_M] int32, pairs grouped by expert (P: padding)
    expert_ids_ptr,   # [num_blocks] int32 (-1: nothing)
    num_pairs, N, K, stride_am, stride_be, stride_se, stride_cm, SK, SCALE_BN, SCALE_BK,
    TOP_K: tl.constexpr, FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (num_blocks, cdiv(N, BLOCK_N)): BLOCK_M pairs of one expert x BLOCK_N outputs."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = pairs < num_pairs
    rows = (pairs // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)            # [BM, BK]
        w = _b_tile(b_ptr, s_ptr, z_ptr, expert, offs_n, offs_k,
                    mask_k[:, None] & mask_n[None, :], N, K, stride_be, stride_se, SK,
                    SCALE_BN, SCALE_BK, FORMAT, BITS, GROUP_SIZE)               # [BK, BN]
        if a.dtype == tl.float32:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        acc *= tl.load(topk_weights_ptr + pairs, mask=mask_m, other=0.0)[:, None]
    tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def triton_supports(w: ExpertWeights) -> bool:
    return type(w.w13) in FORMATS and type(w.w2) in FORMATS


def _stack_args(stack: Any) -> tuple[Any, ...]:
    """(b, s, z, N, K, stride_be, stride_se, SK, SCALE_BN, SCALE_BK, FORMAT, BITS, GROUP)."""
    if isinstance(stack, IntExperts):
        e, kp, n = stack.qweight.shape
        k = kp * (32 // stack.bits)
        return (stack.qweight, stack.scales, stack.bias, n, k, kp * n, stack.scales.stride(0),
                1, 1, 1, 1, stack.bits, stack.group_size)
    if isinstance(stack, Mxfp4Experts):
        e, n, half_k = stack.blocks.shape
        return (stack.blocks, stack.scales, stack.scales, n, 2 * half_k, n * half_k,
                stack.scales.stride(0), 1, 1, 1, 3, 4, 32)
    if isinstance(stack, Fp8Experts):
        _, n, k = stack.weight.shape
        return (stack.weight, stack.scale, stack.scale, n, k, n * k, stack.scale.stride(0),
                stack.scale.shape[2], stack.block[0], stack.block[1], 2, 8, 1)
    _, n, k = stack.weight.shape
    return (stack.weight, stack.weight, stack.weight, n, k, n * k, 0, 1, 1, 1, 0, 8, 1)


def _grouped_gemm_triton(a: torch.Tensor, stack: Any, bias: torch.Tensor | None,
                         c: torch.Tensor, topk_weights: torch.Tensor, sorted_ids: torch.Tensor,
                         expert_ids: torch.Tensor, top_k: int, block_m: int,
                         mul_routed_weight: bool) -> None:
    b, s, z, n, k, stride_be, stride_se, sk, sbn, sbk, fmt, bits, group = _stack_args(stack)
    block_n, block_k = (64, 64) if n >= 64 else (32, 32)
    grid = (expert_ids.numel(), triton.cdiv(n, block_n))
    _fused_moe_kernel[grid](
        a, b, s, z, bias if bias is not None else a, c, topk_weights, sorted_ids, expert_ids,
        c.shape[0], n, k, a.stride(0), stride_be, stride_se, c.stride(0), sk, sbn, sbk,
        TOP_K=top_k, FORMAT=fmt, BITS=bits, GROUP_SIZE=group, HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=mul_routed_weight, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def fused_experts_triton(x: torch.Tensor, w: ExpertWeights, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor],
                     block_m: int | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H] in x's dtype: gate|up for every pair, the activation, down scaled by
    each pair's routing weight, then the top_k rows of each token summed."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    if block_m is None:    # decode: few pairs per expert; prefill: fuller tiles
        block_m = 16 if num_pairs <= 64 * w.num_experts else 64
    sorted_ids, expert_ids = moe_align_block_size(topk_ids, block_m, w.num_experts,
                                                  w.expert_map)
    x = x.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    n13 = _stack_args(w.w13)[3]
    h = torch.empty(num_pairs, n13, dtype=x.dtype, device=x.device)
    _grouped_gemm_triton(x, w.w13, w.b13, h, weights, sorted_ids, expert_ids, top_k, block_m,
                         False)
    act = activation(h).contiguous()
    # NOTE: zeros: another rank's pairs (expert parallel) are never written, and add nothing.
    y = torch.zeros(num_pairs, x.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm_triton(act, w.w2, w.b2, y, weights, sorted_ids, expert_ids, 1, block_m, True)
    return y.view(num_tokens, top_k, -1).sum(dim=1)
