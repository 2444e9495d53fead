"""--enable-auto-tool-choice without --tool-call-parser (issue 19.3): the parser detected from
the chat template's markers, and minserve's generic format for a template that renders no tools:
the tools in the system message, "auto" constrained to plain text or one valid call."""
from __future__ import annotations

import json

import pytest

from minserve.tool_parsers.generic import (
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


@pytest.mark.parametrize("template, parser, ours", [
    (CHATML, "hermes", True), (None, "hermes", True),
    (TOOLS_LOOP + "<tool_call>" + CHATML, "hermes", False),
    (TOOLS_LOOP + "[AVAILABLE_TOOLS][TOOL_CALLS]", "mistral", False),
    (TOOLS_LOOP + "<|python_tag|>{{ m }}", "llama3_json", False),
    (TOOLS_LOOP + 'Respond in the format {"name": n, "parameters": d}', "llama3_json", False),
    (TOOLS_LOOP + "[func_name1(params_name1=params_value1)]", "pythonic", False),
    (TOOLS_LOOP + CHATML, "hermes", False),
])
def test_parser_is_detected_from_the_template(template, parser, ours):
    assert detect_tool_parser(template) == (parser, ours)
    assert template_renders_tools(template) is not ours


def test_tools_go_into_the_system_message():
    msgs = [{"role": "user", "content": "hi"}]
    out = with_tools_in_system(msgs, TOOLS)
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"] and out[1:] == msgs
    out = with_tools_in_system([{"role": "system", "content": "Be brief."}, *msgs], TOOLS)
    assert out[0]["content"].startswith("Be brief.\n\n") and len(out) == 2
    assert "%json" in auto_call_spec(TOOLS)["grammar"]


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
        else:
            kinds.add("text")
            assert choice["finish_reason"] == "length" or not msg["content"].startswith("<")
    assert kinds, kinds
    assert autos[0].json()["usage"]["prompt_tokens"] > 300  # the tool list is in the prompt
