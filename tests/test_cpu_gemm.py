"""kernels/cpu_gemm.py through kernels.linear: oneDNN's packed float32 linear on CPU against
F.linear, the rows it takes (two or more) and the ones it leaves to F.linear, and repacking after
an in-place load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minserve import kernels
from minserve.kernels import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="torch built without oneDNN")


class _Owner:
    pass


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 67])
@pytest.mark.parametrize("in_f,out_f", [(64, 96), (57, 33), (576, 960)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, in_f, out_f, bias):
    torch.manual_seed(rows + in_f)
    x, w = torch.randn(rows, in_f), torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    owner = _Owner()
    got = kernels.linear(x, w, b, owner)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert hasattr(owner, "_onednn_weight") == (rows >= 2)   # one row stays on F.linear


def test_repacks_when_the_weight_changes_in_place():
    owner, x = _Owner(), torch.randn(4, 32)
    w = torch.randn(48, 32)
    kernels.linear(x, w, None, owner)
    with torch.no_grad():
        w.copy_(torch.randn(48, 32))                 # a reload: same storage, new values
    torch.testing.assert_close(kernels.linear(x, w, None, owner), F.linear(x, w))


def test_other_dtypes_and_shapes_use_f_linear():
    owner = _Owner()
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    out = kernels.linear(torch.randn(4, 16, dtype=torch.bfloat16), w, None, owner)
    assert out.dtype == torch.bfloat16 and not hasattr(owner, "_onednn_weight")
    x3 = torch.randn(2, 3, 16)
    torch.testing.assert_close(kernels.linear(x3, w.float(), None, owner), F.linear(x3, w.float()))
    assert not hasattr(owner, "_onednn_weight")


def test_inside_inference_mode_like_the_runner():
    owner, w = _Owner(), torch.randn(24, 16)
    with torch.inference_mode():
        got = kernels.linear(torch.randn(3, 16), w, None, owner)
    assert got.shape == (3, 24)
    x = torch.randn(3, 16)                           # the packed copy also serves outside it
    torch.testing.assert_close(kernels.linear(x, w, None, owner), F.linear(x, w))


def test_a_weight_made_under_inference_mode():
    owner = _Owner()
    with torch.inference_mode():
        w, x = torch.randn(24, 16), torch.randn(3, 16)
        torch.testing.assert_close(kernels.linear(x, w, None, owner), F.linear(x, w))


def test_row_counts_run_in_few_buckets():
    """Every row count runs at one of a few bucket sizes (oneDNN caches a primitive per row
    count), and the padded rows never reach the result."""
    buckets = {cpu_gemm.bucket_rows(m) for m in range(2, 257)}
    assert len(buckets) <= 20
    assert all(cpu_gemm.bucket_rows(m) >= m for m in range(2, 2000))
    assert all(cpu_gemm.bucket_rows(m) <= 1.5 * m + 2 for m in range(2, 2000))
    w, b, owner = torch.randn(24, 16), torch.randn(24), _Owner()
    for rows in (2, 3, 5, 17, 65, 257):
        x = torch.randn(rows, 16)
        got = kernels.linear(x, w, b, owner)
        assert got.shape == (rows, 24)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
