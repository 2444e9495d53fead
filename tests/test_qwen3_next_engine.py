"""A hybrid model (Qwen3-Next: Gated DeltaNet + gated attention, MoE) through the engine: greedy
tokens equal transformers' generate for concurrent prompts of different lengths under chunked
prefill, under preemption (the state slot is freed and the prompt recomputed), with fewer state
slots than --max-num-seqs; n = 3 sampled with a seed equals three requests with those seeds."""
from __future__ import annotations

import pytest
import torch

from minserve import LLM, SamplingParams
from minserve.config import ConfigError
from tests.paged_runner import load_hf
from tests.test_qwen3_next import VARIANTS, prompt
from tests.tiny import make_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    arch, overrides = VARIANTS["qwen3next-moe"]
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3next")), arch, **overrides)


@pytest.fixture(scope="module")
def hf(folder):
    return load_hf(folder)


@pytest.fixture(scope="module")
def prompts():
    return [prompt(n, 40 + n) for n in (37, 5, 70, 18)]


@pytest.fixture(scope="module")
def expected(hf, prompts):
    with torch.inference_mode():
        return [hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder, max_num_batched_tokens=16, max_model_len=128, kv_cache_memory=1 << 22)


def test_concurrent_chunked_requests_equal_transformers(llm, prompts, expected):
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_preemption_and_few_slots_give_the_same_tokens(folder, prompts, expected, capfd):
    """A cache too small for all four: requests are preempted (their slots freed, their prompts
    recomputed) and only a few state slots exist, fewer than --max-num-seqs."""
    llm = LLM(folder, max_num_batched_tokens=32, max_model_len=128, max_num_seqs=8,
              kv_cache_memory=100_000)
    err = capfd.readouterr().err
    assert "fewer than --max-num-seqs 8" in err
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.stats()["num_preemptions"] > 0


def test_n3_seeded_equals_three_seeded_requests(llm):
    p = prompt(21, 3)
    params = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    (together,) = llm.generate([p], SamplingParams(n=3, seed=7, **params), use_tqdm=False)
    apart = llm.generate([p] * 3, [SamplingParams(seed=7 + i, **params) for i in range(3)],
                         use_tqdm=False)
    assert [c.token_ids for c in together.outputs] == [o.outputs[0].token_ids for o in apart]
    assert len({tuple(c.token_ids) for c in together.outputs}) > 1


def test_second_chat_turn_resumes_from_a_state_snapshot(llm, hf, prompts, expected):
    """Turn two (turn one's prompt and answer, then more) hits the prefix cache up to the last
    block boundary turn one passed, restores the linear layers' states saved there, and
    prefills only the rest: its tokens equal transformers' on the whole prompt."""
    turn2 = prompts[0] + expected[0] + prompt(7, 99)          # 37 + 10 + 7 tokens
    with torch.inference_mode():
        want = hf.generate(torch.tensor([turn2]), max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(turn2):].tolist()
    (one,) = llm.generate([prompts[0]], GREEDY, use_tqdm=False)
    assert one.outputs[0].token_ids == expected[0]
    (out,) = llm.generate([turn2], GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == want
    assert out.num_cached_tokens == 32       # turn one computed 46 tokens: two 16-token blocks
    snaps = llm.engine.kv_cache.state_snapshots
    assert snaps is not None and 0 < len(snaps._ids) <= snaps.capacity


def test_speculative_decoding_is_a_clear_startup_error(folder):
    with pytest.raises(ConfigError, match="hybrid linear-attention"):
        LLM(folder, max_model_len=128, kv_cache_memory=1 << 22,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
