"""GGUF weights served from their blocks (kernels/gguf_blocks.py, kernels/cpu_gguf.c): the
native block GEMM and dequantizer against gguf-py's reference dequantizers, every type, on
mixed shapes and row counts (the few-row decode path and the prefill path past MAX_ROWS)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minserve import env, kernels
from minserve.kernels import cpu_native
from minserve.kernels.dispatch import CPU_REPACKED_GGUF
from minserve.kernels.gguf_blocks import QUANTIZED_TYPES, GgufBlockWeight, dequantize_ref

from tests.quant_packers import k_quant_blocks

needs_native = pytest.mark.skipif(not cpu_native.available(),
                                  reason="no C compiler for the native CPU kernels")


@pytest.fixture
def int8_activations(monkeypatch):
    """The serving default (tests/conftest.py runs the suite on exact activations)."""
    monkeypatch.setattr(env, "CPU_EXACT_ACTIVATIONS", False)


def _blocks(type_name: str, n: int, k: int, seed: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if type_name.endswith("_K"):
        return k_quant_blocks((n, k), type_name, 0.05, seed)
    rng = np.random.default_rng(seed)
    return quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32),
                    GGMLQuantizationType[type_name])


def _reference(raw: np.ndarray, type_name: str, n: int, k: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, k)).float()


SHAPES = {"small": [(1, 32), (5, 96), (67, 160)], "k": [(1, 256), (7, 512), (67, 768)]}


def _cases():
    for type_name in QUANTIZED_TYPES:
        for n, k in SHAPES["k" if type_name.endswith("_K") else "small"]:
            yield type_name, n, k


@pytest.mark.parametrize("type_name,n,k", list(_cases()))
def test_torch_reference_matches_gguf(type_name, n, k):
    raw = _blocks(type_name, n, k, seed=n)
    w = GgufBlockWeight(torch.from_numpy(raw), type_name, k)
    torch.testing.assert_close(dequantize_ref(w), _reference(raw, type_name, n, k),
                               rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("type_name,n,k", list(_cases()))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 65])
def test_block_gemm_matches_gguf(type_name, n, k, rows, monkeypatch, int8_activations):
    raw = _blocks(type_name, n, k, seed=n + rows)
    want_w = _reference(raw, type_name, n, k)
    w = GgufBlockWeight(torch.from_numpy(raw), type_name, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows))
    # the few-row path sees the int8 activations (cpu_native.int8_activations_ref)
    want = cpu_native.int8_activations_ref(x) @ want_w.T
    torch.testing.assert_close(kernels.int_gemm(x, w), want, atol=1e-4, rtol=1e-4)
    # and as the dispatch serves it on CPU (from the blocks, or repacked: CPU_REPACKED_GGUF)
    served = kernels.prepare_int_weight(w)
    assert isinstance(served, GgufBlockWeight) == (type_name not in CPU_REPACKED_GGUF)
    if type_name in CPU_REPACKED_GGUF:   # repacked: int_gemm's int8 rows go to 2 x FEW_ROWS
        want = cpu_native.int8_activations_ref(x, 2 * cpu_native.FEW_ROWS) @ want_w.T
    torch.testing.assert_close(kernels.int_gemm(x, served), want, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(env, "CPU_EXACT_ACTIVATIONS", True)
    torch.testing.assert_close(kernels.int_gemm(x, w), x @ want_w.T, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("type_name", QUANTIZED_TYPES)
def test_block_dequantize_is_exact(type_name):
    n, k = 9, 512
    raw = _blocks(type_name, n, k, seed=3)
    lib = cpu_native.library()
    w = GgufBlockWeight(torch.from_numpy(raw), type_name, k)
    out = torch.empty(n, k)
    lib.block_dequantize(w.blocks.data_ptr(), w.type_id, k, n, out.data_ptr(), 2)
    torch.testing.assert_close(out, _reference(raw, type_name, n, k), rtol=0, atol=0)


@needs_native
def test_block_gemm_bias_half_activations_and_leading_dims():
    raw = _blocks("Q4_K", 40, 256, seed=1)
    w = GgufBlockWeight(torch.from_numpy(raw), "Q4_K", 256)
    dense = _reference(raw, "Q4_K", 40, 256)
    x, bias = torch.randn(3, 2, 256), torch.randn(40)
    got = kernels.int_gemm(x, w, bias)
    assert got.shape == (3, 2, 40)
    torch.testing.assert_close(got, x @ dense.T + bias, atol=1e-4, rtol=1e-4)
    xb = x.to(torch.bfloat16)
    got = kernels.int_gemm(xb, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), xb.float() @ dense.T, atol=2e-2, rtol=2e-2)


def test_without_the_library_a_block_weight_is_repacked(monkeypatch):
    from minserve.kernels.quant_gemm import IntWeight, dequantize_int

    monkeypatch.setattr(cpu_native, "available", lambda: False)
    raw = _blocks("Q6_K", 4, 256, seed=2)
    w = kernels.prepare_int_weight(GgufBlockWeight(torch.from_numpy(raw), "Q6_K", 256))
    assert not isinstance(w, GgufBlockWeight)
    want = _reference(raw, "Q6_K", 4, 256)
    if isinstance(w, IntWeight):
        torch.testing.assert_close(dequantize_int(w), want, rtol=0, atol=0)
    x = torch.randn(2, 256)
    torch.testing.assert_close(kernels.int_gemm(x, w), x @ want.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("type_name,bound", [("Q4_K", 0.12), ("Q6_K", 0.03)])
def test_bench_k_quantizer_round_trips_through_gguf(type_name, bound):
    """bench/gguf_quantize.py's own Q4_K/Q6_K (gguf-py has none), for the Q4_K_M bench file:
    gguf-py's dequantizer reads back the values within round-to-nearest's error."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gguf_quantize.py")
    spec = importlib.util.spec_from_file_location("gguf_quantize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    w = (np.random.default_rng(0).standard_normal((6, 512)) * 0.05).astype(np.float32)
    raw = getattr(module, f"quantize_{type_name.lower()}")(w)
    back = _reference(raw, type_name, 6, 512).numpy()
    assert np.sqrt(((back - w) ** 2).mean()) / w.std() < bound
    assert module.q4_k_m_type("blk.0.attn_v.weight", 576) == "Q8_0"
    assert module.q4_k_m_type("blk.0.ffn_up.weight", 512) == "Q4_K"
