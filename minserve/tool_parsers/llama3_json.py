"""Llama 3.1/3.2 JSON tool calls: [<|python_tag|>]{"name": ..., "parameters": {...}} with more
calls after ';'. Output that does not start with a call is plain content. Only parses."""
from __future__ import annotations

import json
import re

from minserve.tool_parsers.base import Piece, ToolParser, call_from_json

PYTHON_TAG = "<|python_tag|>"
_SEPARATOR = re.compile(r"(\s|;|<\|eom_id\|>|<\|eot_id\|>)*")
_END_MARKERS = ("<|eom_id|>", "<|eot_id|>")
_decoder = json.JSONDecoder()


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|> is a special token

    def parse(self, text: str, final: bool) -> list[Piece]:
        body = text.lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        elif not body.startswith("{"):
            if not final and PYTHON_TAG.startswith(body):  # "" or "<|pyth": undecided
                return []
            return [text]
        pieces: list[Piece] = []
        pos = 0
        while pos < len(body):
            # NOTE: if the first thing is not a call, the whole output is content; after a
            # call, the first thing that is not a call starts content up to the end.
            rest: list[Piece] = [body[pos:]] if pieces else [text]
            if body[pos] != "{":
                if not final and pieces and any(m.startswith(body[pos:]) for m in _END_MARKERS):
                    break  # "<|eo" may still become <|eom_id|>
                return pieces + rest
            try:
                obj, end = _decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return pieces + rest if final else pieces  # broken, or still being written
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return pieces + rest
            pieces.append(call)
            sep = _SEPARATOR.match(body, end)
            if sep.end() == len(body) and not final:
                break  # a ';' or '<|eom_id|>' may still be arriving
            pos = sep.end()
        if not pieces and final:
            return [text]
        return pieces
