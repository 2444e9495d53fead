"""Quantized serving end to end on tiny models: the engine with an fp8 KV cache, and (below)
models whose weights are quantized into each checkpoint format, whose logits must equal the same
model run on the producer-dequantized weights."""
from __future__ import annotations

import pytest
import torch

from minserve import LLM, SamplingParams
from minserve.models.layers import Attention

PROMPTS = [[5, 17, 33, 200, 9, 41, 77, 12, 300, 8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
           [100, 3, 4]]


def test_fp8_kv_cache_holds_more_blocks_and_stays_close(tiny_model_dir):
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(tiny_model_dir, kv_cache_dtype=kv, kv_cache_memory=1 << 22)
        attn = next(m for m in llm.engine.runner.model.modules() if isinstance(m, Attention))
        runs[kv] = (llm.engine.info.num_kv_blocks, attn.k_cache.dtype,
                    llm.generate(PROMPTS, params, use_tqdm=False))
    (blocks, dtype, ref), (blocks8, dtype8, outs) = runs["auto"], runs["fp8"]
    assert (dtype, dtype8) == (torch.float32, torch.float8_e4m3fn)
    assert blocks8 == 4 * blocks                     # one byte per element instead of four
    for a, b in zip(ref, outs, strict=True):
        diffs = [abs(x.logprob - y.logprob)
                 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True)]
        assert max(diffs) < 0.3, diffs               # e4m3 keeps ~3 mantissa bits per K/V
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]


def test_kv_cache_dtype_refuses_unknown():
    from minserve.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="--kv-cache-dtype 'int8' is not supported"):
        EngineConfig(kv_cache_dtype="int8")


# ---- tiny models quantized into each checkpoint format --------------------------------------
# Each case: our logits on the quantized checkpoint against our logits on the same model with
# the producer-dequantized weights (the writers in tests/quant_packers.py), for a whole prefill,
# token-by-token decode and a prefill in chunks.

FORMATS = [
    ("awq-g32", "awq", {"group_size": 32}),
    ("gptq-4bit-g32-act-order", "gptq", {"bits": 4, "group_size": 32, "desc_act": True}),
    ("gptq-8bit-g64-v2", "gptq", {"bits": 8, "group_size": 64, "v1": False}),
    ("gptq-4bit-asym-g32", "gptq", {"bits": 4, "group_size": 32, "sym": False}),
    ("ct-int4-g32-asym", "ct-int", {"bits": 4, "group_size": 32, "sym": False}),
    ("ct-int8-channel", "ct-int", {"bits": 8, "group_size": None}),
    ("ct-fp8-channel", "ct-fp8", {"strategy": "channel"}),
    ("ct-fp8-tensor", "ct-fp8", {"strategy": "tensor"}),
    ("fp8-block-32x32", "fp8-block", {"block": (32, 32)}),
]
ATOL = 1e-2   # logits O(10): our fp32 dequantization vs the producers' fp16-rounded weights


def _prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture
def reference_int_path(monkeypatch):
    """Keep int4 layers off torch's bf16-activation CPU int4 kernel: the plain-torch reference
    runs, or where it builds the native kernel, both with exact fp32 dequantization."""
    import minserve.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "cpu_int4_supported", lambda w: False)


def _check_pair(ours, ref, atol: float = ATOL) -> None:
    from tests.paged_runner import PagedRunner

    prompt = _prompt(40, 1)
    (got,) = PagedRunner(ours, block_size=16).step([("a", prompt)])
    (want,) = PagedRunner(ref, block_size=16).step([("a", prompt)])
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    runner_got, runner_want = PagedRunner(ours, block_size=8), PagedRunner(ref, block_size=8)
    for start in range(24):                              # token-by-token decode
        (g,) = runner_got.step([("d", prompt[start:start + 1])])
        (w,) = runner_want.step([("d", prompt[start:start + 1])])
        torch.testing.assert_close(g, w, atol=atol, rtol=0)
    runners = PagedRunner(ours, block_size=16), PagedRunner(ref, block_size=16)
    pos = 0
    for size in (5, 16, 11, 1, 7):                      # chunked prefill, mid-block edges
        (g,) = runners[0].step([("c", prompt[pos:pos + size])])
        (w,) = runners[1].step([("c", prompt[pos:pos + size])])
        torch.testing.assert_close(g, w, atol=atol, rtol=0)
        pos += size


