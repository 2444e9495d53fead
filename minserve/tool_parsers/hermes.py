"""Hermes / Qwen2.5 / Qwen3 tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>,
any number, with content around them. Only parses; streaming is base.py's job."""
from __future__ import annotations

import json

from minserve.tool_parsers.base import (
    Piece,
    ToolCall,
    ToolParser,
    call_from_json,
    scan_marked_calls,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> list[Piece]:
        # the newline(s) between calls are layout, not content
        return scan_marked_calls(text, final, START, END, _call, trim_after_call=True)


def _call(body: str) -> ToolCall | None:
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None
