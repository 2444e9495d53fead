"""--enable-auto-tool-choice without --tool-call-parser: the parser detected from the chat
template's markers, and for a template that renders no tools (SmolLM2's) minserve's own
fallback: the tool list goes into the system message in hermes' format, and tool_choice "auto"
constrains the output to either plain text or one well-formed <tool_call> of a listed tool
(llama.cpp's server has such a generic mode), which the hermes parser then reads."""
from __future__ import annotations

import json
from typing import Any

import jinja2
import jinja2.meta

# (marker in the template, parser), first match wins; vLLM's formats by their tell-tale text.
_MARKERS = [("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
            ("<|python_tag|>", "llama3_json"), ("[func_name1(", "pythonic"),
            ('"parameters"', "llama3_json")]
FALLBACK_PARSER = "hermes"


def template_renders_tools(template: str | None) -> bool:
    """Whether the jinja2 template reads the `tools` variable at all."""
    if not template:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(
            template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def detect_tool_parser(template: str | None) -> tuple[str, bool]:
    """-> (parser name, whether minserve renders the tools itself)."""
    if not template_renders_tools(template):
        return FALLBACK_PARSER, True
    for marker, name in _MARKERS:
        if marker in template:
            return name, False
    return FALLBACK_PARSER, False  # renders tools, no known marker: hermes is the common one


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return ("You are a function calling AI model. You have these functions:\n"
            + "\n".join(lines) + "\nWhen a function can answer the user's question, call it: "
            "reply with only\n<tool_call>\n"
            '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>\n'
            "Otherwise reply to the user in plain text.")


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
    """A grammar spec: plain text (not starting with '<'), or one hermes call of a listed tool
    with arguments valid for its parameters."""
    variants = []
    for tool in tools:
        fn = tool.get("function") or {}
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        variants.append({"type": "object", "additionalProperties": False,
                         "properties": {"name": {"const": fn.get("name")}, "arguments": params},
                         "required": ["name", "arguments"]})
    schema = json.dumps({"anyOf": variants})
    return {"grammar": 'start: TEXT | call\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n'
                       f"body: %json {schema}\nTEXT: /[^<](.|\\n)*/\n"}
