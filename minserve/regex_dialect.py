"""guided_regex text -> what llguidance compiles, with Python re's meaning under fullmatch (the
output must match the whole regex). Anchors and word boundaries at the two ends are exact
rewrites; what cannot be expressed (lookarounds, backreferences, an interior \\b) is refused in
one line naming the construct and its position. No llguidance here: structured.py compiles."""
from __future__ import annotations

import re
from typing import NamedTuple

WORD_CLASS = "[0-9a-zA-Z_]"  # \w as structured.py compiles it (ASCII: the 'dw' option)
# The constraint engine unrolls counted repetitions: (a{1000}){1000} is a million states, and its
# first token mask took 2-5 s on the engine thread (issue 36). Bounded before compiling: this many
# elements once every count is multiplied out (a{10000} measured ~25 ms for the first mask).
MAX_REGEX_SIZE = 10_000
_QUANTIFIER = re.compile(r"\{(\d*)(,?)(\d*)\}")


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
    size = expanded_size(atoms[lo:hi])
    if size > MAX_REGEX_SIZE:
        raise RegexDialectError(
            f"the regex unrolls to about {size} elements (counted repetitions multiply: "
            f"(a{{100}}){{100}} is 10000); at most {MAX_REGEX_SIZE} are allowed in guided_regex")
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


def regex_size(regex: str) -> int:
    """expanded_size of a whole regex (a JSON schema's pattern, say)."""
    return expanded_size(list(_atoms(regex)))


def expanded_size(atoms: list[tuple[int, str]]) -> int:
    """How many elements (characters, classes) the regex holds once every counted repetition
    is unrolled: an element repeated {n,m} counts n times (once more when more may follow);
    alternatives add up. One pass over the atoms, no recursion."""
    stack = [[0, 0, 0]]   # per open group: [finished alternatives, this alternative, last item]
    after_quantifier = in_spec = False
    for i, (_, atom) in enumerate(atoms):
        top = stack[-1]
        if in_spec:     # (?:  (?P<name>  (?i)  (?i:  hold no elements
            in_spec = atom not in (":", ">", ")")
            if atom != ")":
                continue
        elif atom == "?" and i and atoms[i - 1][1] == "(":
            in_spec = True
            continue
        bounds = _bounds(atom)
        if bounds is not None and after_quantifier and atom in ("?", "+"):
            after_quantifier = False     # a lazy or possessive marker, not a repetition
            continue
        after_quantifier = False
        if atom == "(":
            stack.append([0, 0, 0])
        elif atom == ")" and len(stack) > 1:
            group = stack.pop()
            size = group[0] + group[1]
            stack[-1][1] += size
            stack[-1][2] = size
        elif atom == "|":
            top[0], top[1], top[2] = top[0] + top[1], 0, 0
        elif bounds is not None and top[2]:
            lo, hi = bounds
            extra = top[2] * (max(lo, 1) - 1) + (top[2] if hi is None or hi > lo else 0)
            top[1] += extra
            top[2] += extra
            after_quantifier = True
        else:   # a character, a class or an escape
            top[1] += 1
            top[2] = 1
    return sum(g[0] + g[1] for g in stack)


def _bounds(atom: str) -> tuple[int, int | None] | None:
    """(min, max) of a quantifier atom (max None: unbounded), None for any other atom."""
    if atom in ("*", "+", "?"):
        return {"*": (0, None), "+": (1, None), "?": (0, 1)}[atom]
    m = _QUANTIFIER.fullmatch(atom)
    if m is None or not (m.group(1) or m.group(3)):
        return None
    lo = int(m.group(1) or 0)
    hi = int(m.group(3)) if m.group(3) else (None if m.group(2) else lo)
    return lo, hi


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
