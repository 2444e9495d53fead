"""A request value -> the short text an error message may show: its type and a bounded prefix.
Never repr() a whole user value: a list 1,000 levels deep made repr raise RecursionError (a 500)
and a 10 MB string would be echoed back whole. Imports nothing of minserve (everything may use it).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MAX_VALUE_TEXT = 40
_JSON_TYPES = {dict: "object", list: "array", tuple: "array", str: "string", bool: "boolean",
               int: "integer", float: "number", type(None): "null"}
_END = object()


def value_text(value: Any, limit: int = MAX_VALUE_TEXT) -> str:
    """`array [[[[1, 2…` / `string 'abc'` / `integer 5`: the JSON type, then at most `limit`
    characters of a repr-like prefix, built without recursion, stopping once the budget is spent."""
    kind = _JSON_TYPES.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {_prefix(value, limit)}"


def _prefix(value: Any, limit: int) -> str:
    out: list[str] = []
    size = 0
    stack: list[Iterator[Any]] = [iter((value,))]  # pieces still to write, innermost last
    while stack and size <= limit:
        piece = next(stack[-1], _END)
        if piece is _END:
            stack.pop()
            continue
        if isinstance(piece, _Text):
            text = piece
        elif isinstance(piece, (dict, list, tuple)):
            stack.append(_pieces(piece))
            continue
        else:
            text = _scalar(piece, limit)
        out.append(text)
        size += len(text)
    text = "".join(out)
    return text if not stack and len(text) <= limit else text[:limit] + "…"


class _Text(str):
    """Punctuation of the walk itself (brackets, commas), written as is."""


def _pieces(value: dict | list | tuple) -> Iterator[Any]:
    opener, closer = ("{", "}") if isinstance(value, dict) else \
        ("[", "]") if isinstance(value, list) else ("(", ")")
    yield _Text(opener)
    items = value.items() if isinstance(value, dict) else value
    for i, item in enumerate(items):
        if i:
            yield _Text(", ")
        if isinstance(value, dict):
            yield item[0]
            yield _Text(": ")
            yield item[1]
        else:
            yield item
    yield _Text(closer)


def _scalar(value: Any, limit: int) -> str:
    if isinstance(value, (str, bytes)):
        return repr(value[:limit + 1])
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<{value.bit_length()}-bit int>"  # str() of a huge int is slow, then refused
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"<{type(value).__name__}>"  # never call an arbitrary object's repr
