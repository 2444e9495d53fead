"""gpt-oss's harmony format through the chat path: outputs written as harmony token sequences
(the tiny harmony tokenizer's ids, special tokens included) go through a real ChoiceState, whole
and streamed one token at a time, with --reasoning-parser openai_gptoss and/or
--tool-call-parser openai: analysis -> reasoning_content, commentary to=functions.NAME ->
tool_calls, preambles and final -> content, for every channel combination. The harmony chat
template renders conversations (tools, calls, results, reasoning_effort)."""
from __future__ import annotations

import json

import pytest

from minserve import harmony
from minserve.engine.request import FinishReason, RequestOutput
from minserve.output import ChoiceState
from minserve.protocol import OpenAIError, ServingContext, parse_chat
from minserve.tokenizer import Tokenizer
from tests.tiny_gpt_oss import make_harmony_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {}}}}]
A = "<|channel|>analysis<|message|>"
NEXT = "<|end|><|start|>assistant"
CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
ARGS = '{"city": "Paris"}'
# (id, output text as the model writes it after the prompt's <|start|>assistant, its last
#  token, reasoning, content, calls [(name, arguments)])
CASES = [
    ("analysis-final", A + "User greets." + NEXT + "<|channel|>final<|message|>Hello there!",
     "<|return|>", "User greets.", "Hello there!", []),
    ("final-only", "<|channel|>final<|message|>Just the answer.", "<|return|>",
     None, "Just the answer.", []),
    ("analysis-call", A + "Need weather." + NEXT + CALL + ARGS, "<|call|>",
     "Need weather.", None, [("get_weather", ARGS)]),
    ("analysis-preamble-call", A + "Need weather." + NEXT
     + "<|channel|>commentary<|message|>Checking the weather." + NEXT + CALL + ARGS,
     "<|call|>", "Need weather.", "Checking the weather.", [("get_weather", ARGS)]),
    ("two-calls", A + "Both." + NEXT + CALL + ARGS + "<|call|><|start|>assistant"
     + " to=functions.get_time<|channel|>commentary json<|message|>{}", "<|call|>",
     "Both.", None, [("get_weather", ARGS), ("get_time", "{}")]),
    ("recipient-in-role", " to=functions.get_weather<|channel|>commentary json<|message|>"
     + ARGS, "<|call|>", None, None, [("get_weather", ARGS)]),
    ("two-analyses-final", A + "First." + NEXT + A + "Second." + NEXT
     + "<|channel|>final<|message|>Done.", "<|return|>", "First.\nSecond.", "Done.", []),
    ("cut-in-analysis", A + "Still thinking about it", None, "Still thinking about it",
     None, []),
    ("cut-in-final", A + "Ok." + NEXT + "<|channel|>final<|message|>Partial ans", None,
     "Ok.", "Partial ans", []),
    # a call is certain from its header (its arguments stream): not JSON, still a call (vLLM's)
    ("malformed-call", A + "Hmm." + NEXT + CALL + '{"city": ', "<|call|>", "Hmm.",
     None, [("get_weather", '{"city":')]),
    ("builtin-tool", A + "Look it up." + NEXT
     + "<|channel|>analysis to=browser.search<|message|>" + '{"query": "x"}' + NEXT
     + "<|channel|>final<|message|>Found.", "<|return|>", 'Look it up.\n{"query": "x"}',
     "Found.", []),
    ("plain-text", "No harmony at all.", "<|return|>", None, "No harmony at all.", []),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harmony-tok")
    make_harmony_tokenizer(str(folder))
    return Tokenizer.from_folder(str(folder))


def _ctx(tokenizer, reasoning: str | None = "openai_gptoss", tools: str | None = "openai"):
    return ServingContext(tokenizer, ["gpt-oss"], 512, 512, reasoning_parser=reasoning,
                          tool_call_parser=tools, enable_auto_tool_choice=tools is not None)


def _run(tokenizer, text: str, last: str | None, stream: bool, **ctx_args):
    """(message or None, streamed fields) of a choice fed `text`'s tokens one at a time."""
    ctx = _ctx(tokenizer, **ctx_args)
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "stream": stream}
    if ctx.tool_call_parser:
        body["tools"] = TOOLS
    req = parse_chat(body, ctx)
    assert req.params.skip_special_tokens is False
    ids = tokenizer.encode(text, add_special_tokens=False)
    if last is not None:
        ids.append(tokenizer.backend.token_to_id(last))
    choice = ChoiceState(0, req, tokenizer, req.prompts[0])
    got = {"reasoning": "", "content": "", "calls": []}
    for i, tid in enumerate(ids):
        end = i == len(ids) - 1
        d = choice.update(RequestOutput(req.request_id, [tid],
                                        (FinishReason.STOP if last else FinishReason.LENGTH)
                                        if end else None))
        got["reasoning"] += d.reasoning
        got["content"] += d.text
        for c in d.tool_calls or []:
            if "id" in c:       # a call's first delta: its header
                assert c["id"].startswith("call_") and c["type"] == "function"
                assert c["index"] == len(got["calls"])
                got["calls"].append((c["function"]["name"], c["function"]["arguments"]))
            else:               # more of a call's arguments
                assert c["index"] == len(got["calls"]) - 1 and set(c) == {"index", "function"}
                name, args = got["calls"][-1]
                got["calls"][-1] = (name, args + c["function"]["arguments"])
    return (None if stream else choice.chat_message("")), got, choice


