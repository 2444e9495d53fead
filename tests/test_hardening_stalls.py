"""Issue 36, finding 7: requests that stalled everyone. /detokenize with millions of ids held the
event loop; guided_regex "(a{1000}){1000}" took seconds of the engine thread to build its first
token mask. Now: /detokenize takes at most max_model_len ids and decodes off the event loop;
counted repetitions are bounded before compiling (guided_regex, a JSON schema's pattern, a
grammar's /regex/), and the first mask is built by the compile, not by an engine step."""
from __future__ import annotations

import threading

import pytest

from minserve import structured
from minserve.regex_dialect import MAX_REGEX_SIZE, regex_size
from minserve.tokenizer import Tokenizer
from tests.asgi import call
from tests.fake_engine import make_fake_app
from tests.serving import run


@pytest.mark.parametrize("regex, size", [
    ("(a{1000}){1000}", 1_000_000), ("a{10000}", 10_000), ("(?:a{100}){100}", 10_000),
    ("((a{10}){10}){1000}", 100_000), ("[a-z]{1,100000}", 2), (r"\d{4}-\d{2}-\d{2}", 10),
    ("a{5000}?", 5000), ("(ab|cd){3}", 12), ("x{,5}", 2)])
def test_regex_size_multiplies_counted_repetitions(regex, size):
    assert regex_size(regex) == size


@pytest.mark.parametrize("spec, what", [
    ({"regex": "(a{1000}){1000}"}, "the regex unrolls to about 1000000"),
    ({"json": {"type": "object", "properties": {"s": {
        "type": "string", "pattern": "^(a{1000}){1000}$"}}}}, "pattern"),
    ({"json": {"type": "object", "patternProperties": {"(k{500}){500}": {}}}}, "pattern"),
    ({"grammar": "start: /(a{1000}){1000}/"}, "grammar's regex")])
def test_huge_repetitions_refused_before_compiling(tiny_model_dir, spec, what):
    tok = Tokenizer.from_folder(tiny_model_dir)
    with pytest.raises(structured.StructuredOutputError, match=what) as e:
        structured.compile(spec, tok, vocab_size=512)
    assert str(MAX_REGEX_SIZE) in str(e.value)
    structured.compile({"regex": "(a{100}){100}"}, tok, vocab_size=512)   # at the bound: fine


def test_first_mask_built_by_the_compile(tiny_model_dir, monkeypatch):
    """The costly first mask runs in compile() (a request's parse thread), so an engine step
    never pays it: compile asks the matcher for one mask before it returns."""
    tok = Tokenizer.from_folder(tiny_model_dir)
    masks = []
    real = structured.llguidance.LLMatcher

    class Recording:
        grammar_from_lark = staticmethod(real.grammar_from_lark)

        def __init__(self, *args, **kwargs):
            self._m = real(*args, **kwargs)

        def unsafe_compute_mask_ptr(self, *args):
            masks.append(threading.current_thread().name)
            return self._m.unsafe_compute_mask_ptr(*args)

        def __getattr__(self, name):
            return getattr(self._m, name)

    monkeypatch.setattr(structured.llguidance, "LLMatcher", Recording)
    structured.compile({"regex": "[a-c]{3}x"}, tok, vocab_size=512)
    assert masks == ["minserve-compile"]


def test_huge_regex_is_a_400_on_the_route(tiny_model_dir):
    async def fn(app):
        return await call(app, "POST", "/v1/completions", {
            "model": "tiny", "prompt": "a", "max_tokens": 3,
            "guided_regex": "(a{1000}){1000}"})

    res = run(make_fake_app(tiny_model_dir), fn)
    assert res.status == 400 and "at most 10000" in res.json()["error"]["message"]


def test_detokenize_bounded_and_off_the_event_loop(tiny_model_dir, monkeypatch):
    threads = []
    real = Tokenizer.decode

    def decode(self, ids, *args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "decode", decode)

    async def fn(app):
        return (await call(app, "POST", "/detokenize", {"tokens": [5] * 4_000_000}),
                await call(app, "POST", "/detokenize", {"tokens": [5] * 257}),
                await call(app, "POST", "/detokenize", {"tokens": [5, 6]}),
                await call(app, "POST", "/detokenize", {"tokens": [5, -1]}))

    huge, over, ok, bad = run(make_fake_app(tiny_model_dir), fn)   # max_model_len 256
    for res in (huge, over):
        assert res.status == 400 and "at most 256" in res.json()["error"]["message"]
        assert res.json()["error"]["param"] == "tokens"
    assert ok.status == 200 and ok.json()["prompt"]
    assert bad.status == 400 and "token ids in [0," in bad.json()["error"]["message"]
    assert threads == [False]
