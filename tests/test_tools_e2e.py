"""Tool calling and reasoning through the official openai SDK against a real server on a tiny
random model. "required" and a named function are enforced by the grammar, so every output must
be a valid call; "auto" and the reasoning split are driven by a regex that makes the random model
write the exact text a real model would (the parsers then see realistic output)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from minserve.protocol import OpenAIError, ServingContext, parse_chat
from tests.test_openai_sdk import KEY, start_server, stop_server

WEATHER = {"type": "object", "additionalProperties": False,
           "properties": {"location": {"type": "string", "maxLength": 16},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                           "properties": {
            "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]
# No whitespace between JSON tokens: a random model would otherwise spend its tokens on it.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, url = start_server(["serve", tiny_model_dir, "--served-model-name", "tiny",
                              "--api-key", KEY, "--max-model-len", "1024",
                              "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                              "--reasoning-parser", "qwen3"])
    yield url
    code, out = stop_server(proc)
    assert code == 0, out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def _stream(client, **kw):
    """The SDK's own accumulation of a streamed chat completion."""
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, **kw):
        state.handle_chunk(chunk)
    return state.current_completion_snapshot


def _check_calls(message, names=SCHEMAS):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_valid_calls(client, stream):
    complete = 0
    for seed in range(5):
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=seed,
                  temperature=1.0, max_tokens=200, extra_body=COMPACT)
        r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
        ch = r.choices[0]
        if ch.finish_reason == "length":
            continue  # cut off: then it is content, never a half call
        complete += 1
        assert ch.finish_reason == "tool_calls"
        _check_calls(ch.message)
    assert complete >= 3


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_arguments_validate(client, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(5):
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                  temperature=1.0, max_tokens=120, extra_body=COMPACT)
        r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
        ch = r.choices[0]
        assert [c.function.name for c in ch.message.tool_calls] == ["get_weather"]
        if ch.finish_reason != "length":
            _check_calls(ch.message, {"get_weather"})


def test_n_samples_each_constrained(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, n=4, seed=3,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "get_time"}},
                                       max_tokens=100, extra_body=COMPACT)
    assert len(r.choices) == 4
    for ch in r.choices:
        assert ch.finish_reason == "stop"  # OpenAI's reason for a forced named function
        assert ch.message.tool_calls[0].function.name == "get_time"
        assert json.loads(ch.message.tool_calls[0].function.arguments)["tz"] in ("UTC", "CET")


HERMES_CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", '
               '"unit": "celsius"}}\n</tool_call>')


def _forced(text: str) -> dict:
    """A regex that only lets the model write `text` (escaped)."""
    return {"guided_regex": "".join("\\" + c if c in r"\.^$*+?()[]{}|/" else c for c in text)}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_hermes_call_with_reasoning(client, stream):
    text = "<think>Paris, so celsius.</think>Let me check." + HERMES_CALL
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=120,
              extra_body=_forced(text))  # no tool_choice: "auto" as the server enables it
    r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me check."
    assert ch.message.reasoning_content == "Paris, so celsius." if not stream else True
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris", "unit": "celsius"}


def test_streamed_reasoning_deltas(client):
    text = "<think>two plus two</think>four"
    thoughts, content = "", ""
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                                max_tokens=60, extra_body=_forced(text)):
        delta = chunk.choices[0].delta
        thoughts += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (thoughts, content) == ("two plus two", "four")


def test_malformed_call_is_content(client):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"location": </tool_call>'
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=80,
                                       extra_body=_forced(text))
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and not ch.message.tool_calls
    assert ch.message.content == text


def test_none_renders_tools_but_never_parses(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice="none", max_tokens=80,
                                       extra_body=_forced(HERMES_CALL))
    assert r.choices[0].message.content == HERMES_CALL and not r.choices[0].message.tool_calls


def test_history_with_tool_calls_and_results(client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                       max_tokens=5)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("extra, word", [
    ({"tool_choice": "required"}, "tools"),                          # no tools given
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": "get_weather"}, "tools"),
])
def test_bad_tool_requests_are_400(client, extra, word):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, **{
            k: v for k, v in extra.items() if k in ("tools", "tool_choice")},
            extra_body={k: v for k, v in extra.items() if k not in ("tools", "tool_choice")})
    assert word in str(e.value)


def test_auto_needs_the_server_flags(tiny_model_dir):
    """Without --enable-auto-tool-choice, "auto" is a 400 with vLLM's words; absent means none."""
    from minserve.tokenizer import Tokenizer
    ctx = ServingContext(tokenizer=Tokenizer.from_folder(tiny_model_dir), model_names=["tiny"],
                         max_model_len=512, vocab_size=512)
    with pytest.raises(OpenAIError) as e:
        parse_chat({"messages": ASK, "tools": TOOLS, "tool_choice": "auto"}, ctx)
    assert e.value.status == 400 and "--enable-auto-tool-choice" in e.value.message
    req = parse_chat({"messages": ASK, "tools": TOOLS}, ctx)
    assert req.make_parsers is None and req.params.structured is None


@pytest.mark.slow
def test_default_model_seed_guide_examples():
    """The examples of the seed guide, verbatim, on the real default model."""
    proc, url = start_server(["--max-model-len", "2048"], timeout=600)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model, max_tokens=80,
            messages=[{"role": "user", "content": "Extract data: John Doe is 30 years old."}],
            extra_body=dict(guided_json={"type": "object", "properties": {
                "name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]}))
        data = json.loads(r.choices[0].message.content)
        assert isinstance(data["name"], str) and isinstance(data["age"], int)
        r = client.chat.completions.create(
            model=model, max_tokens=20,
            messages=[{"role": "user", "content": "Give me an IP address."}],
            extra_body=dict(guided_regex=r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"))
        assert len(r.choices[0].message.content.split(".")) == 4
        r = client.chat.completions.create(
            model=model, max_tokens=5,
            messages=[{"role": "user", "content": "Classify: 'WIN A FREE PRIZE NOW!!!'"}],
            extra_body=dict(guided_choice=["SPAM", "NOT_SPAM"]))
        assert r.choices[0].message.content in ("SPAM", "NOT_SPAM")
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "City and state, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["location", "unit"]}}}]
        messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
        for stream in (False, True):
            kw = dict(model=model, messages=messages, tools=tools, tool_choice="required",
                      max_tokens=100, temperature=0, parallel_tool_calls=False)
            r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
            call = r.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather"
            args = json.loads(call.function.arguments)
            assert args["unit"] in ("celsius", "fahrenheit") and "Paris" in args["location"]
    finally:
        code, out = stop_server(proc)
    assert code == 0, out
