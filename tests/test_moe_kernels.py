"""The fused MoE kernels: the Triton grouped GEMMs against the plain-torch reference in Triton's
interpreter (one child process; tests/moe_kernel_checks.py), and on the CPU the grouped
per-expert path, the native grouped int GEMM, the routing variants and the stacking of
per-expert weights, against the same reference."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from minserve.kernels import cpu_native
from minserve.kernels import fused_moe as fm
from minserve.kernels.layer_ops import silu_and_mul_ref
from minserve.kernels.quant_gemm import IntWeight, pack_int

from minserve import kernels
from tests.moe_kernel_checks import CHECKS, make_stack

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "moe_kernel_checks.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"MoE kernel checks crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_matches_reference(interpreter_results, name):
    error = interpreter_results.get(name, "check did not run")
    if error is not None:
        pytest.fail(error, pytrace=False)


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, : num_experts // 4] -= 100              # some experts get no token
    return fm.select_experts(logits, top_k, "softmax_topk")


@pytest.mark.parametrize("fmt", ["dense", "int4", "int8", "fp8"])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (7, 16, 4), (90, 32, 8)])
def test_cpu_path_matches_reference(fmt, num_tokens, num_experts, top_k):
    """dispatch.fused_experts on CPU: the grouped path, int stacks in their native layout (one
    call; 90 tokens x 8 of 32 experts puts more than MAX_ROWS rows on some experts)."""
    gen = torch.Generator().manual_seed(num_tokens)
    w13, w2 = (make_stack(fmt, num_experts, n, k, torch.float32, gen, group=32)
               for n, k in ((128, 64), (64, 64)))
    b13, b2 = torch.randn(num_experts, 128, generator=gen), torch.randn(num_experts, 64,
                                                                           generator=gen)
    want_w = fm.dense_experts(w13), fm.dense_experts(w2)
    if fmt.startswith("int"):    # as the loader leaves them: prepare_int_weight, then stacked
        w13, w2 = (kernels.stack_experts([kernels.prepare_int_weight(s.expert(e))
                                          for e in range(num_experts)]) for s in (w13, w2))
        if cpu_native.available():
            assert isinstance(w13, cpu_native.CpuIntExperts)
    x = torch.randn(num_tokens, 64, generator=gen)
    weights, ids = _routing(num_tokens, num_experts, top_k, 1)
    got = kernels.fused_experts(x, fm.ExpertWeights(w13, w2, b13, b2), weights, ids)
    want = fm.fused_experts_ref(x, *want_w, weights, ids, silu_and_mul_ref, b13, b2)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_cpu_path_never_touches_an_unrouted_expert():
    """Experts no token chose are never multiplied: their weights here are NaN."""
    w13 = torch.randn(8, 32, 16)
    w2 = torch.randn(8, 16, 16)
    w13[[0, 1, 5]] = float("nan")
    w2[[0, 1, 5]] = float("nan")
    ids = torch.tensor([[2, 3], [7, 2], [4, 6]])
    weights = torch.full((3, 2), 0.5)
    got = kernels.fused_experts(torch.randn(3, 16), fm.ExpertWeights(fm.DenseExperts(w13),
                                                                     fm.DenseExperts(w2)),
                                weights, ids)
    assert bool(got.isfinite().all())


def test_expert_parallel_map_adds_only_local_experts():
    gen = torch.Generator().manual_seed(2)
    w13, w2 = torch.randn(8, 32, 16, generator=gen), torch.randn(8, 16, 16, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    weights, ids = _routing(5, 8, 3, 3)
    full = fm.fused_experts_ref(x, w13, w2, weights, ids, silu_and_mul_ref)
    halves = []
    for rank in range(2):
        expert_map = torch.full((8,), -1, dtype=torch.long)
        expert_map[rank * 4:(rank + 1) * 4] = torch.arange(4)
        local = fm.ExpertWeights(fm.DenseExperts(w13[rank * 4:(rank + 1) * 4]),
                                 fm.DenseExperts(w2[rank * 4:(rank + 1) * 4]),
                                 expert_map=expert_map)
        halves.append(kernels.fused_experts(x, local, weights, ids))
    torch.testing.assert_close(halves[0] + halves[1], full, atol=1e-5, rtol=1e-5)


def test_routing_variants():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 1.0]])
    w, ids = fm.select_experts(logits, 2, "softmax_topk")
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(w, probs.gather(1, ids))
    w_norm, _ = fm.select_experts(logits, 2, "softmax_topk_norm")
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(2))
    w_top, ids_top = fm.select_experts(logits, 2, "topk_softmax")
    assert ids_top.tolist() == ids.tolist()
    torch.testing.assert_close(w_top, w_norm)
    with pytest.raises(ValueError, match="unknown MoE router variant 'grouped'"):
        fm.select_experts(logits, 2, "grouped")


def test_stack_experts_picks_one_layout_or_a_list():
    dense = kernels.stack_experts([torch.randn(6, 4) for _ in range(3)])
    assert isinstance(dense, fm.DenseExperts) and dense.weight.shape == (3, 6, 4)
    q = torch.randint(0, 16, (64, 32))
    plain = IntWeight(pack_int(q, 4), torch.rand(2, 32), torch.rand(2, 32), 4, 32)
    perm = IntWeight(plain.qweight, plain.scales, plain.bias, 4, 32, torch.randperm(64))
    assert isinstance(kernels.stack_experts([plain, plain]), fm.IntExperts)
    mixed = kernels.stack_experts([plain, perm])       # act-order: no shared layout
    assert isinstance(mixed, fm.ExpertList) and mixed.expert(1) is perm
    x = torch.randn(3, 64)
    torch.testing.assert_close(kernels.dispatch.expert_gemm(x, mixed.expert(1)),
                               kernels.int_gemm(x, perm))


@pytest.mark.skipif(not cpu_native.available(), reason="no C compiler for the native kernels")
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (4, 128)])
def test_native_grouped_gemm_matches_one_gemm_per_expert(bits, group):
    """moe_int_gemm: groups of 1-5 and 70 rows (70 > MAX_ROWS: dequantize + sgemm), in any
    order of experts, rows of other groups left alone."""
    gen = torch.Generator().manual_seed(bits + group)
    n, k = 45, 256
    experts = [cpu_native.to_cpu_int(IntWeight(
        pack_int(torch.randint(0, 2 ** bits, (k, n), generator=gen), bits),
        torch.rand(k // group, n, generator=gen) * 0.1, torch.randn(k // group, n,
                                                                    generator=gen) * 0.1,
        bits, group)) for _ in range(6)]
    stack = kernels.stack_experts(experts)
    groups = [(4, 0, 1), (0, 1, 3), (5, 3, 8), (2, 8, 78)]
    x = torch.randn(78, k, generator=gen)
    got = cpu_native.moe_int_gemm(x, stack, groups)
    for e, start, end in groups:
        torch.testing.assert_close(got[start:end], cpu_native.int_gemm_ref(x[start:end],
                                                                           experts[e]),
                                   atol=2e-4, rtol=2e-4)
