"""LoRA through the API: `model` = an adapter on chat and completions (streaming, n, logprobs,
structured output, tools), /v1/models cards, 404 for unknown names, the runtime load/unload
routes and their 400s (unloading while a request runs lets it finish), vllm:lora_requests_info,
and the guide's client code through the OpenAI SDK against a real server, checked against
servers on each adapter's merged weights."""
from __future__ import annotations

import asyncio

import openai
import pytest

from minserve.config import EngineConfig, LoRAConfig, LoRAModule
from minserve.server import ServerConfig, create_app
from tests.asgi import call
from tests.lora_adapters import edit_config, make_adapter, merged_model
from tests.serving import run, serving, wait_until

pytest.importorskip("peft")
MSGS = [{"role": "user", "content": "Write a SQL query that counts the users."}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("loras")
    return {"sql": make_adapter(tiny_model_dir, str(d / "sql"), r=8, seed=11),
            "poet": make_adapter(tiny_model_dir, str(d / "poet"), r=16, use_rslora=True,
                                 seed=12)}


def lora_app(model_dir, modules, **server):
    cfg = EngineConfig(model=model_dir, kv_cache_memory=4 << 20, max_model_len=512,
                       lora=LoRAConfig(modules, max_loras=2, max_cpu_loras=3))
    return create_app(cfg, ServerConfig(served_model_names=["tiny"], lora_modules=modules,
                                        model_root=model_dir, **server))


def test_adapters_through_the_routes(tiny_model_dir, adapters, tmp_path):
    modules = [LoRAModule("sql", adapters["sql"]),
               LoRAModule("poet", adapters["poet"], base_model_name="tiny-base")]
    app = lora_app(tiny_model_dir, modules, allow_runtime_lora=True)
    big = make_adapter(tiny_model_dir, str(tmp_path / "big"), r=8, seed=13)
    edit_config(big, r=32)

    async def body(app):
        cards = {m["id"]: m for m in (await call(app, "GET", "/v1/models")).json()["data"]}
        assert cards["sql"]["parent"] == "tiny" and cards["sql"]["root"] == adapters["sql"]
        assert cards["poet"]["parent"] == "tiny-base" and cards["tiny"]["parent"] is None
        assert (await call(app, "GET", "/v1/models/sql")).json()["root"] == adapters["sql"]

        def comp(model, **kw):
            return call(app, "POST", "/v1/completions", {
                "model": model, "prompt": "SELECT", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, **kw})
        texts = {m: (await comp(m)).json()["choices"][0]["text"] for m in ("tiny", "sql", "poet")}
        assert len(set(texts.values())) == 3
        r = await comp("sql", n=2, logprobs=2)
        assert r.json()["model"] == "sql"
        assert [c["text"] for c in r.json()["choices"]] == [texts["sql"]] * 2
        assert len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
        s = await call(app, "POST", "/v1/chat/completions", {
            "model": "poet", "messages": MSGS, "max_tokens": 6, "stream": True})
        assert s.status == 200 and s.events()[-1] == "[DONE]"
        assert all(e["model"] == "poet" for e in s.events()[:-1])
        j = await call(app, "POST", "/v1/chat/completions", {
            "model": "sql", "messages": MSGS, "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"n": {"type": "integer"}},
                "required": ["n"], "additionalProperties": False}}}})
        assert j.status == 200, j.body
        t = await call(app, "POST", "/v1/chat/completions", {
            "model": "sql", "messages": MSGS, "max_tokens": 200, "tool_choice": {
                "type": "function", "function": {"name": "count"}},
            "tools": [{"type": "function", "function": {"name": "count", "parameters": {
                "type": "object", "properties": {}, "additionalProperties": False}}}]})
        assert t.status == 200, t.body
        assert t.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "count"
        assert (await comp("nope")).status == 404

        # runtime load / unload
        load = lambda b: call(app, "POST", "/v1/load_lora_adapter", b)  # noqa: E731
        unload = lambda b: call(app, "POST", "/v1/unload_lora_adapter", b)  # noqa: E731
        for b, status, match in [
            ({"lora_name": "x", "lora_path": str(tmp_path / "none")}, 400,
             "not a usable PEFT LoRA adapter"),
            ({"lora_name": "sql", "lora_path": adapters["poet"]}, 400, "already been loaded"),
            ({"lora_name": "x", "lora_path": big}, 400, "greater than --max-lora-rank"),
            ({"lora_name": "x"}, 400, "lora_path"),
        ]:
            r = await load(b)
            assert r.status == status and match in r.json()["error"]["message"], r.body
        r = await unload({"lora_name": "x"})
        assert r.status == 400 and "is not loaded" in r.json()["error"]["message"]
        r = await load({"lora_name": "sql2", "lora_path": adapters["sql"]})
        assert r.status == 200 and b"added successfully" in r.body
        assert (await comp("sql2")).json()["choices"][0]["text"] == texts["sql"]
        # unloading while a request streams with the adapter lets it finish
        stream = asyncio.ensure_future(comp("sql2", max_tokens=40, stream=True))
        await wait_until(lambda: app.chat.stats.get("lora_running") == ["sql2"], what="running")
        assert b"removed successfully" in (await unload({"lora_name": "sql2"})).body
        events = (await stream).events()
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]
                   if e.get("choices")) > 0
        assert (await comp("sql2")).status == 404
        assert "sql2" not in {m["id"] for m in (await call(app, "GET", "/v1/models")).json()[
            "data"]}
        metrics = (await call(app, "GET", "/metrics")).body.decode()
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters=""' in metrics
        app.cfg.allow_runtime_lora = False
        assert (await load({"lora_name": "y", "lora_path": adapters["sql"]})).status == 404

    run(app, body)


