"""Sleep mode (vLLM's): level 1 (weights kept in host memory, KV cache freed) and level 2
(weights dropped, reloaded from the checkpoint) then wake_up give the greedy tokens of before;
the server's /sleep, /wake_up and /is_sleeping, and a request while asleep (a 503)."""
from __future__ import annotations

import pytest

from minserve import LLM, SamplingParams
from tests.asgi import call
from tests.serving import real_app, run

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["Hello world", "The quick brown fox"]


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, kv_cache_memory=4 << 20)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_then_wake_gives_the_same_tokens(llm, level):
    before = _tokens(llm)
    llm.sleep(level)
    engine = llm.engine
    weights = sum(p.numel() for p in engine.runner.model.parameters())
    # level 2 drops every weight; level 1 on a CPU keeps them (host memory already)
    assert (weights == 0) == (level == 2)
    assert engine.kv_cache.num_free_blocks == engine.runner.num_blocks
    with pytest.raises(ValueError, match="sleeping"):
        llm.generate(PROMPTS, GREEDY)
    llm.wake_up()
    assert engine.parked is None
    assert _tokens(llm) == before


def test_sleep_routes(tiny_model_dir):
    body = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def fn(app):
        r = {"before": await call(app, "POST", "/v1/completions", body)}
        r["level"] = await call(app, "POST", "/sleep", query=b"level=3")
        r["sleep"] = await call(app, "POST", "/sleep", query=b"level=2")
        r["asleep"] = await call(app, "GET", "/is_sleeping")
        r["during"] = await call(app, "POST", "/v1/completions", body)
        r["wake"] = await call(app, "POST", "/wake_up")
        r["awake"] = await call(app, "GET", "/is_sleeping")
        r["after"] = await call(app, "POST", "/v1/completions", body)
        return r

    r = run(real_app(tiny_model_dir, enable_sleep_mode=True), fn)
    assert r["level"].status == 400 and "level" in r["level"].json()["error"]["message"]
    assert r["sleep"].status == r["wake"].status == 200
    assert r["asleep"].json() == {"is_sleeping": True}
    assert r["awake"].json() == {"is_sleeping": False}
    assert r["during"].status == 503 and "wake_up" in r["during"].json()["error"]["message"]
    text = [x.json()["choices"][0]["text"] for x in (r["before"], r["after"])]
    assert text[0] == text[1]


def test_sleep_routes_need_the_flag(tiny_model_dir):
    async def fn(app):
        return await call(app, "POST", "/sleep")

    assert run(real_app(tiny_model_dir), fn).status == 404
