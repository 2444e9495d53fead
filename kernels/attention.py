"""Paged attention over the block-table KV cache: prefill chunks and decodes of one step in one
launch. Holds the metadata the runner builds, the plain-torch reference (CPU, tests) and the
Triton kernels that replace it on CUDA. It must not allocate cache or decide scheduling.

Per request r (a row of the batch), in token positions:

    |<------------- seq_len = seq_lens[r] ------------->|
    |<---- context_len (already in cache) ---->|<-query_len->|
                                                ^ query_start_loc[r] .. query_start_loc[r+1] in q

Query token i of request r sits at absolute position context_len + i and may attend keys at
positions <= context_len + i (and > context_len + i - sliding_window, when there is a window).

Image spans (Gemma 3: image tokens attend to each other both ways): image_span_end[t] is one past
the last position of the image that query token t sits in; the token also sees keys up to there.
A step holding an image's tokens holds all of it from where it starts (the scheduler's rule), so
those keys are in the cache; a token outside images has 0 (nothing past causal):

    positions      10 11 12 13 14 15 16 17        image = positions 12..15
    span_end        0  0 16 16 16 16  0  0        query 13 sees keys 0..15, query 11 keys 0..11

With `sinks` ([H] float32, gpt-oss's learned attention sinks) head h's softmax denominator holds
one more term, exp(sinks[h]), for a key whose value is zero: probabilities may sum to less than 1.

With `softcap` (Gemma 2/3's attn_logit_softcapping) each scaled logit s = scale * q.k becomes
softcap * tanh(s / softcap) before the mask and softmax (a sink's logit is not capped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minserve.kernels.jit import jit, tl, triton


@dataclass(slots=True)
class AttnMetadata:
    query_start_loc: torch.Tensor        # [R+1] int32, prefix sums of query lengths
    seq_lens: torch.Tensor               # [R] int32, context_len + query_len
    block_table: torch.Tensor            # [R, max_blocks] int32
    slot_mapping: torch.Tensor           # [T] int64, flat cache slot per new token; -1 = skip
    max_query_len: int
    max_seq_len: int
    # Host copies, so the torch reference never syncs with the device.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    # [T] int32, only for a step with image tokens of a model whose images attend both ways
    # (see the picture above); None: causal everywhere.
    image_span_end: torch.Tensor | None = None
    # the CPU dispatch's per-step plan for its native short rows (dispatch.py), made at the
    # first layer and read by the others: none of its host work repeats per layer
    native_plan: object = None
    # [R] int64, each row's state slot (linear-attention layers: kernels/gdn.py); None for a
    # model without such layers. Its host copy, for the CPU paths.
    state_slots: torch.Tensor | None = None
    state_slots_host: list[int] | None = None


def paged_attention_ref(
    q: torch.Tensor,         # [T, H, D]
    k_cache: torch.Tensor,   # [NB, BS, K, D]
    v_cache: torch.Tensor,   # [NB, BS, K, D]
    attn: AttnMetadata, scale: float, sliding_window: int | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, rows: list[int] | None = None,
    out: torch.Tensor | None = None, sinks: torch.Tensor | None = None,   # sinks [H] float32
    softcap: float | None = None,
) -> torch.Tensor:           # [T, H, D]
    """(rows: only these requests, into `out`; the others' tokens are left as they are.)
    One request at a time, in float32 (an fp8 cache holds k / k_scale,
    v / v_scale). GQA without copying K/V per query head: a decode's G
    query heads of kv head k become G rows of k's matrix (the kernel's tile packing, in torch),
    which made CPU serving's attention 2.5-3x faster than repeat_interleave + einsum; longer
    queries go through torch's fused SDPA (enable_gqa) with the causal/window mask.
    PERF: SDPA against the packed bmm pair took three 200-token prefill rows (9 q / 3 kv heads,
    D 64) from 10.8-13.7 ms to 6.4-6.8 ms per layer; for decode rows it was slower (0.22 against
    0.15 ms at 210 keys), and batching all decode rows into one padded SDPA call gained at most
    ~20% at 16 rows (1 thread, CPU time, AVX2 EPYC; /tmp scripts, see bench/RESULTS.md).
    Sinks ride along as one extra key per kv head (see _with_sink_key), so SDPA keeps its GQA.
    SDPA cannot cap logits: with softcap, longer queries take _softcapped_attention."""
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    qsl, seq_lens = attn.query_start_loc_host, attn.seq_lens_host
    for r in range(len(seq_lens)) if rows is None else rows:
        start, end, seq_len = qsl[r], qsl[r + 1], seq_lens[r]
        query_len = end - start
        if query_len == 0:
            continue
        context_len = seq_len - query_len
        blocks = attn.block_table[r, :(seq_len + block_size - 1) // block_size]
        k = k_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].float()   # [S, K, D]
        v = v_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].float()
        if k_scale != 1.0 or v_scale != 1.0:
            k, v = k * k_scale, v * v_scale
        if query_len == 1 and sliding_window is None:    # one decode token sees all S keys
            # [1, H, D] -> [K, G, D]: row g of kv head k is query head k*G + g
            qr = q[start].float().view(num_kv_heads, group, head_dim)
            scores = _softcap(torch.bmm(qr, k.permute(1, 2, 0)) * scale, softcap)   # [K, G, S]
            if sinks is not None:       # the sink's logit as a last column, dropped after
                scores = torch.cat((scores, sinks.float().view(num_kv_heads, group, 1)), -1)
            probs = torch.softmax(scores, dim=-1)[..., :seq_len]
            o = torch.bmm(probs, v.permute(1, 0, 2))                         # [K, G, D]
            out[start] = o.reshape(num_heads, head_dim).to(q.dtype)
            continue
        q_pos = torch.arange(context_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos                                              # [Q, S]
        if attn.image_span_end is not None:
            allowed |= k_pos < attn.image_span_end[start:end, None].to(q.device)
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        qr = q[start:end].float()
        if softcap is not None:
            o = _softcapped_attention(qr, k, v, allowed, scale, softcap, sinks)
            out[start:end] = o.to(q.dtype)
            continue
        if sinks is not None:
            qr, k, v, allowed = _with_sink_key(qr, k, v, allowed, sinks, scale)
        o = torch.nn.functional.scaled_dot_product_attention(
            qr.transpose(0, 1)[None], k.transpose(0, 1)[None],
            v.transpose(0, 1)[None], attn_mask=allowed, scale=scale,
            enable_gqa=True)                                                  # [1, H, Q, D]
        out[start:end] = o[0].transpose(0, 1)[..., :head_dim].to(q.dtype)
    return out


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _softcapped_attention(
    q: torch.Tensor,         # [Q, H, D] float32
    k: torch.Tensor,         # [S, K, D] float32
    v: torch.Tensor,         # [S, K, D] float32
    allowed: torch.Tensor,   # [Q, S] bool
    scale: float, softcap: float, sinks: torch.Tensor | None,
) -> torch.Tensor:           # [Q, H, D]
    """Attention with capped logits, written out (the query heads of a kv head as one batch)."""
    num_tokens, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qg = q.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [K, G, Q, D]
    scores = _softcap(torch.matmul(qg, k.permute(1, 2, 0)[:, None]) * scale, softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))                        # [K, G, Q, S]
    if sinks is not None:
        sink = sinks.float().view(num_kv_heads, group, 1, 1).expand(-1, -1, num_tokens, 1)
        scores = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :seq_len]
    o = torch.matmul(probs, v.permute(1, 0, 2)[:, None])                         # [K, G, Q, D]
    return o.permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim)


def _with_sink_key(
    q: torch.Tensor,         # [Q, H, D] float32
    k: torch.Tensor,         # [S, K, D] float32
    v: torch.Tensor,         # [S, K, D] float32
    allowed: torch.Tensor,   # [Q, S] bool
    sinks: torch.Tensor,     # [H]
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention sinks as SDPA inputs: one more dim and one more key, visible to every query.

        q'   = [q | sinks[h] / scale]     (per query head h)
        k'_j = [k_j | 0],  v'_j = [v_j | 0]   for the S real keys
        k'_S = [0 ... 0 | 1],  v'_S = 0        the sink key: q' . k'_S * scale = sinks[h]

    so each softmax gets the extra term exp(sinks[h]) and the sink adds nothing to the output
    (whose extra dim the caller drops). The keys stay per kv head: GQA is untouched."""
    num_tokens, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    sink_col = (sinks.float() / scale).view(1, num_heads, 1).expand(num_tokens, -1, -1)
    q = torch.cat((q, sink_col), dim=-1)
    k = torch.nn.functional.pad(k, (0, 1, 0, 0, 0, 1))                        # [S+1, K, D+1]
    k[seq_len, :, head_dim] = 1.0
    v = torch.nn.functional.pad(v, (0, 1, 0, 0, 0, 1))
    allowed = torch.nn.functional.pad(allowed, (0, 1), value=True)
    return q, k, v, allowed


