"""The rest of the engine on a mixture-of-experts model (issue 30 item 6; chunked prefill and
prefix caching are in test_moe_models.py, LoRA in test_moe_lora.py): logprobs and beam search
against transformers, structured outputs through the offline LLM API, and --load-format dummy
with float and int4 experts."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from minserve.kernels import fused_moe as fm

from minserve import LLM, SamplingParams
from minserve.models.moe import FusedMoE
from tests.paged_runner import load_hf
from tests.test_beam import _beam_params, reference_beam_search
from tests.test_engine import generate, make_engine, toks
from tests.tiny import make_tiny_model

PROMPT = [(i * 37) % 500 + 3 for i in range(35)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3moe")), "Qwen3MoeForCausalLM",
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           norm_topk_prob=True, mlp_only_layers=[0])


@pytest.fixture(scope="module")
def hf(folder):
    return load_hf(folder)


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder, max_model_len=128, kv_cache_memory=1 << 22)


def test_logprobs_match_transformers(llm, hf):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                logprobs=3), use_tqdm=False)[0].outputs[0]
    seq = torch.tensor([PROMPT + out.token_ids[:-1]])
    with torch.no_grad():
        want = torch.log_softmax(hf(seq).logits[0, len(PROMPT) - 1:].float(), -1)
    for pos, lp in enumerate(out.logprobs):
        assert lp.token_id == int(want[pos].argmax())
        assert [t for t, _ in lp.top] == want[pos].topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), want[pos].topk(3).values,
                                   atol=2e-4, rtol=0)


def test_beam_search_matches_reference(folder, hf):
    engine = make_engine(folder)
    outs = generate(engine, [PROMPT], _beam_params(2, 4), ids=["w"])
    assert [toks(outs[f"w-{i}"]) for i in range(2)] == reference_beam_search(hf, PROMPT, 2, 4)


def test_structured_choice(llm):
    choices = ["alpha", "beta gamma", "delta"]
    outs = llm.generate([PROMPT, PROMPT[:9]], SamplingParams(
        temperature=0, max_tokens=16, structured={"choice": choices}), use_tqdm=False)
    assert all(o.outputs[0].text in choices for o in outs)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "gptq-int4"])
def test_dummy_weights(folder, tmp_path, quantized):
    dst = str(tmp_path / "config-only")
    os.makedirs(dst)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if quantized:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                         "desc_act": False, "sym": True}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.copy(os.path.join(folder, "tokenizer.json"), dst)
    llm = LLM(dst, load_format="dummy", max_model_len=64, kv_cache_memory=1 << 22)
    moe = next(m for m in llm.engine.runner.model.modules() if isinstance(m, FusedMoE))
    assert isinstance(moe.weights.w13, fm.DenseExperts) != quantized
    out = llm.generate([PROMPT[:8]], SamplingParams(temperature=0, max_tokens=4,
                                                    ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
