"""The model pool's and sleep mode's routes. POST /v1/models/{id}/load and /unload (operators;
behind --api-key as every /v1 route) load or unload a pooled model now. Sleep mode, as vLLM
spells it, only with --enable-sleep-mode (else 404): POST /sleep?level=1|2 (the chat model frees
its KV cache and parks its weights: level 1 in host memory, level 2 dropped and reloaded from
disk on wake), POST /wake_up, GET /is_sleeping. While the model sleeps its generation requests
get a 503 naming POST /wake_up (they do not wait). Torch-free."""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from minserve.engine.async_engine import EngineError
from minserve.http import Http, OpenAIError, model_not_found


# ---- sleep mode (the chat model) ----
def _sleeper(app: Any, http: Http) -> Any:
    if not app.cfg.enable_sleep_mode:
        raise OpenAIError(404, f"Not Found: {http.path} (start the server with "
                          "--enable-sleep-mode)", type="NotFoundError")
    if app.chat is None:
        raise OpenAIError(404, f"Not Found: {http.path} puts the --model model to sleep, and "
                          "this server has none (the pool parks its own models; unload one "
                          "with POST /v1/models/{id}/unload)", type="NotFoundError")
    return app.chat


def _level(http: Http) -> int:
    query = parse_qs(http.scope.get("query_string", b"").decode("latin-1"))
    raw = (query.get("level") or ["1"])[-1]
    if raw not in ("1", "2"):
        raise OpenAIError(400, f"level must be 1 or 2, not {raw[:20]!r}", param="level")
    return int(raw)


async def _engine_call(call: Any) -> None:
    try:
        await call
    except EngineError as e:
        raise OpenAIError(e.status, e.message) from None


async def sleep(app: Any, http: Http) -> None:
    engine, level = _sleeper(app, http), _level(http)
    await _engine_call(engine.sleep(level))
    await http.send_body(200, b"")


async def wake_up(app: Any, http: Http) -> None:
    await _engine_call(_sleeper(app, http).wake_up())
    await http.send_body(200, b"")


async def is_sleeping(app: Any, http: Http) -> None:
    await http.send_json(200, {"is_sleeping": bool(_sleeper(app, http).sleep_level)})


# ---- the model pool ----
def _pooled(app: Any, http: Http) -> str:
    name = http.path_params["model"]
    if app.pool is None or name not in app.pool.models:
        names = list(app.pool.models) if app.pool is not None else []
        raise model_not_found(name, names)
    return name


def model_card(app: Any, name: str) -> dict[str, Any]:
    """A pooled model's /v1/models card: OpenAI's fields, then its status (loaded, loading,
    unloaded, failed; sleeping: parked; unloading) and requests in flight."""
    pool = app.pool
    base = pool.adapters.get(name)
    m = pool.models[base or name]
    max_len = m.config.max_model_len
    if m.engine is not None and m.engine.is_ready:     # the resolved length, once loaded
        max_len = m.engine.max_model_len if m.task == "embed" else m.engine.info.max_model_len
    return {"id": name, "object": "model", "created": int(app.started), "owned_by": "minserve",
            "root": m.config.model, "parent": base, "max_model_len": max_len,
            "permission": [], **m.card()}


async def load_model(app: Any, http: Http) -> None:
    m = await app.pool.load(_pooled(app, http))
    await http.send_json(200, model_card(app, m.name))


async def unload_model(app: Any, http: Http) -> None:
    m = await app.pool.unload(_pooled(app, http))
    await http.send_json(200, model_card(app, m.name))


# the routes that lease the model their body names (App.serving_for): a pooled one loads on demand
# there, so they do not wait for the chat model's readiness
LEASED = {"/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions",
          "/invocations", "/tokenize", "/detokenize", "/v1/responses", "/v1/messages",
          "/v1/messages/count_tokens", "/v1/embeddings", "/v1/score", "/v1/rerank", "/score",
          "/rerank", "/v2/rerank"}
ROUTES = {
    "/sleep": {"POST": sleep},
    "/wake_up": {"POST": wake_up},
    "/is_sleeping": {"GET": is_sleeping},
    "/v1/models/{model}/load": {"POST": load_model},
    "/v1/models/{model}/unload": {"POST": unload_model},
}
