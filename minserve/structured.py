"""Structured outputs: request spellings -> one spec dict -> an llguidance constraint that masks
tokens step by step (JSON schema, JSON object, regex, choice, Lark/EBNF grammar).
Never imports torch at module level (protocol/server import this file); decides nothing about
scheduling: the engine asks for bitmask rows and reports sampled tokens."""
from __future__ import annotations

import ctypes
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import llguidance

from minserve.errors import library_text
from minserve.regex_dialect import WORD_CLASS, RegexDialectError, prepare_regex
from minserve.structured_limits import (
    COMPILE_STACK_BYTES,
    StructuredOutputError,
    check_limits,
)
from minserve.value_text import value_text

if TYPE_CHECKING:
    import torch

SPEC_KINDS = ("json", "json_object", "regex", "choice", "grammar")
_MAX_CACHED_MATCHERS = 64
# verbose_errors off: llguidance's verbose errors dump lexer and parser state into the message.
# initial_lexer_fuel a fifth of llguidance's default: it bounds the work of the first token mask
# (computed in compile(), off the engine thread), 2.2 s -> 0.2 s for a lexer that blows up.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False, initial_lexer_fuel=200_000)

# ---------------------------------------------------------------- request -> spec
def structured_from_request(body: dict[str, Any]) -> dict[str, Any] | None:
    """Read every spelling vLLM and OpenAI accept and return one spec dict
    ({"json": schema} | {"json_object": True} | {"regex": s} | {"choice": [...]} |
    {"grammar": s}, plus optional "whitespace_pattern"), or None when unconstrained.
    Raises StructuredOutputError on wrong types or when two options conflict."""
    found: list[tuple[str, dict[str, Any]]] = []  # (where it came from, spec)
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _from_response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    for key, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if body.get(key) is not None:
            found.append((key, {kind: _check_value(kind, body[key], key)}))
    if body.get("guided_json_object"):
        found.append(("guided_json_object", {"json_object": True}))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise StructuredOutputError("'structured_outputs' must be an object")
        for kind in SPEC_KINDS:
            if so.get(kind) not in (None, False):
                found.append((f"structured_outputs.{kind}",
                              {kind: _check_value(kind, so[kind], f"structured_outputs.{kind}")}))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise StructuredOutputError(
            f"conflicting structured output options: {names}; send only one of them")
    ws = body.get("guided_whitespace_pattern")
    if so is not None and so.get("whitespace_pattern") is not None:
        ws = so["whitespace_pattern"]
    if not found:
        return None
    spec = found[0][1]
    if ws is not None:
        if not isinstance(ws, str):
            raise StructuredOutputError("'guided_whitespace_pattern' must be a string")
        spec["whitespace_pattern"] = ws
    spec.update(request_options(so))
    return spec


def request_options(so: Any) -> dict[str, bool]:
    """vLLM's per-request switches in `structured_outputs` -> spec options (absent: the
    server's --structured-outputs-config, then the defaults of grammar_from_spec)."""
    out: dict[str, bool] = {}
    if not isinstance(so, dict):
        return out
    for key, option in (("disable_any_whitespace", "any_whitespace"),
                        ("disable_additional_properties", "additional_properties")):
        value = so.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise StructuredOutputError(f"'structured_outputs.{key}' must be a boolean")
        out[option] = not value
    return out


def _from_response_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise StructuredOutputError("'response_format' must be an object with a 'type'")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise StructuredOutputError(
                "response_format.json_schema must be an object with 'name' and 'schema'")
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:  # OpenAI makes 'schema' optional: then any JSON object
            return {"json_object": True}
        return {"json": _check_value("json", schema, "response_format.json_schema.schema")}
    raise StructuredOutputError(
        f"response_format type {value_text(kind)} is not supported "
        "(use text, json_object or json_schema)")


def _check_value(kind: str, value: Any, where: str) -> Any:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as e:
                raise StructuredOutputError(f"'{where}' is not valid JSON: "
                                            f"{library_text(e)}") from None
        if not isinstance(value, (dict, bool)):
            raise StructuredOutputError(f"'{where}' must be a JSON schema object")
        return value
    if kind == "json_object":
        return True
    if kind == "choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) for c in value)):
            raise StructuredOutputError(f"'{where}' must be a non-empty list of strings")
        return value
    if not isinstance(value, str) or not value:
        raise StructuredOutputError(f"'{where}' must be a non-empty string")
    return value


