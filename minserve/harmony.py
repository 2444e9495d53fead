"""OpenAI's harmony format (gpt-oss), read from the output text with its special tokens kept:
the messages an output holds, and the API fields they become, as vLLM maps them. Touches no
tokens and renders no prompt (the chat template does); the parsers over it are reasoning.py's
openai_gptoss and tool_parsers/openai.py.

An output continues the prompt's `<|start|>assistant`, so its first header has no role:

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
        {"city": "Paris"}<|call|>
    ...<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

    analysis                          -> reasoning_content
    a recipient functions.NAME        -> a tool call NAME(arguments = the message text)
    commentary without a recipient    -> content (a preamble before calls)
    final                             -> content
    any other recipient (built-ins)   -> reasoning (minserve runs no built-in tools)

An output that does not open with a header (<|channel|>, to=, <|constrain|> or <|start|>) is
plain final text. A message ends at <|end|>, <|call|>, <|return|>, the next <|start|> or the end of
the output (the stop tokens may or may not be in the text)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from minserve.tool_parsers.base import partial_marker_len

START, END, MESSAGE, CHANNEL, CONSTRAIN = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>")
CALL, RETURN, ENDOFTEXT = "<|call|>", "<|return|>", "<|endoftext|>"
TERMINATORS = (END, CALL, RETURN, ENDOFTEXT)
STOP_MARKERS = (START, *TERMINATORS)
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")
_CONSTRAIN = re.compile(re.escape(CONSTRAIN) + r"\s*([^\s<]+)")
FUNCTIONS = "functions."


@dataclass(slots=True)
class Message:
    channel: str | None        # analysis | commentary | final (None: no header at all)
    recipient: str | None      # "functions.get_weather", a built-in tool, or None
    content_type: str | None   # "json" (<|constrain|>json, or a bare word after the channel)
    text: str
    done: bool                 # its end came (a terminator, the next message, the output's end)

    @property
    def function(self) -> str | None:
        """The called function's name, for a message to functions.NAME."""
        if self.recipient and self.recipient.startswith(FUNCTIONS):
            return self.recipient[len(FUNCTIONS):] or None
        return None

    @property
    def kind(self) -> str:
        """reasoning | content | call: where the message goes in the API."""
        if self.function is not None:
            return "call"
        if self.recipient is not None or self.channel == "analysis":
            return "reasoning"
        return "content"

    def render(self) -> str:
        """The message as an assistant header and body (its end marker once done): the
        canonical form the tool parser reads after the reasoning parser took analysis out."""
        header = CHANNEL + (self.channel or "final")
        if self.recipient:
            header += f" to={self.recipient}"
        if self.content_type:
            header += f" {CONSTRAIN}{self.content_type}"
        return START + "assistant" + header + MESSAGE + self.text + (END if self.done else "")


def _header(text: str) -> tuple[str | None, str | None, str | None]:
    """(channel, recipient, content type) of a header such as 'assistant<|channel|>commentary
    to=functions.f <|constrain|>json' (recipient and type may come before or after the channel)."""
    channel = _CHANNEL.search(text)
    recipient = _RECIPIENT.search(text)
    ctype = _CONSTRAIN.search(text)
    content_type = ctype.group(1) if ctype else None
    if content_type is None and channel is not None:   # "<|channel|>commentary json"
        words = text[channel.end():].split(CONSTRAIN)[0].split()
        content_type = next((w for w in words if not w.startswith("to=")), None)
    return (channel.group(1) if channel else None, recipient.group(1) if recipient else None,
            content_type)


def opens_header(text: str) -> bool | None:
    """Whether an output starts with a harmony header (None: too short to tell yet)."""
    body = text.lstrip()
    for marker in (CHANNEL, CONSTRAIN, START, " to=", "to="):
        if body.startswith(marker) or text.startswith(marker):
            return True
        if marker.startswith(body) or marker.startswith(text):
            return None
    return False


def parse(text: str, final: bool = True) -> list[Message]:
    """The messages of an output so far. With final=False only what is certain: a message whose
    header is still being written is left out, and so is a tail of its text that may be the
    start of a special token; the last message is done only once its end marker came."""
    opened = opens_header(text)
    if opened is None and not final:
        return []
    if not opened:      # plain text: one final message
        body = _cut_stop(text, final)
        return [Message("final", None, None, body[0], body[1] or final)]
    messages: list[Message] = []
    pos = len(START) if text.startswith(START) else 0
    while pos < len(text):
        at = text.find(MESSAGE, pos)
        if at < 0:          # a header still being written (or never finished)
            break
        channel, recipient, ctype = _header(text[pos:at])
        body, ended, pos = _body(text, at + len(MESSAGE), final)
        messages.append(Message(channel, recipient, ctype, body, ended))
        if not ended:
            break
    return messages


def _cut_stop(text: str, final: bool) -> tuple[str, bool]:
    """(text up to the first end marker, whether one came); not final: a partial marker held."""
    ends = [i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0]
    if ends:
        return text[:min(ends)], True
    return text[:len(text) - (0 if final else _partial_marker(text))], False


def _partial_marker(text: str) -> int:
    return max(partial_marker_len(text, m) for m in (*STOP_MARKERS, MESSAGE, CHANNEL))


def _body(text: str, start: int, final: bool) -> tuple[str, bool, int]:
    """A message body from `start`: (text, ended, where the next header starts)."""
    rest = text[start:]
    ends = [(i, m) for m in STOP_MARKERS if (i := rest.find(m)) >= 0]
    if not ends:
        keep = 0 if final else _partial_marker(rest)
        return rest[:len(rest) - keep], final, len(text)
    i, marker = min(ends)
    nxt = start + i + len(marker)
    if marker != START and text.startswith(START, nxt):     # <|end|><|start|>assistant...
        nxt += len(START)
    return rest[:i], True, nxt


@dataclass(slots=True)
class Parts:
    """An output's API fields: reasoning text, content text, and the calls (name, arguments
    text, done) in order."""
    reasoning: str
    content: str
    calls: list[tuple[str, str, bool]]


def split(messages: list[Message]) -> Parts:
    """Messages -> reasoning (joined by newlines), content (joined by newlines) and calls."""
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[tuple[str, str, bool]] = []
    for m in messages:
        kind = m.kind
        if kind == "call":
            calls.append((m.function, m.text, m.done))
        elif kind == "reasoning":
            reasoning.append(m.text)
        else:
            content.append(m.text)
    return Parts("\n".join(reasoning), "\n".join(content), calls)
