"""Speculative decoding's "never slower" switches: no drafts in a step once disable_by_batch_size
requests run; a request whose drafts keep being rejected drafts nothing for a while (backing off
longer each time), then tries again; the start-up log states the defaults; beam search runs
without speculation (and gives what it gives without)."""
from __future__ import annotations

import logging

from minserve.engine.request import Request
from minserve.engine.spec.policy import SpecPolicy, SpecState
from minserve.sampling_params import SamplingParams
from tests.test_spec import NGRAM, PROMPTS, all_toks, generate, make_engine

GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def spy_drafts(engine) -> list[list[int] | None]:
    """Every step's drafts per row (None: a step that verifies none)."""
    seen = []
    orig = engine._execute

    def execute(step):
        seen.append(None if step.num_draft_tokens is None else list(step.num_draft_tokens))
        return orig(step)

    engine._execute = execute
    return seen


def test_no_drafts_in_a_step_with_a_large_batch(tiny_model_dir):
    eng = make_engine(tiny_model_dir, {**NGRAM, "disable_by_batch_size": 3})
    seen = spy_drafts(eng)
    # three requests at once: no step drafts until one finishes and two remain
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), GREEDY]
    ref = all_toks(generate(make_engine(tiny_model_dir), PROMPTS, params))
    assert all_toks(generate(eng, PROMPTS, params)) == ref
    rows = [s for s in seen if s is not None]
    assert rows and all(len(s) < 3 for s in rows)   # drafts only with fewer than 3 rows
    assert any(s is None for s in seen[:8])          # the 3-row steps verify nothing
    assert eng.stats()["spec_num_draft_tokens"] > 0


def _request(max_tokens: int | None = 100) -> Request:
    r = Request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=max_tokens))
    r.spec_state = SpecState()
    return r


def test_low_acceptance_backs_off_longer_each_time():
    policy = SpecPolicy(4, disable_by_batch_size=8, min_acceptance_rate=0.5, max_model_len=1000)
    r = _request()
    assert policy.num_drafts(r) == 4
    policy.observe(r, 4, 4)                     # all accepted: goes on drafting
    assert policy.num_drafts(r) == 4

    def rejected_spell() -> int:
        """Reject every draft until the request stops drafting; how many steps it pauses."""
        while r.spec_state.backoff == 0:
            policy.observe(r, 4, 0)
        paused = 0
        while policy.num_drafts(r) == 0:
            paused += 1
        return paused

    first, second = rejected_spell(), rejected_spell()
    assert 0 < first < second                   # drafts again after a pause, a longer one next
    policy.observe(r, 4, 4)                     # a good round resets the pause
    assert rejected_spell() == first
    for _ in range(3):
        policy.observe(r, 4, 4)
    policy.observe(r, 4, 0)                     # one miss after a good run: still drafting
    assert r.spec_state.backoff == 0 and policy.num_drafts(r) == 4
    assert not policy.step_enabled(8) and policy.step_enabled(7)


def test_drafts_never_run_past_max_tokens_or_the_context():
    policy = SpecPolicy(4, 8, 0.0, max_model_len=10)
    assert policy.num_drafts(_request(max_tokens=3)) == 2     # the last token is the target's
    assert policy.num_drafts(_request(max_tokens=1)) == 0
    assert policy.num_drafts(_request(max_tokens=None)) == 4  # 10 - 3 tokens - 1 = 6 left
    assert SpecPolicy(4, 8, 0.0, max_model_len=6).num_drafts(_request(None)) == 2


def test_the_start_up_log_states_the_defaults(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="minserve.spec"):
        make_engine(tiny_model_dir, {"method": "ngram", "num_speculative_tokens": 3})
    line = next(r.getMessage() for r in caplog.records if "speculative decoding" in r.getMessage())
    assert "ngram" in line and "3 tokens" in line and "off from 4 requests" in line
    assert "30%" in line


def test_beam_search_runs_without_speculation(tiny_model_dir):
    eng = make_engine(tiny_model_dir, NGRAM)
    seen = spy_drafts(eng)
    params = SamplingParams(use_beam_search=True, n=2, max_tokens=10, ignore_eos=True,
                            temperature=0)
    outs = all_toks(generate(eng, PROMPTS[:1], params))
    assert set(outs) == {"q0-0", "q0-1"}
    assert outs == all_toks(generate(make_engine(tiny_model_dir), PROMPTS[:1], params))
    assert seen and all(s is None for s in seen)
