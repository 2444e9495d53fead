"""The model pool (--models-dir): three tiny models (built here, different weights) and a broken
one, with room for one loaded model. Requests alternate A, B, C, A with each model's own greedy
text (LLM on its folder); two models asked at once share the one slot (no deadlock, nothing
lost, only idle models evicted); a model with broken files fails alone; nothing evictable: a 503
with Retry-After, and so does a load that outlasts --model-wait-timeout; an unloaded model gives
its memory back (RSS) and its engine thread; sleep mode parks the evicted model and wakes it
with the same tokens; the tokenizer, Responses and Messages routes lease pooled models too; a
tiny BERT folder is a pooled embedding model for /v1/embeddings and /v1/rerank."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading

import pytest

from minserve import LLM, SamplingParams
from minserve.cli import parse_args, server_config
from minserve.config import EngineConfig
from minserve.models_dir import PoolSpec, discover
from minserve.pool import ModelPool
from minserve.server import ServerConfig, create_app
from tests.asgi import call
from tests.serving import run, wait_until
from tests.tiny import make_tiny_model

BODY = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(NAMES):
        make_tiny_model(str(root / name), seed=seed)
    broken = root / "broken"
    shutil.copytree(root / "a", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    # a bigger model of random weights (no weight files: --load-format dummy), for RSS
    big = root / "big"
    shutil.copytree(root / "a", big, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((big / "config.json").read_text())
    cfg.update(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
               num_key_value_heads=8, head_dim=64, num_hidden_layers=4)
    (big / "config.json").write_text(json.dumps(cfg))
    (root / "minserve-models.json").write_text(json.dumps({"big": {"load_format": "dummy"}}))
    return str(root)


@pytest.fixture(scope="module")
def expected(models_dir):
    """Each model's greedy text, from LLM on its folder."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = {}
    for name in NAMES:
        llm = LLM(os.path.join(models_dir, name), kv_cache_memory=4 << 20)
        out[name] = llm.generate(BODY["prompt"], params)[0].outputs[0].text
        del llm
    assert len(set(out.values())) == 3, "the three models should answer differently"
    return out


def pool_app(models_dir, **spec):
    base = EngineConfig(kv_cache_memory=4 << 20, max_model_len=512)
    models = discover(models_dir, base)
    return create_app(None, ServerConfig(served_model_names=[]),
                      pool=PoolSpec(models, **{"max_loaded": 1, **spec}))


async def complete(app, model):
    r = await call(app, "POST", "/v1/completions", {**BODY, "model": model})
    assert r.status == 200, r.body
    return r.json()["choices"][0]["text"]


def statuses(models) -> dict[str, str]:
    return {card["id"]: card["status"] for card in models.json()["data"]}


def test_discover_and_settings(models_dir):
    models = {m.name: m for m in discover(models_dir, EngineConfig())}
    assert sorted(models) == ["a", "b", "big", "broken", "c"]
    assert models["big"].config.load_format == "dummy" and models["a"].config.model.endswith("/a")
    assert models["a"].size_bytes > 0 and models["big"].size_bytes == 0


def test_alternating_models_with_room_for_one(models_dir, expected):
    async def fn(app):
        texts = [await complete(app, name) for name in ("a", "b", "c", "a")]
        return (texts, await call(app, "GET", "/v1/models"),
                await call(app, "GET", "/metrics"), await call(app, "GET", "/health"))

    texts, models, metrics, health = run(pool_app(models_dir), fn)
    assert texts == [expected[n] for n in ("a", "b", "c", "a")]
    assert statuses(models) == {"a": "loaded", "b": "unloaded", "c": "unloaded",
                                "big": "unloaded", "broken": "unloaded"}
    assert [c["max_model_len"] for c in models.json()["data"] if c["id"] == "a"] == [512]
    text = metrics.body.decode()
    assert 'minserve:model_loads_total{model_name="a"} 2.0' in text
    assert 'minserve:model_unloads_total{model_name="b"} 1.0' in text
    assert 'minserve:model_load_seconds_count{model_name="c"} 1.0' in text
    # each pooled model's requests count under its own name
    assert 'vllm:request_success_total{finished_reason="length",model_name="a"} 2.0' in text
    assert health.status == 200


