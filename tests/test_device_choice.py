"""Which implementation runs is kernels/' choice alone: no module outside kernels/ imports the
device paths (native C, oneDNN, the layer-op references), and the dispatched ops (norm,
activation, dense and output linears, the int weight layout) give their references' results
whichever path runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from minserve.kernels import cpu_native
from minserve.kernels.layer_ops import rms_norm_ref, silu_and_mul_ref
from minserve.kernels.quant_gemm import CpuInt4Weight, IntWeight, dequantize_int

from minserve import kernels
from tests.test_cpu_native import _int_weight, _q8_0_valued
from tests.test_imports import MODULES, _imports

DEVICE_PATHS = {"minserve.kernels.cpu_native", "minserve.kernels.cpu_gemm",
                "minserve.kernels.layer_ops", "minserve.kernels.jit"}


def test_only_kernels_import_the_device_paths():
    outside = {name: _imports(name, path) & DEVICE_PATHS for name, path in MODULES.items()
               if not name.startswith("minserve.kernels")}
    assert {name: found for name, found in outside.items() if found} == {}
    assert _imports("minserve.kernels.dispatch", MODULES["minserve.kernels.dispatch"]) \
        >= {"minserve.kernels.cpu_native", "minserve.kernels.cpu_gemm"}   # the check sees them


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows,dim", [(1, 576), (5, 64)])
def test_layer_ops_equal_their_references(monkeypatch, native, rows, dim):
    if not native:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    g = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    weight = torch.randn(dim, generator=g)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    out, res = kernels.rms_norm(x, weight, 1e-5, residual)
    want_out, want_res = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, want_out)
    assert torch.equal(res, want_res)
    gate_up = torch.randn(rows, 2 * dim, generator=g)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), silu_and_mul_ref(gate_up))


class _Owner:
    pass


@pytest.mark.parametrize("rows", [1, 3])
def test_the_output_layer_of_an_exactly_8_bit_weight(rows):
    w, x, owner = _q8_0_valued(), torch.randn(rows, 128), _Owner()
    torch.testing.assert_close(kernels.logits(x, w, owner), F.linear(x, w), atol=1e-4,
                               rtol=1e-4)
    assert (getattr(owner, "_int8_logits", (None, None))[1] is not None) == \
        cpu_native.available()
    dense = torch.randn(50, 128)
    torch.testing.assert_close(kernels.logits(x, dense, _Owner()), F.linear(x, dense),
                               atol=1e-4, rtol=1e-4)


def test_prepare_int_weight_picks_the_layout(monkeypatch):
    import minserve.kernels.dispatch as dispatch

    w = _int_weight(32, 64, 4, 32)
    x = torch.randn(2, 64)
    want = F.linear(x, dequantize_int(w))
    layouts = []
    for native, int4 in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(cpu_native, "available", lambda on=native: on and bool(
            cpu_native.library()))
        monkeypatch.setattr(dispatch, "cpu_int4_supported", lambda _w, on=int4: on)
        prepared = kernels.prepare_int_weight(w)
        layouts.append(type(prepared))
        atol = 0.05 if isinstance(prepared, CpuInt4Weight) else 1e-4   # bf16 activations
        torch.testing.assert_close(kernels.int_gemm(x, prepared), want, atol=atol, rtol=1e-2)
    native_layout = cpu_native.CpuIntWeight if cpu_native.library() else CpuInt4Weight
    assert layouts == [native_layout, CpuInt4Weight, IntWeight]
    dense = torch.randn(4, 4)
    assert kernels.prepare_int_weight(dense) is dense
    assert kernels.int_gemm_fast(torch.device("meta"))
    monkeypatch.setattr(cpu_native, "available", lambda: False)
    assert not kernels.int_gemm_fast(torch.device("cpu"))

