"""THE ASGI app: lifespan (service start/stop, batches resumed), the route table, dispatch, auth,
CORS, readiness, and which model answers which route. Generation is serving.py's (the
chat/completions routes stream its events as SSE here, a receive() disconnect watcher beside
each response); the HTTP plumbing is http.py. Never imports torch: the engine is built in its
own thread."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from minserve import __version__, messages, model_routes, output, pool_routes, responses, \
    token_routes
from minserve.batch import routes as batch_routes
from minserve.config import LoRAModule
from minserve.embeddings import routes as embedding_routes
from minserve.engine import heap
from minserve.engine.async_engine import AsyncEngine, EngineError
from minserve.errors import library_text
from minserve.http import Http, OpenAIError, Receive, Scope, Send, find_route, model_not_found
from minserve.lora import routes as lora_routes
from minserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from minserve.metrics import Metrics
from minserve.pool import ModelPool
from minserve.protocol import GenerateRequest
from minserve.serving import Serving
from minserve.webui import routes as webui_routes

logger = logging.getLogger("minserve.server")


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # vLLM's default
    root_path: str = ""
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    log_requests: bool = False
    model_root: str | None = None   # what /v1/models reports as `root`
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    structured_defaults: dict[str, bool] = field(default_factory=dict)  # from the CLI flag
    log_stats: bool = True          # the periodic throughput line (--disable-log-stats)
    embedding_model_names: list[str] = field(default_factory=list)  # served by App.embedding
    responses_store_size: int = 1000   # /v1/responses kept for previous_response_id and GET
    # vLLM's flags of the same names
    max_logprobs: int = 20
    enable_force_include_usage: bool = False
    enable_prompt_tokens_details: bool = False
    enable_tokenizer_info_endpoint: bool = False
    enable_server_load_tracking: bool = False
    return_tokens_as_token_ids: bool = False
    lora_modules: list[LoRAModule] = field(default_factory=list)    # --lora-modules
    allow_runtime_lora: bool = False   # VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload routes
    enable_webui: bool = True          # the chat page at / (--no-webui)
    enable_sleep_mode: bool = False    # POST /sleep, /wake_up, GET /is_sleeping; pool parking
    engine_process: bool = False       # --engine-process: engine/engine_process.py


Handler = Callable[["App", Http], Awaitable[None]]


class App:
    """app(scope, receive, send). Build with create_app(). `chat` (an AsyncEngine) answers the
    generation routes and `embedding` (an EmbeddingService) /v1/embeddings, /v1/score and
    /v1/rerank; either may be None. `batches` (a BatchService) is the Batch API, or None."""

    def __init__(self, cfg: ServerConfig, chat: AsyncEngine | None, embedding: Any = None,
                 batches: Any = None, pool: Any = None) -> None:
        """pool: a models_dir.PoolSpec (--models-dir): its models load on demand."""
        self.cfg = cfg
        self.chat = chat
        self.embedding = embedding
        self.batches = batches
        self.services = [s for s in (chat, embedding) if s is not None]
        self.model_name = (cfg.served_model_names or cfg.embedding_model_names
                           or [m.name for m in pool.models])[0]
        self.metrics = Metrics(self.model_name,
                               lambda: self.services[0].stats if self.services else {},
                               self._cache_config_info,
                               log_stats=cfg.log_stats)
        self._stats_task: asyncio.Task | None = None
        self.responses = responses.ResponseStore(cfg.responses_store_size)
        self.started = time.time()
        self.shutdown_deadline: float | None = None  # monotonic; set by begin_shutdown()
        self.server_load = 0  # requests in flight on the LOAD_AWARE routes (GET /load)
        # adapters served as models; the load/unload routes change it once the engine agrees
        self.lora_adapters: dict[str, LoRAModule] = {m.name: m for m in cfg.lora_modules}
        self.serving = Serving(cfg, chat, self.metrics, self.lora_adapters) \
            if chat is not None else None
        self.pool = None if pool is None else ModelPool(pool, cfg, self.metrics)

    # ---- ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # never leave granian waiting on a startup reply
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Start the models' threads (they load in the background) and resume the batches: the
        lifespan's, and run-batch's (which serves no HTTP)."""
        for service in self.services:
            service.start()
        if self.pool is not None:
            self.pool.start()
        if self.batches is not None:   # resumes unfinished batches
            await self.batches.start(self)
        self._stats_task = asyncio.create_task(self._tick_stats())

    async def shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.batches is not None:   # first: its lines in flight run again next start
            await self.batches.shutdown()
        grace_s = self.cfg.shutdown_grace_s
        if self.shutdown_deadline is not None:  # the signal started the clock already
            grace_s = max(0.0, self.shutdown_deadline - time.monotonic())
        logger.info("connections drained; stopping the engine")
        for service in self.services:
            await service.shutdown(grace_s)
        if self.pool is not None:
            await self.pool.shutdown(grace_s)
        logger.info("stopped")

    async def _tick_stats(self) -> None:
        """Close a stats interval every few seconds (vLLM's periodic log line and gauges)."""
        while True:
            await asyncio.sleep(self.metrics.window.interval)
            self.metrics.window.tick()

    # ---- shutdown (minserve/shutdown.py drives these from the signal)
    def begin_shutdown(self) -> float:
        """Start the --shutdown-timeout clock; -> its seconds."""
        self.shutdown_deadline = time.monotonic() + self.cfg.shutdown_grace_s
        return self.cfg.shutdown_grace_s

    @property
    def num_in_flight(self) -> int:
        return sum(service.num_in_flight for service in self.services)

    def cut_in_flight(self) -> None:
        """The deadline passed: every request still running ends now with a 503 (an error event
        in a stream), and new ones are refused."""
        for service in self.services:
            service.fail_in_flight("the server is shutting down")

    def _cache_config_info(self) -> dict[str, Any] | None:
        """vllm:cache_config_info's labels, once the chat model is loaded."""
        info = self.chat.info if self.chat is not None and self.chat.is_ready else None
        if info is None or not info.block_size:
            return None
        num_tokens = info.num_kv_blocks * info.block_size
        return {"block_size": info.block_size, "num_gpu_blocks": info.num_kv_blocks,
                "kv_cache_size_tokens": num_tokens,
                "kv_cache_max_concurrency": round(num_tokens / info.max_model_len, 2)}

    # ---- routing policy: which model answers which route
    def chat_serving(self) -> Serving:
        """The generation routes' model; a server of embedding models alone refuses them."""
        if self.serving is None:
            raise OpenAIError(400, f"This server serves only the embedding model(s) "
                              f"{_names(self.cfg.embedding_model_names)}: use POST "
                              "/v1/embeddings (start it with a chat model, and --embedding-model, "
                              "to serve both)", param="model")
        return self.serving

    def serving_for(self, body: Any) -> contextlib.AbstractAsyncContextManager[Serving]:
        """The Serving the body's `model` names: a pooled one is loaded (and held) for the
        block; any other is the chat model's."""
        model = body.get("model") if isinstance(body, dict) else None
        if self.pool is not None and (self.pool.has(model) or self.chat is None):
            return self.pool.lease(model)
        return contextlib.nullcontext(self.chat_serving())

    def embedding_for(self, model: Any, route: str
                      ) -> contextlib.AbstractAsyncContextManager[tuple[str, Any]]:
        """(name, EmbeddingService) of the embedding model a pooling route's `model` names: a
        pooled one is loaded (and held) for the block; else embedding_model's."""
        if self.pool is not None and (self.pool.has(model) or self.embedding is None
                                      and self.pool.names("embed")):
            return self._pooled_embedding(model)
        return contextlib.nullcontext((self.embedding_model(model, route), self.embedding))

    @contextlib.asynccontextmanager
    async def _pooled_embedding(self, model: Any) -> AsyncIterator[tuple[str, Any]]:
        async with self.pool.lease(model, "embed") as service:
            yield model, service

    def embedding_model(self, model: str | None, route: str = "/v1/embeddings") -> str:
        """The embedding model a request to `route` (embeddings, score, rerank) names (None: the
        first one)."""
        names = self.cfg.embedding_model_names
        if self.embedding is None or not names:
            raise OpenAIError(400, f"This server serves no embedding model, which {route} needs "
                              "(start it with --embedding-model all-minilm-l6-v2, or serve one "
                              "with --task embed or --task score)"
                              + (f"; `{model}` is a chat model" if model else ""), param="model")
        if model is None:
            return names[0]
        if model in names:
            return model
        if self.chat is not None and model in self.cfg.served_model_names:
            raise OpenAIError(400, f"`{model}` is a chat model and does not answer {route}: "
                              f"use {_names(names)}.", param="model")
        raise model_not_found(str(model), names)

    def model_names(self) -> list[str]:
        chat = self.cfg.served_model_names if self.chat is not None else []
        return chat + (self.cfg.embedding_model_names if self.embedding is not None else [])

    def model_max_len(self, name: str) -> int:
        """For /v1/models: each card reports its own model's context length."""
        if self.embedding is not None and name in self.cfg.embedding_model_names:
            return self.embedding.max_model_len
        return self.chat_serving().ctx.max_model_len

    def answering(self, path: str) -> list[Any]:
        """The services (models) a route needs. Each route waits only for the model that answers
        it: chat keeps working while the embedding model loads or after it failed, and the other
        way round (/health and /v1/models, which describe both, need both)."""
        if path in EMBEDDING_ROUTES and self.embedding is not None:
            return [self.embedding]
        leased = self.pool is not None and path in pool_routes.LEASED
        if path.startswith(("/v1/files", "/v1/batches")) or leased:
            return []     # the Batch API's bookkeeping needs no model; the pool loads its own
        if path == "/v1/models" or path.startswith("/v1/models/") or self.chat is None:
            return self.services
        return [self.chat]

    def _check_ready(self, path: str) -> None:
        for service in self.answering(path):
            if not service.is_healthy:
                raise OpenAIError(503, f"the engine is not healthy: {service.dead_reason}")
            if not service.is_ready:
                raise OpenAIError(503, "the model is still loading; retry when /health returns 200")

    # ---- HTTP dispatch
    def _cors(self, headers: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        origin = headers.get(b"origin")
        allowed = self.cfg.allowed_origins
        if origin is None or not allowed:
            return []
        if "*" in allowed:
            return [(b"access-control-allow-origin", b"*")]
        if origin.decode("latin-1") in allowed:
            return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        return []

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path = scope["path"]
        root = scope.get("root_path") or self.cfg.root_path
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope["method"]
        http = Http(scope, receive, send, path, headers, self.cfg.max_body_bytes,
                    self._cors(headers), head_only=method == "HEAD")
        http.error_body = ERROR_SHAPES.get(path, OpenAIError.to_dict)
        try:
            # A CORS preflight carries no credentials: answered before auth and routing, the
            # same for every path (as Starlette's CORSMiddleware does).
            if method == "OPTIONS" and http.extra_headers and \
                    b"access-control-request-method" in headers:
                return await self._preflight(http)
            # Auth before routing, as vLLM does: without a key, /v1 paths reveal nothing (401,
            # not 404 or 405), whatever the method.
            if self.cfg.api_keys and (path.startswith("/v1/") or path in PROTECTED):
                http.api_key = self._check_auth(scope.get("headers", []))
            found = find_route(ROUTES, path)
            if found is None:
                raise OpenAIError(404, f"Not Found: {method} {path}", type="NotFoundError")
            methods, http.path_params = found
            handler = methods.get("GET" if method == "HEAD" else method)
            if handler is None:
                raise OpenAIError(405, f"Method Not Allowed: {method} {path} (allowed: "
                                  f"{', '.join(sorted(methods))})")
            if path not in ALWAYS_OPEN:
                self._check_ready(path)
            await self._counted(path, handler(self, http))
        except Exception as e:  # noqa: BLE001 - whatever happens, the client gets an answer
            await http.send_error(_as_error(e, method, path))
        finally:
            heap.note_work()   # what it freed goes back to the OS once the server is idle

    async def _counted(self, path: str, work: Awaitable[Any]) -> Any:
        """GET /load counts what runs on the LOAD_AWARE routes."""
        if path not in LOAD_AWARE:
            return await work
        self.server_load += 1
        try:
            return await work
        finally:
            self.server_load -= 1

    async def answer(self, path: str, body: Any, priority: int) -> tuple[int, Any]:
        """A batch line: the POST route `path` answers the JSON `body` as it answers HTTP
        clients, at engine `priority`, without an exchange (the batch's owner passed auth when
        it was created) -> (status, JSON body)."""
        try:
            self._check_ready(path)
            return 200, await self._counted(path, ANSWERS[path](self, body, priority))
        except Exception as e:  # noqa: BLE001 - as _http: every line gets an answer
            err = _as_error(e, "POST", path)
            return err.status, err.to_dict()

    async def _preflight(self, http: Http) -> None:
        req_headers = http.headers.get(b"access-control-request-headers", b"*")
        await http.send_body(200, b"", [
            (b"access-control-allow-methods", b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            (b"access-control-allow-headers", req_headers), (b"access-control-max-age", b"600")])

    def _check_auth(self, raw_headers: list[tuple[bytes, bytes]]) -> str:
        """-> the API key the request carries (401 unless it is one of ours)."""
        values = [v for k, v in raw_headers if k.lower() == b"authorization"]
        if len(values) > 1:  # which one counts would be a guess (the last one used to win)
            raise OpenAIError(400, f"{len(values)} Authorization headers: send exactly one")
        auth = values[0] if values else b""
        # Anthropic's clients send the key as x-api-key.
        token = auth[7:] if auth[:7].lower() == b"bearer " else \
            next((v for k, v in raw_headers if k.lower() == b"x-api-key"), b"")
        # NOTE: compare against every key so timing does not tell which one is close.
        found = None
        for key in self.cfg.api_keys:
            if hmac.compare_digest(token, key.encode()):
                found = key
        if found is None:
            raise OpenAIError(401, "Unauthorized: a valid `Authorization: Bearer <api key>` "
                              "(or `x-api-key`) header is required", type="AuthenticationError")
        return found


# ---------------------------------------------------------------- route handlers
def _generation_route(kind: str) -> Handler:
    """POST /v1/chat/completions ("chat"), /v1/completions, /v1/chat/completions/batch."""
    async def handler(app: App, http: Http) -> None:
        await _generate(app, http, kind, await http.read_json())
    return handler


def _generation_answer(kind: str) -> Callable[[App, Any, int], Awaitable[dict[str, Any]]]:
    """The JSON a generation route answers a batch line's body with."""
    async def answer(app: App, body: Any, priority: int) -> dict[str, Any]:
        async with app.serving_for(body) as serving:
            return await serving.complete(await serving.parse(kind, body, priority))
    return answer


async def _generate(app: App, http: Http, kind: str, body: Any) -> None:
    async with app.serving_for(body) as serving:
        req = await serving.parse(kind, body)
        await http.watched(_respond(http, serving, req))


async def _respond(http: Http, serving: Serving, req: GenerateRequest) -> None:
    if not req.stream:
        return await http.send_json(200, await serving.complete(req))
    with serving.generate(req) as gen:
        await http.start_events()
        async for chunk in output.stream_chunks(req, gen):
            await http.send_event(chunk)
    await http.end_events()


async def invocations(app: App, http: Http) -> None:
    """SageMaker's one route: the body says which API it is, as vLLM routes it."""
    body = await http.read_json()
    if isinstance(body, dict) and "messages" in body:
        await _generate(app, http, "chat", body)
    elif isinstance(body, dict) and "prompt" in body:
        await _generate(app, http, "completion", body)
    elif isinstance(body, dict) and "input" in body:
        await http.send_json(200, await embedding_routes.embeddings_json(app, body))
    else:
        raise OpenAIError(400, "Cannot find suitable handler for request. Expected one of: "
                          "a chat completion (messages), a completion (prompt) or an "
                          "embedding (input) request")


async def server_load(app: App, http: Http) -> None:
    if not app.cfg.enable_server_load_tracking:
        raise OpenAIError(404, "Not Found: GET /load (start the server with "
                          "--enable-server-load-tracking)", type="NotFoundError")
    await http.send_json(200, {"server_load": app.server_load})


async def health(app: App, http: Http) -> None:
    ok = all(s.is_ready and s.is_healthy for s in app.services) and \
        (app.pool is None or app.pool.is_healthy)
    await http.send_body(200 if ok else 503, b"")


async def version(app: App, http: Http) -> None:
    await http.send_json(200, {"version": __version__})


async def metrics(app: App, http: Http) -> None:
    await http.send_body(200, app.metrics.render(),
                         [(b"content-type", METRICS_CONTENT_TYPE.encode())])


# {path pattern: {method: handler}}; a route module adds its own table (http.match_path patterns).
ROUTES: dict[str, dict[str, Handler]] = {
    **pool_routes.ROUTES,     # first: /v1/models/{id}/load before /v1/models/{id}
    **embedding_routes.ROUTES,
    **batch_routes.ROUTES,
    **lora_routes.ROUTES,
    **token_routes.ROUTES,
    **webui_routes.ROUTES,
    "/v1/chat/completions": {"POST": _generation_route("chat")},
    "/v1/chat/completions/batch": {"POST": _generation_route("chat_batch")},
    "/v1/completions": {"POST": _generation_route("completion")},
    "/invocations": {"POST": invocations},
    "/load": {"GET": server_load},
    **model_routes.ROUTES,
    "/health": {"GET": health},
    "/ping": {"GET": health, "POST": health},
    "/version": {"GET": version},
    "/metrics": {"GET": metrics},
    "/v1/responses": {"POST": responses.create_response},
    "/v1/responses/{id}": {"GET": responses.get_response, "DELETE": responses.delete_response},
    "/v1/responses/{id}/cancel": {"POST": responses.cancel_response},
    "/v1/messages": {"POST": messages.create_message},
    "/v1/messages/count_tokens": {"POST": messages.count_tokens},
}
EMBEDDING_ROUTES = set(embedding_routes.ROUTES)  # answered by App.embedding
# what a batch line may run: each POST route's answer to a JSON body (App.answer)
ANSWERS = {"/v1/chat/completions": _generation_answer("chat"),
           "/v1/completions": _generation_answer("completion"), **embedding_routes.ANSWERS}
# A route of another API answers errors (its own and the dispatcher's: 401, 404...) in its shape.
ERROR_SHAPES = {"/v1/messages": messages.error_body,
                "/v1/messages/count_tokens": messages.error_body}
PROTECTED = {"/tokenize", "/detokenize", "/score", "/rerank", "/v2/rerank", "/invocations",
             "/tokenizer_info", *pool_routes.ROUTES}  # and every /v1/ route
ALWAYS_OPEN = {"/health", "/ping", "/version", "/metrics", "/load",
               *webui_routes.ROUTES}  # also while loading
# what GET /load counts (vLLM's load_aware_call routes)
LOAD_AWARE = {"/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions",
              "/v1/embeddings", "/invocations"}


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _as_error(e: Exception, method: str, path: str) -> OpenAIError:
    """What a route raised -> the client's error: its own OpenAIError, the engine's word on the
    request (400/500/503), or a 500 for a bug of ours (logged)."""
    if isinstance(e, EngineError):
        return OpenAIError(e.status, e.message)
    if not isinstance(e, OpenAIError):
        logger.exception("unhandled error in %s %s", method, path)
        return OpenAIError(500, f"internal server error: {type(e).__name__}: {library_text(e)}")
    return e


def create_app(engine_config: Any, server_config: ServerConfig,
               engine_factory: Callable[[Any], Any] | None = None, embedding: Any = None,
               batches: Any = None, pool: Any = None) -> App:
    """engine_config None + an EmbeddingService (or a pool): serve those alone. batches: a
    BatchService for the Batch API (/v1/files, /v1/batches). pool: a models_dir.PoolSpec."""
    if engine_config is None and (embedding is not None or pool is not None):
        chat = None
    elif server_config.engine_process and engine_factory is None:
        from minserve.engine.engine_process import ProcessEngine

        chat = ProcessEngine(engine_config)
    else:
        chat = AsyncEngine(engine_config, engine_factory)
    return App(server_config, chat, embedding, batches, pool)
