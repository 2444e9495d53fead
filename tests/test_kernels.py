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
from minserve.kernels.rotary import make_cos_sin_cache, rotary_ref

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


def test_rotary_ref_matches_hf_rotate_half():
    # The reference itself against HF Llama: q * cos + rotate_half(q) * sin, cos/sin = [f | f].
    torch.manual_seed(11)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos_sin_cache = make_cos_sin_cache(inv_freq, 32)
    positions = torch.tensor([0, 3, 31])
    q, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    cos = cos_sin_cache[positions, :8].repeat(1, 2)[:, None]
    sin = cos_sin_cache[positions, 8:].repeat(1, 2)[:, None]

    def rotate_half(x):
        return torch.cat([-x[..., 8:], x[..., :8]], dim=-1)

    want_q, want_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    rotary_ref(positions, q, k, cos_sin_cache)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)


def test_dispatch_uses_refs_on_cpu():
    import minserve.kernels as kernels

    x = torch.randn(4, 2, 6)
    assert not kernels.triton_enabled(x)
    out, h = kernels.rms_norm(x, torch.ones(6), 1e-6, residual=torch.ones_like(x))
    torch.testing.assert_close(h, x + 1)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(4, 2), atol=1e-4, rtol=1e-4)
    y = kernels.silu_and_mul(x)
    torch.testing.assert_close(y, torch.nn.functional.silu(x[..., :3]) * x[..., 3:])
