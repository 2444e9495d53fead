"""Beam search on the engine (engine/beam.py): width 1 is greedy, wider searches match a
plain-torch reference beam search over transformers' logits of the same tiny weights, and the
beams share the prompt's KV blocks through the prefix cache."""
from __future__ import annotations

import pytest
import torch

from minserve.engine.beam import Beam, beam_score
from minserve.engine.request import EngineRequest
from minserve.sampling_params import SamplingParams
from tests.test_engine import generate, hf_model, make_engine, toks  # noqa: F401 (fixture)

PROMPT = [(i * 37) % 500 + 3 for i in range(35)]   # 35 tokens: two full blocks of 16


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def reference_beam_search(hf_model, prompt: list[int], width: int, max_tokens: int,
                          length_penalty: float = 1.0) -> list[list[int]]:
    """vLLM's beam search (2 x width candidates per beam, best `width` kept by score), over the
    full-sequence log-softmax of transformers' model: no KV cache, no engine."""
    beams = [Beam([])]
    with torch.no_grad():
        for _ in range(max_tokens):
            candidates = []
            for beam in beams:
                logits = hf_model(torch.tensor([prompt + beam.token_ids])).logits[0, -1]
                lp = torch.log_softmax(logits.float(), -1)
                top = lp.topk(2 * width)
                for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    candidates.append(Beam(beam.token_ids + [t], beam.cum_logprob + v))
            candidates.sort(key=lambda b: beam_score(len(prompt), b, length_penalty),
                            reverse=True)
            beams = candidates[:width]
    return [b.token_ids for b in beams]


def _beam_params(width: int, max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(n=width, max_tokens=max_tokens, ignore_eos=True, temperature=0,
                          use_beam_search=True, **kw)


def test_width_one_is_greedy(engine):
    greedy = generate(engine, [PROMPT], SamplingParams(temperature=0, max_tokens=6,
                                                       ignore_eos=True))
    beam = generate(engine, [PROMPT], _beam_params(1, 6), ids=["b"])
    assert toks(beam["b"]) == toks(greedy["q0"])
    assert engine.scheduler.num_running == 0 and not engine.beams.searches


@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (3, 0.5)])
def test_matches_reference_beam_search(engine, hf_model, width, length_penalty):  # noqa: F811
    want = reference_beam_search(hf_model, PROMPT, width, 4, length_penalty)
    outs = generate(engine, [PROMPT], _beam_params(width, 4, length_penalty=length_penalty),
                    ids=["w"])
    got = [toks(outs[f"w-{i}"]) for i in range(width)]
    assert got == want


def test_beams_share_the_prompt_blocks(engine):
    before = engine.kv_cache.prefix_cache_hits
    generate(engine, [PROMPT + [7]], _beam_params(3, 3), ids=["s"])
    # rounds 2 and 3: every beam finds the prompt's two full blocks in the prefix cache
    assert engine.kv_cache.prefix_cache_hits - before >= 2 * 3 * 32
    assert engine.kv_cache.usage == 0 or engine.scheduler.num_running == 0


def test_abort_stops_the_search(engine):
    engine.add_request(EngineRequest("a", PROMPT, _beam_params(2, 50)))
    engine.step()
    engine.abort_request(["a-0", "a-1"])
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.beams.searches and engine.scheduler.num_running == 0
