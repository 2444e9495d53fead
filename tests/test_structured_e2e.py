"""Structured outputs through the official openai SDK against a real server on a tiny random
model: random weights write arbitrary tokens, so every valid output below is the constraint's
doing. Every vLLM spelling, streaming, n > 1, mixed batches, and the 400s for bad constraints."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.serving import KEY, serving

PERSON = {"type": "object", "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}
# Compact JSON: a random model would otherwise spend its tokens on whitespace.
COMPACT = {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}}
IPV4 = r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"
IPV4_CHECK = r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"
USER = [{"role": "user", "content": "Extract data: John Doe is 30 years old."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # RUST_BACKTRACE=1: a native panic's backtrace must still never reach an error body.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUST_BACKTRACE", "1")
        with serving(["serve", tiny_model_dir, "--served-model-name", "tiny",
                      "--api-key", KEY, "--max-model-len", "512"]) as url:
            yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(**{"model": "tiny", "messages": USER,
                                              "max_tokens": 120, **kw})


def test_json_schema_every_spelling_validates(client):
    spellings = [COMPACT,
                 {"response_format": {"type": "json_schema", "json_schema": {
                     "name": "person", "schema": PERSON, "strict": True}},
                  "guided_whitespace_pattern": ""},
                 {"guided_json": json.dumps(PERSON), "guided_whitespace_pattern": ""}]
    stopped = 0
    for seed, extra in enumerate(spellings * 2):
        r = _chat(client, n=3, seed=seed, temperature=1.0, extra_body=extra)
        for ch in r.choices:
            if ch.finish_reason == "stop":
                jsonschema.validate(json.loads(ch.message.content), PERSON)
                stopped += 1
            else:  # cut by max_tokens: still a prefix of valid compact JSON
                assert ch.finish_reason == "length" and ch.message.content.startswith("{")
    assert stopped >= 12  # most samples complete within 120 tokens


def test_json_object_mode_parses(client):
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=200, seed=seed,
                                      extra_body={"structured_outputs": {
                                          "json_object": True, "disable_any_whitespace": True}},
                                      temperature=0.7, n=2)
        for ch in r.choices:
            if ch.finish_reason == "stop":
                assert isinstance(json.loads(ch.text), dict)


def test_guided_regex_ipv4_streaming_and_not(client):
    for seed in range(4):
        r = _chat(client, n=2, seed=seed, extra_body={"guided_regex": IPV4})
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            assert re.fullmatch(IPV4_CHECK, ch.message.content), ch.message.content
        text, finish = "", None
        for chunk in client.completions.create(model="tiny", prompt="IP:", stream=True,
                                               seed=seed, max_tokens=40,
                                               extra_body={"guided_regex": IPV4}):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop" and re.fullmatch(IPV4_CHECK, text), text


def test_guided_choice_with_logprobs(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny", n=3, seed=seed, logprobs=True, top_logprobs=2,
            messages=[{"role": "user", "content": "Is this spam? 'You won a prize!'"}],
            extra_body={"guided_choice": ["SPAM", "NOT_SPAM"]})
        for ch in r.choices:
            assert ch.message.content in ("SPAM", "NOT_SPAM")
            assert ch.finish_reason == "stop" and ch.logprobs.content


def test_grammar_and_stop_string(client):
    grammar = 'start: "yes" | "no" | "maybe later"'
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="Answer:", seed=seed, max_tokens=20,
                                      extra_body={"guided_grammar": grammar})
        assert r.choices[0].text in ("yes", "no", "maybe later")
    # A stop string inside the constrained text ends the output before it, as usual.
    r = client.completions.create(model="tiny", prompt="x", max_tokens=20, stop=[" "],
                                  extra_body={"guided_choice": ["maybe later"]})
    assert r.choices[0].text == "maybe" and r.choices[0].finish_reason == "stop"


def test_truncated_constraint_reports_length(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                       extra_body=COMPACT)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


def test_mixed_constrained_and_free_batch(client):
    def constrained(seed):
        r = _chat(client, seed=seed, extra_body={"guided_regex": IPV4})
        return re.fullmatch(IPV4_CHECK, r.choices[0].message.content) is not None

    def free(seed):
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=30, seed=seed,
                                      extra_body={"ignore_eos": True})
        return r.usage.completion_tokens == 30

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(constrained if i % 2 else free, i) for i in range(24)]
        assert all(f.result() for f in futures)


def test_seeded_constrained_output_is_reproducible(client):
    a = _chat(client, seed=7, temperature=1.0, extra_body=COMPACT).choices[0].message.content
    b = _chat(client, seed=7, temperature=1.0, extra_body=COMPACT).choices[0].message.content
    assert a == b


@pytest.mark.parametrize("extra, word", [
    ({"guided_regex": "(unclosed"}, "regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
     "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": PERSON, "guided_regex": "a+"}, "conflicting"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_constraints_are_400(client, extra, word):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, extra_body=extra)
    assert word in str(e.value)
    # ... and the server still answers.
    assert _chat(client, max_tokens=3).choices[0].finish_reason == "length"


def test_hostile_constraints_are_answered_and_the_server_lives_on(client):
    """The 3,000-rule chain that once killed the process with SIGSEGV compiles; past the caps,
    and for a Rust panic or a regex parser's caret diagram, the 400 says one line."""
    from tests.test_structured_fuzz import rule_chain

    r = _chat(client, max_tokens=5, extra_body={"guided_grammar": rule_chain(3000)["grammar"]})
    assert r.choices[0].finish_reason in ("length", "stop")
    for extra, word in [({"guided_grammar": rule_chain(30_000)["grammar"]}, "at most"),
                        ({"guided_choice": [f"c{i}" for i in range(100_000)]}, "at most"),
                        ({"guided_regex": "(?=a)b"}, "lookaround"),
                        ({"guided_regex": "[z-a]" + "x" * 5000}, "character class")]:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, extra_body=extra)
        message = e.value.body["message"]
        assert word in message and "\n" not in message and len(message) < 400, message
        assert "panic" not in message.lower() and "backtrace" not in message.lower()
    assert _chat(client, max_tokens=3).choices[0].finish_reason == "length"
