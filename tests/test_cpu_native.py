"""The native CPU kernels (kernels/cpu_native.py: cpu_int_gemm.c, cpu_attention.c) against their
plain-torch references, on mixed shapes. Skipped where no C compiler builds them."""
from __future__ import annotations

import pytest
import torch

from minserve import env, kernels
from minserve.kernels import cpu_native
from minserve.kernels.attention import paged_attention_ref
from minserve.kernels.quant_gemm import IntWeight, dequantize_int, int_gemm_ref, pack_int

from tests.kernel_checks import make_batch

needs_native = pytest.mark.skipif(not cpu_native.available(),
                                  reason="no C compiler for the native CPU kernels")


@pytest.fixture
def int8_activations(monkeypatch):
    """The serving default (tests/conftest.py runs the suite on exact activations)."""
    monkeypatch.setattr(env, "CPU_EXACT_ACTIVATIONS", False)


def _int_weight(n: int, k: int, bits: int, group: int, perm: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (k, n), generator=g)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 0.001
    bias = (torch.rand(k // group, n, generator=g) - 0.5) * 0.1
    order = torch.randperm(k, generator=g) if perm else None
    return IntWeight(pack_int(q, bits), scales, bias, bits, group, order)


GEMM_CASES = [  # (N, K, bits, group)
    (5, 32, 4, 32), (67, 96, 4, 32), (130, 576, 4, 64), (64, 256, 4, 256),
    (3, 64, 8, 32), (67, 96, 8, 32), (130, 512, 8, 128), (33, 1536, 8, 32),
]


@needs_native
@pytest.mark.parametrize("n,k,bits,group", GEMM_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 65])
def test_int_gemm_matches_reference(n, k, bits, group, rows, monkeypatch, int8_activations):
    w = _int_weight(n, k, bits, group, seed=rows)
    cw = cpu_native.to_cpu_int(w)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n))
    want = int_gemm_ref(x, w)
    torch.testing.assert_close(cpu_native.int_gemm_ref(x, cw), want, atol=1e-4, rtol=1e-4)
    # up to 2 x FEW_ROWS rows int_gemm runs on int8 activations, the same products as the
    # reference on the activations quantized and back
    got = kernels.int_gemm(x, cw)
    torch.testing.assert_close(got, int_gemm_ref(cpu_native.int8_activations_ref(
        x, 2 * cpu_native.FEW_ROWS), w), atol=1e-4, rtol=1e-4)
    if rows <= 2 * cpu_native.FEW_ROWS:   # a row's result is the same whatever rows share the call
        assert torch.equal(got[-1:], kernels.int_gemm(x[-1:].contiguous(), cw))
    monkeypatch.setattr(env, "CPU_EXACT_ACTIVATIONS", True)
    torch.testing.assert_close(kernels.int_gemm(x, cw), want, atol=1e-4, rtol=1e-4)