def test_two_models_at_once_share_one_slot(models_dir, expected):
    evicted_busy = []

    async def fn(app):
        pool = app.pool
        unload = pool._unload

        async def checked(m):      # eviction only of idle models
            evicted_busy.extend([m.name] if m.users else [])
            await unload(m)

        pool._unload = checked
        names = ["a", "b"] * 3
        return names, await asyncio.gather(*(complete(app, n) for n in names))

    names, texts = run(pool_app(models_dir, wait_timeout_s=120), fn)
    assert texts == [expected[n] for n in names]
    assert evicted_busy == []


def test_broken_model_fails_alone(models_dir, expected):
    async def fn(app):
        bad = await call(app, "POST", "/v1/completions", {**BODY, "model": "broken"})
        return (bad, await complete(app, "a"), await call(app, "GET", "/v1/models"),
                await call(app, "GET", "/health"))

    bad, text, models, health = run(pool_app(models_dir), fn)
    assert bad.status == 503 and "broken" in bad.json()["error"]["message"]
    assert "failed to load" in bad.json()["error"]["message"]
    assert text == expected["a"] and health.status == 200
    cards = {card["id"]: card for card in models.json()["data"]}
    assert cards["broken"]["status"] == "failed" and cards["broken"]["error"]


def test_no_room_is_a_503_with_retry_after(models_dir):
    async def fn(app):
        async with app.pool.lease("a"):      # a request in flight on the one loaded model
            r = await call(app, "POST", "/v1/completions", {**BODY, "model": "b"})
            busy = await call(app, "POST", "/v1/models/a/unload")
        return r, busy

    r, busy = run(pool_app(models_dir, wait_timeout_s=0.2), fn)
    assert r.status == 503 and r.headers.get("retry-after") == "5"
    assert "no room" in r.json()["error"]["message"]
    assert busy.status == 409


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def _engine_threads() -> int:
    return sum(t.name == "minserve-engine" for t in threading.enumerate())


def test_load_and_unload_routes_give_memory_back(models_dir):
    async def fn(app):
        # Two load/unload cycles, RSS after each: in a process that has run many other tests the
        # allocator keeps some freed pages and hands them to the next load, so a single cycle's
        # before/after pair is noise; what must hold is that cycles do not grow the process and
        # that an unload gives back the bulk of what the loaded model holds.
        r = {"threads": _engine_threads()}
        await call(app, "POST", "/v1/models/big/load")
        await call(app, "POST", "/v1/models/big/unload")
        r["after1"] = _rss()
        r["load"] = await call(app, "POST", "/v1/models/big/load")
        r["loaded"], r["loaded_threads"] = _rss(), _engine_threads()
        r["unload"] = await call(app, "POST", "/v1/models/big/unload")
        r["after"], r["after_threads"] = _rss(), _engine_threads()
        r["missing"] = await call(app, "POST", "/v1/models/nope/load")
        return r

    r = run(pool_app(models_dir), fn)
    assert r["load"].json()["status"] == "loaded" and r["unload"].json()["status"] == "unloaded"
    assert r["missing"].status == 404
    weights = 4 * (4 * (4 * 512 * 512 + 3 * 512 * 2048))      # float32, 4 layers
    assert r["loaded"] - r["after"] > weights * 0.4       # the unload gave the model's memory back
    assert r["after"] - r["after1"] < weights * 0.25      # and a second cycle did not grow RSS
    assert r["loaded_threads"] == r["threads"] + 1 and r["after_threads"] == r["threads"]


def test_sleep_mode_parks_the_evicted_model(models_dir, expected, monkeypatch):
    # parking frees device memory only on a GPU; here the CPU plays one
    monkeypatch.setattr(ModelPool, "_can_park", lambda self, m: True)

    async def fn(app):
        texts = [await complete(app, "a"), await complete(app, "b")]
        models = await call(app, "GET", "/v1/models")
        texts.append(await complete(app, "a"))
        return texts, models, app.pool.models["a"].loads

    texts, models, loads = run(pool_app(models_dir, park=True), fn)
    assert texts == [expected["a"], expected["b"], expected["a"]]
    assert statuses(models)["a"] == "sleeping"
    assert loads == 2     # the load, then the wake-up


