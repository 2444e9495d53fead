"""The server side of embeddings: the /v1/embeddings handler, and which served model answers which
route (a chat call naming the embedding model, or an embeddings call naming a chat model, is a 400
that names the model to use). server.py's App holds `embedding` (an EmbeddingService or None); when
it serves an embedding model alone, app.engine is that same service. No torch here."""
from __future__ import annotations

import time
from typing import Any

from minserve.embeddings.protocol import build_embeddings_response, parse_embeddings_request
from minserve.http import Http, OpenAIError


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
                          f"only. For completions use {_names(app.cfg.served_model_names)}.",
                          param="model")


def _embedding_model(app: Any, model: str | None) -> str:
    names = app.cfg.embedding_model_names
    if app.embedding is None or not names:
        raise OpenAIError(400, "This server serves no embedding model (start it with "
                          "--embedding-model all-minilm-l6-v2, or serve one with --task embed)"
                          + (f"; `{model}` is a chat model" if model else ""), param="model")
    if model is None:
        return names[0]
    if model in names:
        return model
    if serves_chat(app) and model in app.cfg.served_model_names:
        raise OpenAIError(400, f"`{model}` is a chat model and does not create embeddings: use "
                          f"{_names(names)} with /v1/embeddings.", param="model")
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


async def embeddings(app: Any, http: Http) -> None:
    arrival = time.monotonic()
    req = parse_embeddings_request(await http.read_json())
    model = _embedding_model(app, req.model)
    vectors, num_tokens = await app.embedding.embed(
        req.inputs, truncate_prompt_tokens=req.truncate_prompt_tokens, dimensions=req.dimensions)
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    await http.send_json(200, build_embeddings_response(model, vectors, req.encoding_format,
                                                         num_tokens))