# ---------------------------------------------------------------- spec -> grammar
# Keywords whose values are subschemas: maps of them, lists of them, or one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
               "propertyNames", "additionalItems", "unevaluatedProperties", "unevaluatedItems")


def close_objects(schema: Any) -> Any:
    """vLLM's disable_additional_properties, our default: every object schema that lists
    `properties` (or `patternProperties`) and says nothing of `additionalProperties` gets
    `additionalProperties: false`, so the output holds only the listed keys, as xgrammar (vLLM's
    default backend) generates. A copy, built without recursion; the input is untouched."""
    root = [schema]
    todo: list[tuple[Any, Any]] = [(root, 0)]  # (container, key) of each subschema to visit
    while todo:
        parent, key = todo.pop()
        node = parent[key]
        if not isinstance(node, dict):
            continue
        node = parent[key] = dict(node)
        if ("properties" in node or "patternProperties" in node) \
                and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for k in _SCHEMA_MAPS:
            if isinstance(node.get(k), dict):
                node[k] = dict(node[k])
                todo.extend((node[k], name) for name in node[k])
        for k in _SCHEMA_LISTS:
            if isinstance(node.get(k), list):
                node[k] = list(node[k])
                todo.extend((node[k], i) for i in range(len(node[k])))
        todo.extend((node, k) for k in _SCHEMA_ONE if isinstance(node.get(k), dict))
    return root[0]


def grammar_from_spec(spec: dict[str, Any]) -> str:
    """The llguidance grammar text for a spec (not yet checked against a tokenizer)."""
    kinds = [k for k in SPEC_KINDS if spec.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise StructuredOutputError(
            f"a structured output spec needs exactly one of {', '.join(SPEC_KINDS)}; got {kinds}")
    kind = kinds[0]
    value = _check_value(kind, spec[kind], kind)
    check_limits(kind, value)
    if kind == "json" and not spec.get("additional_properties", False):
        value = close_objects(value)
    options: dict[str, Any] = {"whitespace_flexible": spec.get("any_whitespace", True)}
    if spec.get("whitespace_pattern") is not None:
        options["whitespace_pattern"] = spec["whitespace_pattern"]
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=options)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=options)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(value))
        if kind == "regex":
            # NOTE: \d and \w are ASCII ([0-9], [0-9a-zA-Z_]) as in JSON Schema and xgrammar: the
            # Rust defaults (any Unicode digit/letter/mark) let a model write "６" into an IPv4
            # address, and produce text that Python's re (another Unicode table) rejects.
            return _regex_grammar(value)
        return llguidance.grammar_from("grammar", value)  # Lark, or GBNF/EBNF converted to Lark
    except (ValueError, RecursionError) as e:
        raise StructuredOutputError(f"invalid {kind}: {_describe(str(e))}") from None


def _regex_grammar(regex: str) -> str:
    """A guided_regex as one Lark lexeme; a \\b at an end becomes an intersection (`&`) with
    "starts/ends with a word character", which is exactly what it means under fullmatch."""
    try:
        rx = prepare_regex(regex)
    except RegexDialectError as e:
        raise StructuredOutputError(str(e)) from None
    lexeme = f"/{llguidance.regex_to_lark(rx.body, 'dw')}/"
    if rx.word_start:
        lexeme += f" & /{WORD_CLASS}(.|\\n)*/"
    if rx.word_end:
        lexeme += f" & /(.|\\n)*{WORD_CLASS}/"
    return llguidance.LLMatcher.grammar_from_lark(f"start: REGEX\nREGEX: {lexeme}")


# ---------------------------------------------------------------- tokenizer bridge
_ll_cache: dict[int, tuple[Any, dict[int, llguidance.LLTokenizer]]] = {}
_lock = threading.Lock()