# ---------------------------------------------------------------------------------------------
# Triton kernels.
#
# Grid axis 0 walks "query blocks" of BLOCK_Q tokens laid out request after request; the first
# block of request r is query_start_loc[r] // BLOCK_Q + r, which leaves room for the ragged
# last block of every request (BLOCK_Q = 2, query lens 3, 1, 4):
#
#   query_start_loc  = [0, 3, 4, 8]      first block of r = qsl[r] // BLOCK_Q + r  -> 0, 2, 4
#   global block       0    1    2    3    4    5    6      grid = num_tokens // BLOCK_Q + num_reqs
#   request            r0   r0   r1  (r1)  r2   r2  (r2)    (..) = idle, returns at once
#   local block        0    1    0    1    0    1    2
#
# A program finds its request by binary search for the last r with first_block(r) <= pid.
# Axis 1 is the kv head: the tile's BLOCK_M rows pack BLOCK_Q tokens x the GROUP query heads
# that share that kv head (GROUP = 3, BLOCK_M = 8 -> BLOCK_Q = 2):
#
#   row m         0    1    2    3    4    5    6    7
#   query_pos     p    p    p    p+1  p+1  p+1  pad  pad    p = local_block * BLOCK_Q + m // GROUP
#   query head    3k   3k+1 3k+2 3k   3k+1 3k+2              kv_head * GROUP + m % GROUP
#
# Keys are visited TILE_SIZE at a time; the cache block of key j is block_table[r, j // BLOCK_SIZE]
# at offset j % BLOCK_SIZE, so TILE_SIZE and BLOCK_SIZE are independent.
# ---------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
SPLIT_KV_MAX_PROGRAMS = 128   # split decode when num_reqs * num_kv_heads is below ~one H100 wave
SPLIT_KV_SEGMENTS = 16


