"""Quantized experts: a tiny Qwen3-MoE written in each checkpoint format (GPTQ / AWQ int4 as the
Qwen3-30B-A3B-GPTQ-Int4 layout: one quantized module per expert, the router left in float;
block FP8 as the Qwen3-30B-A3B-FP8 layout) must give the logits of the same model on the
producer-dequantized weights; GGUF MoE files (llama.cpp's ffn_*_exps tensors, one [E, N, K]
tensor per projection) served from their blocks must give the file's own logits dequantized at
load. Prefill, token-by-token decode and chunks (test_quant_models._check_pair)."""
from __future__ import annotations

import os

import pytest
from minserve.kernels import cpu_native
from minserve.kernels import fused_moe as fm

from minserve.models.loader import resolve_model
from minserve.models.moe import FusedMoE
from tests.paged_runner import load_ours
from tests.test_quant_models import _check_pair
from tests.tiny import make_tiny_model, write_gguf

QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
             "norm_topk_prob": True}
NATIVE_INT = cpu_native.CpuIntExperts if cpu_native.available() else fm.IntExperts
# (name, quantizer, options, the stack the experts must end in)
FORMATS = [
    ("gptq-int4-g32", "gptq", {"bits": 4, "group_size": 32}, NATIVE_INT),
    ("awq-int4-g32", "awq", {"group_size": 32}, NATIVE_INT),
    ("gptq-int8-g64-v2", "gptq", {"bits": 8, "group_size": 64, "v1": False}, NATIVE_INT),
    # act-order: each expert reads x in its own order, so each runs its own layer's GEMM
    ("gptq-int4-act-order", "gptq", {"bits": 4, "group_size": 32, "desc_act": True},
     fm.ExpertList),
    ("fp8-block-32x32", "fp8-block", {"block": (32, 32)}, fm.Fp8Experts),
]


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3moe")), "Qwen3MoeForCausalLM",
                           **QWEN3_MOE)


@pytest.fixture
def reference_int_path(monkeypatch):
    """Where the native kernel does not build, int4 stays off torch's bf16 CPU int4 kernel."""
    import minserve.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "cpu_int4_supported", lambda w: False)


def _experts(model) -> fm.ExpertWeights:
    return next(m for m in model.modules() if isinstance(m, FusedMoE)).weights


@pytest.mark.parametrize("name,method,opts,stack", FORMATS, ids=[f[0] for f in FORMATS])
def test_quantized_experts_match_dequantized(qwen3_moe, tmp_path, reference_int_path, name,
                                             method, opts, stack):
    from tests.quant_packers import quantize_model_folder

    dst, ref = str(tmp_path / "quantized"), str(tmp_path / "dequantized")
    quantize_model_folder(qwen3_moe, dst, ref, method, **opts)
    ours = load_ours(dst)
    weights = _experts(ours)
    assert isinstance(weights.w13, stack) and isinstance(weights.w2, stack)
    _check_pair(ours, load_ours(ref))


# (name, architecture, llama.cpp's name, overrides, qtype, per-module qtypes)
# K-quants come in 256-value blocks: those models are 256 wide (4 heads of 64)
WIDE = {"hidden_size": 256, "head_dim": 64}
GGUF_CASES = [
    ("qwen3moe-q8_0", "Qwen3MoeForCausalLM", "qwen3moe", QWEN3_MOE, "Q8_0", {}),
    # the Q4_K_M mix: experts' gate/up Q4_K, down Q6_K (16-value groups, 8-bit layout)
    ("qwen3moe-q4_k-down-q6_k", "Qwen3MoeForCausalLM", "qwen3moe",
     {**QWEN3_MOE, **WIDE, "num_experts": 4, "moe_intermediate_size": 256}, "Q8_0",
     {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q6_K"}),
    ("qwen2moe-q4_0-shared", "Qwen2MoeForCausalLM", "qwen2moe",
     {**QWEN3_MOE, "norm_topk_prob": False, "shared_expert_intermediate_size": 64}, "Q4_0", {}),
    ("mixtral-q5_k", "MixtralForCausalLM", "llama",
     {**WIDE, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 256},
     "Q8_0", {"ffn_gate_exps": "Q5_K", "ffn_up_exps": "Q5_K", "ffn_down_exps": "Q5_K"}),
]


@pytest.mark.parametrize("name,arch,gguf_arch,overrides,qtype,qtypes", GGUF_CASES,
                         ids=[c[0] for c in GGUF_CASES])
def test_gguf_experts_served_from_blocks_match_dequantized(tmp_path, monkeypatch,
                                                           reference_int_path, name, arch,
                                                           gguf_arch, overrides, qtype, qtypes):
    folder = make_tiny_model(str(tmp_path / "hf"), arch, **overrides)
    path = os.path.join(tmp_path, "moe.gguf")
    write_gguf(folder, path, gguf_arch, qtype=qtype, qtypes=qtypes)
    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path / "cache"))
    served = load_ours(resolve_model(path, gguf_quantized=True))
    dequantized = load_ours(resolve_model(path, gguf_quantized=False))
    weights = _experts(served)
    assert not isinstance(weights.w13, fm.DenseExperts)    # kept in the GGUF blocks
    assert isinstance(_experts(dequantized).w13, fm.DenseExperts)
    assert served.config.architecture == arch
    # the native kernel's few-row decode path sums q*x and offset*sum(x) apart (fp32
    # cancellation, ~4e-3 on Q5_K's wide offsets): the dense GGUF test's tolerance
    _check_pair(served, dequantized)
