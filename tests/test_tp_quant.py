"""Quantized linears under tensor parallelism (CPU, gloo, two processes on loopback): for every
checkpoint format (AWQ, GPTQ with act-order and 8 bits, compressed-tensors int and FP8, FP8
block-wise, FP8 quantized at load, GGUF 32-blocks and K-quants), a tiny quantized model's
logits at tp 2 equal one process's, through chunked prefill and decode; a rank boundary that
splits an FP8 block is a start-up error with the numbers. One process group for the module."""
from __future__ import annotations

import os

import pytest
import torch

from minserve.config import ConfigError
from tests.tp_ranks import assert_steps_match, load_spec, run_steps, spawn_ranks

# (name, method, options) for tests/quant_packers.py; group 32 so that each rank's 32 input
# rows of o_proj hold whole groups; FP8 blocks of 16 so that k/v's 16 rows per rank do
FORMATS = [
    ("awq-g32", "awq", {"group_size": 32}),
    ("gptq-4bit-g32-act-order", "gptq", {"bits": 4, "group_size": 32, "desc_act": True}),
    ("gptq-8bit-g32-v2-asym", "gptq", {"bits": 8, "group_size": 32, "v1": False, "sym": False}),
    ("ct-int4-g32-asym", "ct-int", {"bits": 4, "group_size": 32, "sym": False}),
    ("ct-int8-channel", "ct-int", {"bits": 8, "group_size": None}),
    ("ct-fp8-channel", "ct-fp8", {"strategy": "channel"}),
    ("ct-fp8-tensor", "ct-fp8", {"strategy": "tensor"}),
    ("fp8-block-16x16", "fp8-block", {"block": (16, 16)}),
]
# GGUF: a 32-block type, and the Q4_K_M mix on a model wide enough that a rank's input
# features (o_proj 256, down 512) hold whole 256-value super-blocks
GGUF_CASES = [("gguf-Q4_0", "Q4_0", {}, {}),
              ("gguf-Q4_K-mix", "Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q5_K"},
               {"hidden_size": 512, "intermediate_size": 1024, "head_dim": 128})]
NAMES = [f[0] for f in FORMATS] + ["fp8-dynamic"] + [c[0] for c in GGUF_CASES]


@pytest.fixture(scope="module")
def specs(tiny_model_factory, tmp_path_factory):
    """name -> FOLDER or FOLDER::QUANTIZATION (tests/tp_ranks.py's load_spec)."""
    pytest.importorskip("compressed_tensors")
    from minserve.models.loader import resolve_model
    from tests.quant_packers import quantize_model_folder
    from tests.tiny import write_gguf

    root = tmp_path_factory.mktemp("tp-quant")
    src = tiny_model_factory("LlamaForCausalLM")
    out = {}
    for name, method, opts in FORMATS:
        quantize_model_folder(src, str(root / name), str(root / f"{name}-ref"), method, **opts)
        out[name] = str(root / name)
    out["fp8-dynamic"] = f"{src}::fp8"
    old = os.environ.get("MINSERVE_CACHE")
    os.environ["MINSERVE_CACHE"] = str(root / "cache")
    try:
        for name, qtype, qtypes, shape in GGUF_CASES:
            path = str(root / f"{name}.gguf")
            write_gguf(tiny_model_factory("LlamaForCausalLM", **shape), path, "llama", qtype,
                       qtypes)
            out[name] = resolve_model(path, gguf_quantized=True)
    finally:
        if old is None:
            del os.environ["MINSERVE_CACHE"]
        else:
            os.environ["MINSERVE_CACHE"] = old
    return out


@pytest.fixture(scope="module")
def sharded_logits(specs, tmp_path_factory):
    """Both ranks run every model in one process group (started once), int4 layers on the
    reference GEMM (torch's CPU int4 kernel rounds activations to bf16)."""
    env = {**os.environ, "MINSERVE_TEST_REFERENCE_INT": "1"}
    logits = spawn_ranks([specs[n] for n in NAMES], tmp_path_factory.mktemp("tp-quant-out"),
                         timeout=900, env=env)
    return dict(zip(NAMES, logits, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_quantized_logits_at_tp2_equal_one_process(name, specs, sharded_logits, monkeypatch):
    import minserve.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "cpu_int4_supported", lambda w: False)
    model = load_spec(specs[name])
    assert any(getattr(m, "parts", None) or getattr(m, "fp8_weight", None) is not None
               for m in model.modules()), "no layer was quantized"
    assert_steps_match(run_steps(model), sharded_logits[name], atol=5e-4)


def _load_layer(layer, tensors: dict, shard_id=None):
    for name, t in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, t, shard_id)


