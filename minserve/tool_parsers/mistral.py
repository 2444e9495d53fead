"""Mistral tool calls: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (v3 tokenizers) or
[TOOL_CALLS]name[ARGS]{...} (v11+), after optional content. Only parses."""
from __future__ import annotations

import json
import re
import secrets
import string

from minserve.tool_parsers.base import (
    Piece,
    ToolCall,
    ToolParser,
    arguments_text,
    call_from_json,
    partial_marker_len,
)

BOT, ARGS = "[TOOL_CALLS]", "[ARGS]"
_decoder = json.JSONDecoder()
_NAME = re.compile(r"[A-Za-z_][\w.-]*")
_ALNUM = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] is a control token

    def make_id(self) -> str:
        # Mistral chat templates reject tool_call ids that are not 9 alphanumerics.
        return "".join(secrets.choice(_ALNUM) for _ in range(9))

    def parse(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        pos = 0
        while True:
            start = text.find(BOT, pos)
            if start < 0:
                tail = text[pos:]
                keep = 0 if final else partial_marker_len(tail, BOT)
                pieces.append(tail[:len(tail) - keep])
                return pieces
            pieces.append(text[pos:start])
            at = start + len(BOT)
            while at < len(text) and text[at].isspace():
                at += 1
            calls, end = _parse_calls(text, at)
            if end is None:  # not complete yet, or broken
                if final:
                    pieces.append(text[start:])
                return pieces
            pieces.extend(calls if calls is not None else [text[start:end]])
            pos = end


def _parse_calls(text: str, at: int) -> tuple[list[ToolCall] | None, int | None]:
    """Calls starting at `at` and where they end; (None, end) for a complete non-call."""
    if text.startswith("[", at):
        try:
            obj, end = _decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None, None
        calls = [call_from_json(o) for o in obj] if isinstance(obj, list) and obj else [None]
        return (None, end) if any(c is None for c in calls) else (calls, end)
    args_at = text.find(ARGS, at)
    if args_at < 0:
        return None, None
    name = text[at:args_at].strip()
    try:
        args, end = _decoder.raw_decode(text, args_at + len(ARGS))
    except json.JSONDecodeError:
        return None, None
    if not _NAME.fullmatch(name) or not isinstance(args, dict):
        return None, end
    return [ToolCall(name, arguments_text(args))], end
