"""THE ASGI app: lifespan (AsyncEngine start/stop), route table, body limit, auth, CORS, OpenAI
error objects, and the SSE writer with a receive() disconnect watcher (granian's send() does not
raise after a disconnect). Never imports torch: the engine is built in its own thread."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from minserve import __version__, output
from minserve.batch import routes as batch_routes
from minserve.embeddings.routes import (
    BATCH_SCOPE_KEY,
    POOLING_ROUTES,
    all_model_names,
    check_chat_route,
    embeddings,
    model_max_len,
    no_chat_model_error,
    request_priority,
    rerank,
    score,
    serves_chat,
    services,
)
from minserve.engine.async_engine import AsyncEngine, EngineError, RequestStream
from minserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from minserve.metrics import Metrics, RequestTracker
from minserve.protocol import (
    GenerateRequest,
    OpenAIError,
    ServingContext,
    parse_chat,
    parse_completion,
    prompt_chars_limit,
)

logger = logging.getLogger("minserve.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
       (b"x-accel-buffering", b"no")]


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
    embedding_model_names: list[str] = field(default_factory=list)  # served by App.embedding


@dataclass
class Http:
    """One HTTP exchange as the handlers see it."""
    scope: Scope
    receive: Receive
    send: Send
    path: str
    headers: dict[bytes, bytes]
    path_param: str | None = None
    path_params: dict[str, str] = field(default_factory=dict)
    started: bool = False   # http.response.start went out: errors can no longer be a status
    sse: bool = False       # ... and it opened an event stream: errors become an SSE event


Handler = Callable[["App", Http], Awaitable[None]]


async def send_json(send: Send, status: int, obj: Any,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": JSON + [(b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, err: OpenAIError) -> None:
    extra = [(b"www-authenticate", b"Bearer")] if err.status == 401 else []
    await send_json(send, err.status, err.to_dict(), extra)


def _sse(obj: Any) -> dict[str, Any]:
    return {"type": "http.response.body", "body": b"data: " + orjson.dumps(obj) + b"\n\n",
            "more_body": True}


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class App:
    """app(scope, receive, send). Build with create_app()."""

    def __init__(self, engine: AsyncEngine, cfg: ServerConfig, embedding: Any = None,
                 batches: Any = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.embedding = embedding  # EmbeddingService or None; `is engine` when serving it alone
        self.batches = batches      # BatchService (the Batch API) or None
        # PERF: batch lines parse (template + tokenize) on their own thread: on the shared
        # pool, 512 lines queued ahead of a chat request made its TTFT 32 s instead of ~1 s
        # (tiny model, loaded 2-core CPU, bench/RESULTS.md).
        self.batch_parse_pool = ThreadPoolExecutor(1, thread_name_prefix="minserve-batch-parse")
        self.model_name = (cfg.served_model_names or cfg.embedding_model_names)[0]
        self.metrics = Metrics(self.model_name, lambda: self.engine.stats)
        self._ctx: ServingContext | None = None
        self.started = time.time()

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
                    for service in services(self):
                        service.start()
                    if self.batches is not None:   # resumes unfinished batches
                        await self.batches.start(self)
                except Exception as e:  # never leave granian waiting on a startup reply
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.batches is not None:   # first: its lines in flight run again next start
                    await self.batches.shutdown()
                for service in services(self):
                    await service.shutdown(self.cfg.shutdown_grace_s)
                await send({"type": "lifespan.shutdown.complete"})
                return

    @property
    def ctx(self) -> ServingContext:
        if not serves_chat(self):
            raise no_chat_model_error(self)
        if self._ctx is None:
            eng = self.engine.engine
            self._ctx = ServingContext(
                tokenizer=eng.tokenizer, model_names=self.cfg.served_model_names,
                max_model_len=eng.max_model_len, vocab_size=eng.model_config.vocab_size,
                generation_defaults=dict(getattr(eng, "generation_defaults", None) or {}),
                check_structured=self._check_structured,
                enable_auto_tool_choice=self.cfg.enable_auto_tool_choice,
                tool_call_parser=self.cfg.tool_call_parser,
                reasoning_parser=self.cfg.reasoning_parser,
                max_prompt_chars=prompt_chars_limit(eng.max_model_len,
                                                    eng.tokenizer.max_token_bytes))
        return self._ctx

    def _check_structured(self, spec: dict[str, Any]) -> None:
        # The engine compiles the same spec again; structured.compile caches it, so this is the
        # one real compile, done here where a bad grammar can still be a 400.
        from minserve import structured  # imports torch lazily only for the bitmask helpers
        eng = self.engine.engine
        structured.compile(spec, eng.tokenizer, vocab_size=eng.model_config.vocab_size)

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
        cors = self._cors(headers)
        path = scope["path"]
        root = scope.get("root_path") or self.cfg.root_path
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope["method"]
        http = Http(scope, receive, send, path, headers)

        async def send(msg: dict[str, Any]) -> None:  # noqa: F811 - track the start, add CORS
            if msg["type"] == "http.response.start":
                http.started = True
                http.sse = (b"content-type", b"text/event-stream") in msg.get("headers", ())
                if cors:
                    msg = {**msg, "headers": list(msg.get("headers", [])) + cors}
            await http_send(msg)

        http_send, http.send = http.send, send
        try:
            # Auth before routing, as vLLM does: without a key, /v1 paths reveal nothing (401,
            # not 404). A CORS preflight carries no credentials, so it is not checked.
            # (a batch line was authorized with its batch; only the batch runner sets the key)
            if self.cfg.api_keys and method != "OPTIONS" and BATCH_SCOPE_KEY not in scope and (
                    path.startswith("/v1/") or path in PROTECTED):
                self._check_auth(headers)
            methods = ROUTES.get(path)
            if methods is None and path.startswith("/v1/models/"):
                methods, http.path_param = ROUTES["/v1/models/{id}"], path[len("/v1/models/"):]
            if methods is None:
                methods, http.path_params = _templated(path)
            if methods is None:
                raise OpenAIError(404, f"Not Found: {method} {path}", type="NotFoundError")
            if method == "OPTIONS" and cors and b"access-control-request-method" in headers:
                return await self._preflight(http)
            handler = methods.get(method)
            if handler is None:
                raise OpenAIError(405, f"Method Not Allowed: {method} {path} (allowed: "
                                  f"{', '.join(sorted(methods))})")
            if path not in ALWAYS_OPEN:
                self._check_ready(path)
            await handler(self, http)
        except Exception as e:  # noqa: BLE001 - whatever happens, the client gets an answer
            if not isinstance(e, OpenAIError):
                logger.exception("unhandled error in %s %s", method, path)
                e = OpenAIError(500, f"internal server error: {type(e).__name__}: {e}")
            await self._send_late_error(http, e)

    async def _send_late_error(self, http: Http, err: OpenAIError) -> None:
        """An error as a status when nothing was sent yet; inside an open event stream as one
        `data: {"error": ...}` event and [DONE]; otherwise the body just ends."""
        if not http.started:
            return await send_error(http.send, err)
        if http.sse:
            await http.send(_sse(err.to_dict()))
            await http.send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                             "more_body": False})
        else:
            await http.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _preflight(self, http: Http) -> None:
        req_headers = http.headers.get(b"access-control-request-headers", b"*")
        await http.send({"type": "http.response.start", "status": 200, "headers": [
            (b"access-control-allow-methods", b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            (b"access-control-allow-headers", req_headers),
            (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
        await http.send({"type": "http.response.body", "body": b"", "more_body": False})

    def _check_auth(self, headers: dict[bytes, bytes]) -> None:
        auth = headers.get(b"authorization", b"")
        token = auth[7:] if auth[:7].lower() == b"bearer " else b""
        # NOTE: compare against every key so timing does not tell which one is close.
        ok = False
        for key in self.cfg.api_keys:
            ok |= hmac.compare_digest(token, key.encode())
        if not ok:
            raise OpenAIError(401, "Unauthorized: a valid `Authorization: Bearer <api key>` "
                              "header is required", type="AuthenticationError")

    def _check_ready(self, path: str) -> None:
        """Each route waits only for the model that answers it: chat keeps working while the
        embedding model loads or after it failed, and the other way round (/health and
        /v1/models, which describe both, need both)."""
        if path in POOLING_ROUTES and self.embedding is not None:
            needed = [self.embedding]
        elif path.startswith(("/v1/files", "/v1/batches")):
            needed = []     # the Batch API's bookkeeping needs no model
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            needed = services(self)
        else:
            needed = [self.engine]
        for service in needed:
            if not service.is_healthy:
                raise OpenAIError(503, f"the engine is not healthy: {service.dead_reason}")
            if not service.is_ready:
                raise OpenAIError(503, "the model is still loading; retry when /health returns 200")

    async def read_json(self, http: Http) -> Any:
        ctype = http.headers.get(b"content-type")
        if ctype is not None and b"json" not in ctype.lower():
            raise OpenAIError(415, f"Content-Type must be application/json, got "
                              f"{ctype.decode('latin-1')!r}")
        limit = self.cfg.max_body_bytes
        declared = http.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise OpenAIError(413, f"request body is larger than the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            msg = await http.receive()
            if msg["type"] == "http.disconnect":
                raise OpenAIError(400, "client disconnected")
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                raise OpenAIError(413, f"request body is larger than the limit of {limit} bytes")
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as e:
            raise OpenAIError(400, f"invalid JSON body: {e}") from None

    # ---- generation
    async def generate(self, http: Http, req: GenerateRequest) -> None:
        if self.cfg.log_requests:
            logger.info("request %s: %d prompt(s), %d prompt tokens, params=%s", req.request_id,
                        len(req.prompts), sum(map(len, req.prompts)), req.params)
        try:
            # batch lines run after interactive requests (0), as vLLM's priority
            stream = self.engine.add_batch(req.request_id, req.prompts, req.params,
                                           priority=request_priority(http))
        except EngineError as e:
            raise OpenAIError(e.status, e.message) from None
        n = req.params.n
        tok = self.ctx.tokenizer
        choices = [output.ChoiceState(i, req, tok, req.prompts[i // n])
                   for i in range(len(req.prompts) * n)]
        tracker = self.metrics.tracker()
        body = self._stream_body if req.stream else self._full_body
        producer = asyncio.ensure_future(body(http, req, stream, choices, tracker))
        watcher = asyncio.ensure_future(_wait_disconnect(http.receive))
        try:
            done, _ = await asyncio.wait({producer, watcher},
                                         return_when=asyncio.FIRST_COMPLETED)
            if producer in done:
                producer.result()
            else:
                logger.info("client disconnected; aborting %s", req.request_id)
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
                self._finish(req, choices, tracker)  # counted as finished_reason="abort"
        finally:
            watcher.cancel()
            producer.cancel()
            self.engine.abort(req.request_id)  # a no-op if it already finished

    async def _consume(self, out: Any, stream: RequestStream, choices: list, tracker:
                       RequestTracker) -> tuple[output.ChoiceState, str, list, bool]:
        c = choices[stream.index_of(out.request_id)]
        before = c.num_output_tokens
        text, lps, hit = c.update(out)
        if hit:
            self.engine.abort_child(stream, out.request_id)
        tracker.on_tokens(c.num_output_tokens - before, c.index)
        if out.timings is not None:
            tracker.on_engine_timings(out.timings, c.num_output_tokens)
        return c, text, lps, c.finish_reason is not None

    def _finish(self, req: GenerateRequest, choices: list, tracker: RequestTracker) -> None:
        n = req.params.n
        tracker.on_finish(sum(c.num_prompt_tokens for c in choices[::n]),
                          [c.finish_reason or "abort" for c in choices],
                          [c.num_output_tokens for c in choices])

    async def _full_body(self, http: Http, req: GenerateRequest, stream: RequestStream,
                         choices: list, tracker: RequestTracker) -> None:
        try:
            async for out in stream:
                await self._consume(out, stream, choices, tracker)
        except EngineError as e:
            raise OpenAIError(e.status, e.message) from None
        self._finish(req, choices, tracker)
        await send_json(http.send, 200, output.response(req, choices))

    async def _stream_body(self, http: Http, req: GenerateRequest, stream: RequestStream,
                           choices: list, tracker: RequestTracker) -> None:
        send = http.send
        # Headers go out before the first token so clients see the stream open at once.
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        n, num_prompts = req.params.n, len(req.prompts)
        continuous = req.include_usage and req.continuous_usage
        # Echo with logprobs waits for the prompt's logprobs, which come with the first output.
        echo_later = req.kind == "completion" and req.echo and req.logprobs is not None

        async def send_chunk(choice: dict[str, Any]) -> None:
            u = output.usage(choices, num_prompts, n) if continuous else None
            await send(_sse(output.chunk(req, [choice], u)))

        try:
            for c in choices:  # chat: the role first; echo: the prompt text first
                text = output.echo_prefix(req, c)
                if req.kind == "chat" or (text and not echo_later):
                    await send_chunk(output.chunk_choice(req, c, text, [],
                                                         role=req.kind == "chat", echo=True))
            async for out in stream:
                c, text, lps, finished = await self._consume(out, stream, choices, tracker)
                if echo_later and not c.echo_sent:
                    c.echo_sent = True
                    await send_chunk(output.echo_chunk_choice(req, c))
                if text or lps or finished:
                    ch = output.chunk_choice(req, c, text, lps, finished=finished)
                    if req.kind == "chat" and not (ch["delta"] or lps or finished):
                        continue  # the reasoning/tool parsers hold this text back for now
                    await send_chunk(ch)
            if req.include_usage:
                await send(_sse(output.chunk(req, [], output.usage(choices, num_prompts, n))))
            self._finish(req, choices, tracker)
        except EngineError as e:
            await send(_sse(OpenAIError(e.status, e.message).to_dict()))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})


# ---------------------------------------------------------------- route handlers
# Parsing renders chat templates and tokenizes (up to a megabyte-scale prompt: about a second):
# in a worker thread, so the event loop keeps every other stream flowing meanwhile.
async def _parse(app: App, http: Http, parse: Callable[..., GenerateRequest],
                 body: Any) -> GenerateRequest:
    """In a worker thread; batch lines on their own, never ahead of interactive requests."""
    if BATCH_SCOPE_KEY in http.scope:
        return await asyncio.get_running_loop().run_in_executor(app.batch_parse_pool, parse,
                                                                body, app.ctx)
    return await asyncio.to_thread(parse, body, app.ctx)


async def chat_completions(app: App, http: Http) -> None:
    body = await app.read_json(http)
    check_chat_route(app, body)
    await app.generate(http, await _parse(app, http, parse_chat, body))


async def completions(app: App, http: Http) -> None:
    body = await app.read_json(http)
    check_chat_route(app, body)
    await app.generate(http, await _parse(app, http, parse_completion, body))


def _model_card(app: App, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(app.started), "owned_by": "minserve",
            "root": app.cfg.model_root or name, "parent": None,
            "max_model_len": model_max_len(app, name), "permission": []}


async def list_models(app: App, http: Http) -> None:
    await send_json(http.send, 200, {"object": "list", "data": [
        _model_card(app, name) for name in all_model_names(app)]})


async def get_model(app: App, http: Http) -> None:
    if http.path_param not in all_model_names(app):
        raise OpenAIError(404, f"The model `{http.path_param}` does not exist.", param="model",
                          type="NotFoundError")
    await send_json(http.send, 200, _model_card(app, http.path_param))


async def health(app: App, http: Http) -> None:
    ok = all(s.is_ready and s.is_healthy for s in services(app))
    await http.send({"type": "http.response.start", "status": 200 if ok else 503,
                     "headers": [(b"content-length", b"0")]})
    await http.send({"type": "http.response.body", "body": b"", "more_body": False})


async def version(app: App, http: Http) -> None:
    await send_json(http.send, 200, {"version": __version__})


async def metrics(app: App, http: Http) -> None:
    body = app.metrics.render()
    await http.send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", METRICS_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode())]})
    await http.send({"type": "http.response.body", "body": body, "more_body": False})


async def tokenize(app: App, http: Http) -> None:
    body = await app.read_json(http)
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    await send_json(http.send, 200, await asyncio.to_thread(_tokenize, body, app.ctx))


def _tokenize(body: dict[str, Any], ctx: ServingContext) -> dict[str, Any]:
    if "messages" in body:
        chat = parse_chat({**body, "max_tokens": None, "max_completion_tokens": None,
                           "stream": False, "stream_options": None}, ctx)
        ids = chat.prompts[0]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt: must be a string", param="prompt")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise OpenAIError(400, "add_special_tokens: must be a boolean",
                              param="add_special_tokens")
        ids = ctx.tokenizer.encode(prompt, add_special_tokens=add)
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
            "token_strs": strs}


async def detokenize(app: App, http: Http) -> None:
    body = await app.read_json(http)
    ids = body.get("tokens") if isinstance(body, dict) else None
    vocab = app.ctx.vocab_size
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise OpenAIError(400, f"tokens: must be a list of token ids in [0, {vocab})",
                          param="tokens")
    await send_json(http.send, 200, {"prompt": app.ctx.tokenizer.decode(ids)})


# Others add routes here (e.g. "/v1/embeddings": {"POST": embeddings}).
ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/chat/completions": {"POST": chat_completions},
    "/v1/completions": {"POST": completions},
    "/v1/embeddings": {"POST": embeddings},
    "/v1/score": {"POST": score},
    "/score": {"POST": score},
    "/v1/rerank": {"POST": rerank},
    "/rerank": {"POST": rerank},
    "/v2/rerank": {"POST": rerank},
    "/v1/models": {"GET": list_models},
    "/v1/models/{id}": {"GET": get_model},
    "/health": {"GET": health},
    "/ping": {"GET": health, "POST": health},
    "/version": {"GET": version},
    "/metrics": {"GET": metrics},
    "/tokenize": {"POST": tokenize},
    "/detokenize": {"POST": detokenize},
}
ROUTES.update(batch_routes.ROUTES)
PROTECTED = {"/tokenize", "/detokenize", "/score", "/rerank", "/v2/rerank"}  # and all /v1/
ALWAYS_OPEN = {"/health", "/ping", "/version", "/metrics"}  # answer while loading, too


def _templated(path: str) -> tuple[dict[str, Handler] | None, dict[str, str]]:
    """"/v1/files/{file_id}/content"-style routes: each {name} matches one path segment."""
    got = path.split("/")
    for pattern, methods in ROUTES.items():
        want = pattern.split("/")
        if "{" not in pattern or len(want) != len(got) or pattern == "/v1/models/{id}":
            continue
        params = {}
        for w, g in zip(want, got, strict=True):
            if w.startswith("{") and w.endswith("}") and g:
                params[w[1:-1]] = g
            elif w != g:
                break
        else:
            return methods, params
    return None, {}


def create_app(engine_config: Any, server_config: ServerConfig,
               engine_factory: Callable[[Any], Any] | None = None, embedding: Any = None,
               batches: Any = None) -> App:
    """engine_config None + an EmbeddingService: serve the embedding model alone. batches: a
    BatchService for the Batch API (/v1/files, /v1/batches)."""
    if engine_config is None and embedding is not None:
        return App(embedding, server_config, embedding, batches)
    return App(AsyncEngine(engine_config, engine_factory), server_config, embedding, batches)
