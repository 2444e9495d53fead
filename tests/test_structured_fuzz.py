"""Fuzz the grammar, regex, choice and JSON-schema compilers (structured.compile) with generated
inputs: random small specs of every shape, deep rule and $ref chains at and past the caps, and the
3,000-rule chain that once killed the server with SIGSEGV. Every input must end in a constraint or
a StructuredOutputError whose message is one bounded line (no panic text, backtrace or path).

The inputs run in a child process (RUST_BACKTRACE=1 set), so a native crash fails this test and
names the input instead of killing pytest."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.tiny import make_tokenizer_json

NUM_RANDOM = 400  # per kind; all of them take a few seconds
_WORDS = ["a", "b", "ab", "x y", "1", "é", "日本", "\\", '"', "\n", "{", "}", "(", ")"]


# ---------------------------------------------------------------- generators
def _lark(rng: random.Random, depth: int = 0) -> str:
    """A random Lark expression: literals, regexes, references (maybe undefined), groups,
    alternatives and repetitions; sometimes plain junk."""
    r = rng.random()
    if depth > 4 or r < 0.25:
        return rng.choice([json.dumps(rng.choice(_WORDS)), f"/{_regex(rng, 2)}/",
                           f"r{rng.randrange(6)}", "%json {\"type\": \"integer\"}", "NUMBER",
                           rng.choice(["::", "|", ")", "\"", "/", "%ignore", "?"])])
    parts = [_lark(rng, depth + 1) for _ in range(rng.randrange(1, 4))]
    joined = rng.choice([" ", " | "]).join(parts)
    return rng.choice(["({})", "[{}]", "{}*", "({})+", "{}?", "({}){{1,3}}", "{}"]).format(joined)


def random_grammar(rng: random.Random) -> str:
    rules = [f"start: {_lark(rng)}"]
    rules += [f"r{i}: {_lark(rng)}" for i in range(rng.randrange(6))]
    if rng.random() < 0.2:  # GBNF spelling
        return "\n".join(line.replace(":", " ::=", 1).replace("start", "root", 1)
                         for line in rules)
    return "\n".join(rules)


def _regex(rng: random.Random, depth: int = 3) -> str:
    atoms = ["a", "b", ".", "\\d", "\\w", "\\s", "[a-z]", "[^0-9]", "\\p{L}", "é", "\\.", "\\b",
             "(?=a)", "(?i)", "^", "$", "[", "(", ")", "{2}", "\\", "[z-a]", "(?P<n>x)"]
    out = []
    for _ in range(rng.randrange(1, 6)):
        if depth > 0 and rng.random() < 0.3:
            out.append("(" + "|".join(_regex(rng, depth - 1) for _ in range(rng.randrange(1, 3)))
                       + ")")
        else:
            out.append(rng.choice(atoms))
        out[-1] += rng.choice(["", "", "*", "+", "?", "{1,4}", "{0,1000}", "{99999}"])
    return "".join(out)


def random_schema(rng: random.Random, depth: int = 0) -> object:
    """Random (mostly plausible, sometimes wrong) JSON schemas with $refs into $defs."""
    if rng.random() < 0.05:
        return rng.choice([True, False, 1, "string", [], None])
    kind = rng.choice(["string", "integer", "number", "boolean", "null", "object", "array",
                       "anyOf", "allOf", "oneOf", "ref", "enum", "const", "bogus"])
    leaf = depth > 3
    if kind == "object" and not leaf:
        props = {f"p{i}": random_schema(rng, depth + 1) for i in range(rng.randrange(4))}
        s = {"type": "object", "properties": props,
             "required": rng.sample(list(props), rng.randrange(len(props) + 1))}
        if rng.random() < 0.3:
            s["additionalProperties"] = rng.choice([False, True, random_schema(rng, depth + 1)])
        return s
    if kind == "array" and not leaf:
        s = {"type": "array", "items": random_schema(rng, depth + 1)}
        if rng.random() < 0.5:
            s["minItems"] = rng.choice([0, 1, 3, -1, 10**12])
        return s
    if kind in ("anyOf", "allOf", "oneOf") and not leaf:
        return {kind: [random_schema(rng, depth + 1) for _ in range(rng.randrange(1, 4))]}
    if kind == "ref":
        return {"$ref": rng.choice(["#/$defs/d0", "#/$defs/d1", "#/$defs/missing", "#", "nope"])}
    if kind == "enum":
        return {"enum": [rng.choice(_WORDS) for _ in range(rng.randrange(0, 4))]}
    if kind == "const":
        return {"const": rng.choice([1, "x", None, [1], {"a": 1}])}
    if kind == "string":
        s = {"type": "string"}
        if rng.random() < 0.4:
            s["pattern"] = _regex(rng, 2)
        if rng.random() < 0.3:
            s["maxLength"] = rng.choice([0, 5, -2, 10**9])
        return s
    if kind == "bogus":
        return {"type": rng.choice(["nonsense", 5, ["string", "integer"]]), "format": "email"}
    return {"type": kind if not leaf else "string"}


def random_spec(rng: random.Random, kind: str) -> dict:
    if kind == "grammar":
        return {"grammar": random_grammar(rng)}
    if kind == "regex":
        return {"regex": _regex(rng)}
    if kind == "choice":
        return {"choice": [rng.choice(_WORDS) * rng.randrange(1, 4)
                           for _ in range(rng.randrange(1, 6))]}
    schema = random_schema(rng)
    if isinstance(schema, dict) and rng.random() < 0.5:
        schema = {**schema, "$defs": {"d0": random_schema(rng, 2), "d1": {"$ref": "#/$defs/d0"}}}
    return {"json": schema}


def rule_chain(num_rules: int) -> dict:
    """The issue's crash: start: r0; rI: "tI" rI+1 | "e"; r<N>: "z"."""
    return {"grammar": "\n".join(["start: r0"] + [f'r{i}: "t{i}" r{i + 1} | "e"'
                                                  for i in range(num_rules)]
                                 + [f'r{num_rules}: "z"'])}


