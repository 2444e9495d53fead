"""Phi-4-mini tool calls: functools[{"name": ..., "arguments": {...}}, ...] (vLLM's
phi4_mini_json), with content before and after the list. Only parses; base.py streams."""
from __future__ import annotations

import json

from minserve.tool_parsers.base import Piece, ToolParser, call_from_json, partial_marker_len

MARKER = "functools["
_decoder = json.JSONDecoder()


class Phi4MiniJsonToolParser(ToolParser):
    name = "phi4_mini_json"

    def parse(self, text: str, final: bool) -> list[Piece]:
        at = text.find(MARKER)
        if at < 0:
            keep = 0 if final else partial_marker_len(text, MARKER)
            return [text[:len(text) - keep]]
        before = [text[:at]] if at else []
        try:
            calls, end = _decoder.raw_decode(text, at + len(MARKER) - 1)   # from the "["
        except json.JSONDecodeError:
            return before + [text[at:]] if final else before   # broken, or still being written
        parsed = [call_from_json(c) for c in calls] if isinstance(calls, list) else [None]
        if not parsed or None in parsed:
            return before + [text[at:]]
        rest = text[end:]
        return before + parsed + ([rest] if rest.strip() else [])