@pytest.mark.parametrize("name,method,opts", FORMATS, ids=[f[0] for f in FORMATS])
def test_quantized_checkpoint_matches_dequantized(tiny_model_dir, tmp_path, reference_int_path,
                                                  name, method, opts):
    if method.startswith("ct-"):
        pytest.importorskip("compressed_tensors")
    from tests.paged_runner import load_ours
    from tests.quant_packers import quantize_model_folder

    dst, ref = str(tmp_path / "quantized"), str(tmp_path / "dequantized")
    quantize_model_folder(tiny_model_dir, dst, ref, method, **opts)
    ours = load_ours(dst)
    assert any(hasattr(m, "parts") or getattr(m, "fp8_weight", None) is not None
               for m in ours.modules()), "no layer was quantized"
    _check_pair(ours, load_ours(ref))


ARCH_FORMATS = [   # issue 31's architectures: Phi-3's fused q|k|v and gate|up tensors are
    # quantized whole, as AutoAWQ/GPTQModel write them, and split into shards at load
    ("Phi3ForCausalLM", "awq", {"group_size": 32}),
    ("Phi3ForCausalLM", "gptq", {"bits": 4, "group_size": 32, "desc_act": True}),
    ("Phi3ForCausalLM", "ct-fp8", {"strategy": "tensor"}),
    ("Phi3ForCausalLM", "fp8-block", {"block": (32, 32)}),
    ("Gemma3ForCausalLM", "gptq", {"bits": 4, "group_size": 32, "sym": False}),
    ("Gemma3ForCausalLM", "fp8-block", {"block": (32, 32)}),
    ("SmolLM3ForCausalLM", "awq", {"group_size": 32}),
    # its per-layer-input linears quantized too (K = 32, a whole group)
    ("Gemma4ForCausalLM", "gptq", {"bits": 8, "group_size": 32}),
]
ARCH_SHAPES = {"Gemma4ForCausalLM": {"hidden_size_per_layer_input": 32}}


@pytest.mark.parametrize("arch,method,opts", ARCH_FORMATS,
                         ids=[f"{a[:-11].lower()}-{m}" for a, m, _ in ARCH_FORMATS])
def test_quantized_architectures_match_dequantized(tiny_model_factory, tmp_path,
                                                   reference_int_path, arch, method, opts):
    if method.startswith("ct-"):
        pytest.importorskip("compressed_tensors")
    from tests.paged_runner import load_ours
    from tests.quant_packers import quantize_model_folder

    dst, ref = str(tmp_path / "quantized"), str(tmp_path / "dequantized")
    quantize_model_folder(tiny_model_factory(arch, **ARCH_SHAPES.get(arch, {})), dst, ref, method,
                          **opts)
    ours = load_ours(dst)
    assert any(hasattr(m, "parts") or getattr(m, "fp8_weight", None) is not None
               for m in ours.modules()), "no layer was quantized"
    # (4 layers and the per-layer inputs carry the fp16 rounding a little further)
    _check_pair(ours, load_ours(ref), atol=3e-2 if arch.startswith("Gemma4") else ATOL)


def test_fp8_dynamic_quantization_of_a_16_bit_checkpoint(tiny_model_dir):
    """--quantization fp8: per-channel scales computed at load; the reference is the dense
    model with each weight rounded the same way (which per-channel makes shard-independent)."""
    from minserve.kernels.fp8_gemm import dequantize_fp8, fp8_quantize_weight

    from tests.paged_runner import load_ours

    ours = load_ours(tiny_model_dir, quantization="fp8")
    ref = load_ours(tiny_model_dir)
    with torch.no_grad():
        for module in ref.modules():
            w = getattr(module, "weight", None)
            if hasattr(module, "quant_method") and w is not None:
                w.copy_(dequantize_fp8(fp8_quantize_weight(w)))
    _check_pair(ours, ref)


