"""Library error text -> what a user-facing error message may carry: one bounded line, without
backtraces, panics' internals, build paths or multi-line state dumps. Our own messages are written
as one line already; only text that comes from a library (llguidance, tokenizers, jinja2, a
500's exception) goes through here. No imports from the rest of minserve (everything may use it).
"""
from __future__ import annotations

import re

class ConfigError(ValueError):
    """A bad engine argument or an unsupported model; the CLI prints it and exits."""


MAX_LIBRARY_TEXT = 240
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+){2,}(?::\d+)*")  # /a/b/c.rs:12:5


def library_text(text: object, limit: int = MAX_LIBRARY_TEXT) -> str:
    """The first meaningful line of a library's error, cut to `limit` characters. A line that
    says what went wrong (`error: ...`, as regex parsers print it under a caret diagram) goes
    first, before the first line (which may echo a long input); a Rust panic becomes a plain
    sentence (its text is an internal assert)."""
    text = str(text).split("<backtrace>", 1)[0].split("stack backtrace:", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if lines[0].lower().startswith(("panic", "thread '")):
        return "the input is too large or too complex for the library (it failed internally)"
    first = lines[0].rstrip(":")
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    if detail is not None:
        first = f"{detail[len('error:'):].strip()}; {first}"
    first = _PATH.sub("<path>", first)
    return first if len(first) <= limit else first[:limit - 1] + "…"