def ref_chain(num_refs: int, make) -> dict:
    defs = {f"d{i}": make(f"#/$defs/d{i + 1}") for i in range(num_refs)}
    defs[f"d{num_refs}"] = {"type": "string"}
    return {"json": {"$ref": "#/$defs/d0", "$defs": defs}}


# (name, spec, must compile): the deepest inputs the caps let through must compile; past the
# caps a clear refusal. Each of these shapes once crashed (or would) on an 8 MB stack.
DEEP = [
    ("chain-3000", lambda: rule_chain(3000), True),
    ("chain-9990", lambda: rule_chain(9990), True),
    ("chain-30000", lambda: rule_chain(30000), False),
    ("ref-chain-9000", lambda: ref_chain(9000, lambda r: {"type": "array", "items": {"$ref": r}}),
     True),
    ("ref-only-19000", lambda: ref_chain(19000, lambda r: {"$ref": r}), True),
    ("ref-anyof-3000", lambda: ref_chain(3000, lambda r: {"anyOf": [
        {"type": "array", "items": {"$ref": r}}, {"type": "null"}]}), True),
    ("ref-chain-40000", lambda: ref_chain(40000, lambda r: {"$ref": r}), False),
    ("gbnf-2000", lambda: {"grammar": "\n".join(
        ["root ::= r0"] + [f'r{i} ::= "t" r{i + 1} | "e"' for i in range(2000)]
        + ['r2000 ::= "z"'])}, False),
    ("choices-100000", lambda: {"choice": [f"c{i}" for i in range(100_000)]}, False),
    ("nested-schema-300", lambda: {"json": _nested(300)}, False),
    ("long-regex", lambda: {"regex": "a" * (2 << 20)}, False),
]


def _nested(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}}
    return s


# ---------------------------------------------------------------- the child process
def _check_message(message: str) -> str | None:
    """What is wrong with an error message, or None."""
    low = message.lower()
    if "\n" in message or len(message) > 400:
        return "not one bounded line"
    for bad in ("panic", "backtrace", ".rs:", "/root/", "/home/"):
        if bad in low:
            return f"leaks {bad!r}"
    return None


def _child(tokenizer_path: str, seed: int) -> int:
    from tokenizers import Tokenizer

    from minserve import structured
    from minserve.structured import StructuredOutputError

    tok = Tokenizer.from_file(tokenizer_path)
    rng = random.Random(seed)
    cases = [(f"{kind}-{i}", lambda kind=kind: random_spec(rng, kind), None)
             for kind in ("grammar", "regex", "json", "choice") for i in range(NUM_RANDOM)]
    counts = {"ok": 0, "error": 0}
    problems = []
    for name, make, must_compile in cases + DEEP:
        spec = make()
        print(f"INPUT {name}: {json.dumps(spec)[:300]}", flush=True)  # the last line if we die
        try:
            structured.compile(spec, tok, vocab_size=512)
            counts["ok"] += 1
            if must_compile is False:
                problems.append(f"{name}: compiled, but is past the caps")
        except StructuredOutputError as e:
            counts["error"] += 1
            if must_compile:
                problems.append(f"{name}: refused: {e}")
            why = _check_message(str(e))
            if why:
                problems.append(f"{name}: message {why}: {str(e)[:500]!r}")
        except Exception as e:  # noqa: BLE001 - anything but a StructuredOutputError is a bug
            problems.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
    print("RESULT " + json.dumps({"counts": counts, "problems": problems}), flush=True)
    return 0


# ---------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fuzz-tok") / "tokenizer.json")
    make_tokenizer_json(path)
    return path


def test_compilers_never_crash_and_errors_are_one_line(tokenizer_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RUST_BACKTRACE": "1", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-m", "tests.test_structured_fuzz", tokenizer_path,
                           "1234"], capture_output=True, text=True, env=env, cwd=root,
                          timeout=900)
    lines = proc.stdout.splitlines()
    last_input = next((line for line in reversed(lines) if line.startswith("INPUT")), "")
    assert proc.returncode == 0, (f"the compiler process died ({proc.returncode}) on "
                                  f"{last_input[:400]}\n{proc.stderr[-2000:]}")
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    assert result["problems"] == []
    # the generators reach both sides: many inputs compile, many are refused
    assert result["counts"]["ok"] > NUM_RANDOM and result["counts"]["error"] > NUM_RANDOM // 4


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2])))
