"""Speculative decoding with prompt lookup (ngram) on a tiny random Llama: token for token what
the same engine gives without speculation (greedy, and seeded sampling with penalties), through
chunked prefill, prefix hits, preemption, n > 1 and logprobs; rows with and without drafts in
one step; no block holding a rejected draft is ever published; max_tokens, stop ids, stop
strings and grammars exact; the tallies and metrics move; bad configurations are start-up
errors naming the key."""
from __future__ import annotations

import json
import re

import pytest

from minserve import LLM
from minserve.config import ConfigError, EngineConfig, SpeculativeConfig
from minserve.engine.engine import Engine
from minserve.engine.kv_cache import hash_block, prefix_root
from minserve.engine.request import EngineRequest, FinishReason, Request
from minserve.engine.spec.ngram import propose_ngram
from minserve.engine.spec.rejection import accept_drafts
from minserve.sampling_params import SamplingParams

# repetitive prompts: a tiny random model falls into loops, which prompt lookup drafts well
PROMPTS = [
    [5, 17, 99, 3, 250] * 6,
    list(range(40, 63)) * 2,
    [(i * 37) % 500 + 3 for i in range(41)],
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "min_acceptance_rate": 0, "disable_by_batch_size": 64}
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def make_engine(model_dir: str, spec: dict | None = None, **kw) -> Engine:
    kw.setdefault("kv_cache_memory", 4 << 20)
    return Engine(EngineConfig(model=model_dir, speculative_config=spec, **kw))