def test_keep_alive_unloads_an_idle_model(models_dir, expected):
    async def fn(app):
        text = await complete(app, "a")
        m = app.pool.models["a"]
        await wait_until(lambda: m.status == "unloaded", 30, "the idle model to be unloaded")
        return text, m.unloads

    text, unloads = run(pool_app(models_dir, keep_alive_s=0.2), fn)
    assert text == expected["a"] and unloads == 1


def test_flags_build_the_pool(models_dir, tmp_path, capsys):
    args = parse_args(["--models-dir", models_dir, "--max-loaded-models", "2",
                       "--models-memory", "3", "--keep-alive", "60", "--device", "cpu"])
    spec = args.pool_spec
    assert [m.name for m in spec.models] == ["a", "b", "big", "broken", "c"]
    assert (spec.max_loaded, spec.memory_bytes, spec.keep_alive_s) == (2, 3 << 30, 60.0)
    assert server_config(args).served_model_names == []     # the pool alone
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    (tmp_path / "minserve-models.json").write_text(json.dumps({"a": {"max_len": 5}}))
    with pytest.raises(SystemExit):
        parse_args(["--models-dir", str(tmp_path)])
    assert "unknown setting(s) max_len" in capsys.readouterr().err


def test_unknown_or_missing_model_is_a_4xx(models_dir):
    async def fn(app):
        return (await call(app, "POST", "/v1/completions", {**BODY, "model": "nope"}),
                await call(app, "POST", "/v1/completions", BODY),
                await call(app, "POST", "/v1/models/nope/unload"))

    unknown, missing, unload = run(pool_app(models_dir), fn)
    assert unknown.status == 404 and "`a`" in unknown.json()["error"]["message"]
    assert missing.status == 400 and "required" in missing.json()["error"]["message"]
    assert unload.status == 404


def test_other_routes_lease_pooled_models(models_dir):
    """/tokenize, /detokenize, /v1/messages (+ count_tokens) and /v1/responses (background too)
    load the model they name on demand, as the generation routes do, and answer as its chat
    route does."""
    chat = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 6,
            "temperature": 0}

    async def fn(app):
        out = {"tok": await call(app, "POST", "/tokenize", {"model": "b", "prompt": "Hello"})}
        out["after_tok"] = statuses(await call(app, "GET", "/v1/models"))
        out["detok"] = await call(app, "POST", "/detokenize",
                                  {"model": "c", "tokens": out["tok"].json()["tokens"]})
        out["missing"] = await call(app, "POST", "/tokenize", {"prompt": "Hello"})
        out["msg"] = await call(app, "POST", "/v1/messages", {**chat, "model": "a"})
        out["count"] = await call(app, "POST", "/v1/messages/count_tokens",
                                  {"model": "b", "messages": chat["messages"]})
        out["chat_a"] = await call(app, "POST", "/v1/chat/completions", {**chat, "model": "a"})
        r = await call(app, "POST", "/v1/responses", {
            "model": "c", "input": "Hello world", "max_output_tokens": 6, "temperature": 0,
            "background": True})
        rid = r.json()["id"]
        done = {}

        async def finished():
            done["r"] = await call(app, "GET", f"/v1/responses/{rid}")
            return done["r"].json()["status"] not in ("queued", "in_progress")

        deadline = asyncio.get_running_loop().time() + 60
        while not await finished():
            assert asyncio.get_running_loop().time() < deadline, done["r"].body
            await asyncio.sleep(0.01)
        out["resp"] = done["r"]
        # the background run gives its lease back as it ends (just after its status is final)
        await wait_until(lambda: app.pool.models["c"].users == 0, what="c's lease back")
        out["chat_c"] = await call(app, "POST", "/v1/chat/completions", {**chat, "model": "c"})
        return out

    out = run(pool_app(models_dir), fn)
    assert out["tok"].status == 200 and out["tok"].json()["count"] > 0
    assert out["after_tok"]["b"] == "loaded"
    assert out["detok"].status == 200 and out["detok"].json()["prompt"].endswith("Hello")
    assert out["missing"].status == 400
    assert out["msg"].status == 200, out["msg"].body
    assert out["msg"].json()["content"][0]["text"] == \
        out["chat_a"].json()["choices"][0]["message"]["content"]
    assert out["count"].status == 200 and out["count"].json()["input_tokens"] > 0
    assert out["resp"].json()["status"] == "incomplete"     # max_output_tokens reached
    text = out["resp"].json()["output"][-1]["content"][0]["text"]
    assert text == out["chat_c"].json()["choices"][0]["message"]["content"]


