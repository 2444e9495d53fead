"""tool_choice "required" and a named function, as vLLM does them: a JSON-schema constraint
(structured.py enforces it) that makes any model write valid calls, and readers that turn the
constrained output into tool_calls, whole or streamed. Not a --tool-call-parser format."""
from __future__ import annotations

import json
from typing import Any

from minserve.tool_parsers.base import Piece, ToolCall, ToolParser, call_from_json
from minserve.value_text import value_text

_decoder = json.JSONDecoder()
_EMPTY_PARAMS = {"type": "object", "properties": {}}


class ToolChoiceError(ValueError):
    """A tool_choice that cannot be honoured (the server answers 400 with the text)."""


def _functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise ToolChoiceError(f"tools[{i}] must be {{'type': 'function', 'function': "
                                  "{'name': ..., 'parameters': {...}}}")
        out[fn["name"]] = fn
    return out


def named_tool(tool_choice: Any) -> str | None:
    """The function name of {"type": "function", "function": {"name": ...}}, else None."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise ToolChoiceError(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}")
        return fn["name"]
    return None


def tool_variants(tools: list[dict[str, Any]] | None,
                  args_key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One schema per tool for {"name": <its name>, args_key: <its parameters>}, and the tools'
    $defs, moved out so the caller puts them at its schema's root (where "#/$defs/..." points).
    """
    defs: dict[str, Any] = {}
    variants = []
    for fn_name, fn in _functions(tools).items():
        params = dict(fn.get("parameters") or _EMPTY_PARAMS)
        for key, value in (params.pop("$defs", None) or {}).items():
            if key in defs and defs[key] != value:
                raise ToolChoiceError(f"tools define $defs/{key} differently; rename one")
            defs[key] = value
        variants.append({"type": "object", "additionalProperties": False,
                         "properties": {"name": {"type": "string", "enum": [fn_name]},
                                        args_key: params},
                         "required": ["name", args_key]})
    return variants, defs


def tool_choice_spec(tool_choice: Any, tools: list[dict[str, Any]] | None,
                     parallel_tool_calls: bool = True) -> dict[str, Any] | None:
    """The structured-output spec for tool_choice, or None when the output is unconstrained
    ("none", "auto", or no tool_choice).
      required: [{"name": <one of the tools>, "parameters": <its schema>}, ...] (minItems 1;
                maxItems 1 when parallel_tool_calls is false)
      named:    the function's parameters object itself (the output is the arguments)"""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    functions = _functions(tools)
    name = named_tool(tool_choice)
    if name is not None:
        if name not in functions:
            raise ToolChoiceError(
                f"tool_choice names function {value_text(name)}, which is not in tools")
        return {"json": functions[name].get("parameters") or _EMPTY_PARAMS}
    if tool_choice != "required":
        raise ToolChoiceError(f"unknown tool_choice {value_text(tool_choice)}")
    if not functions:
        raise ToolChoiceError("tool_choice 'required' needs at least one tool in 'tools'")
    variants, defs = tool_variants(tools, "parameters")
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return {"json": schema}


class RequiredToolCallParser(ToolParser):
    """Reads the constrained output of tool_choice "required": a JSON array of
    {"name", "parameters"}; each call is streamed as soon as its object is complete."""

    name = "required"
    forced = True  # no complete call: tool_calls is null, content "" (vLLM)

    def parse(self, text: str, final: bool) -> list[Piece]:
        body = text.lstrip()
        if not body.startswith("["):
            return [text] if final or body else []
        pieces: list[Piece] = []
        pos = len(text) - len(body) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos < len(text) and text[pos] == "]":
                rest = text[pos + 1:]
                return pieces + [rest] if rest else pieces
            try:
                obj, end = _decoder.raw_decode(text, pos)
            except json.JSONDecodeError:  # still being written, or cut off by max_tokens:
                return pieces               # an unfinished call never leaks into content
            call = call_from_json(obj, ("parameters", "arguments"))
            pieces.append(call if call is not None else text[pos:end])
            pos = end


class NamedToolCallParser:
    """Reads the constrained output of a named tool_choice: the text is the arguments. Streams
    the call once its arguments are complete JSON (header and arguments in one delta; any later
    text as argument fragments). A call cut off by max_tokens comes back as it is, arguments
    unfinished (vLLM's answer: the function was forced, so the output is its call), streamed
    at the end."""

    reports_tool_calls = False  # OpenAI ends a forced function call with "stop"
    forced = True

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name
        self._started = False
        self._held = ""
        self.num_tool_calls = 0

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, [ToolCall(self.function_name, text)]

    def extract_streaming(self, delta_text: str) -> dict[str, Any] | None:
        if self._started:
            return {"tool_calls": [{"index": 0, "function": {"arguments": delta_text}}]} \
                if delta_text else None
        self._held += delta_text
        return self._open() if _is_json(self._held) else None

    def finish(self) -> dict[str, Any] | None:
        """The output ended with the arguments unfinished (max_tokens): the call as it is."""
        return None if self._started else self._open()

    def _open(self) -> dict[str, Any]:
        """The call's first delta: header and the arguments held so far."""
        self._started, self.num_tool_calls = True, 1
        return {"tool_calls": [{"index": 0, "id": ToolCall(self.function_name, "").id,
                                "type": "function", "function": {
                                    "name": self.function_name, "arguments": self._held}}]}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