def test_act_order_row_shard_pads_its_groups_and_sums_to_the_whole(monkeypatch):
    """A row shard of an act-order GPTQ layer holds parts of groups: padded to whole groups
    (reading a zero column), its partial output plus the other rank's is the whole layer's."""
    import minserve.kernels.dispatch as dispatch
    from minserve.models.linear import RowParallelLinear
    from minserve.models.quant import get_quant_config
    from tests.quant_packers import QUANTIZERS

    torch.manual_seed(0)
    k, n = 128, 16
    packed, dense = QUANTIZERS["gptq"](torch.randn(n, k), bits=4, group_size=32, desc_act=True)
    config = get_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 32,
                               "desc_act": True})
    x = torch.randn(3, k)

    def layer(rank: int, tp_size: int):
        layer = RowParallelLinear(k, n, bias=False, tp_rank=rank, tp_size=tp_size,
                                  quant_method=config.get_linear_method("down_proj"))
        _load_layer(layer, packed)
        layer.quant_method.process_weights_after_loading(layer, torch.float32)
        return layer

    for int4_kernel in (False, True):            # the reference GEMM, then torch's CPU kernel
        monkeypatch.setattr(dispatch, "cpu_int4_supported", lambda w, on=int4_kernel: on)
        whole = layer(0, 1)
        want = whole.quant_method.apply(whole, x)
        total = torch.zeros(3, n)
        for rank in range(2):
            shard = layer(rank, 2)
            (part,) = shard.parts
            assert part.in_features > k // 2    # padded: groups straddle the rank boundary
            total += shard.quant_method.apply(shard, x[:, rank * k // 2:(rank + 1) * k // 2])
        # torch's kernel rounds to bf16 (outputs O(10)): a wrong row would be off by ~5
        torch.testing.assert_close(total, want, atol=0.25 if int4_kernel else 1e-5, rtol=0)
        torch.testing.assert_close(want, x @ dense.t(), atol=0.25, rtol=0)


def test_fp8_block_split_by_a_rank_boundary_is_a_startup_error():
    from minserve.kernels.fp8_gemm import FP8_DTYPE
    from minserve.models.linear import QKVParallelLinear
    from minserve.models.quant import get_quant_config

    config = get_quant_config({"quant_method": "fp8", "activation_scheme": "dynamic",
                               "weight_block_size": [32, 32]})
    # 2 kv heads of 16 rows over 2 ranks: 16 rows of k and v per rank, blocks of 32
    layer = QKVParallelLinear(64, 16, 4, 2, bias=False, tp_rank=1, tp_size=2,
                              quant_method=config.get_linear_method("qkv_proj"))
    for shard_id, rows in (("q", 64), ("k", 32), ("v", 32)):
        _load_layer(layer, {"weight": torch.zeros(rows, 64).to(FP8_DTYPE),
                            "weight_scale_inv": torch.ones(-(-rows // 32), 2)}, shard_id)
    with pytest.raises(ConfigError, match=r"16 output features.*32"):
        layer.quant_method.process_weights_after_loading(layer, torch.float32)


@pytest.mark.parametrize("name", ["gptq-4bit-g32-act-order", "fp8-dynamic"])
def test_llm_with_tp2_generates_one_process_tokens(name, specs):
    """Through the engine and its worker processes (torch's CPU int4 kernel on both sides):
    --quantization reaches every rank, and greedy tokens match one process."""
    from minserve import LLM, SamplingParams

    folder, _, quantization = specs[name].partition("::")
    args = dict(kv_cache_memory=1 << 22, max_model_len=256, quantization=quantization or None)
    prompts = [[5, 17, 33, 200, 9, 41, 77, 12], [100, 3, 4]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one = LLM(folder, **args).generate(prompts, sp, use_tqdm=False)
    two = LLM(folder, tensor_parallel_size=2, **args)
    try:
        got = two.generate(prompts, sp, use_tqdm=False)
    finally:
        two.engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in one]
