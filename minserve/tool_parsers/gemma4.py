"""Gemma 4 tool calls (vLLM's gemma4): <|tool_call>call:NAME{key:<|"|>text<|"|>,n:42}<tool_call|>,
any number, with content around them. Arguments are Gemma's compact notation: bare keys, strings
between <|"|> marks, nested {} and [], and bare numbers, true, false and null. Only parses."""
from __future__ import annotations

import json

from minserve.tool_parsers.base import Piece, ToolCall, ToolParser, scan_marked_calls

START, END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


class Gemma4ToolParser(ToolParser):
    name = "gemma4"
    needs_special_tokens = True   # the call and string marks are special tokens

    def parse(self, text: str, final: bool) -> list[Piece]:
        return scan_marked_calls(text, final, START, END, _call)


def _call(body: str) -> ToolCall | None:
    """'call:NAME{args}' -> ToolCall; None when it is not one."""
    body = body.strip()
    if not body.startswith("call:") or not body.endswith("}"):
        return None
    name, brace, args = body[len("call:"):].partition("{")
    name = name.strip()
    if not brace or not name or not all(c.isalnum() or c in "_.-" for c in name):
        return None
    try:
        value, at = _object(body, len(body) - len(args) - 1)
    except ValueError:
        return None
    return ToolCall(name, json.dumps(value, ensure_ascii=False)) if at == len(body) else None


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n":
        i += 1
    return i


def _value(s: str, i: int) -> tuple[object, int]:
    """The value starting at s[i] and the index after it; ValueError when malformed."""
    i = _skip(s, i)
    if s.startswith(QUOTE, i):
        end = s.find(QUOTE, i + len(QUOTE))
        if end < 0:
            raise ValueError("unterminated string")
        return s[i + len(QUOTE):end], end + len(QUOTE)
    if s.startswith("{", i):
        return _object(s, i)
    if s.startswith("[", i):
        items, i = [], _skip(s, i + 1)
        while not s.startswith("]", i):
            item, i = _value(s, i)
            items.append(item)
            i = _skip(s, i)
            if s.startswith(",", i):
                i = _skip(s, i + 1)
            elif not s.startswith("]", i):
                raise ValueError("expected , or ]")
        return items, i + 1
    end = i
    while end < len(s) and s[end] not in ",}]":
        end += 1
    raw = s[i:end].strip()
    if not raw:
        raise ValueError("empty value")
    try:   # numbers, true, false, null as JSON reads them; anything else is text
        return json.loads(raw), end
    except json.JSONDecodeError:
        return raw, end


def _object(s: str, i: int) -> tuple[dict[str, object], int]:
    """The {key:value,...} starting at s[i] (which is "{")."""
    out: dict[str, object] = {}
    i = _skip(s, i + 1)
    while not s.startswith("}", i):
        if i >= len(s):
            raise ValueError("unterminated object")
        if s.startswith(QUOTE, i):
            key, i = _value(s, i)
        else:
            colon = s.find(":", i)
            if colon < 0:
                raise ValueError("key without a value")
            key, i = s[i:colon].strip(), colon
        i = _skip(s, i)
        if not s.startswith(":", i):
            raise ValueError("expected :")
        out[str(key)], i = _value(s, i + 1)
        i = _skip(s, i)
        if s.startswith(",", i):
            i = _skip(s, i + 1)
        elif not s.startswith("}", i):
            raise ValueError("expected , or }")
    return out, i + 1
