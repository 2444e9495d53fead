"""/v1/embeddings body parsing and response encoding (pure Python: no model, no torch)."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from minserve.embeddings.protocol import (
    MAX_INPUTS,
    EmbeddingsRequestError,
    build_embeddings_response,
    parse_embeddings_request,
)
from minserve.protocol import OpenAIError


@pytest.mark.parametrize("value,want", [
    ("hello", ["hello"]),
    (["a", "b c"], ["a", "b c"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_input_forms(value, want):
    req = parse_embeddings_request({"model": "m", "input": value})
    assert req.inputs == want
    assert (req.encoding_format, req.dimensions, req.truncate_prompt_tokens) == \
        ("float", None, None)


@pytest.mark.parametrize("body,param,match", [
    ({"model": "m"}, "input", "required"),
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "empty list"),
    ({"input": ["a", ""]}, "input", r"input\[1\] must not be an empty string"),
    ({"input": [[1], []]}, "input", "empty list of token ids"),
    ({"input": ["a", [1]]}, "input", "not a mix"),
    ({"input": [1, "a"]}, "input", "not a token id"),
    ({"input": [1, -2]}, "input", "not a token id"),
    ({"input": [True]}, "input", r"input\[0\] is bool"),
    ({"input": {"text": "a"}}, "input", "must be a string"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", "at most 2048"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "float' or 'base64"),
    ({"input": "a", "dimensions": 0}, "dimensions", "positive integer"),
    ({"input": "a", "dimensions": "8"}, "dimensions", "positive integer"),
    ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "or -1"),
    ({"input": "a", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "or -1"),
    ({"input": "a", "user": 5}, "user", "string"),
    ({"input": "a", "model": 5}, "model", "string"),
    ([1, 2], None, "JSON object"),
])
def test_bad_bodies_are_400(body, param, match):
    with pytest.raises(EmbeddingsRequestError, match=match) as e:
        parse_embeddings_request(body)
    assert isinstance(e.value, OpenAIError) and isinstance(e.value, ValueError)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.to_dict()["error"]["message"]


def test_accepted_options():
    req = parse_embeddings_request({"model": "m", "input": ["x"], "encoding_format": "base64",
                                    "dimensions": 64, "truncate_prompt_tokens": -1, "user": "u"})
    assert (req.encoding_format, req.dimensions, req.truncate_prompt_tokens, req.user) == \
        ("base64", 64, -1, "u")
    req = parse_embeddings_request({"input": "x", "encoding_format": None})
    assert req.encoding_format == "float"


def test_response_float_and_base64_decode_to_the_same_numbers():
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(384).astype(np.float32) for _ in range(3)]
    as_float = build_embeddings_response("m", vectors, "float", 11)
    as_b64 = build_embeddings_response("m", vectors, "base64", 11)
    assert as_float["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert as_float["object"] == "list" and as_float["model"] == "m"
    assert [d["index"] for d in as_float["data"]] == [0, 1, 2]
    for f, b, v in zip(as_float["data"], as_b64["data"], vectors, strict=True):
        assert f["object"] == "embedding" and isinstance(f["embedding"][0], float)
        # what the OpenAI SDK does with base64: frombuffer float32, then tolist()
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="float32").tolist()
        assert decoded == f["embedding"] == v.tolist()
    plain = build_embeddings_response("m", [[0.5, -1.25]], "base64", 1)["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(plain), dtype="<f4").tolist() == [0.5, -1.25]
