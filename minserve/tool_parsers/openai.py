"""gpt-oss's tool calls (--tool-call-parser openai): harmony messages to functions.NAME, in any
channel, are calls; final and commentary (preamble) text is content; analysis is left out (the
openai_gptoss reasoning parser takes it). Only parses (harmony.py reads the format); streaming
is base.py's job, which sends a call once its message has ended."""
from __future__ import annotations

import json

from minserve import harmony
from minserve.tool_parsers.base import Piece, ToolCall, ToolParser


class OpenAIToolParser(ToolParser):
    name = "openai"
    needs_special_tokens = True
    keeps_calls = True

    def parse(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        num_content = 0
        for m in harmony.parse(text, final):
            kind = m.kind
            if kind == "reasoning" or (kind == "call" and not self.keeps_calls):
                continue
            if kind == "call":
                if not m.done:          # its arguments are still being written
                    return pieces
                if _is_json(m.text):
                    pieces.append(ToolCall(m.function, m.text.strip()))
                    continue
            # NOTE: one newline between content messages (a preamble, then the final answer),
            # as vLLM joins them; a malformed call's text is content, as in every parser.
            pieces.append(("\n" if num_content else "") + m.text)
            num_content += 1
        return pieces


class HarmonyContentParser(OpenAIToolParser):
    """No tool parser asked for, on a harmony model: the text of final and preamble messages,
    without their markup; calls are left out (tool_choice none, or tools not enabled)."""
    name = ""
    keeps_calls = False


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
