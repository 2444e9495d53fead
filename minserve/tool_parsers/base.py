"""The ToolParser interface: model text -> (content, tool calls), whole or streamed as OpenAI
chat deltas. Formats live in sibling modules and only implement parse(); they never stream.
Streaming here re-parses the text so far and sends what has become certain, so the accumulated
stream always equals the whole-text result (a malformed call is never sent as a call). A format
whose calls are certain before their arguments end (harmony's recipient header) returns the
call still being written as a ToolCall with done=False: its header is sent at once and its
arguments as fragments while they grow (each parse's arguments extend the last's)."""
from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI sends function.arguments
    id: str = field(default_factory=lambda: make_tool_call_id())
    done: bool = True   # False: its arguments are still being written (only the last piece)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def make_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def arguments_text(arguments: Any) -> str:
    """function.arguments as JSON text; a model that wrote a JSON string keeps its text."""
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
            return arguments
        except json.JSONDecodeError:
            pass
    return json.dumps(arguments, ensure_ascii=False)


def call_from_json(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters"),
                   ) -> ToolCall | None:
    """{"name": str, "arguments"|"parameters": {...}} -> ToolCall, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if not isinstance(args, (dict, str)):
                return None
            return ToolCall(obj["name"], arguments_text(args if args != "" else {}))
    return ToolCall(obj["name"], "{}")


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker (held back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


Piece = str | ToolCall  # parse() returns content strings and calls, in text order


def scan_marked_calls(text: str, final: bool, start_marker: str, end_marker: str,
                      read_call: Callable[[str], ToolCall | None], *,
                      trim_after_call: bool = False) -> list[Piece]:
    """parse() of a format whose calls sit between two markers, any number, with content
    around them (Hermes, Gemma 4): each body is read by read_call (None: not a call, and its
    marked text stays content). Not final: a call still being written and a partial start
    marker at the end are held back. Final: a call whose end marker never came is read to the
    end of the output (vLLM takes one cut by EOS right after its body). trim_after_call: the
    whitespace after a call is layout, not content."""
    pieces: list[Piece] = []
    pos = 0
    while True:
        start = text.find(start_marker, pos)
        if start < 0:
            tail = text[pos:]
            keep = 0 if final else partial_marker_len(tail, start_marker)
            pieces.append(tail[:len(tail) - keep])
            break
        pieces.append(text[pos:start])
        body_at = start + len(start_marker)
        end = text.find(end_marker, body_at)
        if end < 0:
            if final:
                call = read_call(text[body_at:])
                pieces.append(call if call is not None else text[start:])
            break
        call = read_call(text[body_at:end])
        pieces.append(call if call is not None else text[start:end + len(end_marker)])
        pos = end + len(end_marker)
        if call is not None and trim_after_call:
            while pos < len(text) and text[pos].isspace():
                pos += 1
    return [p for p in pieces if p != ""]


class ToolParser:
    """Subclasses set `name` and implement parse(); registry.py maps names to classes."""

    name: ClassVar[str] = ""
    # The markers are special tokens in some vocabularies: the server must detokenize with
    # skip_special_tokens=False for these parsers (as vLLM's adjust_request does).
    needs_special_tokens: ClassVar[bool] = False
    # finish_reason "tool_calls" when calls were made (OpenAI says "stop" for a forced function)
    reports_tool_calls: ClassVar[bool] = True

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []
        self._text = ""
        self._num_content_sent = 0   # chars of the certain content already looked at
        self._held_ws = ""           # whitespace-only content not sent yet (see _emit_content)
        self._sent_non_ws = False
        self._num_calls_sent = 0
        self._args_sent = 0          # chars of the last sent call's arguments already sent
        self._finished = False

    def parse(self, text: str, final: bool) -> list[Piece]:
        """The pieces of text that are certain. With final=False, a tail that may still become
        (or stop being) a call is left out; whatever parse(prefix, False) returns must be a prefix
        of parse(text, True). With final=True everything is returned; malformed calls are content.
        """
        raise NotImplementedError

    def make_id(self) -> str:
        return make_tool_call_id()

    # ------------------------------------------------------------ whole text
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool_calls). content is None when only whitespace surrounds the calls."""
        pieces = self.parse(text, final=True)
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        for c in calls:
            c.id = self.make_id()
        content = "".join(p for p in pieces if isinstance(p, str))
        if calls and not content.strip():
            return None, calls
        return content, calls

    # ------------------------------------------------------------ streaming
    def extract_streaming(self, delta_text: str) -> dict[str, Any] | None:
        """Feed the next text delta; returns {"content": ..., "tool_calls": [...]} with what is
        new (either key may be absent) or None. Call finish() once after the last delta."""
        self._text += delta_text
        return self._delta(self.parse(self._text, final=False), final=False)

    def finish(self) -> dict[str, Any] | None:
        """End of the output: flush what was held back (a half-written call becomes content)."""
        if self._finished:
            return None
        self._finished = True
        return self._delta(self.parse(self._text, final=True), final=True)

    @property
    def num_tool_calls(self) -> int:
        """Calls streamed so far (finish_reason is "tool_calls" when > 0)."""
        return self._num_calls_sent

    def _delta(self, pieces: list[Piece], final: bool) -> dict[str, Any] | None:
        content = "".join(p for p in pieces if isinstance(p, str))
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        delta: dict[str, Any] = {}
        text = self._emit_content(content[self._num_content_sent:], final, bool(calls))
        self._num_content_sent = max(self._num_content_sent, len(content))
        if text:
            delta["content"] = text
        new_calls = []
        if self._num_calls_sent and len(calls) >= self._num_calls_sent:
            # the last sent call's arguments that came since (a call sent while being written)
            rest = calls[self._num_calls_sent - 1].arguments[self._args_sent:]
            if rest:
                new_calls.append({"index": self._num_calls_sent - 1,
                                  "function": {"arguments": rest}})
        for call in calls[self._num_calls_sent:]:
            # NOTE: a call is sent only once it is certain, so nothing sent is ever taken back:
            # one delta with name and arguments, and argument fragments after while not done.
            new_calls.append({"index": self._num_calls_sent, "id": self.make_id(),
                              "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}})
            self._num_calls_sent += 1
        if calls:
            self._args_sent = len(calls[self._num_calls_sent - 1].arguments)
        if new_calls:
            delta["tool_calls"] = new_calls
        return delta or None

    def _emit_content(self, new: str, final: bool, has_calls: bool) -> str:
        # Whitespace-only content is held until real text follows, so that "\n" between or
        # around calls ends like extract(): content None when there is only whitespace.
        if self._sent_non_ws:
            return new
        self._held_ws += new
        if self._held_ws.strip():
            out, self._held_ws, self._sent_non_ws = self._held_ws, "", True
            return out
        if final and not has_calls:
            out, self._held_ws = self._held_ws, ""
            return out
        return ""
