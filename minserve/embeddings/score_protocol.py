"""The /v1/score and /v1/rerank (/rerank, /v2/rerank) bodies, in vLLM's shapes (which are Jina's
and Cohere's): validation into text pairs (bad input -> EmbeddingsRequestError, a 400 naming the
parameter) and the response builders, sorted by relevance for rerank. No torch, no I/O."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from minserve.embeddings.protocol import MAX_INPUTS, EmbeddingsRequestError, common_fields


@dataclass
class ScoreRequest:
    """One scoring call: the pairs to score, in response order, and how to answer."""
    model: str | None
    pairs: list[tuple[str, str]]
    labels: list[str]                   # each pair's name in errors ("documents[3]")
    truncate_prompt_tokens: int | None = None
    # rerank only
    documents: list[str] | None = None
    top_n: int = 0                      # 0: every document
    return_documents: bool = True


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise EmbeddingsRequestError(f"{param} must be a non-empty string", param=param)
    return value


def _texts(value: Any, param: str) -> list[str]:
    """A string or a non-empty list of strings (at most MAX_INPUTS)."""
    if isinstance(value, str):
        return [_text(value, param)]
    if not isinstance(value, list) or not value:
        raise EmbeddingsRequestError(f"{param} must be a string or a non-empty list of strings",
                                     param=param)
    if len(value) > MAX_INPUTS:
        raise EmbeddingsRequestError(f"{param} holds {len(value)} texts; at most {MAX_INPUTS} "
                                     "are allowed per request", param=param)
    return [_text(v, f"{param}[{i}]") for i, v in enumerate(value)]


def parse_score_request(body: Any) -> ScoreRequest:
    """text_1 against text_2: one to one, one to many (text_1 a single text), or many to many
    (two lists of the same length, scored pairwise), as vLLM's /score."""
    model, truncate = common_fields(body)
    for key in ("text_1", "text_2"):
        if key not in body:
            raise EmbeddingsRequestError(f"{key} is required", param=key)
    first, second = _texts(body["text_1"], "text_1"), _texts(body["text_2"], "text_2")
    one_to_many = len(first) == 1
    if one_to_many:
        first = first * len(second)
    elif len(first) != len(second):
        raise EmbeddingsRequestError(
            f"text_1 holds {len(first)} texts and text_2 {len(second)}: give one text_1 (scored "
            "against every text_2) or two lists of the same length (scored pairwise)",
            param="text_2")
    labels = [f"(text_1[{0 if one_to_many else i}], text_2[{i}])" for i in range(len(second))]
    return ScoreRequest(model, list(zip(first, second, strict=True)), labels, truncate)


def parse_rerank_request(body: Any) -> ScoreRequest:
    """query + documents (strings, or {"text": ...} objects as Jina and Cohere v1 accept),
    top_n (0 or absent: all), return_documents (default true, as vLLM always returns them)."""
    model, truncate = common_fields(body)
    query = _text(body.get("query"), "query")
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise EmbeddingsRequestError("documents must be a non-empty list of strings",
                                     param="documents")
    if len(docs) > MAX_INPUTS:
        raise EmbeddingsRequestError(f"documents holds {len(docs)} items; at most {MAX_INPUTS} "
                                     "are allowed per request", param="documents")
    texts = []
    for i, doc in enumerate(docs):
        if isinstance(doc, dict):
            doc = doc.get("text")
        texts.append(_text(doc, f"documents[{i}]"))
    top_n = body.get("top_n")
    if top_n is None:
        top_n = 0
    elif isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise EmbeddingsRequestError(f"top_n must be a non-negative integer, got {top_n!r}",
                                     param="top_n")
    ret = body.get("return_documents")
    if ret is not None and not isinstance(ret, bool):
        raise EmbeddingsRequestError("return_documents must be a boolean",
                                     param="return_documents")
    return ScoreRequest(model, [(query, t) for t in texts],
                        [f"documents[{i}] with the query" for i in range(len(texts))], truncate,
                        documents=texts, top_n=top_n, return_documents=ret is not False)


def build_score_response(model: str, scores: list[float], num_prompt_tokens: int
                         ) -> dict[str, Any]:
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens,
                      "completion_tokens": 0}}


def build_rerank_response(model: str, req: ScoreRequest, scores: list[float],
                          num_prompt_tokens: int) -> dict[str, Any]:
    """Most relevant first (ties keep the documents' order); top_n of them when given."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if req.top_n:
        order = order[:req.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            item["document"] = {"text": req.documents[i]}
        results.append(item)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model,
            "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens},
            "results": results}
