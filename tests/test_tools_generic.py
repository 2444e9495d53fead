"""--enable-auto-tool-choice without --tool-call-parser (issue 19.3): the parser detected from
the chat template's markers, and minserve's generic format for a template that renders no tools:
the tools in the system message, "auto" constrained to one JSON object that is either a valid
call of a listed tool or a text response."""
from __future__ import annotations

import json

import pytest

from minserve.tool_parsers.generic import (
    GenericToolParser,
    auto_call_spec,
    detect_tool_parser,
    template_renders_tools,
    with_tools_in_system,
)
from tests.asgi import call
from tests.serving import real_app, run
from tests.tiny import CHATML

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}}}]
TOOLS_LOOP = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"


@pytest.mark.parametrize("template, parser", [
    (CHATML, "generic"), (None, "generic"),
    (TOOLS_LOOP + "<tool_call>" + CHATML, "hermes"),
    (TOOLS_LOOP + "[AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
    (TOOLS_LOOP + "<|python_tag|>{{ m }}", "llama3_json"),
    (TOOLS_LOOP + 'Respond in the format {"name": n, "parameters": d}', "llama3_json"),
    (TOOLS_LOOP + "[func_name1(params_name1=params_value1)]", "pythonic"),
    (TOOLS_LOOP + CHATML, "hermes"),
])
def test_parser_is_detected_from_the_template(template, parser):
    assert detect_tool_parser(template) == parser
    assert template_renders_tools(template) is (parser != "generic")


def test_tools_go_into_the_system_message():
    msgs = [{"role": "user", "content": "hi"}]
    out = with_tools_in_system(msgs, TOOLS)
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"] and out[1:] == msgs
    out = with_tools_in_system([{"role": "system", "content": "Be brief."}, *msgs], TOOLS)
    assert out[0]["content"].startswith("Be brief.\n\n") and len(out) == 2
    schema = auto_call_spec(TOOLS)["json"]
    assert [list(v["properties"]) for v in schema["anyOf"]] == [["tool_call"], ["response"]]


def test_auto_on_a_template_without_tools_is_text_or_one_valid_call(tiny_model_dir):
    """The tiny model's template renders no tools: every seeded sample under "auto" is either
    plain text or a get_weather call whose arguments fit the schema; the tools reached the
    prompt."""
    ask = [{"role": "user", "content": "What's the weather like in Paris today?"}]

    async def fn(app):
        autos = [await call(app, "POST", "/v1/chat/completions", {
            "messages": ask, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 16,
            "temperature": 1.0, "seed": seed}) for seed in range(4)]
        return autos

    autos = run(real_app(tiny_model_dir, enable_auto_tool_choice=True), fn)
    kinds = set()
    for r in autos:
        assert r.status == 200, r.body
        choice = r.json()["choices"][0]
        msg = choice["message"]
        if msg.get("tool_calls"):
            kinds.add("call")
            (c,) = msg["tool_calls"]
            args = json.loads(c["function"]["arguments"])
            assert c["function"]["name"] == "get_weather" and set(args) == {"location", "unit"}
            assert choice["finish_reason"] == "tool_calls"
        else:   # the response string, decoded; a cut-off one up to where it was cut
            kinds.add("text")
            assert isinstance(msg["content"], str)
            assert choice["finish_reason"] == "length" or not msg["content"].startswith('{"')
            assert "\n" not in msg["content"] or not msg["content"].startswith('{"')
    assert kinds, kinds
    assert autos[0].json()["usage"]["prompt_tokens"] > 300  # the tool list is in the prompt


CALL = '{"tool_call": {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}}'
REPLY = '{"response": "Hi \\"there\\"\\n\\u00e9\\ud83d\\ude00 \\\\ end"}'


@pytest.mark.parametrize("text, content, calls", [
    (CALL, None, [("get_weather", {"location": "Paris", "unit": "celsius"})]),
    (" " + CALL + "\n", None, [("get_weather", {"location": "Paris", "unit": "celsius"})]),
    (REPLY, 'Hi "there"\n\u00e9\U0001F600 \\ end', []),
    ('{"response": "cut off mid-wo', "cut off mid-wo", []),           # max_tokens
    ('{"tool_call": {"name": "get_weather", "argu', '{"tool_call": {"name": "get_weather", "argu',
     []),                                                               # a half call is content
    ("plain text, not the format", "plain text, not the format", []),
])
def test_generic_parser_reads_calls_and_responses(text, content, calls):
    got_content, got_calls = GenericToolParser(TOOLS).extract(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


@pytest.mark.parametrize("text", [CALL, REPLY, '{"response": "cut \\u00', "plain {text}",
                                  '{"tool_call": {"name": "nope"', '  {  "response" :  "sp"}'])
def test_generic_parser_streams_what_extract_returns(text):
    """Fed one character at a time, the streamed content and calls add up to extract()'s."""
    parser, content, calls = GenericToolParser(TOOLS), "", []
    for ch in text:
        delta = parser.extract_streaming(ch) or {}
        content += delta.get("content", "")
        calls += delta.get("tool_calls", [])
    delta = parser.finish() or {}
    content += delta.get("content", "")
    calls += delta.get("tool_calls", [])
    want_content, want_calls = GenericToolParser(TOOLS).extract(text)
    assert content == (want_content or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c.name, c.arguments) for c in want_calls]


DEFS_TOOLS = [{"type": "function", "function": {
    "name": "book", "description": "Book a trip",
    "parameters": {"type": "object", "properties": {"trip": {"$ref": "#/$defs/trip"}},
                   "required": ["trip"], "$defs": {"trip": {
                       "type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 8}},
                       "required": ["city"], "additionalProperties": False}}}}}]


def test_auto_with_defs_refs_gives_valid_calls_or_text(tiny_model_dir):
    """Tools whose parameters use $defs/$ref: "auto" compiles (the defs move to the root) and
    every sample is a call matching the referenced schema, or text."""
    async def fn(app):
        return [await call(app, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Book me a trip to Rome"}],
            "tools": DEFS_TOOLS, "tool_choice": "auto", "max_tokens": 40, "temperature": 1.0,
            "seed": seed}) for seed in range(3)]

    for r in run(real_app(tiny_model_dir, enable_auto_tool_choice=True), fn):
        assert r.status == 200, r.body
        for c in r.json()["choices"][0]["message"].get("tool_calls") or []:
            args = json.loads(c["function"]["arguments"])
            assert c["function"]["name"] == "book" and set(args) == {"trip"}
            assert set(args["trip"]) == {"city"} and len(args["trip"]["city"]) <= 8
