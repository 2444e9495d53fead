"""gpt-oss against transformers on a tiny random GptOssForCausalLM (2 layers, hidden 64, 4
experts, top-2, a sliding window of 8 on layer 0, sinks, YaRN): logits through the paged cache
(whole, token by token, chunked, prompts far past the window), and the engine's greedy tokens
(chunked prefill, mixed batches) equal transformers' generate; the same model with its experts
quantized to MXFP4 against transformers on the dequantized weights; config errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from minserve import LLM
from minserve.config import ConfigError
from minserve.sampling_params import SamplingParams
from tests.paged_runner import (
    PagedRunner,
    check_decode,
    check_prefill,
    hf_logits,
    load_hf,
    load_ours,
    random_prompt,
)
from tests.tiny_gpt_oss import TINY_GPT_OSS, make_mxfp4_pair, make_tiny_gpt_oss

ATOL = 2e-4
WINDOW = TINY_GPT_OSS["sliding_window"]


def _prompt(n: int, seed: int) -> list[int]:
    return random_prompt(n, seed, low=10)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    bf16 = make_tiny_gpt_oss(str(root / "model"))
    make_mxfp4_pair(bf16, str(root / "mxfp4"), str(root / "mxfp4-ref"))
    return {"model": bf16, "mxfp4": str(root / "mxfp4"), "mxfp4-ref": str(root / "mxfp4-ref")}


@pytest.fixture(scope="module", params=["model", "mxfp4"])
def pair(request, folders):
    """(ours, transformers') for the bf16-layout model and for the MXFP4 one (whose reference
    is transformers on the dequantized experts)."""
    name = request.param
    ref = folders["mxfp4-ref" if name == "mxfp4" else name]
    return load_ours(folders[name]), load_hf(ref), folders[name], ref


def test_prefill_past_the_window_matches_transformers(pair):
    ours, hf, _, _ = pair
    prompt = _prompt(45, 1)
    assert len(prompt) > 5 * WINDOW
    check_prefill(ours, hf, prompt, ATOL)


@pytest.mark.parametrize("block_size", [16, 4])
def test_decode_token_by_token(pair, block_size):
    """Decode rows through the native CPU attention (sinks, the window) and the MoE's few-row
    paths, against the whole-sequence reference."""
    ours, hf, _, _ = pair
    check_decode(ours, hf, _prompt(37, 2), block_size, ATOL)


def test_chunked_prefill_and_mixed_batch(pair):
    ours, hf, _, _ = pair
    a, b = _prompt(45, 3), _prompt(30, 4)
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)
    runner = PagedRunner(ours, block_size=16)
    got_a, got_b, start = [], [], 0
    for size in (5, 16, 11, 1, 12):       # chunks start and end mid-block, past the window
        step = [("a", a[start:start + size])]
        if start == 21:                   # b's whole prompt beside a's third chunk
            step.append(("b", b))
        out = runner.step(step)
        got_a.append(out[0])
        if len(out) > 1:
            got_b.append(out[1])
        start += size
    torch.testing.assert_close(torch.cat(got_a), ref_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(got_b), ref_b, atol=ATOL, rtol=0)


def test_engine_greedy_tokens_equal_transformers_generate(pair):
    """LLM through the scheduler: prompts longer than the window, prefill in chunks of 16
    tokens beside other requests' decodes, then greedy decode past 60 positions."""
    _, hf, folder, _ = pair
    prompts = [_prompt(40, 5), _prompt(23, 6), _prompt(9, 7)]
    want = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        want.append(out[0, len(p):].tolist())
    llm = LLM(folder, max_num_batched_tokens=16, max_model_len=128,
              kv_cache_memory=64 * 2 * 2 * 16 * 16 * 4 * 2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


def test_mxfp4_experts_stay_4_bit(folders):
    from minserve.kernels.mxfp4 import Mxfp4Experts

    model = load_ours(folders["mxfp4"])
    moe = model.model.layers[0].mlp
    assert isinstance(moe.weights.w13, Mxfp4Experts) and isinstance(moe.weights.w2, Mxfp4Experts)
    assert moe.weights.w13.blocks.dtype == torch.uint8
    assert moe.experts is None          # nothing but the stacks holds the experts
    e, h, i = 4, 64, 64
    assert moe.weights.w13.nbytes() + moe.weights.w2.nbytes() == 3 * e * h * i * 17 // 32  # 4.25 b


def test_dummy_load_format_builds_both_layouts(folders):
    for name in ("model", "mxfp4"):
        model = load_ours(folders[name], load_format="dummy")
        runner = PagedRunner(model, block_size=16)
        (logits,) = runner.step([("a", _prompt(20, 8))])
        assert torch.isfinite(logits).all() and logits.std() > 0


def test_config_errors_are_start_up_errors(folders, tmp_path):
    from minserve.models.gpt_oss import GptOssConfig

    with open(os.path.join(folders["mxfp4"], "config.json")) as f:
        hf = json.load(f)
    cfg = GptOssConfig.from_dict(hf)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    assert cfg.moe.router == "topk_softmax" and cfg.moe.num_experts == 4
    assert cfg.sliding_window == WINDOW and [cfg.is_sliding(i) for i in range(2)] == [True, False]
    with pytest.raises(ConfigError, match="layer_types must name 2 layers"):
        GptOssConfig.from_dict({**hf, "layer_types": ["full_attention"]})
    with pytest.raises(ConfigError, match="num_local_experts"):
        GptOssConfig.from_dict({k: v for k, v in hf.items() if k != "num_local_experts"})
    with pytest.raises(ConfigError, match="mxfp4 needs a mxfp4 checkpoint"):
        load_ours(folders["model"], quantization="mxfp4")
    with pytest.raises(ConfigError, match="no kernel on meta"):
        from minserve.models.quant.mxfp4 import Mxfp4Config

        Mxfp4Config().check_device(torch.device("meta"))
