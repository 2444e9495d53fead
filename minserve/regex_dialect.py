"""guided_regex text -> what llguidance compiles, with Python re's meaning under fullmatch (the
output must match the whole regex). Anchors and word boundaries at the two ends are exact
rewrites; what cannot be expressed (lookarounds, backreferences, an interior \\b) is refused in
one line naming the construct and its position. No llguidance here: structured.py compiles."""
from __future__ import annotations

import re
from typing import NamedTuple

WORD_CLASS = "[0-9a-zA-Z_]"  # \w as structured.py compiles it (ASCII: the 'dw' option)


class RegexDialectError(ValueError):
    """A construct the constraint engine cannot honour: a 400 with this one-line text."""


class Regex(NamedTuple):
    body: str                 # the regex without its end anchors / boundaries
    word_start: bool = False  # a leading \b: the output starts with a word character
    word_end: bool = False    # a trailing \b: the output ends with one


# (pattern at a position, what the user is told); checked in order at every atom.
_REFUSED = [
    (re.compile(r"\(\?<?[=!]"), "a lookaround ({})"),
    (re.compile(r"\(\?>"), "an atomic group ({})"),
    (re.compile(r"\(\?\("), "a conditional group ({})"),
    (re.compile(r"\\[1-9]|\\k<|\\g<|\(\?P="), "a backreference ({})"),
    (re.compile(r"\\[GK]"), "the escape {}"),
    (re.compile(r"\(\?[a-zA-Z]*m[a-zA-Z]*[:)]"), "the multi-line flag ({})"),
]
_START_ANCHOR = ("^", r"\A")
_END_ANCHOR = ("$", r"\Z", r"\z")


def prepare_regex(regex: str) -> Regex:
    """Strip ^/\\A and $/\\Z/\\z at the ends (fullmatch makes them true), turn a \\b at either
    end into a word-character condition, rewrite Python's {,n} as {0,n}; refuse the rest."""
    atoms = list(_atoms(regex))
    for pos, _ in atoms:
        for pattern, what in _REFUSED:
            m = pattern.match(regex, pos)
            if m:
                raise RegexDialectError(
                    f"{what.format(m.group())} at position {pos} is not supported in "
                    "guided_regex")
    has_alternation = any(a == "|" for _, a in _top_level(atoms))
    lo, hi = 0, len(atoms)  # fullmatch: anchors at the ends of the whole regex always hold
    while lo < hi and atoms[lo][1] in _START_ANCHOR:
        lo += 1
    while lo < hi and atoms[hi - 1][1] in _END_ANCHOR:
        hi -= 1
    word_start = not has_alternation and lo < hi and atoms[lo][1] == r"\b"
    lo += word_start
    word_end = not has_alternation and lo < hi and atoms[hi - 1][1] == r"\b"
    hi -= word_end
    for pos, atom in atoms[lo:hi]:
        if atom in (r"\b", r"\B"):
            raise RegexDialectError(
                f"a word boundary ({atom}) at position {pos} is not supported in guided_regex "
                "(only at the very start or end of a regex without a top-level |)")
        if atom in ("^", "$", r"\A", r"\Z", r"\z"):
            raise RegexDialectError(
                f"the anchor {atom} at position {pos} is not supported in guided_regex (only at "
                "the very start or end of the regex)")
    return Regex("".join(a for _, a in atoms[lo:hi]), word_start, word_end)


def _atoms(regex: str):
    """(position, atom): an escape with its character(s), a whole [...] class, {n,m} quantifiers
    (with Python's {,n} written {0,n}), or one character."""
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "\\":
            j = i + 2
            if regex[i + 1:i + 2] in ("p", "P", "x", "u") and regex[j:j + 1] == "{":
                j = regex.find("}", j) + 1 or n
            yield i, regex[i:j]
        elif c == "[":
            j = _class_end(regex, i)
            yield i, regex[i:j]
        elif c == "{":
            m = re.compile(r"\{(\d*),?(\d*)\}").match(regex, i)
            if m and m.group(0).startswith("{,"):
                yield i, "{0" + m.group(0)[1:]
                j = m.end()
            else:
                j = m.end() if m else i + 1
                yield i, regex[i:j]
        else:
            j = i + 1
            yield i, c
        i = j


def _class_end(regex: str, i: int) -> int:
    """The index after the ] closing the class opened at i ([] nest for [[:alpha:]])."""
    j, depth, n = i + 1, 1, len(regex)
    if regex[j:j + 1] == "^":
        j += 1
    if regex[j:j + 1] == "]":
        j += 1
    while j < n and depth:
        if regex[j] == "\\":
            j += 2
            continue
        if regex[j] == "[":
            depth += 1
        elif regex[j] == "]":
            depth -= 1
        j += 1
    return j


def _top_level(atoms: list[tuple[int, str]]):
    depth = 0
    for pos, atom in atoms:
        if atom == "(":
            depth += 1
        elif atom == ")":
            depth -= 1
        elif depth == 0:
            yield pos, atom
