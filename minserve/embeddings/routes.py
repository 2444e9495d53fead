"""The server side of embeddings: the /v1/embeddings, /v1/score and /v1/rerank handlers, and which
served model answers which route (a chat call naming the embedding model, or an embeddings call
naming a chat model, is a 400 that names the model to use). server.py's App holds `embedding` (an
EmbeddingService or None); when it serves an embedding model alone, app.engine is that same
service. No torch here."""
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
from minserve.protocol import OpenAIError

# The routes the embedding model answers (their readiness waits on it alone).
POOLING_ROUTES = ("/v1/embeddings", "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank")
# Set only by the in-process batch runner (batch/runner.py), never by an ASGI server, so no
# client can claim it: its value is the line's priority (higher runs later, as vLLM's), and a
# request carrying it skips the API-key check (the batch's owner passed it at creation).
BATCH_SCOPE_KEY = "minserve.batch_priority"


def request_priority(http: Any) -> int:
    return int(http.scope.get(BATCH_SCOPE_KEY, 0))


def serves_chat(app: Any) -> bool:
    return app.embedding is None or app.engine is not app.embedding


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def no_chat_model_error(app: Any) -> OpenAIError:
    return OpenAIError(400, f"This server serves only the embedding model(s) "
                       f"{_names(app.cfg.embedding_model_names)}: use POST /v1/embeddings "
                       "(start it with a chat model, and --embedding-model, to serve both)",
                       param="model")


def check_chat_route(app: Any, body: Any) -> None:
    """Before parse_chat/parse_completion: refuse embedding models on the generation routes."""
    if not serves_chat(app):
        raise no_chat_model_error(app)
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and model in app.cfg.embedding_model_names:
        raise OpenAIError(400, f"`{model}` is an embedding model: it answers POST /v1/embeddings "
                          "(and /v1/score, /v1/rerank) only. For completions use "
                          f"{_names(app.cfg.served_model_names)}.", param="model")


def _embedding_model(app: Any, model: str | None, route: str = "/v1/embeddings") -> str:
    names = app.cfg.embedding_model_names
    if app.embedding is None or not names:
        raise OpenAIError(400, f"This server serves no embedding model, which {route} needs "
                          "(start it with --embedding-model all-minilm-l6-v2, or serve one with "
                          "--task embed or --task score)"
                          + (f"; `{model}` is a chat model" if model else ""), param="model")
    if model is None:
        return names[0]
    if model in names:
        return model
    if serves_chat(app) and model in app.cfg.served_model_names:
        raise OpenAIError(400, f"`{model}` is a chat model and does not answer {route}: use "
                          f"{_names(names)}.", param="model")
    raise OpenAIError(404, f"The model `{model}` does not exist.", param="model",
                      type="NotFoundError")


def model_max_len(app: Any, name: str) -> int:
    """For /v1/models: each card reports its own model's context length."""
    if app.embedding is not None and name in app.cfg.embedding_model_names:
        return app.embedding.max_model_len
    return app.ctx.max_model_len


def all_model_names(app: Any) -> list[str]:
    chat = app.cfg.served_model_names if serves_chat(app) else []
    return chat + (app.cfg.embedding_model_names if app.embedding is not None else [])


def services(app: Any) -> list[Any]:
    """The engines whose readiness gates the API: the chat engine and/or the embedding service."""
    if app.embedding is None or app.embedding is app.engine:
        return [app.engine]
    return [app.engine, app.embedding]


async def embeddings(app: Any, http: Any) -> None:
    from minserve.server import send_json  # server.py imports this module: import at call time

    arrival = time.monotonic()
    req = parse_embeddings_request(await app.read_json(http))
    model = _embedding_model(app, req.model)
    vectors, num_tokens = await app.embedding.embed(
        req.inputs, truncate_prompt_tokens=req.truncate_prompt_tokens, dimensions=req.dimensions,
        priority=request_priority(http))
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    await send_json(http.send, 200, build_embeddings_response(model, vectors, req.encoding_format,
                                                              num_tokens))


async def _scores(app: Any, http: Any, parse: Any) -> tuple[str, Any, list[float], int]:
    """score and rerank: the body -> pairs -> the embedding service's scores."""
    arrival = time.monotonic()
    req = parse(await app.read_json(http))
    model = _embedding_model(app, req.model, http.path)
    scores, num_tokens = await app.embedding.score(req.pairs, req.labels,
                                                   req.truncate_prompt_tokens,
                                                   priority=request_priority(http))
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    return model, req, scores, num_tokens


async def score(app: Any, http: Any) -> None:
    """POST /v1/score (and /score): text_1 against text_2."""
    from minserve.server import send_json

    model, _, scores, num_tokens = await _scores(app, http, parse_score_request)
    await send_json(http.send, 200, build_score_response(model, scores, num_tokens))


async def rerank(app: Any, http: Any) -> None:
    """POST /v1/rerank, /rerank, /v2/rerank: one response shape (vLLM's, which Jina and Cohere
    clients read): results most relevant first."""
    from minserve.server import send_json

    model, req, scores, num_tokens = await _scores(app, http, parse_rerank_request)
    await send_json(http.send, 200, build_rerank_response(model, req, scores, num_tokens))
