"""POST /v1/responses through the ASGI app: whole and streamed answers (each body and event
validated by the openai SDK's typed models, events in order), function calls and their outputs,
text.format, reasoning items, the store (previous_response_id, GET, DELETE, eviction) and
background runs with cancel."""
from __future__ import annotations

import asyncio
import json

from tests.api_checks import response_body, response_events
from tests.asgi import call
from tests.fake_engine import make_fake_app
from tests.serving import real_app, run, wait_until

R = "/v1/responses"
# vLLM's extra field: no whitespace between JSON tokens (a random model spends tokens on it)
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}


def _text(resp) -> str:
    return "".join(c.text for item in resp.output if item.type == "message"
                   for c in item.content)


def test_whole_and_streamed_responses(tiny_model_dir):
    body = {"model": "tiny", "instructions": "Be brief.", "max_output_tokens": 6,
            "temperature": 0, "ignore_eos": True, "metadata": {"k": "v"}, "user": "u1",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                      {"type": "message", "role": "assistant", "content": "Hi!"},
                      {"role": "user", "content": "Tell me more"}]}

    async def fn(app):
        return await call(app, "POST", R, body), await call(app, "POST", R,
                                                            {**body, "stream": True})

    whole, streamed = run(real_app(tiny_model_dir), fn)
    assert whole.status == 200 and streamed.status == 200, whole.body
    assert streamed.headers["content-type"] == "text/event-stream" and streamed.closed
    resp = response_body(whole.json())
    final, types = response_events(streamed.named_events())
    assert types[-1] == "response.incomplete"
    for r in (resp, final):
        assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 6 and r.usage.input_tokens > 10
        assert r.usage.total_tokens == r.usage.input_tokens + 6
        assert r.instructions == "Be brief." and r.metadata == {"k": "v"} and r.user == "u1"
        assert [i.type for i in r.output] == ["message"] and r.output[0].role == "assistant"
    assert _text(resp) == _text(final) and _text(resp)


def test_function_call_round_trip_and_previous_response_id(tiny_model_dir):
    """A forced call (valid on any model), then its output sent back two ways: by
    previous_response_id, and statelessly with the output items as input. Both render the
    same conversation the chat route renders for it."""
    ask = {"input": "Weather in Paris?", "tools": [TOOL], "tool_choice": "required",
           "parallel_tool_calls": False, "max_output_tokens": 60, "temperature": 0, **COMPACT}

    async def fn(app):
        first = await call(app, "POST", R, ask)
        streamed = await call(app, "POST", R, {**ask, "stream": True})
        out = first.json()["output"]
        result = {"type": "function_call_output", "call_id": out[0]["call_id"],
                  "output": "18 degrees"}
        follow = {"tools": [TOOL], "max_output_tokens": 3, "ignore_eos": True}
        chained = await call(app, "POST", R, {**follow, "input": [result],
                                              "previous_response_id": first.json()["id"]})
        stateless = await call(app, "POST", R, {**follow, "store": False, "input": [
            {"role": "user", "content": "Weather in Paris?"}, *out, result]})
        call_ = out[0]
        tokens = await call(app, "POST", "/tokenize", {"tools": [
            {"type": "function", "function": {k: TOOL[k] for k in ("name", "description",
                                                                    "parameters")}}],
            "messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": call_["call_id"], "type": "function", "function": {
                                 "name": call_["name"], "arguments": call_["arguments"]}}]},
                         {"role": "tool", "tool_call_id": call_["call_id"],
                          "content": "18 degrees"}]})
        return first, streamed, chained, stateless, tokens

    first, streamed, chained, stateless, tokens = run(real_app(tiny_model_dir), fn)
    resp = response_body(first.json())
    assert resp.status == "completed", first.body
    assert [i.type for i in resp.output] == ["function_call"]
    fc = resp.output[0]
    assert fc.name == "get_weather" and fc.call_id.startswith("call_") and fc.status == "completed"
    assert isinstance(json.loads(fc.arguments)["city"], str)
    final, types = response_events(streamed.named_events())
    assert "response.function_call_arguments.delta" in types and types[-1] == "response.completed"
    assert final.output[0].arguments == fc.arguments and final.output[0].name == "get_weather"
    a, b = response_body(chained.json()), response_body(stateless.json())
    assert a.previous_response_id == resp.id and b.previous_response_id is None
    assert a.usage.input_tokens == b.usage.input_tokens == tokens.json()["count"]


def test_text_format_json_schema_and_json_object(tiny_model_dir):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}

    async def fn(app):
        fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
        return (await call(app, "POST", R, {"input": "Answer", "text": {"format": fmt},
                                            "max_output_tokens": 30, **COMPACT}),
                await call(app, "POST", R, {"input": "Answer", "stream": True, **COMPACT,
                                            "text": {"format": fmt}, "max_output_tokens": 30}),
                await call(app, "POST", R, {"input": "Answer", "max_output_tokens": 5,
                                            "text": {"format": {"type": "json_object"}}}))

    schema_r, streamed, obj = run(real_app(tiny_model_dir), fn)
    resp = response_body(schema_r.json())
    assert resp.status == "completed" and resp.text.format.type == "json_schema"
    assert isinstance(json.loads(_text(resp))["ok"], bool)
    final, _ = response_events(streamed.named_events())
    assert isinstance(json.loads(_text(final))["ok"], bool)
    assert response_body(obj.json()).text.format.type == "json_object"


