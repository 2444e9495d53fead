"""MXFP4 (gpt-oss's experts) on the CPU paths: the reference decode against the checkpoint
format as transformers dequantizes it, the native kernel (cpu_mxfp4.c: few rows from the blocks,
many rows through one dequantize) against the reference on mixed shapes, and the grouped MoE
path with MXFP4 stacks, biases and the clamped SwiGLU. The Triton kernels' checks run in the
interpreter (kernel_checks.py: mxfp4_gemm, mxfp4_fused_moe)."""
from __future__ import annotations

import pytest
import torch

from minserve import kernels
from minserve.kernels import cpu_native
from minserve.kernels.fused_moe import ExpertWeights, fused_experts_ref
from minserve.kernels.layer_ops import swiglu_oai_ref
from minserve.kernels.mxfp4 import (
    Mxfp4Experts,
    Mxfp4Weight,
    dequantize_mxfp4,
    mxfp4_gemm_cpu,
    mxfp4_gemm_ref,
)
from tests.tiny_gpt_oss import quantize_mxfp4


def _weight(n: int, k: int, seed: int) -> Mxfp4Weight:
    g = torch.Generator().manual_seed(seed)
    return Mxfp4Weight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                       torch.randint(118, 132, (n, k // 32), dtype=torch.uint8, generator=g))


def test_reference_decodes_the_checkpoint_format_as_transformers():
    """transformers' convert_moe_packed_tensors on [E, N, K/32, 16] blocks gives [E, K, N]."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = _weight(24, 96, 0)
    blocks = w.blocks.view(1, 24, 3, 16)
    want = convert_moe_packed_tensors(blocks, w.scales.view(1, 24, 3), dtype=torch.float32)
    torch.testing.assert_close(dequantize_mxfp4(w), want[0].t(), atol=0, rtol=0)
    # and the tests' quantizer round-trips values already on the grid
    dense = dequantize_mxfp4(w)
    b, s = quantize_mxfp4(dense)
    assert torch.equal(dequantize_mxfp4(Mxfp4Weight(b.flatten(-2), s)), dense)


@pytest.mark.skipif(not cpu_native.available(), reason="no C compiler for the native kernels")
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (3, 130, 2880), (4, 5, 32), (16, 64, 96),
                                   (17, 50, 256), (40, 33, 128)])
def test_native_gemm_matches_reference(m, n, k):
    w = _weight(n, k, m + n)
    x = torch.randn(m, k)
    bias = torch.randn(n) if m % 2 else None
    got = mxfp4_gemm_cpu(x, w, bias)
    assert got is not None
    torch.testing.assert_close(got, mxfp4_gemm_ref(x, w, bias), atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(kernels.mxfp4_gemm(x[None], w, bias)[0],
                               mxfp4_gemm_ref(x, w, bias), atol=2e-3, rtol=1e-4)


def test_without_the_native_library_the_reference_serves(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path))
    w, x = _weight(9, 64, 1), torch.randn(2, 64)
    assert mxfp4_gemm_cpu(x, w) is None
    torch.testing.assert_close(kernels.mxfp4_gemm(x, w), mxfp4_gemm_ref(x, w))
    assert kernels.mxfp4_supported(torch.device("cpu"))
    assert not kernels.mxfp4_supported(torch.device("meta"))


@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 4, 2), (9, 8, 4), (40, 16, 1)])
def test_grouped_moe_with_mxfp4_experts_matches_reference(tokens, num_experts, top_k):
    """The CPU path runs only the routed experts (ragged counts, some experts empty)."""
    torch.manual_seed(tokens)
    hidden, inter = 64, 96

    def stack(n, k):
        ws = [_weight(n, k, 10 * e + n) for e in range(num_experts)]
        return Mxfp4Experts(torch.stack([w.blocks for w in ws]),
                            torch.stack([w.scales for w in ws]))
    w13, w2 = stack(2 * inter, hidden), stack(hidden, inter)
    b13, b2 = torch.randn(num_experts, 2 * inter), torch.randn(num_experts, hidden)
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(num_experts // 2)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k), -1)

    def act(h):
        return swiglu_oai_ref(h, 1.702, 7.0)
    got = kernels.fused_experts(x, ExpertWeights(w13, w2, b13, b2), weights, ids, act)
    want = fused_experts_ref(x, dequantize_mxfp4(w13), dequantize_mxfp4(w2), weights, ids, act,
                             b13, b2)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-3)   # outputs reach 1e4


def test_swiglu_oai_matches_transformers():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=6,
                                         num_local_experts=1))
    x = torch.randn(5, 12) * 6          # past the clamp limit (7) on both sides
    torch.testing.assert_close(swiglu_oai_ref(x, 1.702, 7.0), experts._apply_gate(x))