def _backend_json(tokenizer: Any) -> str:
    """tokenizer.json text of a tokenizers.Tokenizer, or of our Tokenizer wrapping one."""
    import tokenizers

    backend = tokenizer
    if not isinstance(backend, tokenizers.Tokenizer):
        for attr in ("backend", "tokenizer", "_tokenizer", "_tok", "hf_tokenizer"):
            cand = getattr(tokenizer, attr, None)
            if isinstance(cand, tokenizers.Tokenizer):
                backend = cand
                break
        else:
            raise TypeError(f"cannot find a tokenizers.Tokenizer inside {type(tokenizer).__name__}")
    # The same normalisation as llguidance.hf.from_tokenizer: padding/truncation off.
    data = json.loads(backend.to_str())
    data["padding"] = None
    data["truncation"] = None
    return json.dumps(data)


def _eos_ids(tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None) or []
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [tokenizer.eos_token_id]
    return sorted(ids)


def get_ll_tokenizer(tokenizer: Any, vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """Build llguidance's view of our vocabulary once per (tokenizer, logits width) and cache it.
    vocab_size is the model's logits width; ids past the tokenizer's vocab are never allowed."""
    if isinstance(tokenizer, llguidance.LLTokenizer):
        return tokenizer
    with _lock:
        by_width = getattr(tokenizer, "_ll_tokenizers", None)
        if by_width is None:
            by_width = {}
            try:
                tokenizer._ll_tokenizers = by_width  # cached on the tokenizer object itself
            except AttributeError:  # slots / Rust objects: keep it here, holding the object
                entry = _ll_cache.setdefault(id(tokenizer), (tokenizer, by_width))
                if entry[0] is not tokenizer:
                    entry = _ll_cache[id(tokenizer)] = (tokenizer, by_width)
                by_width = entry[1]
        if vocab_size not in by_width:
            eos = _eos_ids(tokenizer)
            by_width[vocab_size] = llguidance.LLTokenizer(
                _backend_json(tokenizer), n_vocab=vocab_size, eos_token=eos or None)
        return by_width[vocab_size]


# ---------------------------------------------------------------- the constraint
class StructuredConstraint:
    """One request's grammar state (the engine's `request.structured`)."""

    __slots__ = ("matcher", "vocab_size", "num_words", "eos_token_ids")

    def __init__(self, matcher: llguidance.LLMatcher, ll_tokenizer: llguidance.LLTokenizer):
        self.matcher = matcher
        self.vocab_size = ll_tokenizer.vocab_size
        self.num_words = (self.vocab_size + 31) // 32
        self.eos_token_ids = list(ll_tokenizer.eos_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this step's allowed tokens into bitmask[row] (CPU int32 [R, ceil(V/32)])."""
        words = bitmask.shape[1]
        if self.matcher.is_error():  # NOTE: only EOS, so a broken request ends instead of looping
            bitmask[row].zero_()
            for t in self.eos_token_ids:
                if t < words * 32:
                    bit = t % 32    # bit 31 is the int32 sign bit
                    bitmask[row, t // 32] |= 1 << bit if bit < 31 else -(1 << 31)
            return
        if words == self.num_words and bitmask.is_contiguous():
            ptr = bitmask.data_ptr() + row * words * 4
            self.matcher.unsafe_compute_mask_ptr(ptr, words * 4)
            return
        import torch  # slow path: a bitmask wider than our vocab (padded logits)

        tmp = torch.empty(self.num_words, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(tmp.data_ptr(), self.num_words * 4)
        bitmask[row].zero_()
        n = min(words, self.num_words)
        bitmask[row, :n] = tmp[:n]

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False means it broke the grammar (error state)."""
        return self.matcher.consume_token(token_id)

    def num_valid(self, token_ids: list[int]) -> int:
        """How many of token_ids (drafts, from the current state) the grammar takes in a row."""
        return self.matcher.validate_tokens(token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted (drafts whose masks were computed ahead)."""
        self.matcher.rollback(num_tokens)

    def is_finished(self) -> bool:
        """The grammar is complete (or errored): end the request with finish_reason stop."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return library_text(self.matcher.get_error() or "error") if self.matcher.is_error() \
            else None


_proto_cache: OrderedDict[tuple[int, int | None, str], llguidance.LLMatcher] = OrderedDict()


def compile(spec: dict[str, Any], tokenizer: Any, vocab_size: int | None = None,
            ) -> StructuredConstraint:
    """Validate and compile a spec into a fresh constraint. Raises StructuredOutputError with
    llguidance's message for a bad schema/regex/grammar, so errors surface before step one.
    Compiled matchers are cached (LRU) and deep-copied, so the protocol layer can validate and
    the engine compile again for each of n samples at little cost. The work runs on a compile
    thread (see COMPILE_STACK_BYTES); the caller waits for it."""
    return _on_compile_thread(_compile, spec, tokenizer, vocab_size)


def _compile(spec: dict[str, Any], tokenizer: Any, vocab_size: int | None
             ) -> StructuredConstraint:
    grammar = grammar_from_spec(spec)
    ll_tok = get_ll_tokenizer(tokenizer, vocab_size)
    key = (id(tokenizer), vocab_size, grammar)
    with _lock:
        proto = _proto_cache.get(key)
        if proto is not None:
            _proto_cache.move_to_end(key)
    if proto is None:
        # drops the GIL while building
        proto = llguidance.LLMatcher(ll_tok, grammar, log_level=0, limits=_LIMITS)
        if not proto.is_error():
            # NOTE: the first mask builds the lexer's start states, the costly part of a huge
            # regex: here, not in an engine step, and an error here is still a 400. The copies
            # the engine takes share the states built.
            mask = (ctypes.c_int32 * ((ll_tok.vocab_size + 31) // 32))()
            proto.unsafe_compute_mask_ptr(ctypes.addressof(mask), ctypes.sizeof(mask))
        if proto.is_error():
            kind = next(k for k in SPEC_KINDS if spec.get(k) not in (None, False))
            raise StructuredOutputError(f"invalid {kind}: {_describe(proto.get_error())}")
        with _lock:
            _proto_cache[key] = proto
            while len(_proto_cache) > _MAX_CACHED_MATCHERS:
                _proto_cache.popitem(last=False)
    return StructuredConstraint(proto.deep_copy(), ll_tok)


def _describe(error: str) -> str:
    if error.startswith("Unimplemented keys"):
        error = f"unsupported JSON schema keyword(s): {error.split(':', 1)[1].strip()}"
    return library_text(error)


_stack_size_lock = threading.Lock()


def _on_compile_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a fresh thread with COMPILE_STACK_BYTES of stack; its exception re-raised.
    A thread per call (~0.1 ms) rather than a pool: the stack pages a deep compile touched are
    given back when the thread ends."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            error.append(e)

    thread = threading.Thread(target=target, name="minserve-compile", daemon=True)
    with _stack_size_lock:  # NOTE: stack_size() is process-wide: set it only around our start
        previous = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if error:
        raise error[0]
    return result[0]


# ---------------------------------------------------------------- batched torch helpers
def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """CPU int32 [num_rows, ceil(V/32)] (pinned when CUDA is there), all tokens allowed."""
    import torch

    pin = torch.cuda.is_available()
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32, pin_memory=pin)


_executor: llguidance.LLExecutor | None = None


def fill_bitmasks(constraints: list[StructuredConstraint | None], bitmask: torch.Tensor) -> None:
    """Row i <- constraints[i]'s mask; rows whose constraint is None allow everything.
    PERF: llguidance's executor computes the rows in parallel without the GIL, so the engine can
    run this while the GPU runs the forward pass."""
    global _executor
    fast: list[tuple[llguidance.LLMatcher, int]] = []
    for i, c in enumerate(constraints):
        if c is None:
            bitmask[i].fill_(-1)
        elif (isinstance(c, StructuredConstraint) and len(constraints) > 1
              and c.num_words == bitmask.shape[1]
              and not c.matcher.is_error()):
            fast.append((c.matcher, i))
        else:
            c.fill_bitmask(bitmask, i)
    if fast:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        if not bitmask.is_contiguous():
            raise ValueError("bitmask must be contiguous")
        _executor.unsafe_compute_mask_ptr(fast, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                          bitmask.shape[0])