SCRIPT = ("<think>Paris is in France.</think>Let me check.<tool_call>\n"
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> END')


def _reasoning_app(tiny_model_dir, **server):
    return make_fake_app(tiny_model_dir, text=SCRIPT, server={
        "reasoning_parser": "qwen3", "enable_auto_tool_choice": True,
        "tool_call_parser": "hermes", **server})


def test_reasoning_text_and_auto_tool_call_items(tiny_model_dir):
    """The reasoning parser's part is a reasoning item, then the message, then the parsed call;
    the stream has each item's events in order."""
    body = {"input": "Weather?", "tools": [TOOL], "stop": ["END"], "max_output_tokens": 100,
            "reasoning": {"effort": "low"}}

    async def fn(app):
        return (await call(app, "POST", R, body),
                await call(app, "POST", R, {**body, "stream": True}))

    whole, streamed = run(_reasoning_app(tiny_model_dir), fn)
    for resp in (response_body(whole.json()), response_events(streamed.named_events())[0]):
        assert resp.status == "completed" and resp.reasoning.effort == "low"
        assert [i.type for i in resp.output] == ["reasoning", "message", "function_call"]
        assert resp.output[0].content[0].text == "Paris is in France."
        assert _text(resp) == "Let me check."
        assert json.loads(resp.output[2].arguments) == {"city": "Paris"}
        assert resp.usage.output_tokens_details.reasoning_tokens > 0
    types = response_events(streamed.named_events())[1]
    assert "response.reasoning_text.delta" in types and "response.output_text.delta" in types


def test_store_get_delete_eviction(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"responses_store_size": 2})
    short = {"input": "Hi", "max_output_tokens": 2}

    async def fn(app):
        ids = [(await call(app, "POST", R, short)).json()["id"] for _ in range(3)]
        unstored = (await call(app, "POST", R, {**short, "store": False})).json()["id"]
        got = [await call(app, "GET", f"{R}/{i}") for i in [*ids, unstored]]
        deleted = await call(app, "DELETE", f"{R}/{ids[2]}")
        again = await call(app, "GET", f"{R}/{ids[2]}")
        chain = await call(app, "POST", R, {**short, "previous_response_id": ids[0]})
        not_bg = await call(app, "POST", f"{R}/{ids[1]}/cancel")
        return ids, got, deleted, again, chain, not_bg

    ids, got, deleted, again, chain, not_bg = run(app, fn)
    assert [g.status for g in got] == [404, 200, 200, 404]  # the oldest was evicted
    assert response_body(got[1].json()).id == ids[1]
    assert deleted.json() == {"id": ids[2], "object": "response", "deleted": True}
    assert again.status == 404 and chain.status == 404
    assert chain.json()["error"]["param"] == "previous_response_id"
    assert not_bg.status == 400 and "background" in not_bg.json()["error"]["message"]


async def _wait_status(app, rid: str, statuses: tuple[str, ...]) -> dict:
    for _ in range(3000):
        r = (await call(app, "GET", f"{R}/{rid}")).json()
        if r["status"] in statuses:
            return r
        await asyncio.sleep(0.01)
    raise AssertionError(r)


def test_background_run_poll_and_cancel(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, step_delay=0.01)
    long = {"input": "Hi", "background": True, "max_output_tokens": 200}

    async def fn(app):
        done = (await call(app, "POST", R, {**long, "max_output_tokens": 3})).json()
        finished = await _wait_status(app, done["id"], ("incomplete",))
        run_ = (await call(app, "POST", R, long)).json()
        await _wait_status(app, run_["id"], ("in_progress",))
        cancelled = await call(app, "POST", f"{R}/{run_['id']}/cancel")
        again = await call(app, "POST", f"{R}/{run_['id']}/cancel")
        # the abort lands at the engine's next step
        await wait_until(lambda: app.chat.stats["num_running"] == 0, 5, "the run to stop")
        return done, finished, cancelled, again, app.chat.stats

    done, finished, cancelled, again, stats = run(app, fn)
    assert response_body(done).status == "queued" and done["background"] is True
    assert response_body(finished).usage.output_tokens == 3
    c = response_body(cancelled.json())
    assert c.status == "cancelled" and c.usage is None
    assert again.status == 200 and again.json()["status"] == "cancelled"
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0


def test_background_stream_outlives_its_client(tiny_model_dir):
    app = make_fake_app(tiny_model_dir)
    body = {"input": "Hi", "background": True, "stream": True, "max_output_tokens": 30}

    async def fn(app):
        whole = await call(app, "POST", R, body)
        cut = await call(app, "POST", R, body, disconnect_after=4)
        rid = cut.named_events()[0][1]["response"]["id"]
        return whole, await _wait_status(app, rid, ("incomplete",))

    whole, after = run(app, fn)
    final, types = response_events(whole.named_events())
    assert types[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert whole.named_events()[0][1]["response"]["status"] == "queued"
    assert final.status == "incomplete" and final.usage.output_tokens == 30
    assert response_body(after).usage.output_tokens == 30  # the client left; the run did not


def test_engine_failure_mid_stream_is_response_failed(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, fail_at_step=4)

    async def fn(app):
        return await call(app, "POST", R, {"input": "Hi", "stream": True,
                                           "max_output_tokens": 50})

    r = run(app, fn)
    final, types = response_events(r.named_events())
    assert types[-2:] == ["error", "response.failed"]
    assert final.status == "failed" and final.error.code == "server_error"