def test_embedding_model_joins_the_pool(models_dir, expected, tmp_path):
    """A folder whose architecture embeds (a tiny BERT) is a pooled embedding model: /v1/embeddings
    and /v1/rerank lease it (loading on demand, evicting the chat model: room for one) and answer
    as the Embedder on its folder; a chat route naming it, or an embedding route naming a chat
    model, is a 400."""
    import numpy as np

    from minserve.embeddings.embedder import Embedder
    from tests.tiny import make_tiny_encoder

    shutil.copytree(os.path.join(models_dir, "a"), tmp_path / "a")
    emb, _ = make_tiny_encoder(str(tmp_path / "emb"), "bert")

    async def fn(app):
        out = {"chat": await complete(app, "a")}
        out["emb"] = await call(app, "POST", "/v1/embeddings", {"model": "emb", "input": "hi"})
        out["after"] = statuses(await call(app, "GET", "/v1/models"))
        out["rerank"] = await call(app, "POST", "/v1/rerank", {
            "model": "emb", "query": "hi", "documents": ["hi", "a cat"]})
        out["wrong_chat"] = await call(app, "POST", "/v1/completions", {**BODY, "model": "emb"})
        out["wrong_emb"] = await call(app, "POST", "/v1/embeddings", {"model": "a", "input": "x"})
        out["again"] = await complete(app, "a")
        return out

    out = run(pool_app(str(tmp_path)), fn)
    assert out["chat"] == out["again"] == expected["a"]
    assert out["emb"].status == 200, out["emb"].body
    want, _ = Embedder(emb).embed(["hi"])
    np.testing.assert_allclose(np.array(out["emb"].json()["data"][0]["embedding"]), want[0],
                               rtol=1e-5, atol=1e-6)
    assert out["after"] == {"a": "unloaded", "emb": "loaded"}
    assert out["rerank"].status == 200, out["rerank"].body
    assert out["rerank"].json()["results"][0]["index"] == 0    # "hi" is most like "hi"
    assert out["wrong_chat"].status == 400 and "embedding model" in out["wrong_chat"].body.decode()
    assert out["wrong_emb"].status == 400 and "chat model" in out["wrong_emb"].body.decode()


def test_waiting_for_a_load_is_bounded(models_dir, expected):
    """A request whose model is still loading past --model-wait-timeout gets a 503 with
    Retry-After; the load goes on, and the model then serves."""
    from minserve.engine.async_engine import _default_engine_factory

    go = threading.Event()

    def slow(config):      # the engine thread builds the model once the test lets it
        assert go.wait(60), "the test never let the load go on"
        return _default_engine_factory(config)

    async def fn(app):
        app.pool._factory = slow
        try:
            r = await call(app, "POST", "/v1/completions", {**BODY, "model": "b"})
            during = statuses(await call(app, "GET", "/v1/models"))
        finally:
            go.set()
        await wait_until(lambda: app.pool.models["b"].status == "loaded", 60, "b loaded")
        return r, during, await complete(app, "b")

    r, during, text = run(pool_app(models_dir, wait_timeout_s=0.2), fn)
    assert r.status == 503 and r.headers.get("retry-after") == "5"
    assert "still loading" in r.json()["error"]["message"]
    assert during["b"] == "loading"
    assert text == expected["b"]
