"""gpt-oss's tool calls (--tool-call-parser openai): harmony messages to functions.NAME, in any
channel, are calls; final and commentary (preamble) text is content; analysis is left out (the
openai_gptoss reasoning parser takes it). Only parses (harmony.py reads the format); streaming
is base.py's job. The recipient header makes a message a call before its arguments are
written, so a call being written is returned unfinished (done=False) and its arguments stream
as the model writes them, as vLLM's harmony parser streams them. So a call's text is its
arguments whatever it holds (JSON or not: vLLM's answer too), without surrounding whitespace
(held back while the call may still end)."""
from __future__ import annotations

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
                pieces.append(ToolCall(m.function, m.text.strip(), done=m.done))
                if not m.done:          # its arguments are still being written
                    return pieces
                continue
            # NOTE: one newline between content messages (a preamble, then the final answer),
            # as vLLM joins them.
            pieces.append(("\n" if num_content else "") + m.text)
            num_content += 1
        return pieces


class HarmonyContentParser(OpenAIToolParser):
    """No tool parser asked for, on a harmony model: the text of final and preamble messages,
    without their markup; calls are left out (tool_choice none, or tools not enabled)."""
    name = ""
    keeps_calls = False

