"""--enable-auto-tool-choice without --tool-call-parser: the parser detected from the chat
template's markers, and for a template that renders no tools (SmolLM2's) minserve's own generic
format (also `--tool-call-parser generic`, for any model). The tool list goes into the system
message, and under tool_choice "auto" the whole output is constrained to one JSON object, either

    {"tool_call": {"name": <a listed tool>, "arguments": <valid for its parameters>}}
    {"response": "<the reply to the user>"}

Why JSON for both branches (llama.cpp's server has a generic mode of this shape): the choice
between a call and text is then a choice between two keys after `{"`, which a small model makes
from the instructions (SmolLM2-135M: P("tool_call") ~0.3-0.5 for a weather question, against
~0.004 for starting plain text with "<tool_call>"), and a text answer is a JSON string that the
model closes instead of rambling to the context limit."""
from __future__ import annotations

import json
import re
from typing import Any

import jinja2
import jinja2.meta

from minserve.tool_parsers.base import Piece, ToolParser, call_from_json
from minserve.tool_parsers.constrained import tool_variants

# (marker in the template, parser), first match wins; vLLM's formats by their tell-tale text.
_MARKERS = [("<|channel|>", "openai"), ("<|tool_call>", "gemma4"),
            ("functools[", "phi4_mini_json"), ("<tool_call>", "hermes"),
            ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"),
            ("[func_name1(", "pythonic"), ('"parameters"', "llama3_json")]
GENERIC = "generic"
FALLBACK_PARSER = "hermes"   # a template that renders tools without a known marker


def template_renders_tools(template: str | None) -> bool:
    """Whether the jinja2 template reads the `tools` variable at all."""
    if not template:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(
            template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def detect_tool_parser(template: str | None) -> str:
    """The parser for a chat template: generic when it renders no tools."""
    if not template_renders_tools(template):
        return GENERIC
    for marker, name in _MARKERS:
        if marker in template:
            return name
    return FALLBACK_PARSER


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return ("You have these tools:\n" + "\n".join(lines) + "\nRespond with one JSON object. "
            "When a tool can answer the question, call it: "
            '{"tool_call": {"name": <tool name>, "arguments": <arguments object>}}. '
            'Otherwise answer in words: {"response": "..."}')


def with_tools_in_system(messages: list[Any], tools: list[dict[str, Any]]) -> list[Any]:
    """The request's messages with the tool list in the system message (prepended to an
    existing one, else a new first message)."""
    prompt = tools_system_prompt(tools)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system" \
            and isinstance(first.get("content"), str):
        return [{**first, "content": f"{first['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def auto_call_spec(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The structured-output spec of "auto": one object, a call of a listed tool with valid
    arguments or a text response (the tools' $defs move to the root, where their refs point).
    It overrides the server's structured-output defaults on layout only."""
    calls, defs = tool_variants(tools, "arguments")
    variants = [{"type": "object", "additionalProperties": False,
                 "properties": {"tool_call": call}, "required": ["tool_call"]} for call in calls]
    variants.append({"type": "object", "additionalProperties": False,
                     "properties": {"response": {"type": "string"}}, "required": ["response"]})
    schema: dict[str, Any] = {"anyOf": variants}
    if defs:
        schema["$defs"] = defs
    # at most one space between tokens: layout newlines would only let a model wander
    return {"json": schema, "whitespace_pattern": " ?"}


_RESPONSE = re.compile(r'\s*\{\s*"response"\s*:\s*"')
_CALL = re.compile(r'\s*\{\s*"tool_call"\s*:')
_decoder = json.JSONDecoder(strict=False)  # raw newlines in unconstrained text


class GenericToolParser(ToolParser):
    """Reads the generic format: the call, or the response string streamed as content while it
    is written. Anything else (an unconstrained output, or one cut off mid-call) is content."""

    name = GENERIC

    def parse(self, text: str, final: bool) -> list[Piece]:
        if _CALL.match(text):
            if not final:           # a call is sent whole, once the output has ended
                return []
            try:
                obj, end = _decoder.raw_decode(text, text.index("{"))
            except json.JSONDecodeError:
                return [text]
            call = call_from_json(obj.get("tool_call")) if isinstance(obj, dict) else None
            return [text] if call is None or text[end:].strip() else [call]
        m = _RESPONSE.match(text)
        if m is None:               # not (yet) the format: hold back what may still become it
            return [text] if final or not _could_start(text) else []
        return [_string_so_far(text[m.end():], final)]


def _could_start(text: str) -> bool:
    """Whether text may still become the format's opening."""
    body = re.sub(r"\s+", "", text)
    return any(key.startswith(body) for key in ('{"response":"', '{"tool_call":'))


def _string_so_far(body: str, final: bool) -> str:
    """The decoded value of a JSON string whose body (after the opening quote) is written up to
    here: up to its closing quote, else up to the last whole escape (streamed text only grows)."""
    i, safe = 0, 0
    while i < len(body):
        c = body[i]
        if c == '"':
            safe = i
            break
        if c == "\\":
            n = 6 if body[i + 1:i + 2] == "u" else 2
            if i + n > len(body):
                break
            # a high surrogate waits for its pair, which decodes with it to one character
            if n == 6 and body[i + 2:i + 4].lower() in ("d8", "d9", "da", "db") \
                    and i + 12 > len(body) and not final:
                break
            i += n
        else:
            i += 1
        safe = i
    try:
        return _decoder.decode('"' + body[:safe] + '"')
    except json.JSONDecodeError:   # a bad escape (unconstrained output): stop before it
        return _decoder.decode('"' + body[:body.find("\\")] + '"') if "\\" in body else body