@jit
def _find_request(query_start_loc_ptr, block_idx, num_reqs, BLOCK_Q: tl.constexpr):
    # Loop-carried values must be int32 tensors from the start (a Python 0 is a constexpr).
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@jit
def _tile_loop(
    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table_row_ptr, kv_head,
    tile_lo, tile_hi, kv_end, query_abs_pos, last_key_pos, qk_scale, softcap,
    stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_SIZE: tl.constexpr, SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    """Online softmax over key tiles [tile_lo, tile_hi); scores are in the log2 domain. Row m
    sees keys up to last_key_pos[m] (its own position, or the end of its image). softcap is
    the logit cap in the same log2 domain (cap * log2(e)): c * tanh(s / c) there is the capped
    natural logit times log2(e)."""
    offs_t = tl.arange(0, TILE_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_P)
    dim_mask = offs_d < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_SIZE + offs_t
        key_mask = key_pos < kv_end
        # int64: block * stride overflows int32 once the cache passes 2^31 elements.
        block = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=key_mask, other=0)
        block = block.to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        k_off = block * stride_k_b + in_block * stride_k_s + kv_head * stride_k_h
        v_off = block * stride_v_b + in_block * stride_v_s + kv_head * stride_v_h
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None],
                    mask=dim_mask[:, None] & key_mask[None, :], other=0.0)     # [D, TILE]
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :],
                    mask=key_mask[:, None] & dim_mask[None, :], other=0.0)     # [TILE, D]
        if KV_FP8:   # k_scale is folded into qk_scale, v_scale into the output
            k, v = k.to(q.dtype), v.to(q.dtype)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale            # [M, TILE] fp32
        if USE_SOFTCAP:   # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both infinities
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        allowed = key_mask[None, :] & (key_pos[None, :] <= last_key_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed = allowed & (key_pos[None, :] > query_abs_pos[:, None] - SLIDING_WINDOW)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with every key masked so far keeps m = -inf; shift by 0 there to avoid inf - inf.
        m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr,
    span_end_ptr,  # [T] int32, read only when HAS_SPANS
    segm_out_ptr, segm_max_ptr, segm_sum_ptr, sinks_ptr, qk_scale, softcap, v_scale, num_reqs,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt,
    stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    HAS_SPANS: tl.constexpr, USE_SINKS: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    """Grid (query blocks, kv heads, NUM_SEGMENTS). NUM_SEGMENTS == 1 writes the output;
    otherwise each segment covers a slice of the key tiles and writes fp32 partials that
    _reduce_segments merges (split-KV for small decode batches with long contexts).
    USE_SINKS: segment 0 starts each row's online softmax at its head's sink (sinks_ptr [H]
    float32): max = the sink, sum = exp(sink - max) = 1, nothing in the output."""
    block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    r = _find_request(query_start_loc_ptr, block_idx, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + r)
    query_len = tl.load(query_start_loc_ptr + r + 1) - q_start
    local_block = block_idx - (q_start // BLOCK_Q + r)
    if local_block * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + r)
    context_len = seq_len - query_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    query_pos = local_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m // GROUP < BLOCK_Q) & (query_pos < query_len)
    dim_mask = offs_d < HEAD_DIM
    token = (q_start + query_pos).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    # Keys this block can see: [kv_start, kv_end), from its first and last query rows (and
    # the end of an image a row sits in).
    first_pos = context_len + local_block * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    last_key_pos = context_len + query_pos
    if HAS_SPANS:
        span_end = tl.load(span_end_ptr + token, mask=row_mask, other=0)
        last_key_pos = tl.maximum(last_key_pos, span_end - 1)
        kv_end = tl.minimum(seq_len, tl.maximum(kv_end, tl.max(span_end, axis=0)))
    kv_start = 0
    if SLIDING_WINDOW > 0:
        kv_start = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0)
    tile_lo = kv_start // TILE_SIZE
    tile_hi = (kv_end + TILE_SIZE - 1) // TILE_SIZE
    if NUM_SEGMENTS > 1:
        tiles_per_segment = (tile_hi - tile_lo + NUM_SEGMENTS - 1) // NUM_SEGMENTS
        tile_lo = tile_lo + segment * tiles_per_segment
        tile_hi = tl.minimum(tile_hi, tile_lo + tiles_per_segment)

    acc = tl.full([BLOCK_M, HEAD_DIM_P], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    if USE_SINKS:
        if segment == 0:
            sink = tl.load(sinks_ptr + head, mask=row_mask, other=float("-inf"))
            m_i = sink.to(tl.float32) * 1.4426950408889634      # log2 domain, as the scores
            l_i = tl.where(row_mask, 1.0, 0.0)
    acc, m_i, l_i = _tile_loop(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table_ptr + r.to(tl.int64) * stride_bt,
        kv_head, tile_lo, tile_hi, kv_end, context_len + query_pos, last_key_pos, qk_scale,
        softcap, stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h,
        HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, TILE_SIZE, SLIDING_WINDOW, DOT_PRECISION, KV_FP8,
        USE_SOFTCAP)
    if KV_FP8:
        acc = acc * v_scale

    io_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]     # padding rows have l = 0
        tl.store(out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # partials: [num_tokens, NUM_HEADS, NUM_SEGMENTS] (+ HEAD_DIM_P for the output)
        row = (token * NUM_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(segm_max_ptr + row, m_i, mask=row_mask)
        tl.store(segm_sum_ptr + row, l_i, mask=row_mask)
        tl.store(segm_out_ptr + row[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=io_mask)


@jit
def _reduce_segments(
    out_ptr, segm_out_ptr, segm_max_ptr, segm_sum_ptr, query_start_loc_ptr, num_reqs,
    stride_o_t, stride_o_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    """Grid (num_tokens, num_heads): merge the segments' (max, sum, acc) into the output."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_reqs):   # padding tokens past the last request
        return
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM_P)
    row = (token.to(tl.int64) * NUM_HEADS + head) * NUM_SEGMENTS + offs_s
    m = tl.load(segm_max_ptr + row)
    m_all = tl.max(m, axis=0)
    weight = tl.exp2(m - m_all)                      # empty segments: exp2(-inf) = 0
    l_all = tl.sum(tl.load(segm_sum_ptr + row) * weight, axis=0)
    acc = tl.load(segm_out_ptr + row[:, None] * HEAD_DIM_P + offs_d[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / l_all
    tl.store(out_ptr + token.to(tl.int64) * stride_o_t + head * stride_o_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def paged_attention_triton(
    q: torch.Tensor,         # [T, H, D]
    k_cache: torch.Tensor,   # [NB, BS, K, D]
    v_cache: torch.Tensor,   # [NB, BS, K, D]
    attn: AttnMetadata, scale: float, sliding_window: int | None = None,
    out: torch.Tensor | None = None, *, tile_size: int | None = None,
    num_kv_splits: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    sinks: torch.Tensor | None = None,   # [H] float32
    softcap: float | None = None,
) -> torch.Tensor:           # [T, H, D]
    """One launch for the mixed batch. Split-KV rule (num_kv_splits=None): split when every row
    is a decode (max_query_len == 1) and num_reqs * num_kv_heads < SPLIT_KV_MAX_PROGRAMS, i.e.
    the plain grid would leave most SMs idle. It depends only on the batch shape, so a captured
    CUDA graph keeps a valid choice whatever the context lengths."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_reqs = attn.seq_lens.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    decode_only = attn.max_query_len <= 1
    block_m = max(16, triton.next_power_of_2(group))
    if not decode_only and attn.max_query_len >= 64:
        block_m = max(64, block_m)          # prefill: more rows per tile, more reuse of K/V
    block_q = block_m // group
    tile = tile_size or (16 if decode_only else 32)
    if num_kv_splits is None:
        small = num_reqs * num_kv_heads < SPLIT_KV_MAX_PROGRAMS
        num_kv_splits = SPLIT_KV_SEGMENTS if decode_only and small else 1
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    spans = None if decode_only else attn.image_span_end   # a decode sees all its keys anyway
    segm_out = segm_max = segm_sum = out                 # unused when not split
    if num_kv_splits > 1:
        segm_max = torch.empty(num_tokens, num_heads, num_kv_splits, dtype=torch.float32,
                               device=q.device)
        segm_sum = torch.empty_like(segm_max)
        segm_out = torch.empty(*segm_max.shape, head_dim_p, dtype=torch.float32, device=q.device)
    grid = (num_tokens // block_q + num_reqs, num_kv_heads, num_kv_splits)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, attn.block_table, attn.seq_lens, attn.query_start_loc,
        spans if spans is not None else attn.seq_lens,
        segm_out, segm_max, segm_sum, out if sinks is None else sinks.float(),
        scale * k_scale * _LOG2E, (softcap or 0.0) * _LOG2E, v_scale, num_reqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), attn.block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=block_size, TILE_SIZE=tile, BLOCK_Q=block_q, BLOCK_M=block_m,
        SLIDING_WINDOW=sliding_window or 0, NUM_SEGMENTS=num_kv_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn, HAS_SPANS=spans is not None,
        USE_SINKS=sinks is not None, USE_SOFTCAP=softcap is not None,
    )
    if num_kv_splits > 1:
        _reduce_segments[(num_tokens, num_heads)](
            out, segm_out, segm_max, segm_sum, attn.query_start_loc, num_reqs,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            NUM_SEGMENTS=num_kv_splits,
        )
    return out
