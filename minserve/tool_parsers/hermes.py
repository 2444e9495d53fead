"""Hermes / Qwen2.5 / Qwen3 tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>,
any number, with content around them. Only parses; streaming is base.py's job."""
from __future__ import annotations

import json

from minserve.tool_parsers.base import Piece, ToolParser, call_from_json, partial_marker_len

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        pos = 0
        while True:
            start = text.find(START, pos)
            if start < 0:
                tail = text[pos:]
                keep = 0 if final else partial_marker_len(tail, START)
                pieces.append(tail[:len(tail) - keep])
                return pieces
            pieces.append(text[pos:start])
            body_at = start + len(START)
            end = text.find(END, body_at)
            if end < 0:
                if not final:  # still being written
                    return pieces
                # vLLM also takes a call whose closing tag never came (EOS right after the JSON)
                call = _call(text[body_at:])
                pieces.append(call if call is not None else text[start:])
                return pieces
            call = _call(text[body_at:end])
            pieces.append(call if call is not None else text[start:end + len(END)])
            pos = end + len(END)
            if call is not None:  # the newline(s) between calls are layout, not content
                while pos < len(text) and text[pos].isspace():
                    pos += 1


def _call(body: str) -> Piece | None:
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None