GGUF_CASES = [
    ("Q4_0", {}, {}), ("Q4_1", {}, {}), ("Q8_0", {}, {}), ("Q5_0", {"ffn_down": "Q5_1"}, {}),
    # the Q4_K_M mix: V and down in other K-quants, so q|k|v holds two layouts
    ("Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q5_K"},
     {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}),
]


@pytest.mark.parametrize("qtype,qtypes,shape", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_served_quantized_matches_dequantized(tiny_model_factory, tmp_path, monkeypatch,
                                                   reference_int_path, qtype, qtypes, shape):
    from minserve.models.loader import resolve_model
    from tests.paged_runner import load_ours
    from tests.tiny import write_gguf

    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path / "cache"))
    src = tiny_model_factory("LlamaForCausalLM", **shape)
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(src, path, "llama", qtype, qtypes)
    ours = load_ours(resolve_model(path, gguf_quantized=True))
    assert sum(len(getattr(m, "parts", [])) for m in ours.modules()) > 0
    _check_pair(ours, load_ours(resolve_model(path)))


def test_cpu_int4_kernel_path_tracks_dequantized(tiny_model_dir, tmp_path, monkeypatch):
    """Without the native kernel, CPU int4 layers run torch's int4 kernel on bf16 activations:
    the logits follow the dequantized model to bf16 rounding (a wrong nibble order is off by
    ~5)."""
    from minserve.kernels import cpu_native
    from minserve.kernels.quant_gemm import CpuInt4Weight

    from tests.paged_runner import load_ours
    from tests.quant_packers import quantize_model_folder

    monkeypatch.setattr(cpu_native, "available", lambda: False)
    dst, ref = str(tmp_path / "quantized"), str(tmp_path / "dequantized")
    quantize_model_folder(tiny_model_dir, dst, ref, "gptq", bits=4, group_size=32,
                          desc_act=True)
    ours = load_ours(dst)
    assert any(isinstance(p, CpuInt4Weight) for m in ours.modules() for p in
               getattr(m, "parts", []))
    _check_pair(ours, load_ours(ref), atol=0.25)


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_native_kernel_path_tracks_dequantized(tiny_model_dir, tmp_path, bits):
    """With a C compiler, CPU int layers run the native kernel (kernels/cpu_native.py) on fp32
    activations: the logits follow the dequantized model to fp32 summation order."""
    from minserve.kernels import cpu_native

    from tests.paged_runner import load_ours
    from tests.quant_packers import quantize_model_folder

    if not cpu_native.available():
        pytest.skip("no C compiler for the native CPU kernel")
    dst, ref = str(tmp_path / "quantized"), str(tmp_path / "dequantized")
    quantize_model_folder(tiny_model_dir, dst, ref, "gptq", bits=bits, group_size=32,
                          desc_act=True)
    ours = load_ours(dst)
    assert any(isinstance(p, cpu_native.CpuIntWeight) for m in ours.modules() for p in
               getattr(m, "parts", []))
    _check_pair(ours, load_ours(ref))


@pytest.mark.parametrize("arch,gguf_arch", [("Phi3ForCausalLM", "phi3"),
                                            ("Gemma3ForCausalLM", "gemma3")])
def test_gguf_issue31_archs_served_from_their_blocks(tiny_model_factory, tmp_path, monkeypatch,
                                                    reference_int_path, arch, gguf_arch):
    """Phi-3's fused attn_qkv / ffn_up blocks split per projection at load, Gemma 3's linears:
    served from their Q8_0 blocks, the logits follow the dequantized model."""
    from minserve.models.loader import resolve_model
    from tests.paged_runner import load_ours
    from tests.tiny import write_gguf

    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "tiny-q8.gguf")
    write_gguf(tiny_model_factory(arch), path, gguf_arch, "Q8_0")
    ours = load_ours(resolve_model(path, gguf_quantized=True))
    assert sum(len(getattr(m, "parts", [])) for m in ours.modules()) > 0
    _check_pair(ours, load_ours(resolve_model(path)))
