"""Pythonic tool calls (Llama 3.2 / Llama 4, Gemma 3 with vLLM's pythonic template):
[get_weather(city="Paris"), f(a=1)], read with ast (never eval), also inside the Markdown fence
Gemma 3 tends to put around it (```tool_code ... ```). Output that does not start with such a
list is content. Only parses."""
from __future__ import annotations

import ast
import json

from minserve.tool_parsers.base import Piece, ToolCall, ToolParser

START_TAG, END_TAG = "<|python_start|>", "<|python_end|>"
FENCES, FENCE_END = ("```tool_code", "```python", "```"), "```"   # longest first


class PythonicToolParser(ToolParser):
    name = "pythonic"
    needs_special_tokens = True  # Llama 4 wraps calls in <|python_start|> ... <|python_end|>

    def parse(self, text: str, final: bool) -> list[Piece]:
        body = text.lstrip()
        offset = len(text) - len(body)
        end_tag = END_TAG
        if not final and body and any(f.startswith(body) for f in FENCES):
            return []    # "``" may still become a fence
        fence = next((f for f in FENCES if body.startswith(f)), None)
        if body.startswith(START_TAG) or fence is not None:
            offset += len(fence or START_TAG)
            end_tag = FENCE_END if fence else END_TAG
            body = text[offset:].lstrip()
            offset = len(text) - len(body)
        if not body.startswith("["):
            if not final and (START_TAG.startswith(body) or not body):
                return []
            return [text]
        # The list ends at one of the ']' in the text: the first one where it parses as calls.
        end = text.find("]", offset)
        while end >= 0:
            calls = _calls(text[offset:end + 1])
            if calls is not None:
                rest = text[end + 1:]
                after = rest.lstrip()
                ws = rest[:len(rest) - len(after)]
                if after.startswith(end_tag):
                    rest = ws + after[len(end_tag):]
                elif not final and after and end_tag.startswith(after):
                    rest = ws  # "<|python_e" may still become the end tag
                return [*calls, rest] if rest else list(calls)
            end = text.find("]", end + 1)
        return [text] if final else []


def _calls(src: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if (not isinstance(node, ast.Call) or node.args
                or not isinstance(node.func, (ast.Name, ast.Attribute))):
            return None
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return None
        if len(args) != len(node.keywords):  # **kwargs
            return None
        calls.append(ToolCall(ast.unparse(node.func), json.dumps(args, ensure_ascii=False)))
    return calls


def _literal(node: ast.expr) -> object:
    # True/False/None and JSON-like literals; names such as `true`/`null` that models write
    # are read as JSON would read them.
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    return ast.literal_eval(node)
