"""The caps a structured-output spec must be within before anything compiles it (sizes, rule
counts, nesting), so a hostile schema or grammar is a quick 400 and never a crash or a stall.
structured.py checks them; guided_regex's own bound is regex_dialect.MAX_REGEX_SIZE."""
from __future__ import annotations

import re
from typing import Any

from minserve.regex_dialect import MAX_REGEX_SIZE, regex_size

# Limits checked before anything is compiled. NOTE: llguidance recurses (in Rust) along rule
# references, nested groups and JSON-schema nesting and $ref chains, with up to about 3 KB of
# stack per level: a 3,000-rule chain overflowed the default 8 MB thread stack and the whole server
# died of SIGSEGV. Compiles run on threads of their own with COMPILE_STACK_BYTES of stack (address
# space: only the part used becomes memory), and these caps keep the deepest input accepted
# (MAX_GRAMMAR_LEVELS or MAX_SCHEMA_NODES levels, ~60 MB) well inside it.
COMPILE_STACK_BYTES = 256 << 20
MAX_SPEC_CHARS = 1 << 20        # grammar, regex or JSON-schema text
MAX_GRAMMAR_LEVELS = 20_000     # rule definitions + groups ( [ { in a grammar
MAX_GBNF_RULES = 1_000          # llguidance's GBNF -> Lark conversion is quadratic Python (~4 s)
MAX_SCHEMA_NODES = 20_000       # objects and arrays in a JSON schema
MAX_SCHEMA_DEPTH = 128          # as llguidance's JSON reader (deeper is refused there anyway)
MAX_CHOICES = 10_000            # 100,000 choices took 36 s, then panicked inside llguidance
_RULE_DEF = re.compile(r"(?m)^\s*[?!]?[\w.]+(?:\{[^}\n]*\})?\s*(?:::=|:)")
_LARK_REGEX = re.compile(r"/((?:[^/\\\n]|\\.)+)/")      # a Lark terminal's /regex/


class StructuredOutputError(ValueError):
    """A bad schema/regex/grammar or conflicting options: the server answers 400 with the text."""


def check_limits(kind: str, value: Any) -> None:
    """Refuse, before compiling, a spec past the caps above (StructuredOutputError)."""
    if kind == "choice":
        if len(value) > MAX_CHOICES:
            raise StructuredOutputError(f"{len(value)} choices; at most {MAX_CHOICES} are allowed")
        size = sum(map(len, value))
    elif kind == "json":
        size = _check_schema_shape(value)
    elif kind in ("regex", "grammar"):
        size = len(value)
    else:
        return
    if size > MAX_SPEC_CHARS:
        raise StructuredOutputError(f"the {kind} is {size} characters long; at most "
                                    f"{MAX_SPEC_CHARS} are allowed")
    if kind == "grammar":
        for literal in _LARK_REGEX.findall(value):
            _check_pattern(literal, "grammar's regex")
        num_rules = len(_RULE_DEF.findall(value))
        if "::=" in value and num_rules > MAX_GBNF_RULES:
            raise StructuredOutputError(f"the GBNF grammar has {num_rules} rules; at most "
                                        f"{MAX_GBNF_RULES} are allowed")
        levels = num_rules + sum(value.count(c) for c in "([{")
        if levels > MAX_GRAMMAR_LEVELS:
            raise StructuredOutputError(
                f"the grammar has {num_rules} rules and {levels - num_rules} groups; at most "
                f"{MAX_GRAMMAR_LEVELS} together are allowed")


def _check_schema_shape(schema: Any) -> int:
    """Count a schema's objects/arrays and its depth without recursing; -> its string size."""
    num_nodes, size = 0, 0
    todo: list[tuple[Any, int]] = [(schema, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, str):
            size += len(node)
            continue
        if not isinstance(node, (dict, list)):
            size += 8
            continue
        num_nodes += 1
        if num_nodes > MAX_SCHEMA_NODES:
            raise StructuredOutputError(f"the JSON schema has more than {MAX_SCHEMA_NODES} "
                                        "objects and arrays")
        if depth > MAX_SCHEMA_DEPTH:
            raise StructuredOutputError(f"the JSON schema is nested more than "
                                        f"{MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, dict):
            size += sum(len(k) for k in node if isinstance(k, str))
            todo.extend((v, depth + 1) for v in node.values())
            patterns = [node.get("pattern"), *(node.get("patternProperties") or {})] \
                if isinstance(node.get("patternProperties", {}), dict) else []
            for pattern in patterns:
                if isinstance(pattern, str) and len(pattern) <= MAX_SPEC_CHARS:
                    _check_pattern(pattern, "JSON schema's pattern")
        else:
            todo.extend((v, depth + 1) for v in node)
    return size


def _check_pattern(pattern: str, what: str) -> None:
    """A schema's pattern or a grammar's regex is unrolled as guided_regex is: the same bound."""
    size = regex_size(pattern)
    if size > MAX_REGEX_SIZE:
        raise StructuredOutputError(
            f"the {what} {pattern[:40]!r} unrolls to about {size} elements "
            f"(counted repetitions multiply); at most {MAX_REGEX_SIZE} are allowed")
