"""The official openai SDK's `responses` resource and the anthropic SDK's `messages` resource
against a real server (`python -m minserve`, granian, tiny model), as their users call them:
plain, streamed, function tools round-tripped, JSON output, stored responses, background runs,
count_tokens, auth. The default model's semantic checks are one @slow test at the end."""
from __future__ import annotations

import json
import time
from typing import Literal

import anthropic
import openai
import pytest
from pydantic import BaseModel

from tests.serving import KEY, metric, sdk_server, serving

IGNORE_EOS = {"ignore_eos": True}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
          "required": ["city"], "additionalProperties": False}
FUNCTION = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": PARAMS, "strict": True}
ATOOL = {"name": "get_weather", "description": "Weather in a city", "input_schema": PARAMS}


server = sdk_server("--api-key", KEY, "--max-model-len", "512", "--responses-store-size", "8")


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)


def test_responses_plain_and_streamed(oai):
    kw = {"model": "tiny", "input": "Tell me a story", "instructions": "Be brief.",
          "max_output_tokens": 8, "temperature": 0, "extra_body": IGNORE_EOS}
    r = oai.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 8 and r.instructions == "Be brief."
    events = list(oai.responses.create(**kw, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text


def test_responses_function_call_round_trip(oai):
    kw = {"model": "tiny", "tools": [FUNCTION], "tool_choice": "required",
          "parallel_tool_calls": False, "max_output_tokens": 60, "extra_body": COMPACT}
    first = oai.responses.create(input="Weather in Paris?", **kw)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}
    # by previous_response_id, and statelessly with the output items as the next input
    chained = oai.responses.create(model="tiny", tools=[FUNCTION], max_output_tokens=4,
                                   previous_response_id=first.id, input=[result])
    history = [{"role": "user", "content": "Weather in Paris?"}, *first.output, result]
    stateless = oai.responses.create(model="tiny", tools=[FUNCTION], max_output_tokens=4,
                                     input=history, store=False)
    assert chained.previous_response_id == first.id
    assert chained.usage.input_tokens == stateless.usage.input_tokens > first.usage.input_tokens
    with oai.responses.stream(input="Weather in Rome?", **kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and "".join(deltas) == final.output[0].arguments


class Verdict(BaseModel):
    ok: bool
    mood: Literal["good", "bad"]


def test_responses_parse_json_schema(oai):
    r = oai.responses.parse(model="tiny", input="Judge", text_format=Verdict,
                            max_output_tokens=40, extra_body=COMPACT)
    assert r.status == "completed" and isinstance(r.output_parsed, Verdict)
    assert json.loads(r.output_text) == r.output_parsed.model_dump()


def test_responses_store_previous_retrieve_delete(oai):
    first = oai.responses.create(model="tiny", input="Hi", max_output_tokens=4,
                                 extra_body=IGNORE_EOS)
    second = oai.responses.create(model="tiny", input="More", max_output_tokens=4,
                                  previous_response_id=first.id, extra_body=IGNORE_EOS)
    # the second prompt holds the first exchange: its tokens, the answer's, and "More"
    assert second.usage.input_tokens > first.usage.input_tokens + 4
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="tiny", input="x", previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError, match="web_search"):
        oai.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])


def test_responses_background_and_cancel(oai, server):
    done = oai.responses.create(model="tiny", input="Hi", max_output_tokens=3, background=True)
    assert done.status == "queued" and done.background
    run = oai.responses.create(model="tiny", input="Hi", max_output_tokens=400,
                               background=True, extra_body=IGNORE_EOS)
    t0 = time.monotonic()
    while (oai.responses.retrieve(done.id).status in ("queued", "in_progress")
           and time.monotonic() - t0 < 60):
        time.sleep(0.05)
    assert oai.responses.retrieve(done.id).usage.output_tokens <= 3
    cancelled = oai.responses.cancel(run.id)
    assert cancelled.status == "cancelled"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30 and (metric(server, "vllm:num_requests_running") != 0
                                          or metric(server, "vllm:kv_cache_usage_perc") != 0):
        time.sleep(0.05)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0


