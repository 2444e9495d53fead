"""Tool-call parsers on literal outputs of each format: whole text, and split into random streaming
fragments accumulated by the OpenAI SDK's own stream state (must equal the whole result).
tool_choice "required"/named: random-logit outputs under the grammar are valid calls."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from minserve.tool_parsers import TOOL_PARSERS, get_tool_parser
from minserve.tool_parsers.constrained import (
    NamedToolCallParser,
    RequiredToolCallParser,
    ToolChoiceError,
    tool_choice_spec,
)

openai_chat = pytest.importorskip("openai.lib.streaming.chat")
from openai.types.chat import ChatCompletionChunk  # noqa: E402


def random_fragments(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    if rng.random() < 0.3:  # sometimes token-sized pieces everywhere
        cuts = sorted(set(range(1, len(text), rng.randint(1, 3))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def accumulate(parser, fragments: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed fragments, turn each delta into a chunk, and let the OpenAI SDK accumulate them."""
    state = openai_chat.ChatCompletionStreamState()

    def send(delta: dict | None, finish_reason: str | None = None) -> None:
        if delta is None and finish_reason is None:
            return
        for item in (delta or {}).get("tool_calls", []):
            assert set(item) <= {"index", "id", "type", "function"}
            if "id" in item:  # first delta of a call: index, id, type and name
                assert item["type"] == "function" and item["function"]["name"]
            else:
                assert set(item["function"]) == {"arguments"}
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", **(delta or {})},
                         "finish_reason": finish_reason}]}))

    for frag in fragments:
        send(parser.extract_streaming(frag))
    send(parser.finish())
    send({}, "tool_calls" if parser.num_tool_calls else "stop")
    msg = state.get_final_completion().choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    return msg.content or None, calls


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CASES: dict[str, list[tuple[str, str | None, list[tuple[str, dict]]]]] = {
    "hermes": [
        (f"<tool_call>\n{WEATHER}\n</tool_call>", None,
         [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        (f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
         '{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>', "Let me check.\n",
         [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "UTC"})]),
        (f"<tool_call>{WEATHER}", None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        ("No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool "
         "is not a tag.", []),
        ('<tool_call>{"name": "f", "arguments": {"a": </tool_call>',  # invalid JSON
         '<tool_call>{"name": "f", "arguments": {"a": </tool_call>', []),
        ('<tool_call>{"name": "f", "arguments": {"a": 1', '<tool_call>{"name": "f", '
         '"arguments": {"a": 1', []),  # half-written call
        ('<tool_call>{"name": "ok", "arguments": {}}</tool_call> then <tool_call>[1]</tool_call>',
         "then <tool_call>[1]</tool_call>", [("ok", {})]),
        ('<tool_call>{"name": "s", "arguments": "{\\"q\\": \\"日本\\"}"}</tool_call>', None,
         [("s", {"q": "日本"})]),
    ],
    "llama3_json": [
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
         [("get_weather", {"city": "Paris"})]),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
         '{"name": "get_time", "parameters": {}}<|eom_id|>', None,
         [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ("The weather is sunny.", "The weather is sunny.", []),
        ('{"answer": 42} is JSON but not a call', '{"answer": 42} is JSON but not a call', []),
        ('<|python_tag|>{"name": "f", "parameters": {"x": [1, 2', '<|python_tag|>{"name": "f", '
         '"parameters": {"x": [1, 2', []),
        ('{"name": "f", "parameters": {"x": 1}}\nDone.', "Done.", [("f", {"x": 1})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
         '{"name": "get_time", "arguments": {"tz": "UTC"}}]', None,
         [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]),
        ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "Sure. ",
         [("get_weather", {"city": "Paris"})]),
        ("[TOOL] is not a marker", "[TOOL] is not a marker", []),
        ('[TOOL_CALLS][{"name": "f", "arguments": ', '[TOOL_CALLS][{"name": "f", "arguments": ',
         []),
        ('[TOOL_CALLS][{"nom": "f"}] x', '[TOOL_CALLS][{"nom": "f"}] x', []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", days=3), get_time(tz="UTC", dst=True)]', None,
         [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"tz": "UTC", "dst": True})]),
        ('<|python_start|>[search(q="a]b", opts={"k": [1, 2]}, x=null)]<|python_end|>', None,
         [("search", {"q": "a]b", "opts": {"k": [1, 2]}, "x": None})]),
        ("[f()]\nI called f.", "\nI called f.", [("f", {})]),
        ("Plain answer [with brackets].", "Plain answer [with brackets].", []),
        ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
        ('[f(a=1), g(b=', '[f(a=1), g(b=', []),
        ("[f(__import__('os'))]", "[f(__import__('os'))]", []),
        # Gemma 3 with vLLM's pythonic template: the list, often inside a Markdown fence
        ('```tool_code\n[get_weather(city="Paris")]\n```', None,
         [("get_weather", {"city": "Paris"})]),
        ('```python\n[f(a=1), g(b="x")]\n```\nDone.', "\n\nDone.", [("f", {"a": 1}),
                                                                   ("g", {"b": "x"})]),
        ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    ],
    "gemma4": [
        ('<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:3}<tool_call|>', None,
         [("get_weather", {"city": "Paris, FR", "days": 3})]),
        ('Checking.<|tool_call>call:search{q:<|"|>a}b,c<|"|>,opts:{k:[1,<|"|>x<|"|>],on:true},'
         'n:null}<tool_call|><|tool_call>call:now{}<tool_call|> ok', "Checking. ok",
         [("search", {"q": "a}b,c", "opts": {"k": [1, "x"], "on": True}, "n": None}),
          ("now", {})]),
        ("no call here <|tool", "no call here <|tool", []),
        ('<|tool_call>call:f{a:<|"|>open<tool_call|>', '<|tool_call>call:f{a:<|"|>open'
         '<tool_call|>', []),                                         # unterminated string
        ('<|tool_call>call:f{x:1.5}', None, [("f", {"x": 1.5})]),    # EOS before the end mark
    ],
    "phi4_mini_json": [
        ('functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
         [("get_weather", {"city": "Paris"})]),
        ('Let me look.functools[{"name": "a", "arguments": {}}, {"name": "b", "parameters": '
         '{"x": [1]}}]', "Let me look.", [("a", {}), ("b", {"x": [1]})]),
        ("I use functools.partial here.", "I use functools.partial here.", []),
        ('functools[{"name": "f", "arguments": {"x": ', 'functools[{"name": "f", "arguments": '
         '{"x": ', []),
        ('functools[{"nom": "f"}] x', 'functools[{"nom": "f"}] x', []),
    ],
}
PARAMS = [(name, *case) for name, cases in CASES.items() for case in cases]


