"""The /v1/embeddings body: validation (bad input -> EmbeddingsRequestError, a 400 OpenAIError
naming the parameter) and the response builder with float / base64 encodings. No torch, no numpy,
no I/O: routes.py imports this directly; the model side lives in embedder.py."""
from __future__ import annotations

import base64
import sys
from dataclasses import dataclass
from typing import Any

from minserve.protocol import OpenAIError
from minserve.value_text import value_text

MAX_INPUTS = 2048              # OpenAI's limit on the number of inputs in one request
ENCODING_FORMATS = ("float", "base64")


class EmbeddingsRequestError(OpenAIError, ValueError):
    """A user error in an embeddings request (HTTP 400). Also a ValueError, so offline callers of
    Embedder.embed() can catch it without knowing the server's error type."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(status, message, param=param)


@dataclass
class EmbeddingsRequest:
    model: str | None
    inputs: list[str | list[int]]   # one entry per output vector, in order
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None  # None: over-long is an error; -1: max_model_len
    user: str | None = None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_list(ids: list[Any], where: str) -> list[int]:
    if not ids:
        raise EmbeddingsRequestError(f"{where} is an empty list of token ids", param="input")
    for t in ids:
        if not _is_int(t) or t < 0:
            raise EmbeddingsRequestError(f"{where} holds {value_text(t)}, which is not a token id "
                                         "(a non-negative integer)", param="input")
    return ids


def parse_inputs(value: Any) -> list[str | list[int]]:
    """OpenAI's four `input` forms -> a flat list: "text" | ["a", "b"] | [1, 2, 3] | [[1, 2], [3]].
    Like OpenAI, empty strings, empty lists and more than MAX_INPUTS inputs are rejected."""
    if isinstance(value, str):
        if not value:
            raise EmbeddingsRequestError("input must not be an empty string", param="input")
        return [value]
    if not isinstance(value, list):
        raise EmbeddingsRequestError("input must be a string, a list of strings, a list of token "
                                     "ids or a list of lists of token ids", param="input")
    if not value:
        raise EmbeddingsRequestError("input must not be an empty list", param="input")
    if len(value) > MAX_INPUTS:
        raise EmbeddingsRequestError(f"input holds {len(value)} items; at most {MAX_INPUTS} are "
                                     "allowed per request", param="input")
    first = value[0]
    if _is_int(first):
        return [_token_list(value, "input")]
    out: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(first, str) and isinstance(item, str):
            if not item:
                raise EmbeddingsRequestError(f"input[{i}] must not be an empty string",
                                             param="input")
            out.append(item)
        elif isinstance(first, list) and isinstance(item, list):
            out.append(_token_list(item, f"input[{i}]"))
        else:
            raise EmbeddingsRequestError(
                f"input[{i}] is {type(item).__name__}: input must be all strings, all token ids, "
                "or all lists of token ids (not a mix)", param="input")
    return out


def common_fields(body: Any) -> tuple[str | None, int | None]:
    """What every pooling route's body is checked for first: a JSON object, its `model` and
    `truncate_prompt_tokens` (the scoring routes' too)."""
    if not isinstance(body, dict):
        raise EmbeddingsRequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise EmbeddingsRequestError("model must be a string", param="model")
    truncate = body.get("truncate_prompt_tokens")
    if truncate is not None and (not _is_int(truncate) or (truncate < 1 and truncate != -1)):
        raise EmbeddingsRequestError("truncate_prompt_tokens must be a positive integer or -1 "
                                     f"(the model's max length), got {value_text(truncate)}",
                                     param="truncate_prompt_tokens")
    return model, truncate


def parse_embeddings_request(body: Any) -> EmbeddingsRequest:
    """Validate a decoded JSON body. Model-dependent checks (dimensions against the model, token
    ids against the vocabulary, lengths against max_model_len) happen in Embedder.embed()."""
    model, truncate = common_fields(body)
    if "input" not in body:
        raise EmbeddingsRequestError("input is required", param="input")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise EmbeddingsRequestError(f"encoding_format must be 'float' or 'base64', got "
                                     f"{value_text(encoding_format)}", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise EmbeddingsRequestError(
            f"dimensions must be a positive integer, got {value_text(dimensions)}",
                                     param="dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise EmbeddingsRequestError("user must be a string", param="user")
    return EmbeddingsRequest(model=model, inputs=parse_inputs(body["input"]),
                             encoding_format=encoding_format, dimensions=dimensions,
                             truncate_prompt_tokens=truncate, user=user)


def encode_embedding(vector: Any, encoding_format: str) -> list[float] | str:
    """A float32 vector (numpy array from Embedder) -> JSON floats or base64 of little-endian
    float32 bytes (what the OpenAI SDK decodes with np.frombuffer(..., dtype="float32")).
    Floats are the float32 values widened exactly, so both formats decode to the same numbers."""
    if encoding_format == "base64":
        data = vector.astype("<f4", copy=False).tobytes() if hasattr(vector, "astype") else \
            _pack_f32(vector)
        return base64.b64encode(data).decode("ascii")
    return vector.tolist() if hasattr(vector, "tolist") else list(vector)


def _pack_f32(values: list[float]) -> bytes:
    import array

    arr = array.array("f", values)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def build_embeddings_response(model: str, vectors: list[Any], encoding_format: str,
                              num_prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i,
                  "embedding": encode_embedding(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens},
    }