def test_messages_plain_system_multi_turn_stream(claude):
    kw = {"model": "tiny", "max_tokens": 8, "system": "Be brief.",
          "extra_body": {"temperature": 0, **IGNORE_EOS}}
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": [{"type": "text", "text": "Tell me more"}]}]
    m = claude.messages.create(messages=turns, **kw)
    assert m.type == "message" and m.stop_reason == "max_tokens" and m.usage.output_tokens == 8
    with claude.messages.stream(messages=turns, **kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == m.content[0].text
    count = claude.messages.count_tokens(model="tiny", system="Be brief.", messages=turns)
    assert count.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_messages_stop_sequences_and_tools(claude):
    base = {"model": "tiny", "max_tokens": 12, "messages": [{"role": "user", "content": "Hi"}],
            "extra_body": {"temperature": 0, **IGNORE_EOS}}
    text = claude.messages.create(**base).content[0].text
    cut = claude.messages.create(**base, stop_sequences=[text[4:7]])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == text[4:7]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    m = claude.messages.create(model="tiny", max_tokens=60, tools=[ATOOL], messages=ask,
                               tool_choice={"type": "any"}, extra_body=COMPACT)
    use = m.content[-1]
    assert m.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
    assert use.input["city"] in ("Paris", "Rome")
    turn = [*ask, {"role": "assistant", "content": m.content}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]}]
    after = claude.messages.create(model="tiny", max_tokens=4, tools=[ATOOL], messages=turn)
    assert after.usage.input_tokens + after.usage.cache_read_input_tokens > m.usage.input_tokens
    with claude.messages.stream(model="tiny", max_tokens=60, tools=[ATOOL], messages=ask,
                                tool_choice={"type": "tool", "name": "get_weather"},
                                extra_body=COMPACT) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use" and final.content[-1].input["city"]


def test_messages_errors(claude, server):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-opus-4", max_tokens=2,
                               messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="web_search_20250305"):
        claude.messages.create(model="tiny", max_tokens=2, tools=[
            {"type": "web_search_20250305", "name": "web_search"}],
            messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.slow
def test_default_model_responses_and_messages():
    """The done-when flows on the default model: text, streaming, a tool call, JSON output."""
    weather = {"type": "object", "properties": {"location": {"type": "string"}},
               "required": ["location"], "additionalProperties": False}
    person = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    question = "What is the capital of France?"
    with serving(["--kv-cache-memory", "64MiB", "--max-model-len", "2048"], timeout=900) as url:
        oai = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
        model = oai.models.list().data[0].id
        r = oai.responses.create(model=model, input=question, max_output_tokens=16,
                                 temperature=0)
        assert "Paris" in r.output_text
        events = list(oai.responses.create(model=model, input=question, max_output_tokens=16,
                                           temperature=0, stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") \
            == r.output_text
        call = oai.responses.create(
            model=model, input="What's the weather like in Paris today?", temperature=0,
            tools=[{"type": "function", "name": "get_weather", "parameters": weather,
                    "description": "Get the current weather in a given location"}],
            tool_choice="required", max_output_tokens=40).output[0]
        assert call.name == "get_weather" and "Paris" in json.loads(call.arguments)["location"]
        j = oai.responses.create(model=model, input="Extract: John Doe is 30 years old.",
                                 max_output_tokens=40, temperature=0, text={"format": {
                                     "type": "json_schema", "name": "p", "schema": person}})
        assert json.loads(j.output_text) == {"name": "John Doe", "age": 30}

        greedy = {"extra_body": {"temperature": 0}}  # not a typed argument in this SDK
        m = claude.messages.create(model=model, max_tokens=16, **greedy,
                                   messages=[{"role": "user", "content": question}])
        assert "Paris" in m.content[0].text and m.stop_reason in ("end_turn", "max_tokens")
        with claude.messages.stream(model=model, max_tokens=16, **greedy,
                                    messages=[{"role": "user", "content": question}]) as s:
            assert "".join(s.text_stream) == m.content[0].text
        use = claude.messages.create(
            model=model, max_tokens=40, **greedy, tool_choice={"type": "any"},
            tools=[{"name": "get_weather", "input_schema": weather,
                    "description": "Get the current weather in a given location"}],
            messages=[{"role": "user", "content": "What's the weather like in Paris today?"}]
        ).content[-1]
        assert use.type == "tool_use" and "Paris" in use.input["location"]
        j = claude.messages.create(model=model, max_tokens=40, **greedy,
                                   output_config={"format": {"type": "json_schema",
                                                             "schema": person}},
                                   messages=[{"role": "user",
                                              "content": "Extract: John Doe is 30 years old."}])
        assert json.loads(j.content[0].text) == {"name": "John Doe", "age": 30}
