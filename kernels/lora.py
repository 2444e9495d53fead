"""Batched LoRA in the punica manner, for a step whose tokens use different adapters (slot -1:
the base model, no delta). Two ops per LoRA-wrapped linear, each one launch for the whole batch:

    shrink  y[t, :]   = x[t] @ A[slot[t]]^T          x [T, IN], A [S, R, IN]  -> y [T, R]
    expand  out[t, :] += y[t] @ B[slot[t]]^T         B [S, N, R]              -> out [T, N]

The step's tokens are grouped by slot once (LoRAMapping): segment i holds the tokens of slot
seg_slots[i], at sorted_token_ids[seg_start[i]:seg_start[i + 1]]. A program takes BLOCK_M tokens
of one segment, so a prefill chunk is one contiguous segment and decode rows are gathered:

    token_slots:      [ 2  2  2 -1  0  2  0 ]        (T = 7)
    sorted_token_ids: [ 4  6 | 0  1  2  5 ]          base tokens are left out
    seg_start:        [ 0    2            6 ]   seg_slots: [ 0  2 ]

Plain-torch references beside the kernels (what the interpreter tests compare against); a CPU
step runs lora_fused_cpu, the same sums in fewer ops (dispatch.py's lora_add chooses)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from minserve.kernels.jit import jit, tl, triton


@dataclass(slots=True)
class LoRAMapping:
    seg_slots_host: list[int]        # [A] the active slots, ascending
    seg_start_host: list[int]        # [A + 1] segment bounds into sorted_token_ids
    sorted_token_ids: torch.Tensor   # [sum of segments] int64
    seg_start: torch.Tensor          # [A + 1] int32
    seg_slots: torch.Tensor          # [A] int32
    max_seg_len: int
    onehot: torch.Tensor             # [T, A] float32: token t uses active slot a (refs only)
    # the fused CPU path (lora_fused_cpu), planned once per step on the host:
    runs: list = field(default_factory=list)   # (slot, rows): a slice when contiguous, else
    #                                             an int64 index tensor of the slot's tokens
    slot_lo: int = 0                 # the active slots span slot_lo..slot_hi
    slot_hi: int = -1
    span_mask: torch.Tensor | None = None   # [T, slot_hi - slot_lo + 1]: token t uses slot
    _onehot_as: dict = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.seg_slots_host

    def onehot_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._onehot_as:
            self._onehot_as[dtype] = self.onehot.to(dtype)
        return self._onehot_as[dtype]


def lora_mapping(token_slots: np.ndarray, device: torch.device) -> LoRAMapping:
    """Group a step's tokens by adapter slot (on the host, once per step)."""
    slots = np.asarray(token_slots, dtype=np.int64)
    order = np.argsort(slots, kind="stable")
    order = order[slots[order] >= 0]
    seg_slots, counts = np.unique(slots[order], return_counts=True)
    seg_start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=seg_start[1:])
    nb = device.type == "cuda"
    onehot = torch.from_numpy((slots[:, None] == seg_slots[None, :]).astype(np.float32))
    m = LoRAMapping(
        seg_slots.tolist(), seg_start.tolist(),
        torch.from_numpy(order.astype(np.int64)).to(device, non_blocking=nb),
        torch.from_numpy(seg_start.astype(np.int32)).to(device, non_blocking=nb),
        torch.from_numpy(seg_slots.astype(np.int32)).to(device, non_blocking=nb),
        int(counts.max()) if len(counts) else 0, onehot.to(device, non_blocking=nb))
    if device.type == "cpu" and len(seg_slots):
        for i, slot in enumerate(m.seg_slots_host):
            rows = order[seg_start[i]:seg_start[i + 1]]
            first, last = int(rows[0]), int(rows[-1])
            m.runs.append((slot, slice(first, last + 1) if last - first + 1 == len(rows)
                           else torch.from_numpy(rows.astype(np.int64))))
        m.slot_lo, m.slot_hi = m.seg_slots_host[0], m.seg_slots_host[-1]
        span = np.arange(m.slot_lo, m.slot_hi + 1)
        m.span_mask = torch.from_numpy((slots[:, None] == span[None, :]).astype(np.float32))
    return m