@pytest.mark.parametrize("name,text,last,reasoning,content,calls", CASES,
                         ids=[c[0] for c in CASES])
def test_channels_whole_and_streamed_token_by_token(tokenizer, name, text, last, reasoning,
                                                    content, calls):
    msg, _, choice = _run(tokenizer, text, last, stream=False)
    assert msg["reasoning_content"] == reasoning
    assert msg["content"] == (content if content is not None or calls else "")  # as chat's
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] \
        == calls
    assert choice.api_finish_reason == ("tool_calls" if calls else
                                        "stop" if last else "length")
    _, got, choice = _run(tokenizer, text, last, stream=True)
    assert (got["reasoning"] or None, got["content"] or None, got["calls"]) == (
        reasoning, content, calls)
    assert choice.api_finish_reason == ("tool_calls" if calls else
                                        "stop" if last else "length")


def test_reasoning_streams_before_the_message_ends(tokenizer):
    """Deltas, not one block at the end: reasoning and content arrive while they are written."""
    text = A + "one two three four" + NEXT + "<|channel|>final<|message|>five six seven"
    ctx = _ctx(tokenizer)
    req = parse_chat({"messages": [{"role": "user", "content": "Hi"}], "stream": True}, ctx)
    choice = ChoiceState(0, req, tokenizer, req.prompts[0])
    kinds = []
    for tid in tokenizer.encode(text, add_special_tokens=False):
        d = choice.update(RequestOutput(req.request_id, [tid]))
        kinds += ["r"] * bool(d.reasoning) + ["c"] * bool(d.text)
    assert kinds.count("r") >= 3 and kinds.count("c") >= 2
    assert kinds.index("c") > len(kinds) - kinds[::-1].index("r") - 1   # all r before any c


