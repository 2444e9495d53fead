"""The pooling routes: /v1/embeddings, /v1/score (and /score), /v1/rerank (and /rerank,
/v2/rerank). Parse the body, ask the App which embedding model answers (the routing policy is
server.py's), run it on app.embedding, send the response. No torch here."""
from __future__ import annotations

import time
from typing import Any

from minserve.embeddings.protocol import build_embeddings_response, parse_embeddings_request
from minserve.embeddings.score_protocol import (
    build_rerank_response,
    build_score_response,
    parse_rerank_request,
    parse_score_request,
)
from minserve.http import Http


async def embeddings(app: Any, http: Http) -> None:
    arrival = time.monotonic()
    req = parse_embeddings_request(await http.read_json())
    model = app.embedding_model(req.model)
    vectors, num_tokens = await app.embedding.embed(
        req.inputs, truncate_prompt_tokens=req.truncate_prompt_tokens, dimensions=req.dimensions,
        priority=http.priority)
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    await http.send_json(200, build_embeddings_response(model, vectors, req.encoding_format,
                                                         num_tokens))


async def _scores(app: Any, http: Http, parse: Any) -> tuple[str, Any, list[float], int]:
    """score and rerank: the body -> pairs -> the embedding service's scores."""
    arrival = time.monotonic()
    req = parse(await http.read_json())
    model = app.embedding_model(req.model, http.path)
    scores, num_tokens = await app.embedding.score(req.pairs, req.labels,
                                                   req.truncate_prompt_tokens,
                                                   priority=http.priority)
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    return model, req, scores, num_tokens


async def score(app: Any, http: Http) -> None:
    """POST /v1/score (and /score): text_1 against text_2."""
    model, _, scores, num_tokens = await _scores(app, http, parse_score_request)
    await http.send_json(200, build_score_response(model, scores, num_tokens))


async def rerank(app: Any, http: Http) -> None:
    """POST /v1/rerank, /rerank, /v2/rerank: one response shape (vLLM's, which Jina and Cohere
    clients read): results most relevant first."""
    model, req, scores, num_tokens = await _scores(app, http, parse_rerank_request)
    await http.send_json(200, build_rerank_response(model, req, scores, num_tokens))


ROUTES = {"/v1/embeddings": {"POST": embeddings},
          "/v1/score": {"POST": score}, "/score": {"POST": score},
          "/v1/rerank": {"POST": rerank}, "/rerank": {"POST": rerank},
          "/v2/rerank": {"POST": rerank}}
