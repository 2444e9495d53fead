"""gpt-oss under tensor parallelism on CPU (gloo, two processes): heads, sinks and each expert's
intermediate dim split across the ranks (bf16 experts, and MXFP4 blocks split on whole 32-value
groups), or whole experts per rank (--enable-expert-parallel), give one process's logits; the
engine at -tp 2 gives one process's greedy tokens. MXFP4 shares that would cut a scale group are
a start-up error naming the fix. One process group for the module."""
from __future__ import annotations

import json
import os

import pytest
import torch

from minserve import LLM, SamplingParams
from minserve.config import ConfigError
from tests.paged_runner import load_ours
from tests.tiny_gpt_oss import make_mxfp4_pair, make_tiny_gpt_oss
from tests.tp_ranks import assert_steps_match, run_steps, spawn_ranks

# (name, folder, load options for tests/tp_ranks.py)
CASES = [("bf16-split", "model", ""), ("mxfp4-split", "mxfp4", ""), ("mxfp4-ep", "mxfp4", "ep")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss-tp")
    model = make_tiny_gpt_oss(str(root / "model"))
    make_mxfp4_pair(model, str(root / "mxfp4"), str(root / "mxfp4-ref"))
    return {"model": model, "mxfp4": str(root / "mxfp4")}


@pytest.fixture(scope="module")
def sharded_logits(folders, tmp_path_factory):
    specs = [folders[f] + (f"::{opts}" if opts else "") for _, f, opts in CASES]
    logits = spawn_ranks(specs, tmp_path_factory.mktemp("gpt-oss-tp-out"))
    return {name: got for (name, _, _), got in zip(CASES, logits, strict=True)}


@pytest.mark.parametrize("name,folder", [c[:2] for c in CASES], ids=[c[0] for c in CASES])
def test_sharded_logits_match_one_process(name, folder, folders, sharded_logits):
    # prefill chunks past the window, decodes
    assert_steps_match(run_steps(load_ours(folders[folder])), sharded_logits[name])


def test_engine_greedy_tokens_at_tp2_equal_one_process(folders):
    prompts = [[(7 * i + j) % 400 + 10 for j in range(20 + 6 * i)] for i in range(3)]
    args = {"kv_cache_memory": 1 << 20, "max_num_batched_tokens": 16, "max_model_len": 128}
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(folders["mxfp4"], **args).generate(prompts,
                                                                                   greedy)]
    two = LLM(folders["mxfp4"], tensor_parallel_size=2, **args)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, greedy)]
    finally:
        two.engine.shutdown()
    assert got == want


def test_mxfp4_shares_that_cut_a_scale_group_are_a_startup_error(folders):
    from minserve.models.gpt_oss import GptOssConfig, GptOssExperts

    with open(os.path.join(folders["mxfp4"], "config.json")) as f:
        cfg = GptOssConfig.from_dict(json.load(f))      # intermediate_size 64: 32 per rank at 2
    with torch.device("meta"):
        GptOssExperts(cfg, range(4), (1, 2), mxfp4=True)
        with pytest.raises(ConfigError, match=r"64 / 4 = 16.*multiples of 32.*"
                                              r"--enable-expert-parallel"):
            GptOssExperts(cfg, range(4), (1, 4), mxfp4=True)
        GptOssExperts(cfg, range(4), (1, 4), mxfp4=False)   # bf16 experts split anywhere