def test_call_arguments_stream_as_they_are_written(tokenizer):
    """Token by token: the call's header comes once its recipient header is complete, then its
    arguments in fragments while the model writes them, each fragment the text since the last
    (whitespace around them held back), and the second call after the first's fragments."""
    args = '{"city": "Paris", "unit": "celsius"}'
    text = (A + "Need weather." + NEXT + CALL + "  " + args + " <|call|><|start|>assistant"
            + " to=functions.get_time<|channel|>commentary json<|message|>{}")
    ctx = _ctx(tokenizer)
    req = parse_chat({"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                      "tools": TOOLS}, ctx)
    choice = ChoiceState(0, req, tokenizer, req.prompts[0])
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids.append(tokenizer.backend.token_to_id("<|call|>"))
    written, events = "", []
    for i, tid in enumerate(ids):
        written += tokenizer.decode([tid], skip_special_tokens=False)
        d = choice.update(RequestOutput(req.request_id, [tid],
                                        FinishReason.STOP if i == len(ids) - 1 else None))
        for c in d.tool_calls or []:
            events.append((c.get("function", {}).get("name"), c["index"],
                           c["function"]["arguments"], written))
    headers = [e for e in events if e[0] is not None]
    assert [(h[0], h[1]) for h in headers] == [("get_weather", 0), ("get_time", 1)]
    first = [e for e in events if e[1] == 0]
    assert first[0][2] == "" and first[0][3].endswith("<|message|>")    # header before args
    fragments = [e[2] for e in first[1:]]
    assert len(fragments) >= 5 and "".join(fragments) == args
    for _, _, fragment, so_far in first[1:]:      # each fragment: what was written by then
        assert so_far.rstrip().endswith(fragment)
    assert events.index(headers[1]) > events.index(first[-1])
    assert choice.api_finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_one_parser_alone(tokenizer, stream):
    """Reasoning parser alone: calls are not parsed (and not shown as markup); tool parser
    alone: analysis is left out of the content."""
    text = A + "Need weather." + NEXT + "<|channel|>commentary<|message|>Checking." + NEXT \
        + CALL + ARGS
    msg, got, _ = _run(tokenizer, text, "<|call|>", stream, tools=None)
    fields = got if stream else {"reasoning": msg["reasoning_content"],
                                 "content": msg["content"], "calls": msg["tool_calls"]}
    assert (fields["reasoning"], fields["content"], fields["calls"]) == (
        "Need weather.", "Checking.", [])
    msg, got, _ = _run(tokenizer, text, "<|call|>", stream, reasoning=None)
    if stream:
        assert (got["reasoning"], got["content"], got["calls"]) == (
            "", "Checking.", [("get_weather", ARGS)])
    else:
        assert "reasoning_content" not in msg and msg["content"] == "Checking."
        assert msg["tool_calls"][0]["function"]["name"] == "get_weather"


def test_parse_holds_back_partial_markers():
    assert harmony.parse("<|chan", final=False) == []
    (m,) = harmony.parse(A + "abc<|en", final=False)
    assert (m.channel, m.text, m.done) == ("analysis", "abc", False)
    first, second = harmony.parse(A + "abc<|end|><|start|>assistant<|channel|>fin", False)[0], \
        harmony.parse(A + "abc<|end|><|start|>assistant<|channel|>final<|message|>x", False)[1]
    assert first.done and (second.channel, second.text) == ("final", "x")
    assert harmony.opens_header("Hello") is False and harmony.opens_header("<|") is None


# ---------------------------------------------------------------- the template
def test_template_renders_harmony_with_tools_calls_and_results(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=TOOLS)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Reasoning: medium" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools" in text
    assert "type get_weather = (_: {\n// the city\ncity: string,\n" in text
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
            '{"city": "Paris"}<|call|>') in text
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"' \
           '<|end|>' in text
    assert text.endswith("<|start|>assistant")


def test_reasoning_effort_reaches_the_template(tokenizer):
    ctx = _ctx(tokenizer)
    msgs = [{"role": "user", "content": "Hi"}]
    for body, effort in (({}, "medium"), ({"reasoning_effort": "high"}, "high"),
                         ({"reasoning_effort": "low",
                           "chat_template_kwargs": {"reasoning_effort": "high"}}, "high")):
        req = parse_chat({"messages": msgs, **body}, ctx)
        assert f"Reasoning: {effort}\n" in req.rendered_prompt
    with pytest.raises(OpenAIError, match="reasoning_effort"):
        parse_chat({"messages": msgs, "reasoning_effort": "extreme"}, ctx)


def test_responses_reasoning_effort_and_items(tokenizer):
    """Responses' reasoning.effort reaches the template; a function_call item and its output
    render as harmony's call and tool messages."""
    from minserve.responses import chat_body

    chat, _, echo = chat_body({"input": [
        {"type": "message", "role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ARGS},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"}],
        "reasoning": {"effort": "low"}, "tools": [{"type": "function", **TOOLS[0]["function"]}]},
        [])
    assert echo["reasoning"]["effort"] == "low"
    req = parse_chat(chat, _ctx(tokenizer))
    assert "Reasoning: low\n" in req.rendered_prompt
    assert 'to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}' \
        in req.rendered_prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>' \
           '"rain"<|end|>' in req.rendered_prompt


def test_auto_tool_choice_detects_the_openai_parser_from_the_template():
    from minserve.tool_parsers.generic import detect_tool_parser
    from tests.tiny_gpt_oss import harmony_template

    assert detect_tool_parser(harmony_template()) == "openai"


def test_flags_name_the_parsers():
    from minserve.cli import parse_args

    args = parse_args(["serve", "m", "--reasoning-parser", "openai_gptoss",
                       "--tool-call-parser", "openai"])
    assert (args.reasoning_parser, args.tool_call_parser) == ("openai_gptoss", "openai")
    assert json.dumps(CASES)    # cases are plain data (used by the e2e test's fake outputs)