def _normal(calls) -> list[tuple[str, object]]:
    return [(c[0], json.loads(c[1])) for c in calls]


@pytest.mark.parametrize("parser_name,text,content,calls", PARAMS)
def test_whole_text(parser_name, text, content, calls):
    parser = get_tool_parser(parser_name)()
    got_content, got_calls = parser.extract(text)
    assert got_content == content
    assert _normal([(c.name, c.arguments) for c in got_calls]) == calls
    for c in got_calls:
        d = c.to_dict()
        assert d["type"] == "function" and json.loads(d["function"]["arguments"]) is not None
        if parser_name != "mistral":
            assert d["id"].startswith("call_")
        else:
            assert len(d["id"]) == 9 and d["id"].isalnum()


@pytest.mark.parametrize("parser_name,text,content,calls", PARAMS)
def test_streaming_equals_whole(parser_name, text, content, calls):
    for seed in range(25):
        rng = random.Random(seed)
        got_content, got_calls = accumulate(get_tool_parser(parser_name)(),
                                            random_fragments(text, rng))
        assert got_content == content, seed
        assert _normal(got_calls) == calls, seed


def test_registry():
    assert set(TOOL_PARSERS) == {"generic", "hermes", "llama3_json", "mistral", "openai",
                                 "pythonic", "gemma4", "phi4_mini_json"}
    from minserve.tool_parsers.generic import detect_tool_parser

    tools = "{% for t in tools %}{{ t }}{% endfor %}"
    assert detect_tool_parser(tools + "<|tool_call>call:") == "gemma4"
    assert detect_tool_parser(tools + "functools[") == "phi4_mini_json"
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


# ---------------------------------------------------------------- tool_choice required / named
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "additionalProperties": False,
                       "properties": {"city": {"type": "string", "maxLength": 10},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {
            "type": "object", "additionalProperties": False, "required": ["a", "b"],
            "properties": {"a": {"$ref": "#/$defs/small"}, "b": {"$ref": "#/$defs/small"}},
            "$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
    {"type": "function", "function": {"name": "ping"}},
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"})
           for t in TOOLS}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import Tokenizer

    from tests.test_structured import _Tok
    from tests.tiny import make_tokenizer_json

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    make_tokenizer_json(path)
    return _Tok(Tokenizer.from_file(path))


def test_required_random_logits_make_valid_calls(tok):
    from minserve import structured as st
    from tests.test_structured import run_random

    spec = tool_choice_spec("required", TOOLS)
    spec["any_whitespace"] = False
    num_finished = 0
    for seed in range(20):
        text, finished = run_random(st.compile(spec, tok, 512), tok, seed, max_steps=400)
        if not finished:
            continue
        num_finished += 1
        content, calls = RequiredToolCallParser().extract(text)
        assert content is None and calls, text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        got = accumulate(RequiredToolCallParser(), random_fragments(text, random.Random(seed)))
        assert got == (None, [(c.name, c.arguments) for c in calls])
    assert num_finished >= 10


def test_named_random_logits_make_valid_arguments(tok):
    from minserve import structured as st
    from tests.test_structured import run_random

    spec = tool_choice_spec({"type": "function", "function": {"name": "add"}}, TOOLS)
    for seed in range(15):
        text, finished = run_random(st.compile(spec, tok, 512), tok, seed, max_steps=400)
        assert finished, text
        content, calls = NamedToolCallParser("add").extract(text)
        assert [c.name for c in calls] == ["add"] and content is None
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS["add"])
        got = accumulate(NamedToolCallParser("add"), random_fragments(text, random.Random(seed)))
        assert got == (None, [("add", text)])


def test_tool_choice_spec_shapes_and_errors():
    assert tool_choice_spec("auto", TOOLS) is None and tool_choice_spec("none", TOOLS) is None
    assert tool_choice_spec(None, None) is None
    spec = tool_choice_spec("required", TOOLS, parallel_tool_calls=False)["json"]
    assert spec["maxItems"] == 1 and spec["minItems"] == 1 and "small" in spec["$defs"]
    good = [{"name": "add", "parameters": {"a": 1, "b": 2}}]
    jsonschema.validate(good, spec)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"a": 1}}], spec)
    named = tool_choice_spec({"type": "function", "function": {"name": "ping"}}, TOOLS)
    assert named == {"json": {"type": "object", "properties": {}}}
    for choice, tools, message in [
        ({"type": "function", "function": {"name": "nope"}}, TOOLS, "not in tools"),
        ("required", [], "at least one tool"),
        ("sometimes", TOOLS, "unknown tool_choice"),
        ({"type": "function"}, TOOLS, "tool_choice must be"),
        ("required", [{"type": "function"}], r"tools\[0\] must be"),
    ]:
        with pytest.raises(ToolChoiceError, match=message):
            tool_choice_spec(choice, tools)
