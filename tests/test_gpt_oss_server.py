"""A gpt-oss server's answers, end to end through the ASGI app (a scripted engine writes harmony
tokens; --reasoning-parser openai_gptoss --tool-call-parser openai --enable-auto-tool-choice):
chat completions whole and streamed (reasoning_content, tool_calls, content, finish_reason) and
the Responses API (reasoning items, function calls, messages; every body and event checked
against the openai SDK's typed models)."""
from __future__ import annotations

import json

import pytest

from minserve.engine.request import FinishReason
from minserve.server import ServerConfig, create_app
from minserve.tokenizer import Tokenizer
from tests.api_checks import response_body, response_events
from tests.asgi import call
from tests.fake_engine import FakeEngine
from tests.serving import run
from tests.tiny_gpt_oss import make_harmony_tokenizer

ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather in Paris.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
        '<|message|>{"city": "Paris"}<|call|>')
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>"
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
FLAGS = {"reasoning_parser": "openai_gptoss", "tool_call_parser": "openai",
         "enable_auto_tool_choice": True}


class HarmonyEngine(FakeEngine):
    """Writes its script once, one token a step, and stops on its last token (a stop token:
    <|call|> or <|return|>), as gpt-oss's generation_config ends it."""

    def step(self):
        outs = super().step()
        for out in outs:
            r = self.running.get(out.request_id)
            if r is not None and len(r["out"]) == len(self.script):
                out.finish_reason = FinishReason.STOP
                del self.running[out.request_id]
        return outs


@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harmony-server")
    make_harmony_tokenizer(str(folder))
    return str(folder)


def _app(folder: str, text: str, **flags):
    tokenizer = Tokenizer.from_folder(folder)
    cfg = ServerConfig(served_model_names=["gpt-oss"], **{**FLAGS, **flags})
    return create_app(None, cfg, lambda _config: HarmonyEngine(tokenizer, text=text,
                                                                max_model_len=2048))


def _stream_fields(events: list) -> dict:
    got = {"reasoning": "", "content": "", "calls": {}, "finish": None}
    for ev in events:
        if ev == "[DONE]" or not ev.get("choices"):
            continue
        choice = ev["choices"][0]
        delta = choice["delta"]
        got["reasoning"] += delta.get("reasoning_content") or ""
        got["content"] += delta.get("content") or ""
        for c in delta.get("tool_calls") or []:
            call_ = got["calls"].setdefault(c["index"], {"name": "", "arguments": ""})
            call_["name"] += c.get("function", {}).get("name") or ""
            call_["arguments"] += c.get("function", {}).get("arguments") or ""
        got["finish"] = choice.get("finish_reason") or got["finish"]
    return got


def test_chat_reasoning_and_tool_call_whole_and_streamed(harmony_dir):
    body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [CHAT_TOOL], "reasoning_effort": "low"}

    async def fn(app):
        return (await call(app, "POST", "/v1/chat/completions", body),
                await call(app, "POST", "/v1/chat/completions", {**body, "stream": True}))

    whole, streamed = run(_app(harmony_dir, ANALYSIS + CALL), fn)
    assert whole.status == 200, whole.body
    choice = whole.json()["choices"][0]
    msg = choice["message"]
    assert msg["reasoning_content"] == "The user wants the weather in Paris."
    assert msg["content"] is None and choice["finish_reason"] == "tool_calls"
    (tc,) = msg["tool_calls"]
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    got = _stream_fields(streamed.events())
    assert got["reasoning"] == msg["reasoning_content"] and got["content"] == ""
    assert got["calls"] == {0: tc["function"]} and got["finish"] == "tool_calls"


def test_chat_final_answer_without_tools(harmony_dir):
    body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "Weather?"}]}

    async def fn(app):
        return (await call(app, "POST", "/v1/chat/completions", body),
                await call(app, "POST", "/v1/chat/completions", {**body, "stream": True}))

    whole, streamed = run(_app(harmony_dir, ANALYSIS + FINAL, tool_call_parser=None,
                               enable_auto_tool_choice=False), fn)
    choice = whole.json()["choices"][0]
    assert choice["message"]["content"] == "It is sunny in Paris."
    assert choice["message"]["reasoning_content"].startswith("The user wants")
    assert choice["finish_reason"] == "stop"
    got = _stream_fields(streamed.events())
    assert (got["content"], got["finish"]) == ("It is sunny in Paris.", "stop")
    assert "<|" not in got["content"] + got["reasoning"]


@pytest.mark.parametrize("script,items", [(ANALYSIS + CALL, ["reasoning", "function_call"]),
                                          (ANALYSIS + FINAL, ["reasoning", "message"])],
                         ids=["call", "final"])
def test_responses_reasoning_items_and_function_calls(harmony_dir, script, items):
    body = {"model": "gpt-oss", "input": "Weather in Paris?", "tools": [TOOL],
            "reasoning": {"effort": "high"}}

    async def fn(app):
        return (await call(app, "POST", "/v1/responses", body),
                await call(app, "POST", "/v1/responses", {**body, "stream": True}))

    whole, streamed = run(_app(harmony_dir, script), fn)
    assert whole.status == 200, whole.body
    final, types = response_events(streamed.named_events())
    for resp in (response_body(whole.json()), final):
        assert resp.status == "completed" and resp.reasoning.effort == "high"
        assert [i.type for i in resp.output] == items
        assert resp.output[0].content[0].text == "The user wants the weather in Paris."
        last = resp.output[1]
        if last.type == "function_call":
            assert last.name == "get_weather" and json.loads(last.arguments) == {"city": "Paris"}
        else:
            assert last.content[0].text == "It is sunny in Paris."
        assert resp.usage.output_tokens_details.reasoning_tokens > 0
    assert "response.reasoning_text.delta" in types
