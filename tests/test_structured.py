"""Structured outputs: every constraint driven by RANDOM logits (the adversarial case) must end in
output that validates; bad specs fail at compile time with a clear message; request spellings."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from minserve import structured as st
from minserve.engine.sampler import apply_bitmask
from minserve.structured import StructuredOutputError
from tests.tiny import make_tokenizer_json

MODEL_VOCAB = 512  # logits width of the tiny models: wider than the 400-token tokenizer


class _Tok:
    """The two things structured.py reads from our Tokenizer: the backend and the eos ids."""

    def __init__(self, backend: Tokenizer):
        self.tokenizer = backend
        self.eos_token_ids = {backend.token_to_id("<|im_end|>"),
                              backend.token_to_id("<|endoftext|>")}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> _Tok:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    make_tokenizer_json(path)
    return _Tok(Tokenizer.from_file(path))


def run_random(constraint, tok: _Tok, seed: int, max_steps: int = 300,
               spiky: float = 1.0) -> tuple[str, bool]:
    """Sample with random logits under the mask until the grammar finishes or max_steps."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = st.allocate_bitmask(1, MODEL_VOCAB)
    out: list[int] = []
    for _ in range(max_steps):
        constraint.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, MODEL_VOCAB, generator=gen) * spiky
        apply_bitmask(logits, bitmask)
        assert torch.isfinite(logits).any(), "mask allowed nothing"
        token = int(torch.multinomial(torch.softmax(logits, -1)[0], 1, generator=gen))
        assert token < 400, "a padded vocab id was allowed"
        assert constraint.accept_token(token), constraint.error
        if token not in tok.eos_token_ids:
            out.append(token)
        if constraint.is_finished():
            return tok.decode(out), True
    return tok.decode(out), False


PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
MIXED = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", 3, None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "ok": {"type": "boolean"},
        "when": {"type": "string", "format": "date"},
        "ip": {"type": "string", "format": "ipv4"},
        "ref": {"$ref": "#/$defs/point"},
        "alt": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                          {"type": "string", "pattern": "^[a-c]{1,3}$"}]},
    },
    "required": ["kind", "tags", "score", "ref", "alt"],
    "additionalProperties": False,
    "$defs": {"point": {"type": "object", "additionalProperties": False, "required": ["x"],
                        "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                       "y": {"const": "fixed"}}}},
}
ARRAY = {"type": "array", "minItems": 1, "maxItems": 4,
         "items": {"type": "object", "additionalProperties": False, "required": ["id"],
                   "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}}}}


@pytest.mark.parametrize("schema", [PERSON, MIXED, ARRAY], ids=["person", "mixed", "array"])
@pytest.mark.parametrize("ws", [None, r"[ ]?"])
def test_json_schema_random_logits(tok, schema, ws):
    spec = {"json": schema} if ws is None else {"json": schema, "whitespace_pattern": ws}
    num_finished = 0
    for seed in range(12):  # compile() again is cheap: the matcher is cached and deep-copied
        text, finished = run_random(st.compile(spec, tok, MODEL_VOCAB), tok, seed, max_steps=400)
        if finished:
            num_finished += 1
            jsonschema.validate(json.loads(text), schema)
            if ws is not None:
                outside = re.sub(r'"(\\.|[^"\\])*"', '""', text)  # whitespace between tokens
                assert "\n" not in outside and "  " not in outside, text
    assert num_finished >= 6


def test_json_object_and_string_schema(tok):
    c = st.compile({"json": json.dumps(PERSON), "any_whitespace": False}, tok, MODEL_VOCAB)
    text, finished = run_random(c, tok, 1)
    assert finished and jsonschema.validate(json.loads(text), PERSON) is None
    for seed in range(6):  # any JSON object: bounded walk not guaranteed, check what finishes
        text, finished = run_random(
            st.compile({"json_object": True}, tok, MODEL_VOCAB), tok, seed, max_steps=200,
            spiky=4.0)
        if finished:
            assert isinstance(json.loads(text), dict)


IPV4 = r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"


@pytest.mark.parametrize("regex", [IPV4, r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"(yes|no)!?",
                                   r"\w{1,5}-[0-9]{2}"])
def test_regex_random_logits(tok, regex):
    for seed in range(15):
        text, finished = run_random(st.compile({"regex": regex}, tok, MODEL_VOCAB), tok, seed)
        assert finished, text
        assert re.fullmatch(regex, text), (regex, text)


def test_choice_random_logits(tok):
    choices = ["SPAM", "NOT_SPAM", "日本語 ok", 'a "quote"', "SPAMMER"]
    seen = set()
    for seed in range(40):
        text, finished = run_random(st.compile({"choice": choices}, tok, MODEL_VOCAB), tok, seed)
        assert finished and text in choices, text
        seen.add(text)
    assert len(seen) >= 3


@pytest.mark.parametrize("grammar,pattern", [
    ('start: expr\nexpr: NUM (OP NUM)*\nOP: "+" | "-"\nNUM: /[0-9]{1,3}/',
     r"[0-9]{1,3}([+-][0-9]{1,3})*"),
    ('root ::= answer\nanswer ::= "yes" | "no" | "maybe" [0-9]', r"yes|no|maybe[0-9]"),
])
def test_grammar_random_logits(tok, grammar, pattern):
    num_finished = 0
    for seed in range(15):
        text, finished = run_random(st.compile({"grammar": grammar}, tok, MODEL_VOCAB), tok, seed)
        if finished:
            num_finished += 1
            assert re.fullmatch(pattern, text), text
    assert num_finished >= 10


@pytest.mark.parametrize("spec,message", [
    ({"json": {"type": "strnig"}}, "invalid json: Invalid type: strnig"),
    ({"json": {"type": "array", "uniqueItems": True}}, "unsupported JSON schema keyword"),
    ({"json": {"properties": {"a": {"$ref": "#/nope"}}}}, "/nope"),
    ({"json": '{"type": '}, "not valid JSON"),
    ({"json": [1, 2]}, "must be a JSON schema object"),
    ({"json": {"type": "string", "pattern": "(("}}, "regex parse error"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"regex": ""}, "non-empty string"),
    ({"choice": []}, "non-empty list of strings"),
    ({"choice": ["a", 1]}, "non-empty list of strings"),
    ({"grammar": "start: foo"}, "unknown name"),
    ({"grammar": "root ::= ("}, "invalid grammar"),
    ({"json": {"type": "object"}, "whitespace_pattern": "[ ?"}, "unclosed character class"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({}, "exactly one of"),
])
def test_invalid_specs_raise_at_compile(tok, spec, message):
    with pytest.raises(StructuredOutputError) as err:
        st.compile(spec, tok, MODEL_VOCAB)
    assert message in str(err.value)


def test_apply_bitmask_matches_reference():
    """The sampler's mask: bit t % 32 of word t // 32 allows token t (bit 31 is the sign bit)."""
    gen = torch.Generator().manual_seed(0)
    num_vocab = 70
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 3), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[1, 0] = -2**31  # only bit 31 set
    logits = torch.randn(3, num_vocab, generator=gen)
    want = logits.clone()
    for r in range(3):
        for t in range(num_vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, want)


def test_fill_bitmasks_batched_equals_single(tok):
    specs = [{"json": PERSON}, None, {"regex": IPV4}, {"choice": ["a", "b"]}]
    cons = [st.compile(s, tok, MODEL_VOCAB) if s else None for s in specs]
    batched = st.allocate_bitmask(len(cons), MODEL_VOCAB)
    batched.zero_()
    st.fill_bitmasks(cons, batched)
    for i, c in enumerate(cons):
        single = st.allocate_bitmask(1, MODEL_VOCAB)
        if c is None:
            assert (batched[i] == -1).all()
            continue
        c.fill_bitmask(single, 0)
        assert torch.equal(single[0], batched[i])
        assert (single[0, 400 // 32 + 1:] == 0).all()  # padded ids never allowed


def test_wider_bitmask_and_error_state(tok):
    c = st.compile({"choice": ["SPAM"]}, tok, None)  # built without the model width
    wide = st.allocate_bitmask(1, MODEL_VOCAB)
    c.fill_bitmask(wide, 0)
    allowed = [t for t in range(MODEL_VOCAB) if (int(wide[0, t // 32]) >> (t % 32)) & 1]
    assert allowed and all(tok.tokenizer.decode([t]) in "SPAM" for t in allowed)
    bad = next(t for t in range(400) if t not in allowed and t not in tok.eos_token_ids)
    assert not c.accept_token(bad)
    assert c.error and c.is_finished()  # the engine ends it instead of looping
    c.fill_bitmask(wide, 0)
    allowed = {t for t in range(MODEL_VOCAB) if (int(wide[0, t // 32]) >> (t % 32)) & 1}
    assert allowed == tok.eos_token_ids


def test_compiled_constraints_are_independent(tok):
    """compile() hands out a fresh state each time (the cached matcher is deep-copied)."""
    c = st.compile({"choice": ["SPAM", "NOT_SPAM"]}, tok, MODEL_VOCAB)
    twin = st.compile({"choice": ["SPAM", "NOT_SPAM"]}, tok, MODEL_VOCAB)
    for t in tok.tokenizer.encode("SPAM").ids:
        assert c.accept_token(t)
    assert c.is_finished() and not twin.is_finished()
    for t in tok.tokenizer.encode("NOT_SPAM").ids:
        assert twin.accept_token(t)
    assert twin.is_finished()


def test_ll_tokenizer_cached_on_tokenizer(tok):
    a = st.get_ll_tokenizer(tok, MODEL_VOCAB)
    assert st.get_ll_tokenizer(tok, MODEL_VOCAB) is a and a.vocab_size == MODEL_VOCAB
    assert sorted(a.eos_tokens) == sorted(tok.eos_token_ids)
    assert tok._ll_tokenizers[MODEL_VOCAB] is a
    st.get_ll_tokenizer(tok.tokenizer, MODEL_VOCAB)  # a bare tokenizers.Tokenizer works too


# ---------------------------------------------------------------- request spellings
@pytest.mark.parametrize("body,want", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
     {"json": PERSON}),
    ({"guided_json": PERSON}, {"json": PERSON}),
    ({"guided_json": json.dumps(PERSON)}, {"json": PERSON}),
    ({"guided_regex": IPV4}, {"regex": IPV4}),
    ({"guided_choice": ["SPAM", "NOT_SPAM"]}, {"choice": ["SPAM", "NOT_SPAM"]}),
    ({"guided_grammar": "start: \"a\""}, {"grammar": "start: \"a\""}),
    ({"guided_json": PERSON, "guided_whitespace_pattern": " ?"},
     {"json": PERSON, "whitespace_pattern": " ?"}),
    ({"structured_outputs": {"choice": ["x"]}}, {"choice": ["x"]}),
    ({"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
     {"json": PERSON, "any_whitespace": False}),
    ({"response_format": {"type": "text"}, "guided_regex": "a"}, {"regex": "a"}),
])
def test_structured_from_request(body, want):
    assert st.structured_from_request(body) == want


@pytest.mark.parametrize("body,message", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"},
     "conflicting structured output options: response_format, guided_regex"),
    ({"guided_json": PERSON, "structured_outputs": {"regex": "a"}}, "conflicting"),
    ({"guided_choice": "SPAM"}, "non-empty list of strings"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"response_format": {"type": "xml"}}, "not supported"),
    ({"response_format": "json"}, "must be an object"),
    ({"response_format": {"type": "json_schema"}}, "json_schema must be an object"),
    ({"structured_outputs": ["regex"]}, "must be an object"),
])
def test_structured_from_request_errors(body, message):
    with pytest.raises(StructuredOutputError) as err:
        st.structured_from_request(body)
    assert message in str(err.value)


def test_with_minserve_tokenizer(tmp_path, tok):
    """Our Tokenizer (backend + eos ids from generation_config.json) plugs in unchanged."""
    tokenizer_mod = pytest.importorskip("minserve.tokenizer")
    make_tokenizer_json(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    real = tokenizer_mod.Tokenizer.from_folder(str(tmp_path))
    ll = st.get_ll_tokenizer(real, MODEL_VOCAB)
    assert real.eos_token_id in ll.eos_tokens
    c = st.compile({"json": PERSON}, real, MODEL_VOCAB)
    text, finished = run_random(c, tok, 3, max_steps=400)
    assert not finished or jsonschema.validate(json.loads(text), PERSON) is None


def test_scheduler_ends_a_grammar_breaking_token_as_error(tok):
    """A token the grammar rejects (a mask that was not applied) is an ERROR with the grammar's
    message, never a "stop" that would pass invalid output off as complete."""
    from minserve.engine.kv_cache import KVCacheManager
    from minserve.engine.request import FinishReason, Request
    from minserve.engine.scheduler import Scheduler, SchedulerConfig
    from minserve.sampling_params import SamplingParams

    sched = Scheduler(SchedulerConfig(4, 64, 128), KVCacheManager(16, 4, False))
    for rid in ("bad", "good"):
        constraint = st.compile({"choice": ["yes"]}, tok, vocab_size=MODEL_VOCAB)
        sched.add(Request(rid, [1, 2, 3], SamplingParams(max_tokens=8, temperature=0),
                          eos_token_ids=frozenset(tok.eos_token_ids), structured=constraint))
    bad, good = (tok.tokenizer.encode(t, add_special_tokens=False).ids for t in ("no", "yes"))
    plan = sched.schedule()
    outs = {o.request_id: o for o in sched.update(plan, [bad[0], good[0]])}
    assert outs["bad"].finish_reason == FinishReason.ERROR
    assert outs["bad"].error.startswith("structured output:")
    assert outs["good"].finish_reason in (None, FinishReason.STOP)