def guide_task8(base: str, adapters: dict[str, str], tmp_path) -> None:
    """The guide's client code: one server with two adapters, `model=` picks one per request.
    Each answer (temperature 0) equals a server on that adapter's merged weights, and differs
    from the base model's."""
    # `--lora-modules a=... b=...` before the positional model must not swallow it
    args = ["serve", "--enable-lora", "--lora-modules", f"sql_adapter={adapters['sql']}",
            f"poet_adapter={adapters['poet']}", base, "--served-model-name", "base",
            "--max-loras", "2", "--kv-cache-memory", "64MiB", "--max-model-len", "512"]
    answers = {}
    with serving(args) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list().data} >= {"sql_adapter", "poet_adapter"}
        for model in ("sql_adapter", "poet_adapter", "base"):
            r = client.chat.completions.create(model=model, messages=MSGS, temperature=0,
                                               max_tokens=12, extra_body={"ignore_eos": True})
            answers[model] = r.choices[0].message.content
    assert answers["sql_adapter"] != answers["base"] != answers["poet_adapter"]
    for name, adapter in (("sql_adapter", "sql"), ("poet_adapter", "poet")):
        merged = merged_model(base, adapters[adapter], str(tmp_path / adapter))
        app = create_app(EngineConfig(model=merged, kv_cache_memory=64 << 20, max_model_len=512),
                         ServerConfig(served_model_names=["m"]))
        r = run(app, lambda app: call(app, "POST", "/v1/chat/completions", {
            "model": "m", "messages": MSGS, "temperature": 0, "max_tokens": 12,
            "ignore_eos": True}))
        assert r.json()["choices"][0]["message"]["content"] == answers[name]


def test_guide_task8_through_the_sdk_equals_merged_weights(tiny_model_dir, adapters, tmp_path):
    guide_task8(tiny_model_dir, adapters, tmp_path)


@pytest.mark.slow
def test_guide_task8_on_the_default_model(tmp_path):
    from minserve.models.loader import default_model_folder

    base = default_model_folder()
    adapters = {"sql": make_adapter(base, str(tmp_path / "sql"), r=16, seed=21, scale=0.05),
                "poet": make_adapter(base, str(tmp_path / "poet"), r=8, use_rslora=True,
                                     seed=22, scale=0.05)}
    guide_task8(base, adapters, tmp_path)