@needs_native
def test_activation_quantizer_matches_reference():
    lib = cpu_native.library()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 160, generator=g) * torch.logspace(-3, 2, 160)   # mixed magnitudes
    x[1, 32:64] = 0                                                     # an all-zero block
    x[2, 64:96] = 2.5                                                   # ties round to even:
    x[2, 64] = 127.0                                                    # 2.5 * 127 / 127 -> 2
    want_q, want_d = cpu_native.quantize_rows_ref(x)
    q, d = torch.empty(3, 160, dtype=torch.int8), torch.empty(3, 5)
    sums = torch.empty(3, 10)                                           # groups of 16
    lib.quantize_rows_q8(x.data_ptr(), 3, 160, 160, 16, q.data_ptr(), d.data_ptr(),
                         sums.data_ptr())
    assert torch.equal(q, want_q) and torch.equal(d, want_d)
    assert q.abs().max() <= 127
    seen = (q.float().view(3, 5, 32) * d[:, :, None]).view(3, 10, 16).sum(-1)
    torch.testing.assert_close(sums, seen, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("n,k,bits,group", GEMM_CASES[::2])
def test_int8_activation_error_is_bounded(n, k, bits, group, int8_activations):
    """Against the exact fp32 product, each activation moves by at most half its block's step
    (absmax / 254): |y - y_exact| <= sum_k |w[n, k]| * step(k) / 2, the bound checked here. On
    these shapes the error reached 0.07-0.27 of that bound, and 0.4-0.9% of max |y_exact|."""
    w = _int_weight(n, k, bits, group, seed=7)
    cw = cpu_native.to_cpu_int(w)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(k))
    dense = cpu_native.dequantize_ref(cw)                               # [N, K]
    exact = x @ dense.t()
    _, d = cpu_native.quantize_rows_ref(x)
    half_step = (d / 2).repeat_interleave(32, dim=1)                    # [M, K]
    bound = half_step @ dense.abs().t() + 1e-4
    err = (kernels.int_gemm(x, cw) - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0                                                # the int8 path ran


@needs_native
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_moe_int_gemm_on_int8_activations(bits, group, int8_activations):
    """moe_int_gemm's groups of up to FEW_ROWS rows run on int8 activations, larger ones on
    fp32 (5 rows: the many-rows path; 70 > MAX_ROWS: dequantize + sgemm)."""
    n, k = 45, 256
    experts = [cpu_native.to_cpu_int(_int_weight(n, k, bits, group, seed=e)) for e in range(6)]
    stack = kernels.stack_experts(experts)
    groups = [(4, 0, 1), (0, 1, 3), (5, 3, 8), (1, 8, 12), (2, 12, 82)]
    x = torch.randn(82, k, generator=torch.Generator().manual_seed(bits))
    got = cpu_native.moe_int_gemm(x, stack, groups)
    for e, start, end in groups:
        want = cpu_native.int_gemm_ref(cpu_native.int8_activations_ref(x[start:end]), experts[e])
        torch.testing.assert_close(got[start:end], want, atol=1e-4, rtol=1e-4)


@needs_native
def test_int_gemm_act_order_bias_and_half_activations():
    w = _int_weight(40, 128, 4, 32, perm=True)
    cw = cpu_native.to_cpu_int(w)
    x, bias = torch.randn(3, 2, 128), torch.randn(40)
    got = kernels.int_gemm(x, cw, bias)
    assert got.shape == (3, 2, 40)
    torch.testing.assert_close(got, int_gemm_ref(x.view(6, 128), w, bias).view(3, 2, 40),
                               atol=1e-4, rtol=1e-4)
    xb = x.view(6, 128).to(torch.bfloat16)
    got = kernels.int_gemm(xb, cw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), int_gemm_ref(xb.float(), w), atol=2e-2, rtol=2e-2)


@needs_native
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_dequantize_is_exact(bits, group):
    w = _int_weight(37, 192, bits, group)
    cw = cpu_native.to_cpu_int(w)
    dense = dequantize_int(w)
    # (q * s + b is one FMA in the AVX2 build, as in torch's; a build without FMA rounds twice)
    torch.testing.assert_close(cpu_native.dequantize(cw), dense, rtol=1e-6, atol=1e-7)
    assert torch.equal(cpu_native.dequantize_ref(cw), dense)


def _q8_0_valued(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (50, 4, 32), generator=g).float()
    q[:, :, 0] = 127                              # as Q8_0 writes it: the absmax is +-127 d
    d = (torch.rand(50, 4, 1, generator=g) * 0.01 + 1e-4).half().float()
    w = (q * d).view(50, 128)
    w[3, 32:64] = 0                               # an all-zero group
    return w


def test_int8_exact_finds_q8_0_weights_only():
    w = _q8_0_valued()
    cw = cpu_native.int8_exact(w)
    assert cw is not None and cw.bits == 8
    assert torch.equal(cpu_native.dequantize_ref(cw), w)
    assert cpu_native.int8_exact(torch.randn(50, 128)) is None
    assert cpu_native.int8_exact(torch.randn(50, 100)) is None      # K not a multiple of 32


