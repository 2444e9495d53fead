"""Speculative decoding behind the front doors: completions, chat, Responses and Messages, whole
and streamed (several tokens may arrive in one chunk), and batch lines (the /v1/batches runner,
at batch priority beside an HTTP request, whose rows sit steps out with their drafts pending)
give the text a server without speculation gives; usage counts every token once; /metrics shows
the drafts."""
from __future__ import annotations

import asyncio
import re

from minserve.batch.lines import iter_lines
from minserve.batch.runner import LineRunner
from minserve.config import EngineConfig
from minserve.server import ServerConfig, create_app
from tests.asgi import call
from tests.serving import run
from tests.test_batch_store import _line
from tests.test_spec import NGRAM

WORDS = "one two three four one two three four one two three four one two three"
N = 24
BASE = {"model": "tiny", "temperature": 0, "ignore_eos": True}
MSGS = [{"role": "user", "content": WORDS}]


def app(model_dir: str, spec: dict | None):
    cfg = EngineConfig(model=model_dir, kv_cache_memory=4 << 20, max_model_len=512,
                       speculative_config=spec)
    return create_app(cfg, ServerConfig(served_model_names=["tiny"]))


async def texts(app) -> dict:
    comp = {**BASE, "prompt": WORDS, "max_tokens": N}
    chat = {**BASE, "messages": MSGS, "max_tokens": N}
    resp = {**BASE, "input": WORDS, "max_output_tokens": N}
    out = {"completions": (await call(app, "POST", "/v1/completions", comp)).json()
           ["choices"][0]["text"],
           "chat": (await call(app, "POST", "/v1/chat/completions", chat)).json()
           ["choices"][0]["message"]["content"]}
    streamed = (await call(app, "POST", "/v1/completions", {**comp, "stream": True})).events()
    out["completions streamed"] = "".join(e["choices"][0]["text"] for e in streamed[:-1])
    streamed = (await call(app, "POST", "/v1/chat/completions", {
        **chat, "stream": True, "stream_options": {"include_usage": True}})).events()
    out["chat streamed"] = "".join(e["choices"][0]["delta"].get("content") or ""
                                   for e in streamed[:-2])
    out["chat usage"] = streamed[-2]["usage"]["completion_tokens"]
    events = (await call(app, "POST", "/v1/responses", {**resp, "stream": True})).named_events()
    out["responses streamed"] = "".join(d["delta"] for name, d in events
                                        if name == "response.output_text.delta")
    events = (await call(app, "POST", "/v1/messages", {**chat, "stream": True},
                         headers={"anthropic-version": "2023-06-01"})).named_events()
    out["messages streamed"] = "".join(d["delta"].get("text", "") for name, d in events
                                       if name == "content_block_delta")
    out.update(await batch_texts(app, comp, chat))
    out["metrics"] = (await call(app, "GET", "/metrics")).body.decode()
    return out


async def batch_texts(app, comp: dict, chat: dict) -> dict:
    """Four batch lines at once, and an HTTP completion sent while they run."""
    bodies = [{**comp, "prompt": f"{i} {WORDS}"} for i in range(2)] + [
        {**chat, "messages": [{"role": "user", "content": f"{i} {WORDS}"}]} for i in range(2)]
    lines = list(iter_lines([_line(f"b{i}", url="/v1/completions" if "prompt" in b
                                   else "/v1/chat/completions", body=b)
                             for i, b in enumerate(bodies)]))
    got: dict = {}

    async def on_result(line, output):
        body = output["response"]["body"]
        choice = body["choices"][0]
        got[f"batch {line.custom_id}"] = choice.get("text") or choice["message"]["content"]

    http = asyncio.ensure_future(call(app, "POST", "/v1/completions",
                                      {**comp, "prompt": f"x {WORDS}"}))
    await LineRunner(app, max_in_flight=4).run(lines, on_result)
    got["beside the batch"] = (await http).json()["choices"][0]["text"]
    return got


def test_front_doors_give_the_same_text(tiny_model_dir):
    spec = run(app(tiny_model_dir, NGRAM), texts)
    plain = run(app(tiny_model_dir, None), texts)
    drafts = re.search(r'^vllm:spec_decode_num_drafts_total{model_name="tiny"} (\S+)$',
                       spec.pop("metrics"), re.M)
    assert drafts and float(drafts.group(1)) > 0
    assert "vllm:spec_decode_num_drafts_total" not in plain.pop("metrics")
    assert spec == plain
    assert spec["chat usage"] == N and spec["completions"]
    assert spec["completions streamed"] == spec["completions"]
    assert spec["chat streamed"] == spec["chat"] and spec["chat"]
    assert len([k for k in spec if k.startswith("batch ")]) == 4
