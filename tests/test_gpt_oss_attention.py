"""gpt-oss's attention sinks (one learned extra logit per head in each softmax denominator) on the
CPU paths: the plain-torch reference against transformers' eager formula on dense K/V, and the
native decode kernel (cpu_attention.c: sinks and sliding windows) against the reference, on
mixed batches. The Triton kernel's sink checks run in the interpreter (kernel_checks.py)."""
from __future__ import annotations

import pytest
import torch

from minserve import kernels
from minserve.kernels import cpu_native
from minserve.kernels.attention import paged_attention_ref
from tests.kernel_checks import make_batch

CASES = [(1, 37), (5, 18), (17, 40), (1, 1), (7, 39), (1, 16), (1, 33), (3, 90)]


def eager_with_sinks(q, k, v, sinks, scale, window):
    """transformers' GptOss eager_attention_forward for one request: q [Q, H, D], k/v [S, H, D]
    (kv heads already repeated), the query rows at the last Q positions."""
    num_q, seq_len = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    q_pos = torch.arange(seq_len - num_q, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    logits = torch.cat([scores, sinks.view(-1, 1, 1).expand(-1, num_q, 1)], dim=-1)
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return torch.einsum("hqs,shd->qhd", probs, v)


@pytest.mark.parametrize("group,window", [(1, None), (3, None), (4, 7), (2, 20)])
def test_reference_sinks_match_transformers_formula(group, window):
    torch.manual_seed(group)
    q, k_cache, v_cache, attn = make_batch(CASES, 2 * group, 2, 16, 16, torch.float32)
    sinks = torch.randn(2 * group) * 2
    got = paged_attention_ref(q, k_cache, v_cache, attn, 0.25, window, sinks=sinks)
    without = paged_attention_ref(q, k_cache, v_cache, attn, 0.25, window)
    assert not torch.allclose(got, without, atol=1e-3)     # the sinks do matter here
    qsl = attn.query_start_loc_host
    for r, (query_len, seq_len) in enumerate(CASES):
        blocks = attn.block_table[r].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, 1)
        want = eager_with_sinks(q[qsl[r]:qsl[r + 1]], k, v, sinks, 0.25, window)
        torch.testing.assert_close(got[qsl[r]:qsl[r + 1]], want, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_native.available(), reason="no C compiler for the native kernels")
@pytest.mark.parametrize("window,use_sinks", [(None, True), (7, False), (20, True), (1, True)])
@pytest.mark.parametrize("cases", [[(1, 37), (1, 1), (1, 90), (1, 20)],      # decode only
                                   [(1, 37), (5, 18), (1, 90), (17, 40)]])  # mixed
def test_native_decode_rows_with_sinks_and_window(cases, window, use_sinks):
    torch.manual_seed(len(cases) + (window or 0))
    q, k_cache, v_cache, attn = make_batch(cases, 8, 2, 64, 16, torch.float32)
    sinks = torch.randn(8) * 2 if use_sinks else None
    out = torch.full_like(q, float("nan"))
    got = kernels.paged_attention(q, k_cache, v_cache, attn, 0.125, window, out=out,
                                  sinks=sinks)
    assert got is out and not got.isnan().any()
    want = paged_attention_ref(q, k_cache, v_cache, attn, 0.125, window, sinks=sinks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # the kernel itself ran: called directly on the decode rows it gives the same rows
    if all(ql == 1 for ql, _ in cases):
        direct = torch.full_like(q, float("nan"))
        assert cpu_native.decode_attention(q, k_cache, v_cache, attn.block_table, attn.seq_lens,
                                           0.125, direct, window, sinks)
        torch.testing.assert_close(direct, want, atol=2e-5, rtol=1e-5)
