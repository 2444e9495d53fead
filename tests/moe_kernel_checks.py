"""The fused MoE Triton kernel against its plain-torch reference, run by tests/test_moe_kernels.py
in ONE child process started with TRITON_INTERPRET=1 (see tests/test_kernels.py for why). Mixed
shapes: experts 4-128, top-k 1-8, tokens 1-512, ragged per-expert counts with experts that get
no token, dense / int4 / int8 / fp8-block stacks, expert biases, an expert-parallel map. Run one
directly to debug it:
    TRITON_INTERPRET=1 python tests/moe_kernel_checks.py 'fused_moe[E=8,k=2,T=17,int4,float16]'
bfloat16 is left out: Triton 3.9's interpreter gets tl.dot on bf16 wrong (a 16x16 bf16 dot is
off by 1e10), so bf16 can be checked on a GPU only."""
from __future__ import annotations

import json
import sys
import traceback

import torch
from minserve.kernels import fused_moe as fm
from minserve.kernels.layer_ops import silu_and_mul_ref
from minserve.kernels.quant_gemm import pack_int

CHECKS: dict[str, object] = {}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def make_stack(fmt: str, num_experts: int, n: int, k: int, dtype: torch.dtype,
               gen: torch.Generator, group: int = 16):
    """A random stack of num_experts [n, k] weights in `fmt` with O(1) outputs."""
    if fmt == "dense":
        return fm.DenseExperts((torch.randn(num_experts, n, k, generator=gen) / k ** 0.5)
                               .to(dtype))
    if fmt.startswith("int"):
        bits = int(fmt[3:])
        q = torch.randint(0, 2 ** bits, (num_experts, k, n), generator=gen)
        scale = torch.rand(num_experts, k // group, n, generator=gen) * 3.4 / k ** 0.5 / 2 ** bits
        return fm.IntExperts(torch.stack([pack_int(q[e], bits) for e in range(num_experts)]),
                             scale.to(dtype), (-scale * 2 ** (bits - 1)).to(dtype), bits, group)
    block = (16, 32)
    weight = (torch.randn(num_experts, n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(num_experts, -(-n // block[0]), -(-k // block[1]), generator=gen)
    return fm.Fp8Experts(weight, scale * 0.02 / k ** 0.5, block)


def check_fused_moe(num_experts: int, top_k: int, num_tokens: int, fmt: str = "dense",
                    dtype: torch.dtype = torch.float32, *, hidden: int = 32,
                    intermediate: int = 48, bias: bool = False, expert_parallel: bool = False,
                    skewed: bool = False, block_m: int | None = None, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skewed:    # a third of the experts never chosen, the rest ragged
        logits[:, : num_experts // 3] -= 100
        logits += torch.linspace(0, 3, num_experts)
    topk_weights, topk_ids = fm.select_experts(logits, top_k, "softmax_topk_norm")
    local, expert_map = num_experts, None
    if expert_parallel:     # this rank holds the second half
        local = num_experts // 2
        expert_map = torch.full((num_experts,), -1, dtype=torch.long)
        expert_map[local:] = torch.arange(local)
    w13 = make_stack(fmt, local, 2 * intermediate, hidden, dtype, gen)
    w2 = make_stack(fmt, local, hidden, intermediate, dtype, gen)
    b13 = torch.randn(local, 2 * intermediate, generator=gen).to(dtype) if bias else None
    b2 = torch.randn(local, hidden, generator=gen).to(dtype) if bias else None
    weights = fm.ExpertWeights(w13, w2, b13, b2, expert_map)
    want = fm.fused_experts_ref(x, fm.dense_experts(w13), fm.dense_experts(w2), topk_weights,
                                topk_ids, silu_and_mul_ref, b13, b2, expert_map)
    got = fm.fused_experts_triton(x, weights, topk_weights, topk_ids, silu_and_mul_ref, block_m)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# (experts, top_k, tokens, format, dtype, options)
CASES = [
    (4, 1, 1, "dense", torch.float32, {}),
    (8, 2, 17, "int4", torch.float16, {"skewed": True}),
    (8, 2, 9, "int8", torch.float32, {}),
    (8, 2, 17, "fp8", torch.float32, {"bias": True}),
    (16, 4, 33, "dense", torch.float16, {"bias": True, "expert_parallel": True}),
    (64, 8, 4, "int4", torch.float32, {"skewed": True, "hidden": 48, "intermediate": 64}),
    (128, 6, 3, "dense", torch.float32, {}),              # most experts without a token
    (32, 2, 512, "dense", torch.float16, {"block_m": 64, "skewed": True, "hidden": 16,
                                          "intermediate": 16}),
]
for _case in CASES:
    def _(case=_case):
        e, k, t, fmt, dtype, opts = case
        check_fused_moe(e, k, t, fmt, dtype, **opts)
    CHECKS["fused_moe[E={},k={},T={},{},{}]".format(*_case[:4], str(_case[4])[6:])] = _


def _align_check() -> None:
    """sorted_ids holds every local pair once, each block one expert's, padding P."""
    gen = torch.Generator().manual_seed(1)
    for num_experts, top_k, num_tokens, block_m in ((4, 1, 1, 16), (16, 4, 37, 4),
                                                    (128, 8, 100, 16)):
        ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
        sorted_ids, expert_ids = fm.moe_align_block_size(ids, block_m, num_experts)
        num_pairs = num_tokens * top_k
        real = sorted_ids[sorted_ids < num_pairs]
        assert sorted(real.tolist()) == list(range(num_pairs))
        flat = ids.flatten()
        for b, e in enumerate(expert_ids.tolist()):
            block = sorted_ids[b * block_m:(b + 1) * block_m]
            block = block[block < num_pairs]
            if e < 0:
                assert block.numel() == 0
            else:
                assert block.numel() > 0 and bool((flat[block.long()] == e).all())


CHECKS["moe_align_block_size"] = _align_check


def run(names: list[str]) -> dict[str, str | None]:
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = None
        except Exception:  # noqa: BLE001 (each failure is reported with its traceback)
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    print("RESULTS " + json.dumps(run(sys.argv[1:] or list(CHECKS))))
