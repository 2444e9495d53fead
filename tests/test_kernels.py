"""Each Triton kernel against its plain-torch reference on CPU, in Triton's interpreter, at tiny
sizes with fresh random inputs and NaN-poisoned outputs (checks in tests/kernel_checks.py).
The checks run in ONE child process started with TRITON_INTERPRET=1: @triton.jit reads the flag
when it decorates, and triton decorates its own tl.max/tl.sum at import, so an in-process switch
breaks whenever another test imported triton first, and would leak into later GPU tests."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from tests.kernel_checks import CHECKS  # noqa: E402  (imports triton in compiled mode: fine)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kernel_checks.py")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"kernel checks crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_matches_reference(interpreter_results, name):
    error = interpreter_results.get(name, "check did not run")
    if error is not None:
        pytest.fail(error, pytrace=False)


def test_dispatch_uses_refs_on_cpu():
    import minserve.kernels as kernels
    from minserve.kernels.attention import paged_attention_ref

    from tests.kernel_checks import make_batch

    torch.manual_seed(3)
    q, k_cache, v_cache, attn = make_batch([(1, 37), (5, 18)], 4, 2, 16, 16, torch.float32)
    assert not kernels.triton_enabled(q)
    out = torch.full_like(q, float("nan"))
    assert kernels.paged_attention(q, k_cache, v_cache, attn, 0.25, out=out) is out
    torch.testing.assert_close(out, paged_attention_ref(q, k_cache, v_cache, attn, 0.25))


@pytest.mark.parametrize("group,window,dtype", [(1, None, torch.float32), (3, None, torch.float32),
                                                (4, 7, torch.float32), (2, None, torch.bfloat16)])
def test_attention_ref_matches_dense_attention(group, window, dtype):
    """The reference itself against torch's dense SDPA, request by request on contiguous K/V:
    decodes, a chunk starting mid-prompt, a prefix hit, a one-token prompt, GQA, a window."""
    from minserve.kernels.attention import paged_attention_ref

    from tests.kernel_checks import make_batch

    torch.manual_seed(group)
    cases = [(1, 37), (5, 18), (17, 40), (1, 1), (7, 39), (1, 16), (1, 33)]
    q, k_cache, v_cache, attn = make_batch(cases, 2 * group, 2, 16, 16, dtype)
    got = paged_attention_ref(q, k_cache, v_cache, attn, 0.25, window)
    qsl = attn.query_start_loc_host
    for r, (query_len, seq_len) in enumerate(cases):
        blocks = attn.block_table[r].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        mask = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[qsl[r]:qsl[r + 1]].float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=0.25).transpose(0, 1)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[qsl[r]:qsl[r + 1]].float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("group,window", [(1, None), (3, 7)])
def test_attention_ref_softcap_matches_dense_attention(group, window):
    """Gemma's attn_logit_softcapping in the reference (its decode and longer-query paths)
    against the logits capped by hand: softmax(cap * tanh(scale * q.k / cap)) over the mask."""
    from minserve.kernels.attention import paged_attention_ref

    from tests.kernel_checks import make_batch

    torch.manual_seed(group)
    cases = [(1, 37), (5, 18), (17, 40), (1, 1)]
    q, k_cache, v_cache, attn = make_batch(cases, 2 * group, 2, 16, 16, torch.float32)
    got = paged_attention_ref(q, k_cache, v_cache, attn, 0.5, window, softcap=1.5)
    qsl = attn.query_start_loc_host
    for r, (query_len, seq_len) in enumerate(cases):
        blocks = attn.block_table[r].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, 1)
        q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        mask = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
        logits = torch.einsum("qhd,shd->hqs", q[qsl[r]:qsl[r + 1]], k) * 0.5
        logits = (1.5 * torch.tanh(logits / 1.5)).masked_fill(~mask, float("-inf"))
        want = torch.einsum("hqs,shd->qhd", logits.softmax(-1), v)
        torch.testing.assert_close(got[qsl[r]:qsl[r + 1]], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pad", [False, True])
def test_store_kv_ref_writes_each_token_to_its_slot(pad):
    """With and without padding tokens (slot -1), from strided k/v views of a fused qkv."""
    from minserve.kernels.cache import store_kv_ref

    torch.manual_seed(3)
    k_cache, v_cache = torch.zeros(4, 8, 2, 5), torch.zeros(4, 8, 2, 5)
    qkv = torch.randn(6, 6, 5)
    k, v = qkv[:, 2:4], qkv[:, 4:]
    slots = torch.randperm(32)[:6]
    if pad:
        slots[[1, 4]] = -1
    store_kv_ref(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 5), v_cache.view(-1, 2, 5)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[t]) and torch.equal(flat_v[slot], v[t])
    assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == int((slots >= 0).sum())


@pytest.mark.parametrize("window", [None, 3])
def test_attention_ref_image_spans_match_dense_attention(window):
    """Image tokens see their whole image (AttnMetadata.image_span_end): the reference against
    dense SDPA with the mask written out, and the CPU dispatch (native decode rows beside the
    reference's) against the reference."""
    import minserve.kernels as kernels
    from minserve.kernels.attention import paged_attention_ref

    from tests.kernel_checks import SPAN_CASES, SPAN_IMAGES, image_span_end, make_batch

    torch.manual_seed(11)
    q, k_cache, v_cache, attn = make_batch(SPAN_CASES, 4, 2, 16, 16, torch.float32)
    attn.image_span_end = image_span_end(SPAN_CASES, SPAN_IMAGES)
    got = paged_attention_ref(q, k_cache, v_cache, attn, 0.25, window)
    qsl, extended = attn.query_start_loc_host, 0
    for r, (query_len, seq_len) in enumerate(SPAN_CASES):
        blocks = attn.block_table[r].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(2, 1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(2, 1)
        q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        ends = attn.image_span_end[qsl[r]:qsl[r + 1], None]
        mask = ((k_pos <= q_pos) | (k_pos < ends)) & ((k_pos > q_pos - window) if window else True)
        extended += not torch.equal(mask, (k_pos <= q_pos) & mask)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[qsl[r]:qsl[r + 1]].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=0.25).transpose(0, 1)
        torch.testing.assert_close(got[qsl[r]:qsl[r + 1]], want, atol=2e-5, rtol=2e-5)
    assert extended == 3            # the chunks holding images' tokens before their last one
    out = kernels.paged_attention(q, k_cache, v_cache, attn, 0.25, window)
    torch.testing.assert_close(out, got, atol=2e-5, rtol=2e-5)
