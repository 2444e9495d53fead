"""The pooling routes: /v1/embeddings, /v1/score (and /score), /v1/rerank (and /rerank,
/v2/rerank). Each answers a parsed body with its JSON response (what batch lines and /invocations
call too): ask the App which embedding model answers and lease it (App.embedding_for: the
--embedding-model service, or a pooled embedding model loaded on demand), run it there. No torch here."""
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


async def embeddings_json(app: Any, body: Any, priority: int = 0,
                          route: str = "/v1/embeddings") -> dict[str, Any]:
    arrival = time.monotonic()
    req = parse_embeddings_request(body)
    async with app.embedding_for(req.model, route) as (model, service):
        vectors, num_tokens = await service.embed(
            req.inputs, truncate_prompt_tokens=req.truncate_prompt_tokens,
            dimensions=req.dimensions, priority=priority)
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    return build_embeddings_response(model, vectors, req.encoding_format, num_tokens)


async def _scores(app: Any, body: Any, priority: int, route: str, parse: Any
                  ) -> tuple[str, Any, list[float], int]:
    """score and rerank: the body -> pairs -> the embedding service's scores."""
    arrival = time.monotonic()
    req = parse(body)
    async with app.embedding_for(req.model, route) as (model, service):
        scores, num_tokens = await service.score(req.pairs, req.labels,
                                                 req.truncate_prompt_tokens, priority=priority)
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    return model, req, scores, num_tokens


async def score_json(app: Any, body: Any, priority: int = 0, route: str = "/v1/score"
                     ) -> dict[str, Any]:
    """text_1 against text_2."""
    model, _, scores, num_tokens = await _scores(app, body, priority, route, parse_score_request)
    return build_score_response(model, scores, num_tokens)


async def rerank_json(app: Any, body: Any, priority: int = 0, route: str = "/v1/rerank"
                      ) -> dict[str, Any]:
    """One response shape (vLLM's, which Jina and Cohere clients read): results most relevant
    first."""
    model, req, scores, num_tokens = await _scores(app, body, priority, route,
                                                   parse_rerank_request)
    return build_rerank_response(model, req, scores, num_tokens)


def _route(answer: Any) -> Any:
    async def handler(app: Any, http: Http) -> None:
        body = await http.read_json()
        await http.send_json(200, await answer(app, body, route=http.path))
    return handler


# what each POST route answers a JSON body with (the HTTP routes below, batch lines)
ANSWERS = {"/v1/embeddings": embeddings_json, "/v1/score": score_json,
           "/v1/rerank": rerank_json}
ROUTES = {"/v1/embeddings": {"POST": _route(embeddings_json)},
          "/v1/score": {"POST": _route(score_json)}, "/score": {"POST": _route(score_json)},
          "/v1/rerank": {"POST": _route(rerank_json)}, "/rerank": {"POST": _route(rerank_json)},
          "/v2/rerank": {"POST": _route(rerank_json)}}