def generate(engine: Engine, prompts, params) -> dict[str, list]:
    ps = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, ps, strict=True)):
        engine.add_request(EngineRequest(f"q{i}", p, sp))
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def toks(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def all_toks(outs) -> dict[str, list[int]]:
    return {rid: toks(o) for rid, o in outs.items()}


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return make_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return make_engine(tiny_model_dir, NGRAM)


def test_prompt_lookup_and_acceptance_rules():
    import numpy as np

    t = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert propose_ngram(t, 1, 3, 2) == [4, 5]          # the longest n-gram first
    assert propose_ngram(t, 4, 5, 2) == []              # no 4-gram recurs
    assert propose_ngram(np.array([7, 9, 7, 8, 7]), 1, 1, 2) == [8, 7]   # the latest match
    assert accept_drafts([4, 5, 6], [4, 5]) == [4, 5, 6]    # all accepted, then the target's
    assert accept_drafts([4, 7, 6], [4, 5]) == [4, 7]       # the target's token at a mismatch
    assert accept_drafts([8, 5, 6], [4, 5]) == [8]


def test_greedy_equals_no_speculation_in_mixed_chunked_steps(tiny_model_dir, plain):
    eng = make_engine(tiny_model_dir, NGRAM, max_num_batched_tokens=16)
    mixed = []
    orig = eng._execute

    def execute(step):
        nd = step.num_draft_tokens
        if nd is not None:
            mixed.append(min(nd) == 0 < max(nd))
        return orig(step)

    eng._execute = execute
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=25, ignore_eos=True), GREEDY]
    ours = all_toks(generate(eng, PROMPTS, params))
    assert ours == all_toks(generate(plain, PROMPTS, params))
    stats = eng.stats()
    assert stats["spec_num_drafts"] > 0 and stats["spec_num_accepted_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]   # some rejected
    assert sum(stats["spec_accepted_per_pos"]) == stats["spec_num_accepted_tokens"]
    assert any(mixed)    # rows with and without drafts in one step
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks


def test_no_block_with_a_rejected_draft_is_published(spec):
    outs = generate(spec, PROMPTS, GREEDY)
    assert spec.stats()["spec_num_accepted_tokens"] < spec.stats()["spec_num_draft_tokens"]
    bs = spec.kv_cache.block_size
    valid = set()
    for i, p in enumerate(PROMPTS):
        seq = p + toks(outs[f"q{i}"])
        parent = hash(prefix_root(Request("x", p, GREEDY)))
        for b in range(len(seq) // bs):
            parent = hash_block(parent, tuple(seq[b * bs:(b + 1) * bs]))
            valid.add(parent)
    published = set(spec.kv_cache.pool.cached)
    assert published and published <= valid


def test_prefix_hits_and_preemption(tiny_model_dir, plain):
    # 5 blocks of 16 for three growing requests: preemption on the way, then prefix hits
    eng = make_engine(tiny_model_dir, NGRAM, kv_cache_memory=5 * 8192)
    ref = make_engine(tiny_model_dir, kv_cache_memory=5 * 8192)
    prompts = [PROMPTS[0][:14], PROMPTS[1][:15], PROMPTS[0][3:33]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = all_toks(generate(eng, prompts, params))
    assert eng.stats()["num_preemptions"] > 0
    assert ours == all_toks(generate(ref, prompts, params))
    hits = eng.stats()["prefix_cache_hits"]
    assert all_toks(generate(eng, prompts[2:], params))["q0"] == ours["q2"]
    assert eng.stats()["prefix_cache_hits"] > hits
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks


def test_seeded_sampling_is_the_same_tokens(spec, plain):
    # n > 1, penalties, top-k/top-p/min-p: each position samples with its own place's noise
    params = [SamplingParams(temperature=0.7, seed=11, n=2, max_tokens=30, ignore_eos=True,
                             top_k=20, top_p=0.9, min_p=0.01),
              SamplingParams(temperature=0.5, seed=3, max_tokens=30, ignore_eos=True,
                             frequency_penalty=0.5, presence_penalty=0.3,
                             repetition_penalty=1.2),
              SamplingParams(temperature=1.0, seed=4, max_tokens=30, ignore_eos=True,
                             min_tokens=10)]
    drafts = spec.stats()["spec_num_draft_tokens"]
    assert all_toks(generate(spec, PROMPTS, params)) == all_toks(generate(plain, PROMPTS, params))
    assert spec.stats()["spec_num_draft_tokens"] > drafts


def test_logprobs_of_the_emitted_tokens(spec, plain):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    a, b = generate(spec, PROMPTS[:2], params), generate(plain, PROMPTS[:2], params)
    # several tokens in one step (accepted drafts), each with its logprob
    assert max(len(o.new_token_ids) for outs in a.values() for o in outs) > 1
    for rid in a:
        lps = [lp for o in a[rid] for lp in o.logprobs]
        ref = [lp for o in b[rid] for lp in o.logprobs]
        assert [lp.token_id for lp in lps] == toks(a[rid]) == [lp.token_id for lp in ref]
        for x, y in zip(lps, ref, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_max_tokens_and_stop_token_ids_never_overshoot(spec, plain):
    ref = toks(generate(plain, PROMPTS[:1], GREEDY)["q0"])
    stop = ref[12]
    for params in (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                   for n in (1, 2, 5, 13, 21)):
        outs = generate(spec, PROMPTS[:1], params)["q0"]
        assert toks(outs) == ref[:params.max_tokens]
        assert outs[-1].finish_reason == FinishReason.LENGTH
    outs = generate(spec, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=40,
                                                       ignore_eos=True,
                                                       stop_token_ids=[stop]))["q0"]
    assert toks(outs) == ref[:ref.index(stop) + 1] and outs[-1].stop_reason == stop
    assert spec.kv_cache.num_free_blocks == spec.kv_cache.num_blocks


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    return (LLM(tiny_model_dir, kv_cache_memory=4 << 20),
            LLM(tiny_model_dir, kv_cache_memory=4 << 20, speculative_config=NGRAM))


def test_stop_strings_end_at_the_same_token(llms):
    plain, spec = llms
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    free = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    text = free.text
    assert len(text) > 12
    for stop in (text[6:9], text[len(text) // 2:len(text) // 2 + 2]):
        params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
        a = spec.generate(prompt, params)[0].outputs[0]
        b = plain.generate(prompt, params)[0].outputs[0]
        assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
            (b.text, b.token_ids, "stop", stop)
        assert stop not in a.text


def test_grammar_holds_with_drafts(llms):
    plain, spec = llms
    regex = r"\[(\d, ){4,12}\d\]"
    params = SamplingParams(temperature=0, max_tokens=80, structured={"regex": regex})
    drafts = spec.engine.stats()["spec_num_draft_tokens"]
    a = spec.generate("numbers: 1, 2, 3, 1, 2, 3", params)[0].outputs[0]
    b = plain.generate("numbers: 1, 2, 3, 1, 2, 3", params)[0].outputs[0]
    assert re.fullmatch(regex, a.text) and a.finish_reason == "stop"
    assert (a.text, a.token_ids) == (b.text, b.token_ids)
    assert spec.engine.stats()["spec_num_draft_tokens"] > drafts


def test_metrics_carry_vllm_names(spec):
    from minserve.metrics import Metrics

    generate(spec, PROMPTS[:1], GREEDY)
    text = Metrics("m", spec.stats).render().decode()
    stats = spec.stats()
    for name, key in (("vllm:spec_decode_num_drafts_total", "spec_num_drafts"),
                      ("vllm:spec_decode_num_draft_tokens_total", "spec_num_draft_tokens"),
                      ("vllm:spec_decode_num_accepted_tokens_total",
                       "spec_num_accepted_tokens")):
        value = float(re.search(rf'^{name}{{model_name="m"}} (\S+)$', text, re.M).group(1))
        assert value == stats[key] > 0
    per_pos = re.findall(r'^vllm:spec_decode_num_accepted_tokens_per_pos_total'
                         r'{model_name="m",position="(\d)"} (\S+)$', text, re.M)
    assert [float(v) for _, v in per_pos] == stats["spec_accepted_per_pos"]
    assert "Mean acceptance length" in (_stats_line(spec) or "")


def _stats_line(engine: Engine) -> str | None:
    from minserve.metrics import StatsWindow

    window = StatsWindow(engine.stats, log=False)
    window._last = (window._last[0], {})
    return window.tick()


@pytest.mark.parametrize("bad, word", [
    ({"method": "ngram", "num_speculative_tokens": 4, "lookahead": 2}, "lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "medusa"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1},
     "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "min_acceptance_rate": 2},
     "min_acceptance_rate"),
    ({"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "draft_tensor_parallel_size"),
    ({"num_speculative_tokens": 2}, "method"),
])
def test_bad_configurations_name_the_key(bad, word):
    with pytest.raises(ConfigError, match=word):
        EngineConfig(speculative_config=bad)


def test_cli_flag_and_mtp_without_mtp_layers(tiny_model_dir, capsys):
    from minserve.cli import parse_args

    args = parse_args(["--speculative-config", json.dumps(NGRAM)])
    assert args.engine_config.speculative_config == SpeculativeConfig.from_dict(NGRAM)
    with pytest.raises(SystemExit):
        parse_args(["--speculative-config", '{"method": "ngram"}'])
    assert "num_speculative_tokens" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no MTP layers"):
        make_engine(tiny_model_dir, {"method": "mtp", "num_speculative_tokens": 1})