ATTN_CASES = [  # (cases (query_len, seq_len), group, kv heads, head dim, block size)
    ([(1, 37), (5, 18), (1, 1), (17, 40), (1, 230)], 3, 3, 64, 16),
    ([(1, 5)] * 16, 3, 3, 64, 16),
    ([(1, 300), (1, 17)], 1, 2, 16, 32),
    ([(1, 129)] * 4, 4, 2, 128, 64),
    ([(1, 50), (1, 9)], 2, 1, 80, 8),               # a head dim that is not a multiple of 8
    ([(7, 30), (3, 3)], 2, 2, 32, 16),              # short rows: decode queries, causal
    ([(5, 40), (5, 100), (1, 12), (2, 2)], 3, 3, 64, 16),   # a speculative verification step
    ([(18, 60), (5, 21), (30, 30)], 2, 2, 32, 16),  # longer rows: the reference's SDPA
]


@needs_native
@pytest.mark.parametrize("cases,group,kv_heads,head_dim,block_size", ATTN_CASES)
def test_decode_attention_matches_reference(cases, group, kv_heads, head_dim, block_size):
    torch.manual_seed(len(cases))
    q, k_cache, v_cache, attn = make_batch(cases, group * kv_heads, kv_heads, head_dim,
                                           block_size, torch.float32)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    got = kernels.paged_attention(q, k_cache, v_cache, attn, scale, out=out)
    assert got is out and not got.isnan().any()
    torch.testing.assert_close(got, paged_attention_ref(q, k_cache, v_cache, attn, scale),
                               atol=2e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("cases", [[(5, 40), (5, 100), (3, 3)], [(5, 40), (1, 9), (30, 30)]])
def test_one_metadata_serves_every_layer(cases):
    """The dispatch plans a step's short rows at its first layer and reuses the plan: later
    layers (other q, here a strided view as a fused qkv projection gives) match the reference."""
    torch.manual_seed(7)
    q, k_cache, v_cache, attn = make_batch(cases, 6, 2, 32, 16, torch.float32)
    for layer in range(3):
        wide = torch.randn(q.shape[0], q.shape[1] + 2, q.shape[2])
        lq = wide[:, 1:-1] if layer else q                    # rows strided past H * D
        got = kernels.paged_attention(lq, k_cache, v_cache, attn, 0.3)
        assert attn.native_plan is not None
        torch.testing.assert_close(got, paged_attention_ref(lq, k_cache, v_cache, attn, 0.3),
                                   atol=2e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_decode_attention_sliding_window_matches_reference(window):
    """A sliding-window layer (Gemma 3's local layers) decodes natively too: rows longer and
    shorter than the window, beside a prefill row the reference takes."""
    torch.manual_seed(window)
    cases = [(1, 37), (1, 5), (4, 30), (1, 230), (1, 16)]
    q, k_cache, v_cache, attn = make_batch(cases, 6, 2, 32, 16, torch.float32)
    want = paged_attention_ref(q, k_cache, v_cache, attn, 0.2, window)
    got = kernels.paged_attention(q, k_cache, v_cache, attn, 0.2, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    decode = q[[0]], attn.block_table[[3]], attn.seq_lens[[3]]
    out = torch.empty_like(decode[0])
    assert cpu_native.decode_attention(decode[0], k_cache, v_cache, decode[1], decode[2], 0.2,
                                       out, window)
    torch.testing.assert_close(out, paged_attention_ref(
        q[[0]], k_cache, v_cache, make_batch_view(attn, 3), 0.2, window), atol=2e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_softcap_matches_reference(window):
    """Gemma's attn_logit_softcapping on the native decode rows (a decode, a speculative row)
    beside a prefill row the reference takes; the cap (1.5) must change the output."""
    torch.manual_seed(5)
    cases = [(1, 37), (4, 30), (20, 40), (1, 90)]
    q, k_cache, v_cache, attn = make_batch(cases, 6, 2, 32, 16, torch.float32)
    want = paged_attention_ref(q, k_cache, v_cache, attn, 0.35, window, softcap=1.5)
    got = kernels.paged_attention(q, k_cache, v_cache, attn, 0.35, window, softcap=1.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    uncapped = paged_attention_ref(q, k_cache, v_cache, attn, 0.35, window)
    assert not torch.allclose(uncapped, want, atol=1e-3)


def make_batch_view(attn, row: int):
    """Row `row` of a batch's metadata as a one-row decode batch."""
    from minserve.kernels import AttnMetadata

    seq_len = attn.seq_lens_host[row]
    return AttnMetadata(torch.tensor([0, 1], dtype=torch.int32), attn.seq_lens[[row]],
                        attn.block_table[[row]], attn.slot_mapping[:1], 1, seq_len, [0, 1],
                        [seq_len])


@needs_native
def test_decode_attention_leaves_other_cache_dtypes_to_the_reference():
    q, k_cache, v_cache, attn = make_batch([(1, 20)], 2, 1, 16, 16, torch.bfloat16)
    out = torch.empty_like(q)
    assert not cpu_native.decode_attention(q, k_cache, v_cache, attn.block_table,
                                           attn.seq_lens, 0.25, out)
    torch.testing.assert_close(kernels.paged_attention(q, k_cache, v_cache, attn, 0.25),
                               paged_attention_ref(q, k_cache, v_cache, attn, 0.25))


def test_without_a_compiler_the_torch_paths_run(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level("WARNING", logger="minserve"):
        assert not cpu_native.available()
    assert "native CPU kernels unavailable" in caplog.text
    w = _int_weight(9, 64, 4, 32)
    cw = cpu_native.to_cpu_int(w)
    x = torch.randn(2, 64)
    torch.testing.assert_close(cpu_native.int_gemm(x, cw), int_gemm_ref(x, w))
    q8 = _q8_0_valued()
    assert torch.equal(cpu_native.dequantize_ref(cpu_native.int8_exact(q8)), q8)
    assert cpu_native.int8_exact(torch.randn(50, 128)) is None
    q, k_cache, v_cache, attn = make_batch([(1, 20), (3, 9)], 2, 1, 16, 16, torch.float32)
    torch.testing.assert_close(kernels.paged_attention(q, k_cache, v_cache, attn, 0.25),
                               paged_attention_ref(q, k_cache, v_cache, attn, 0.25))


@needs_native
@pytest.mark.parametrize("rows,dim", [(1, 576), (5, 64), (17, 100)])
def test_layer_ops_match_torch(rows, dim):
    from minserve.models.layers import GeluAndMul, RMSNorm, SiluAndMul

    g = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=g)

    def torch_norm(h):
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))

    torch.testing.assert_close(norm(x), torch_norm(x))
    out, res = norm(x, residual)
    assert torch.equal(res, x + residual)
    torch.testing.assert_close(out, torch_norm(x + residual))
    assert torch.equal(residual, residual.clone()) and res.data_ptr() != residual.data_ptr()
    gate_up = torch.randn(rows, 2 * dim, generator=g)
    torch.testing.assert_close(SiluAndMul()(gate_up),
                               torch.nn.functional.silu(gate_up[:, :dim]) * gate_up[:, dim:])
    gelu = torch.nn.functional.gelu(gate_up[:, :dim], approximate="tanh") * gate_up[:, dim:]
    assert cpu_native.gelu_tanh_and_mul(gate_up) is not None
    torch.testing.assert_close(GeluAndMul()(gate_up), gelu)


@needs_native
def test_store_kv_matches_reference_and_refuses_slots_past_the_cache():
    from minserve.kernels.cache import store_kv_ref

    k_cache = torch.zeros(6, 4, 2, 8)
    v_cache = torch.zeros_like(k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(5, 48)              # k and v as views into a fused projection's rows
    k, v = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    slots = torch.tensor([3, -1, 7, 23, 0])
    kernels.store_kv(k, v, k_cache, v_cache, slots)
    store_kv_ref(k, v, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    before = k_cache.clone()
    with pytest.raises(IndexError, match="past the end"):
        kernels.store_kv(k, v, k_cache, v_cache, torch.tensor([3, -1, 7, 24, 0]))
    assert torch.equal(k_cache, before)
