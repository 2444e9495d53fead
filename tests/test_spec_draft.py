"""Speculative decoding with a draft model (its own paged KV cache, built by the one builder):
token for token what the engine gives without speculation, with a draft equal to the target
(nearly every draft accepted) and with an unrelated random draft (few accepted); through
chunked prefill (the draft catches up chunk by chunk), preemption and seeded sampling; a draft
whose vocabulary differs, or an EAGLE-3 head named as a draft model, is a start-up error."""
from __future__ import annotations

import pytest

from minserve.config import ConfigError
from minserve.engine.request import FinishReason
from minserve.sampling_params import SamplingParams
from tests.test_spec import PROMPTS, all_toks, generate, make_engine

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def draft_config(folder: str, **kw) -> dict:
    return {"model": folder, "num_speculative_tokens": 3, "disable_by_batch_size": 64, **kw}


@pytest.fixture(scope="module")
def other_draft(tiny_model_factory):
    return tiny_model_factory("LlamaForCausalLM", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return make_engine(tiny_model_dir, max_num_batched_tokens=16)


def test_a_draft_equal_to_the_target_is_nearly_always_accepted(tiny_model_dir, plain):
    eng = make_engine(tiny_model_dir, draft_config(tiny_model_dir), max_num_batched_tokens=16)
    assert eng.runner.drafter is not None and eng.runner.drafter.runner.num_blocks == \
        eng.runner.num_blocks
    ours = all_toks(generate(eng, PROMPTS, GREEDY))
    assert ours == all_toks(generate(plain, PROMPTS, GREEDY))
    s = eng.stats()
    assert s["spec_num_drafts"] > 0
    assert s["spec_num_accepted_tokens"] >= 0.9 * s["spec_num_draft_tokens"]
    # 3 tokens verified and one more of the target's: about 4 tokens a step, not 1
    assert s["num_generation_tokens"] >= 3 * s["spec_num_drafts"]
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks


def test_an_unrelated_draft_changes_nothing_but_the_speed(tiny_model_dir, other_draft, plain):
    eng = make_engine(tiny_model_dir, draft_config(other_draft, min_acceptance_rate=0),
                      max_num_batched_tokens=16)
    params = [GREEDY, SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=20,
                                     ignore_eos=True, top_p=0.9),
              SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[7])]
    ours = generate(eng, PROMPTS, params)
    assert all_toks(ours) == all_toks(generate(plain, PROMPTS, params))
    s = eng.stats()
    assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"]
    assert ours["q2"][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks


def test_preemption_resets_the_draft_cache(tiny_model_dir):
    # 5 blocks of 16 either way: the draft's cache (8 KiB a block) is sized with the target's
    eng = make_engine(tiny_model_dir, draft_config(tiny_model_dir), kv_cache_memory=10 * 8192)
    ref = make_engine(tiny_model_dir, kv_cache_memory=5 * 8192)
    assert eng.info.num_kv_blocks == ref.info.num_kv_blocks == 5
    # three rows of one block each, growing to two: one of them is preempted
    prompts = [PROMPTS[0][:10], PROMPTS[1][:10], PROMPTS[2][:10]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = all_toks(generate(eng, prompts, params))
    assert eng.stats()["num_preemptions"] > 0
    assert ours == all_toks(generate(ref, prompts, params))
    s = eng.stats()
    assert s["spec_num_accepted_tokens"] >= 0.9 * s["spec_num_draft_tokens"] > 0


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir, tiny_model_factory):
    other = tiny_model_factory("LlamaForCausalLM", vocab_size=509)
    with pytest.raises(ConfigError, match=r"vocabulary \(509 tokens\) does not match the "
                                          r"target's \(512\)"):
        make_engine(tiny_model_dir, draft_config(other))
