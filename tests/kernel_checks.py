"""The Triton-vs-reference checks behind tests/test_kernels.py, meant to run in a process that
set TRITON_INTERPRET=1 before triton was imported (the interpreter cannot take over kernels, or
triton's own tl.max/tl.sum, decorated earlier). Run directly to debug one check:
    TRITON_INTERPRET=1 python tests/kernel_checks.py 'attention_mixed[group=5,bs=64,split=4]'"""
from __future__ import annotations

import json
import sys
import traceback

import torch
from minserve.kernels import attention, cache, lora
from minserve.kernels.attention import AttnMetadata, paged_attention_ref

MIXED = [(1, 37), (5, 18), (17, 40)]          # (query_len, seq_len) per request
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CHECKS: dict[str, object] = {}


def check(name: str):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


def make_batch(cases, num_heads, num_kv_heads, head_dim, block_size, dtype, *,
               num_pad_tokens=0, first_block=0):
    """Random q, caches and metadata; each request gets shuffled, non-contiguous blocks."""
    qsl, seq_lens = [0], []
    for query_len, seq_len in cases:
        qsl.append(qsl[-1] + query_len)
        seq_lens.append(seq_len)
    max_blocks = max(1, max(-(-s // block_size) for s in seq_lens))
    num_used = len(cases) * max_blocks
    num_blocks = first_block + num_used + 3
    # torch.empty: a huge cache (first_block > 0) only commits the pages the blocks touch.
    k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    k_cache[first_block:] = torch.randn(num_used + 3, block_size, num_kv_heads, head_dim)
    v_cache[first_block:] = torch.randn(num_used + 3, block_size, num_kv_heads, head_dim)
    block_table = (first_block + torch.randperm(num_used + 3)[:num_used]).view(len(cases), -1)
    num_tokens = qsl[-1] + num_pad_tokens
    attn = AttnMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table.to(torch.int32),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
        max_query_len=max(q for q, _ in cases), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=seq_lens)
    q = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
    return q, k_cache, v_cache, attn


def image_span_end(cases, images, num_pad_tokens=0) -> torch.Tensor:
    """[T] int32 for AttnMetadata.image_span_end: images[r] lists request r's images as
    (start, end) absolute positions; a query token inside one gets its end, others 0."""
    out = []
    for (query_len, seq_len), spans in zip(cases, images, strict=True):
        for pos in range(seq_len - query_len, seq_len):
            out.append(next((end for start, end in spans if start <= pos < end), 0))
    return torch.tensor(out + [0] * num_pad_tokens, dtype=torch.int32)


def check_attention(cases, *, group=2, num_kv_heads=2, head_dim=16, block_size=16,
                    dtype=torch.float32, sliding_window=None, tile_size=32, num_kv_splits=1,
                    num_pad_tokens=0, first_block=0, seed=0, images=None, use_sinks=False,
                    softcap=None):
    torch.manual_seed(seed)
    q, k_cache, v_cache, attn = make_batch(cases, group * num_kv_heads, num_kv_heads, head_dim,
                                           block_size, dtype, num_pad_tokens=num_pad_tokens,
                                           first_block=first_block)
    if images is not None:
        attn.image_span_end = image_span_end(cases, images, num_pad_tokens)
    scale = head_dim ** -0.5
    # sinks around the scores' size (std 2): some heads' sinks dominate, some vanish
    sinks = torch.randn(group * num_kv_heads) * 2 if use_sinks else None
    out = torch.full_like(q, float("nan"))        # poisoned: unwritten rows fail
    got = attention.paged_attention_triton(
        q, k_cache, v_cache, attn, scale, sliding_window, out=out, tile_size=tile_size,
        num_kv_splits=num_kv_splits, sinks=sinks, softcap=softcap)
    assert got is out
    want = paged_attention_ref(q, k_cache, v_cache, attn, scale, sliding_window, sinks=sinks,
                               softcap=softcap)
    n = attn.query_start_loc_host[-1]
    assert not out[:n].isnan().any(), "kernel left output rows unwritten"
    torch.testing.assert_close(out[:n].float(), want[:n].float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert out[n:].isnan().all(), "kernel wrote past the last request"


# MHA, a GQA group that divides the tile's 16 rows (4 tokens x 4 heads) and one that leaves a
# padded row (5: 3 tokens x 5 heads + 1); group 2, the default of the checks below, divides
# them as 4 does: in this grid it would add time (the interpreter is slow), not a case
for _group in (1, 4, 5):
    for _bs in (16, 64):                       # below and above the 32-token tile
        for _split in (1, 4):
            check(f"attention_mixed[group={_group},bs={_bs},split={_split}]")(
                lambda g=_group, bs=_bs, sp=_split: check_attention(
                    MIXED, group=g, block_size=bs, num_kv_splits=sp, seed=g * 100 + bs + sp))

for _split in (1, 4):
    check(f"attention_fp16[split={_split}]")(lambda sp=_split: check_attention(
        MIXED, group=4, dtype=torch.float16, num_kv_splits=sp, seed=1))
    for _window in (1, 7, 20):
        check(f"attention_sliding_window[window={_window},split={_split}]")(
            lambda w=_window, sp=_split: check_attention(
                MIXED + [(3, 90)], sliding_window=w, num_kv_splits=sp, seed=w))
    # block * block_stride > 2^31 elements: offsets must be int64 (fp16 cache of ~4 GiB
    # virtual memory, of which only the touched blocks are ever committed).
    check(f"attention_block_index_past_int32[split={_split}]")(lambda sp=_split: check_attention(
        [(1, 37), (3, 20)], group=1, num_kv_heads=1, dtype=torch.float16, num_kv_splits=sp,
        first_block=2 ** 31 // (16 * 16) + 1, seed=6))


# Images attending both ways (Gemma 3): a decode beside them; a chunk ending with an image; two
# images in one chunk, the second ending the chunk; an image begun in the cache (a prefix hit
# inside it); a one-token chunk that is an image's last token; with GQA, both block sizes, a
# sliding window shorter than an image, and fp16.
SPAN_CASES = [(1, 37), (5, 18), (17, 40), (7, 39), (1, 9)]
SPAN_IMAGES = [[], [(14, 18)], [(24, 30), (33, 40)], [(30, 36)], [(4, 9)]]
for _group in (1, 3):
    for _bs in (16, 64):
        check(f"attention_image_spans[group={_group},bs={_bs}]")(
            lambda g=_group, bs=_bs: check_attention(SPAN_CASES, group=g, block_size=bs,
                                                     images=SPAN_IMAGES, seed=g + bs))
check("attention_image_spans_window_fp16")(lambda: check_attention(
    SPAN_CASES, group=2, dtype=torch.float16, sliding_window=4, images=SPAN_IMAGES, seed=9))
check("attention_image_spans_long_prefill")(lambda: check_attention(
    [(70, 80), (1, 20)], group=2, images=[[(12, 40), (41, 80)], []], num_pad_tokens=2,
    tile_size=16, seed=10))

# gpt-oss's attention sinks: with and without a window, split or not, GQA groups, block sizes
# below and above the tile, decode-only batches (the split rule), padding, fp16
for _group, _bs, _window in ((1, 16, None), (4, 64, None), (2, 16, 7), (5, 64, 20)):
    for _split in (1, 4):
        check(f"attention_sinks[group={_group},bs={_bs},window={_window},split={_split}]")(
            lambda g=_group, bs=_bs, w=_window, sp=_split: check_attention(
                MIXED + [(3, 90)], group=g, block_size=bs, sliding_window=w, num_kv_splits=sp,
                use_sinks=True, seed=g + bs + (w or 0) + sp))
check("attention_sinks_decode_fp16_padding")(lambda: (
    check_attention([(1, 37), (1, 1), (1, 70)], group=4, dtype=torch.float16, num_kv_splits=4,
                    use_sinks=True, seed=11),
    check_attention([(1, 37), (0, 0), (4, 9)], head_dim=24, num_pad_tokens=3, use_sinks=True,
                    sliding_window=5, seed=12)))
# both at once: sinks with image spans (the two kernel features share the softmax start)
check("attention_sinks_with_image_spans")(lambda: check_attention(
    SPAN_CASES, group=2, block_size=16, images=SPAN_IMAGES, use_sinks=True, seed=13))

# Gemma's attn_logit_softcapping: a cap of 1.5 bends the scaled logits (std ~1, the largest ~4);
# GQA, both block sizes, split decode, a window, fp16 with padding, and with sinks and images
for _group, _bs, _window, _split in ((1, 16, None, 1), (4, 64, 20, 4), (5, 16, 7, 1)):
    check(f"attention_softcap[group={_group},bs={_bs},window={_window},split={_split}]")(
        lambda g=_group, bs=_bs, w=_window, sp=_split: check_attention(
            MIXED + [(3, 90)], group=g, block_size=bs, sliding_window=w, num_kv_splits=sp,
            softcap=1.5, seed=20 + g + bs))
check("attention_softcap_fp16_decode_padding_sinks_images")(lambda: (
    check_attention([(1, 37), (1, 1), (1, 70)], group=4, dtype=torch.float16, num_kv_splits=4,
                    softcap=2.0, seed=21),
    check_attention([(1, 37), (0, 0), (4, 9)], head_dim=24, num_pad_tokens=3, softcap=1.5,
                    use_sinks=True, seed=22),
    check_attention(SPAN_CASES, group=2, images=SPAN_IMAGES, softcap=1.5, seed=23)))


@check("attention_one_token_prompt_and_prefix_hit")
def _():
    # (1, 1): a one-token prompt; (7, 39): 32 cached tokens (two full blocks) then 7 new ones.
    check_attention([(1, 1), (7, 39), (1, 2)], seed=2)


@check("attention_odd_head_dim_and_padding")
def _():
    # head_dim 24 is padded to 32 in the tile; a query_len-0 request and trailing padding
    # tokens (a CUDA-graph padded batch) must produce nothing.
    check_attention([(1, 37), (0, 0), (4, 9)], head_dim=24, num_pad_tokens=3, seed=3)
    check_attention([(1, 37), (0, 0), (1, 9)], head_dim=24, num_pad_tokens=3, num_kv_splits=4,
                    seed=3)


@check("attention_prefill_defaults")
def _():
    # max_query_len >= 64 switches the launcher to BLOCK_M = 64; default tile and split choice.
    torch.manual_seed(4)
    q, k_cache, v_cache, attn = make_batch([(66, 70), (1, 20)], 2, 1, 16, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    attention.paged_attention_triton(q, k_cache, v_cache, attn, 0.25, out=out)
    torch.testing.assert_close(out, paged_attention_ref(q, k_cache, v_cache, attn, 0.25))


@check("attention_decode_rule_splits")
def _():
    torch.manual_seed(5)
    grids, reduce = [], attention._reduce_segments

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return reduce[grid]

    attention._reduce_segments = Recorder()
    try:
        q, k_cache, v_cache, attn = make_batch([(1, 50), (1, 3)], 4, 2, 16, 16, torch.float32)
        out = attention.paged_attention_triton(q, k_cache, v_cache, attn, 0.25)
    finally:
        attention._reduce_segments = reduce
    assert grids, "a small decode-only batch should take the split-KV path"
    torch.testing.assert_close(out, paged_attention_ref(q, k_cache, v_cache, attn, 0.25))


for _dtype in (torch.float32, torch.float16, torch.bfloat16):
    @check(f"store_kv[{_dtype}]")
    def _(dtype=_dtype):
        torch.manual_seed(7)
        num_tokens, num_kv_heads, head_dim, block_size = 9, 3, 24, 16
        k_cache = torch.randn(5, block_size, num_kv_heads, head_dim).to(dtype)
        v_cache = torch.randn_like(k_cache)
        # k, v as strided views of a fused qkv buffer, as the models produce them.
        qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim).to(dtype)
        k, v = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:3 * num_kv_heads]
        slots = torch.randperm(5 * block_size)[:num_tokens]
        slots[[2, 5]] = -1
        want_k, want_v = k_cache.clone(), v_cache.clone()
        cache.store_kv_ref(k, v, want_k, want_v, slots)
        cache.store_kv_triton(k, v, k_cache, v_cache, slots)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@check("store_kv_slot_past_int32")
def _():
    torch.manual_seed(8)
    block_size, head_dim = 16, 16
    num_blocks = 2 ** 31 // (block_size * head_dim) + 4
    k_cache = torch.empty(num_blocks, block_size, 1, head_dim, dtype=torch.float16)
    v_cache = torch.empty_like(k_cache)
    k, v = torch.randn(3, 1, head_dim).half(), torch.randn(3, 1, head_dim).half()
    slots = torch.tensor([(num_blocks - 2) * block_size + 5, -1, (num_blocks - 1) * block_size])
    cache.store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 1, head_dim)[slots[0]], k[0])
    assert torch.equal(v_cache.view(-1, 1, head_dim)[slots[2]], v[2])


# ---- fp8 KV cache (--kv-cache-dtype fp8): caches hold k / k_scale, v / v_scale in e4m3 ----
for _dtype in (torch.float32, torch.float16):
    for _split in (1, 4):
        @check(f"attention_fp8_kv[{_dtype},split={_split}]")
        def _(dtype=_dtype, split=_split):
            from minserve.kernels.cache import to_cache

            torch.manual_seed(13)
            q, k_cache, v_cache, attn = make_batch(MIXED, 4, 2, 16, 16, torch.float32)
            k_scale, v_scale = 0.02, 0.05
            k8 = to_cache(k_cache, torch.float8_e4m3fn, k_scale)
            v8 = to_cache(v_cache, torch.float8_e4m3fn, v_scale)
            q = q.to(dtype)
            out = torch.full_like(q, float("nan"))
            attention.paged_attention_triton(q, k8, v8, attn, 0.25, out=out,
                                             num_kv_splits=split, k_scale=k_scale,
                                             v_scale=v_scale)
            want = paged_attention_ref(q, k8, v8, attn, 0.25, None, k_scale, v_scale)
            tol = TOL[dtype] if dtype != torch.float32 else 1e-4
            torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


@check("store_kv_fp8")
def _():
    # NOTE: Triton 3.9's interpreter rounds fp32 -> e4m3 wrongly when rounding up crosses a power
    # of two (124 -> 64, not 128), so the inputs are e4m3 values times power-of-two scales
    # (nothing to round), plus values past 448 * scale that must saturate rather than NaN.
    torch.manual_seed(14)
    k_cache = torch.zeros(4, 16, 2, 24, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    k_scale, v_scale = 0.0625, 0.25
    k = (torch.randn(9, 2, 24) * 50).to(torch.float8_e4m3fn).float() * k_scale
    v = (torch.randn(9, 2, 24) * 50).to(torch.float8_e4m3fn).float() * v_scale
    k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448 * k_scale, 30.0])
    slots = torch.randperm(64)[:9]
    slots[3] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    cache.store_kv_ref(k, v, want_k, want_v, slots, k_scale, v_scale)
    cache.store_kv_triton(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(k_cache.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))
    assert want_k.float().abs().max() == 448.0 and not want_k.float().isnan().any()


# ---- weight-only int GEMM and FP8 GEMM (kernels/quant_gemm.py, kernels/fp8_gemm.py) ----
# (bits, group_size, M, N, K, act_order, dtype): group sizes 16 (GGUF Q6_K) to 128 and per-channel
# (None), M = 1 (decode: split-K path), 17 (middle tiles) and 100 (prefill tiles), N and K that
# are not multiples of the tiles, act-order permutations.
INT_GEMM_CASES = [
    (4, 32, 1, 37, 96, False, torch.float16), (4, 64, 100, 64, 192, True, torch.float32),
    (4, 128, 1, 130, 256, True, torch.float16), (8, 32, 100, 48, 128, False, torch.float16),
    (8, 128, 1, 33, 384, False, torch.float32), (4, None, 17, 50, 64, False, torch.float32),
    (8, 16, 5, 24, 64, True, torch.float16),
]
for _case in INT_GEMM_CASES:
    @check("int_gemm[bits={},group={},M={},N={},K={},act_order={},{}]".format(*_case))
    def _(case=_case):
        from minserve.kernels.quant_gemm import IntWeight, int_gemm_ref, int_gemm_triton, pack_int

        bits, group, m, n, k, act_order, dtype = case
        group = group or k
        torch.manual_seed(m * n + k)
        q = torch.randint(0, 2 ** bits, (k, n))
        scales = (torch.rand(k // group, n) * 0.05 + 0.01).to(dtype)
        bias = (torch.randn(k // group, n) * 0.1).to(dtype)
        perm = torch.randperm(k) if act_order else None
        w = IntWeight(pack_int(q, bits), scales, bias, bits, group, perm)
        x = torch.randn(m, k).to(dtype)
        got, want = int_gemm_triton(x, w), int_gemm_ref(x, w)
        tol = TOL[dtype] if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

# (M, N, K, block, dtype); block None = per-tensor, (1, K) = per-channel
FP8_GEMM_CASES = [
    (1, 48, 64, None, torch.float16), (100, 37, 96, "channel", torch.float32),
    (3, 200, 320, "128x128", torch.float16), (17, 64, 128, "64x32", torch.float32),
]
for _case in FP8_GEMM_CASES:
    @check("fp8_gemm[M={},N={},K={},block={},{}]".format(*_case))
    def _(case=_case):
        from minserve.kernels.fp8_gemm import (
            FP8_DTYPE,
            Fp8Weight,
            fp8_gemm_ref,
            fp8_gemm_triton,
        )

        m, n, k, block, dtype = case
        block = {None: (n, k), "channel": (1, k)}.get(block) or tuple(map(int, block.split("x")))
        torch.manual_seed(m + n + k)
        scale = torch.rand(-(-n // block[0]), -(-k // block[1])) * 0.01 + 1e-3
        w = Fp8Weight((torch.randn(n, k) * 30).to(FP8_DTYPE), scale, block)
        x = torch.randn(m, k).to(dtype)
        got, want = fp8_gemm_triton(x, w), fp8_gemm_ref(x, w)
        tol = TOL[dtype] if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


# ---- MXFP4 (gpt-oss's experts, kernels/mxfp4.py): (M, N, K, bias, dtype); K one group (32),
# ragged against the 64-wide tiles, scales spread over 2^-6 .. 2^3 (e8m0 121 .. 130); no bf16:
# Triton's interpreter gets bf16 tl.dot wrong (a 16x16 bf16 dot came out off by ~1e10)
MXFP4_GEMM_CASES = [(1, 37, 64, False, torch.float32), (17, 130, 96, True, torch.float32),
                    (100, 64, 32, False, torch.float16), (3, 200, 320, True, torch.float16)]
for _case in MXFP4_GEMM_CASES:
    @check("mxfp4_gemm[M={},N={},K={},bias={},{}]".format(*_case))
    def _(case=_case):
        from minserve.kernels.mxfp4 import Mxfp4Weight, mxfp4_gemm_ref, mxfp4_gemm_triton

        m, n, k, has_bias, dtype = case
        g = torch.Generator().manual_seed(m + n + k)
        w = Mxfp4Weight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                        torch.randint(121, 131, (n, k // 32), dtype=torch.uint8, generator=g))
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g) if has_bias else None
        got, want = mxfp4_gemm_triton(x, w, bias), mxfp4_gemm_ref(x, w, bias)
        tol = TOL[dtype] if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(got.float(), want.float(), atol=tol * 8, rtol=tol)


# gpt-oss's experts through the fused MoE kernel (kernels/fused_moe.py, FORMAT 3): MXFP4 stacks,
# biases, the clamped SwiGLU over interleaved gate|up; (tokens, experts, top_k, H, I, dtype),
# tokens routed to a few experts only (others get none), against the plain-torch reference
MXFP4_MOE_CASES = [(1, 4, 2, 64, 32, torch.float32), (7, 8, 4, 96, 64, torch.float32),
                   (100, 32, 4, 64, 96, torch.float16), (33, 16, 1, 128, 32, torch.float32)]
for _case in MXFP4_MOE_CASES:
    @check("mxfp4_fused_moe[T={},E={},k={},H={},I={},{}]".format(*_case))
    def _(case=_case):
        from minserve.kernels.fused_moe import ExpertWeights, fused_experts_ref, \
            fused_experts_triton
        from minserve.kernels.layer_ops import swiglu_oai_ref
        from minserve.kernels.mxfp4 import Mxfp4Experts, dequantize_mxfp4

        tokens, num_experts, top_k, hidden, inter, dtype = case
        g = torch.Generator().manual_seed(tokens + num_experts)

        def stack(n, k):
            return Mxfp4Experts(
                torch.randint(0, 256, (num_experts, n, k // 2), dtype=torch.uint8, generator=g),
                torch.randint(118, 124, (num_experts, n, k // 32), dtype=torch.uint8, generator=g))
        w13, w2 = stack(2 * inter, hidden), stack(hidden, inter)
        b13, b2 = torch.randn(num_experts, 2 * inter, generator=g), \
            torch.randn(num_experts, hidden, generator=g)
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        used = torch.randperm(num_experts, generator=g)[:max(top_k, num_experts // 2)]
        logits = torch.randn(tokens, len(used), generator=g)
        values, picked = logits.topk(top_k, dim=-1)
        ids, weights = used[picked], torch.softmax(values, dim=-1)
        act = lambda h: swiglu_oai_ref(h, 1.702, 7.0)        # noqa: E731
        got = fused_experts_triton(x, ExpertWeights(w13, w2, b13, b2), weights, ids, act)
        want = fused_experts_ref(x, dequantize_mxfp4(w13), dequantize_mxfp4(w2), weights, ids,
                                 act, b13, b2)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol * 10, rtol=tol)


def check_lora(slot_runs, *, num_slots=4, in_features=40, rank=16, out_features=24,
               dtype=torch.float32, seed=0, b_transposed=False):
    """shrink then expand (into a column slice of a wider output, as a fused qkv's), Triton vs
    the reference; slot_runs = [(slot, num_tokens), ...] in step order (-1: base tokens).
    b_transposed: B is a [S, N, R] view of B^T [S, R, N], as LoRASlots keep it."""
    torch.manual_seed(seed)
    slots = torch.cat([torch.full((n,), s) for s, n in slot_runs]).numpy()
    mapping = lora.lora_mapping(slots, torch.device("cpu"))
    T = len(slots)
    x = torch.randn(T, in_features).to(dtype)
    a = torch.randn(num_slots, rank, in_features).to(dtype) / 4
    b = torch.randn(num_slots, out_features, rank).to(dtype) / 4
    if b_transposed:
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    y_ref = torch.zeros(T, rank, dtype=dtype)
    y = torch.full((T, rank), float("nan"), dtype=dtype)
    lora.lora_shrink_ref(x, a, mapping, y_ref)
    lora.lora_shrink_triton(x, a, mapping, y)
    keep = torch.from_numpy(slots >= 0)
    tol = TOL[dtype]
    torch.testing.assert_close(y[keep], y_ref[keep], atol=tol, rtol=tol)
    base = torch.randn(T, out_features + 8).to(dtype)
    want, got = base.clone(), base.clone()
    lora.lora_expand_ref(y_ref, b, mapping, want[:, 4:4 + out_features])
    lora.lora_expand_triton(y_ref, b, mapping, got[:, 4:4 + out_features])
    torch.testing.assert_close(got, want, atol=tol * 4, rtol=tol * 4)


_LORA_MIXED = [(2, 37), (0, 1), (-1, 1), (1, 1), (2, 1), (-1, 5), (1, 70), (3, 1)]
for _dtype in (torch.float32, torch.float16):
    @check(f"lora_mixed[{_dtype}]")
    def _(dtype=_dtype):
        check_lora(_LORA_MIXED, dtype=dtype)


@check("lora_rank_and_widths")
def _():
    # three slices' ranks stacked (48), widths that are not tile multiples, decode rows only
    check_lora([(0, 1), (3, 1), (-1, 1), (1, 1), (0, 1)], in_features=72, rank=48,
               out_features=130, seed=1)
    check_lora([(1, 3)], rank=8, out_features=16, seed=2)      # one adapter, every token
    check_lora([(-1, 4)], seed=3)                              # no adapter in the step
    check_lora(_LORA_MIXED, out_features=70, seed=4, b_transposed=True)   # LoRASlots' B^T


def run(names: list[str]) -> dict[str, str | None]:
    """name -> None when the check passed, else its traceback."""
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(attention._paged_attention_kernel, InterpretedFunction):
        sys.exit("set TRITON_INTERPRET=1 before running this file")
    results = run(sys.argv[1:] or list(CHECKS))
    for name, error in results.items():
        print(f"{'ok  ' if error is None else 'FAIL'} {name}", file=sys.stderr)
    print("RESULTS " + json.dumps(results))
