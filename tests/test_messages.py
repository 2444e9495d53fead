"""POST /v1/messages and /v1/messages/count_tokens through the ASGI app: whole and streamed
answers (each body and event validated by the anthropic SDK's typed models and accumulated by
its own stream state machine), system, multi-turn, prefill, stop sequences, tool use and
tool_result, thinking blocks, Anthropic's error shape and x-api-key auth."""
from __future__ import annotations

import json

from tests.api_checks import message_body, message_events
from tests.asgi import call
from tests.fake_engine import make_fake_app
from tests.test_responses import SCRIPT
from tests.serving import real_app, run

M = "/v1/messages"
HELLO = [{"role": "user", "content": "Hello"}]
TOOL = {"name": "get_weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


def _text(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def test_whole_and_streamed_messages_system_multi_turn(tiny_model_dir):
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "system": [{"type": "text", "text": "Be brief."}], "metadata": {"user_id": "u"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "More"}]}

    async def fn(app):
        return (await call(app, "POST", M, body),
                await call(app, "POST", M, {**body, "stream": True},
                           headers={"anthropic-version": "2023-06-01"}),
                await call(app, "POST", f"{M}/count_tokens", {k: v for k, v in body.items()
                                                               if k != "max_tokens"}))

    whole, streamed, count = run(real_app(tiny_model_dir), fn)
    assert whole.status == 200, whole.body
    msg = message_body(whole.json())
    acc, types = message_events(streamed.named_events())
    assert types[:3] == ["message_start", "ping", "content_block_start"]
    for m in (msg, acc):
        assert m.id.startswith("msg_") and m.role == "assistant" and m.model == "tiny"
        assert m.stop_reason == "max_tokens" and m.stop_sequence is None
        assert m.usage.output_tokens == 6
        assert [b.type for b in m.content] == ["text"]
    assert _text(acc) == _text(msg) and _text(msg)
    usage = msg.usage
    assert count.json() == {"input_tokens": usage.input_tokens + usage.cache_read_input_tokens}


def test_stop_sequences_and_prefill(tiny_model_dir):
    base = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "messages": HELLO}

    async def fn(app):
        free = (await call(app, "POST", M, base)).json()
        text = free["content"][0]["text"]
        stop = text[4:7]
        cut = await call(app, "POST", M, {**base, "stop_sequences": [stop]})
        cut_s = await call(app, "POST", M, {**base, "stop_sequences": [stop], "stream": True})
        prefill = await call(app, "POST", M, {**base, "max_tokens": 4, "messages": [
            *HELLO, {"role": "assistant", "content": text[:3]}]})
        return text, stop, cut, cut_s, prefill

    text, stop, cut, cut_s, prefill = run(real_app(tiny_model_dir), fn)
    for m in (message_body(cut.json()), message_events(cut_s.named_events())[0]):
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
        assert _text(m) == text[:text.index(stop)]
    p = message_body(prefill.json())
    assert p.stop_reason == "max_tokens" and p.usage.output_tokens == 4


def test_tool_use_and_tool_result(tiny_model_dir):
    ask = {"max_tokens": 60, "temperature": 0, "tools": [TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"}], **COMPACT,
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}

    async def fn(app):
        first = await call(app, "POST", M, ask)
        streamed = await call(app, "POST", M, {**ask, "stream": True})
        use = first.json()["content"][-1]
        turn = [*ask["messages"], {"role": "assistant", "content": first.json()["content"]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                              "content": [{"type": "text", "text": "18 C"}]}]}]
        result = await call(app, "POST", M, {"max_tokens": 3, "tools": [TOOL], "messages": turn})
        tokens = await call(app, "POST", "/tokenize", {"tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": TOOL["input_schema"]}}], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": use["id"], "type":
                "function", "function": {"name": use["name"], "arguments": json.dumps(
                    use["input"])}}]},
            {"role": "tool", "tool_call_id": use["id"], "content": "18 C"}]})
        return first, streamed, result, tokens

    first, streamed, result, tokens = run(real_app(tiny_model_dir), fn)
    assert first.status == 200, first.body
    for m in (message_body(first.json()), message_events(streamed.named_events())[0]):
        assert m.stop_reason == "tool_use" and m.content[-1].type == "tool_use"
        assert m.content[-1].name == "get_weather" and m.content[-1].input["city"] in ("Paris",
                                                                                        "Rome")
    types = message_events(streamed.named_events())[1]
    assert "content_block_delta" in types
    r = message_body(result.json())
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == tokens.json()["count"]


def test_thinking_text_and_tool_use_blocks(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, text=SCRIPT, server={
        "reasoning_parser": "qwen3", "enable_auto_tool_choice": True,
        "tool_call_parser": "hermes"})
    body = {"max_tokens": 100, "tools": [TOOL], "stop_sequences": ["END"], "messages": HELLO,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}

    async def fn(app):
        return (await call(app, "POST", M, body),
                await call(app, "POST", M, {**body, "stream": True}))

    whole, streamed = run(app, fn)
    acc, types = message_events(streamed.named_events())
    for m in (message_body(whole.json()), acc):
        assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
        assert m.content[0].thinking == "Paris is in France." and m.content[0].signature == ""
        assert m.content[1].text == "Let me check."
        assert m.content[2].input == {"city": "Paris"} and m.stop_reason == "tool_use"
    deltas = [e["delta"]["type"] for _, e in streamed.named_events()
              if e["type"] == "content_block_delta"]
    assert {"thinking_delta", "text_delta", "input_json_delta"} <= set(deltas)


def test_errors_are_anthropic_shaped_and_x_api_key(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"api_keys": ["sekret"]}, fail_at_step=30)
    key = {"x-api-key": "sekret", "anthropic-version": "2023-06-01"}

    async def fn(app):
        return {
            "ok": await call(app, "POST", M, {"max_tokens": 2, "messages": HELLO}, headers=key),
            "bearer": await call(app, "POST", M, {"max_tokens": 2, "messages": HELLO},
                                 headers={"authorization": "Bearer sekret"}),
            "nokey": await call(app, "POST", M, {"max_tokens": 2, "messages": HELLO}),
            "wrong": await call(app, "POST", M, {"max_tokens": 2, "messages": HELLO},
                                headers={"x-api-key": "nope"}),
            "model": await call(app, "POST", M, {"model": "claude-x", "max_tokens": 2,
                                                 "messages": HELLO}, headers=key),
            "method": await call(app, "GET", M, headers=key),
            "json": await call(app, "POST", M, body=b"{nope", headers={
                **key, "content-type": "application/json"}),
            "count": await call(app, "POST", f"{M}/count_tokens", {"messages": []}, headers=key),
            "late": await call(app, "POST", M, {"max_tokens": 200, "messages": HELLO,
                                                "stream": True}, headers=key),
        }

    r = run(app, fn)
    assert r["ok"].status == r["bearer"].status == 200
    message_body(r["ok"].json())
    for name, status, kind in (("nokey", 401, "authentication_error"),
                               ("wrong", 401, "authentication_error"),
                               ("model", 404, "not_found_error"),
                               ("method", 405, "invalid_request_error"),
                               ("json", 400, "invalid_request_error"),
                               ("count", 400, "invalid_request_error")):
        assert r[name].status == status, name
        body = r[name].json()
        assert body["type"] == "error" and body["error"]["type"] == kind, (name, body)
        assert body["error"]["message"]
    _, types = message_events(r["late"].named_events())
    assert types[-1] == "error"
    assert r["late"].named_events()[-1][1]["error"]["type"] == "api_error"