# The references compute every active adapter for every token and keep each token's own: a few
# large ops instead of a loop over segments.

def _active(lora: torch.Tensor, m: LoRAMapping) -> torch.Tensor:
    """lora [S, ...] -> [A, ...]: the step's active slots only."""
    if len(m.seg_slots_host) == lora.shape[0]:
        return lora
    return lora[m.seg_slots]


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, m: LoRAMapping,
                    y: torch.Tensor) -> None:
    """x [T, IN], lora_a [S, R, IN] -> y [T, R] for the tokens with an adapter (base rows: 0)."""
    if m.is_empty:
        return
    if len(m.seg_slots_host) == 1 and m.seg_start_host[1] == x.shape[0]:
        torch.matmul(x, lora_a[m.seg_slots_host[0]].t(), out=y)   # one adapter, every token
        return
    a = _active(lora_a, m)                                          # [A, R, IN]
    num_active, rank = a.shape[0], a.shape[1]
    y_all = (x @ a.reshape(num_active * rank, -1).t()).view(-1, num_active, rank)   # [T, A, R]
    torch.sum(y_all * m.onehot_as(x.dtype)[:, :, None], dim=1, out=y)


def lora_expand_ref(y: torch.Tensor, lora_b: torch.Tensor, m: LoRAMapping,
                    out: torch.Tensor) -> None:
    """y [T, R], lora_b [S, N, R]: out [T, N] += y @ B^T per token's slot (out may be a view)."""
    if m.is_empty:
        return
    if len(m.seg_slots_host) == 1 and m.seg_start_host[1] == y.shape[0]:
        out.add_(y @ lora_b[m.seg_slots_host[0]].t())
        return
    b = _active(lora_b, m)                                          # [A, N, R]
    num_active, rank = b.shape[0], b.shape[2]
    y_wide = (y[:, None, :] * m.onehot_as(y.dtype)[:, :, None]).view(-1, num_active * rank)
    out.add_(y_wide @ b.permute(1, 0, 2).reshape(b.shape[1], num_active * rank).t())


# The fused CPU path: a CPU step pays per op and per flop of small-M GEMMs (their cost grows
# with the rows), so one LoRA-wrapped linear runs few ops, each token through its own adapter
# where that is cheap. B is kept per slice as B^T, lora_bt[i] [S, R, N_i] (one slot's rows
# contiguous, several slots' one [W*R, N_i] view).
# - Few tokens over several adapters (decode rows): the onehot form, one shrink for every
#   slot of the step's span, masked, then one addmm per slice into its columns of `out`
#   (measured: fewer flops than one block-diagonal B over the slices, fewer ops than a run
#   per adapter).
# - Otherwise one run per adapter: a contiguous run (a prefill chunk) works on row views;
#   gathered rows are selected, and their delta index-added once.
# PERF: CPU, default model, per layer and per step: bench/RESULTS.md (issue 12, "fused CPU path").
FUSED_ONEHOT_MAX_TOKENS = 32


def lora_fused_cpu(x: torch.Tensor, lora_a: torch.Tensor, lora_bt: list[torch.Tensor],
                   m: LoRAMapping, out: torch.Tensor) -> None:
    """out [T, sum N_i] += per token with an adapter, for each slice i (its column range):
    (x[t] @ A[slot]^T)[i*R:(i+1)*R] @ lora_bt[i][slot]. The same sum as lora_shrink_ref then
    lora_expand_ref per slice (to rounding). x [T, IN], lora_a [S, n*R, IN], lora_bt n x
    [S, R, N_i], out [T, N] with unit column stride."""
    if m.is_empty:
        return
    num_tokens, rank = x.shape[0], lora_bt[0].shape[1]
    offsets = [0]
    for b in lora_bt:
        offsets.append(offsets[-1] + b.shape[2])
    if len(m.runs) > 1 and num_tokens <= FUSED_ONEHOT_MAX_TOKENS:
        lo, hi = m.slot_lo, m.slot_hi + 1
        y = (x @ lora_a[lo:hi].reshape(-1, lora_a.shape[2]).t()).view(
            num_tokens, hi - lo, len(lora_bt), rank)                      # [T, W, n, R]
        y.mul_(m.span_mask[:, :, None, None])
        for i, b in enumerate(lora_bt):
            out[:, offsets[i]:offsets[i + 1]].addmm_(y[:, :, i].reshape(num_tokens, -1),
                                                    b[lo:hi].reshape(-1, b.shape[2]))
        return
    for slot, rows in m.runs:
        if isinstance(rows, slice):
            ys, o = x[rows] @ lora_a[slot].t(), out[rows]
            for i, b in enumerate(lora_bt):
                o[:, offsets[i]:offsets[i + 1]].addmm_(ys[:, i * rank:(i + 1) * rank], b[slot])
        else:
            ys = x.index_select(0, rows) @ lora_a[slot].t()
            out.index_add_(0, rows, torch.cat([ys[:, i * rank:(i + 1) * rank] @ b[slot]
                                               for i, b in enumerate(lora_bt)], dim=1))


@jit
def _lora_kernel(
    in_ptr,           # [T, K]: x (shrink) or a column slice of the shrink output (expand)
    w_ptr,            # [S, N, K]: A (shrink, N = R) or B (expand, K = R)
    out_ptr,          # [T, N]: y (shrink) or a column slice of the base output (expand)
    sorted_ptr,       # [sum of segments] token ids grouped by slot
    seg_start_ptr,    # [A + 1]
    seg_slots_ptr,    # [A]
    stride_in_t, stride_w_s, stride_w_n, stride_w_k, stride_o_t,
    N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """out[tok] (+)= in[tok] @ W[slot]^T for the BLOCK_M tokens of one segment: shrink stores,
    expand (ACCUMULATE) adds into the base layer's output. Grid (A, cdiv(max_seg_len,
    BLOCK_M), cdiv(N, BLOCK_N)); tokens of a segment are unique and segments disjoint, so the
    read-add-write of out never races."""
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    m0 = start + tl.program_id(1) * BLOCK_M
    if m0 >= end:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tok = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        v = tl.load(in_ptr + tok[:, None] * stride_in_t + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)           # [BM, BK]
        w = tl.load(w_ptr + slot * stride_w_s + offs_n[None, :] * stride_w_n
                    + offs_k[:, None] * stride_w_k,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)           # [BK, BN]
        acc += tl.dot(v.to(w.dtype), w)
    mask = mask_m[:, None] & mask_n[None, :]
    o_ptrs = out_ptr + tok[:, None] * stride_o_t + offs_n[None, :]
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_m(m: LoRAMapping) -> int:
    return 16 if m.max_seg_len <= 16 else 64


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, m: LoRAMapping,
                       y: torch.Tensor) -> None:
    assert x.stride(-1) == 1 and lora_a.stride(-1) == 1 and y.stride(-1) == 1
    if m.is_empty:
        return
    n, k = lora_a.shape[1], lora_a.shape[2]
    bm, bn, bk = _block_m(m), 16 if n <= 16 else 32, 64
    grid = (len(m.seg_slots_host), triton.cdiv(m.max_seg_len, bm), triton.cdiv(n, bn))
    _lora_kernel[grid](x, lora_a, y, m.sorted_token_ids, m.seg_start, m.seg_slots,
                       x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
                       y.stride(0),
                       n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACCUMULATE=False)


def lora_expand_triton(y: torch.Tensor, lora_b: torch.Tensor, m: LoRAMapping,
                       out: torch.Tensor) -> None:
    """lora_b [S, N, R] with any strides (lora_add passes the B^T [S, R, N] of LoRASlots
    transposed)."""
    assert y.stride(-1) == 1 and out.stride(-1) == 1
    if m.is_empty:
        return
    n, k = lora_b.shape[1], lora_b.shape[2]
    bm, bn, bk = _block_m(m), 64, 16 if k <= 16 else 32
    grid = (len(m.seg_slots_host), triton.cdiv(m.max_seg_len, bm), triton.cdiv(n, bn))
    _lora_kernel[grid](y, lora_b, out, m.sorted_token_ids, m.seg_start, m.seg_slots,
                       y.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
                       out.stride(0),
                       n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACCUMULATE=True)
