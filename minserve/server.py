"""THE ASGI app: lifespan (service start/stop, batches resumed), the route table, auth, CORS,
readiness, and the chat/completions generation loop (a receive() disconnect watcher beside each
response). The HTTP plumbing is http.py. Never imports torch: the engine is built in its own
thread."""
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

from minserve import __version__, messages, output, responses
from minserve.batch import routes as batch_routes
from minserve.embeddings import routes as embedding_routes
from minserve.engine.async_engine import AsyncEngine, EngineError, RequestStream
from minserve.errors import library_text
from minserve.http import BATCH_SCOPE_KEY, Http, OpenAIError, Receive, Scope, Send, find_route, \
    model_not_found
from minserve.config import LoRAModule
from minserve.lora import routes as lora_routes
from minserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from minserve.metrics import Metrics, RequestTracker
from minserve.protocol import (
    GenerateRequest,
    ServingContext,
    attach_images,
    encode_prompt,
    media_error,
    parse_chat,
    parse_chat_batch,
    parse_completion,
    prompt_chars_limit,
)
from minserve.tool_parsers.generic import GENERIC, detect_tool_parser
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


Handler = Callable[["App", Http], Awaitable[None]]


class App:
    """app(scope, receive, send). Build with create_app(). `chat` (an AsyncEngine) answers the
    generation routes and `embedding` (an EmbeddingService) /v1/embeddings, /v1/score and
    /v1/rerank; either may be None. `batches` (a BatchService) is the Batch API, or None."""

    def __init__(self, cfg: ServerConfig, chat: AsyncEngine | None, embedding: Any = None,
                 batches: Any = None) -> None:
        self.cfg = cfg
        self.chat = chat
        self.embedding = embedding
        self.batches = batches
        self.services = [s for s in (chat, embedding) if s is not None]
        # PERF: batch lines parse (template + tokenize) on their own thread: on the shared
        # pool, 512 lines queued ahead of a chat request made its TTFT 32 s instead of ~1 s
        # (tiny model, loaded 2-core CPU, bench/RESULTS.md).
        self.batch_parse_pool = ThreadPoolExecutor(1, thread_name_prefix="minserve-batch-parse")
        self.model_name = (cfg.served_model_names or cfg.embedding_model_names)[0]
        self.metrics = Metrics(self.model_name, lambda: self.services[0].stats,
                               self._cache_config_info,
                               log_stats=cfg.log_stats)
        self._stats_task: asyncio.Task | None = None
        self._ctx: ServingContext | None = None
        self.responses = responses.ResponseStore(cfg.responses_store_size)
        self.started = time.time()
        self.shutdown_deadline: float | None = None  # monotonic; set by begin_shutdown()
        self.server_load = 0  # requests in flight on the LOAD_AWARE routes (GET /load)
        # adapters served as models; the load/unload routes change it once the engine agrees
        self.lora_adapters: dict[str, LoRAModule] = {m.name: m for m in cfg.lora_modules}

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
                    for service in self.services:
                        service.start()
                    if self.batches is not None:   # resumes unfinished batches
                        await self.batches.start(self)
                except Exception as e:  # never leave granian waiting on a startup reply
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                self._stats_task = asyncio.create_task(self._tick_stats())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
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
                logger.info("stopped")
                await send({"type": "lifespan.shutdown.complete"})
                return

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
    @property
    def ctx(self) -> ServingContext:
        """What parsing a chat/completions request needs from the chat model."""
        if self.chat is None:
            raise self._no_chat_model()
        if self._ctx is None:
            info = self.chat.info
            self._ctx = ServingContext(
                tokenizer=info.tokenizer, model_names=self.cfg.served_model_names,
                max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                generation_defaults=dict(info.generation_defaults),
                check_structured=self._check_structured,
                enable_auto_tool_choice=self.cfg.enable_auto_tool_choice,
                tool_call_parser=self._tool_call_parser(info.tokenizer),
                reasoning_parser=self.cfg.reasoning_parser,
                max_logprobs=self.cfg.max_logprobs,
                force_include_usage=self.cfg.enable_force_include_usage,
                prompt_tokens_details=self.cfg.enable_prompt_tokens_details,
                return_tokens_as_token_ids=self.cfg.return_tokens_as_token_ids,
                adapter_names=self.lora_adapters,
                structured_defaults=self.cfg.structured_defaults,
                image_processor=info.image_processor, image_limit=info.image_limit,
                media_policy=info.media_policy,
                max_prompt_chars=prompt_chars_limit(info.max_model_len,
                                                    info.tokenizer.max_token_bytes)
                if info.tokenizer is not None else None)
        return self._ctx

    def _tool_call_parser(self, tokenizer: Any) -> str | None:
        """--tool-call-parser, or with --enable-auto-tool-choice alone the parser the chat
        template's markers name (logged); generic: minserve renders the tools into the system
        message (tool_parsers/generic.py)."""
        parser = self.cfg.tool_call_parser
        if not parser and self.cfg.enable_auto_tool_choice:
            templates = getattr(tokenizer, "chat_templates", None) or {}
            template = templates.get("tool_use") or getattr(tokenizer, "chat_template", None)
            parser = detect_tool_parser(template)
            if parser == GENERIC:
                logger.info("tool calls: the chat template renders no tools; minserve puts "
                            "them into the system message (--tool-call-parser generic)")
            else:
                logger.info("tool calls: --tool-call-parser %s, detected from the chat "
                            "template", parser)
        return parser

    def _check_structured(self, spec: dict[str, Any]) -> None:
        # The engine compiles the same spec again; structured.compile caches it, so this is the
        # one real compile, done here where a bad grammar can still be a 400.
        from minserve import structured  # imports torch lazily only for the bitmask helpers
        info = self.chat.info
        structured.compile(spec, info.tokenizer, vocab_size=info.vocab_size)

    def _no_chat_model(self) -> OpenAIError:
        return OpenAIError(400, f"This server serves only the embedding model(s) "
                           f"{_names(self.cfg.embedding_model_names)}: use POST /v1/embeddings "
                           "(start it with a chat model, and --embedding-model, to serve both)",
                           param="model")

    def check_chat_model(self, body: Any) -> None:
        """Before parse_chat/parse_completion: refuse embedding models on the generation
        routes, naming the model to use."""
        if self.chat is None:
            raise self._no_chat_model()
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model in self.cfg.embedding_model_names:
            raise OpenAIError(400, f"`{model}` is an embedding model: it answers POST "
                              f"/v1/embeddings (and /v1/score, /v1/rerank) only. For completions "
                              f"use "
                              f"{_names(self.cfg.served_model_names)}.", param="model")

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
        return self.ctx.max_model_len

    def _check_ready(self, path: str) -> None:
        """Each route waits only for the model that answers it: chat keeps working while the
        embedding model loads or after it failed, and the other way round (/health and
        /v1/models, which describe both, need both)."""
        if path in EMBEDDING_ROUTES and self.embedding is not None:
            needed = [self.embedding]
        elif path.startswith(("/v1/files", "/v1/batches")):
            needed = []     # the Batch API's bookkeeping needs no model
        elif path == "/v1/models" or path.startswith("/v1/models/") or self.chat is None:
            needed = self.services
        else:
            needed = [self.chat]
        for service in needed:
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
            # not 404 or 405), whatever the method. A batch line was authorized with its batch
            # (only the in-process batch runner sets the key).
            if self.cfg.api_keys and BATCH_SCOPE_KEY not in scope and (
                    path.startswith("/v1/") or path in PROTECTED):
                self._check_auth(scope.get("headers", []))
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
            if path in LOAD_AWARE:
                self.server_load += 1
                try:
                    return await handler(self, http)
                finally:
                    self.server_load -= 1
            await handler(self, http)
        except Exception as e:  # noqa: BLE001 - whatever happens, the client gets an answer
            if isinstance(e, EngineError):  # the engine's word on this request (400/500/503)
                e = OpenAIError(e.status, e.message)
            elif not isinstance(e, OpenAIError):
                logger.exception("unhandled error in %s %s", method, path)
                e = OpenAIError(500, "internal server error: "
                                f"{type(e).__name__}: {library_text(e)}")
            await http.send_error(e)

    async def _preflight(self, http: Http) -> None:
        req_headers = http.headers.get(b"access-control-request-headers", b"*")
        await http.send_body(200, b"", [
            (b"access-control-allow-methods", b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            (b"access-control-allow-headers", req_headers), (b"access-control-max-age", b"600")])

    def _check_auth(self, raw_headers: list[tuple[bytes, bytes]]) -> None:
        values = [v for k, v in raw_headers if k.lower() == b"authorization"]
        if len(values) > 1:  # which one counts would be a guess (the last one used to win)
            raise OpenAIError(400, f"{len(values)} Authorization headers: send exactly one")
        auth = values[0] if values else b""
        # Anthropic's clients send the key as x-api-key.
        token = auth[7:] if auth[:7].lower() == b"bearer " else \
            next((v for k, v in raw_headers if k.lower() == b"x-api-key"), b"")
        # NOTE: compare against every key so timing does not tell which one is close.
        ok = False
        for key in self.cfg.api_keys:
            ok |= hmac.compare_digest(token, key.encode())
        if not ok:
            raise OpenAIError(401, "Unauthorized: a valid `Authorization: Bearer <api key>` "
                              "(or `x-api-key`) header is required", type="AuthenticationError")

    # ---- generation
    async def generate(self, http: Http, req: GenerateRequest) -> None:
        if self.cfg.log_requests:
            logger.info("request %s: %d prompt(s), %d prompt tokens, params=%s", req.request_id,
                        len(req.prompts), sum(map(len, req.prompts)), req.params)
        for r in req.requests:  # batch lines run after interactive requests (0), as vLLM's
            r.priority = http.priority
        stream = self.chat.add_request(req.request_id, req.requests)
        n = req.params.n
        tok = self.ctx.tokenizer
        choices = [output.ChoiceState(i, req, tok, req.prompts[i // n])
                   for i in range(len(req.prompts) * n)]
        tracker = self.metrics.tracker()
        max_len = self.ctx.max_model_len
        tracker.on_params(n, [req.params.max_tokens or max_len - len(p) for p in req.prompts])
        body = self._stream_body if req.stream else self._full_body
        producer = asyncio.ensure_future(body(http, req, stream, choices, tracker))
        watcher = asyncio.ensure_future(http.wait_disconnect())
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
            self.chat.abort(req.request_id)  # a no-op if it already finished

    def _consume(self, out: Any, stream: RequestStream, choices: list, tracker:
                       RequestTracker) -> tuple[output.ChoiceState, str, list, bool]:
        c = choices[stream.index_of(out.request_id)]
        before = c.num_output_tokens
        text, lps, hit = c.update(out)
        if hit:
            self.chat.abort_child(stream, out.request_id)
        tracker.on_tokens(c.num_output_tokens - before, c.index)
        if out.timings is not None:
            tracker.on_engine_timings(out.timings, c.num_output_tokens, out.num_preemptions)
        return c, text, lps, c.finish_reason is not None

    def _finish(self, req: GenerateRequest, choices: list, tracker: RequestTracker) -> None:
        n = req.params.n
        tracker.on_finish(sum(c.num_prompt_tokens for c in choices[::n]),
                          [c.finish_reason or "abort" for c in choices],
                          [c.num_output_tokens for c in choices])

    async def _full_body(self, http: Http, req: GenerateRequest, stream: RequestStream,
                         choices: list, tracker: RequestTracker) -> None:
        async for out in stream:
            self._consume(out, stream, choices, tracker)
        self._finish(req, choices, tracker)
        await http.send_json(200, output.response(req, choices))

    async def _stream_body(self, http: Http, req: GenerateRequest, stream: RequestStream,
                           choices: list, tracker: RequestTracker) -> None:
        await http.start_events()
        n, num_prompts, details = req.params.n, len(req.prompts), req.prompt_tokens_details
        continuous = req.include_usage and req.continuous_usage
        # Echo with logprobs waits for the prompt's logprobs, which come with the first output.
        echo_later = req.kind == "completion" and req.echo and req.logprobs is not None

        async def send_chunk(choice: dict[str, Any], c: output.ChoiceState) -> None:
            u = output.usage(choices, num_prompts, n, details) if continuous else None
            d = output.chunk(req, [choice], u)
            extras = output.stream_prompt_extras(req, c)
            if extras:  # vLLM: top-level for chat, in the choice for completions
                (d if req.kind == "chat" else choice).update(extras)
            await http.send_event(d)

        for c in choices:  # chat: the role first; echo: the prompt text first
            text = output.echo_prefix(req, c)
            if req.kind == "chat" or (text and not echo_later):
                await send_chunk(output.chunk_choice(req, c, text, [], role=req.kind == "chat",
                                                     echo=True), c)
        async for out in stream:  # an EngineError ends the stream with an error event (_http)
            c, text, lps, finished = self._consume(out, stream, choices, tracker)
            if echo_later and not c.echo_sent:
                c.echo_sent = True
                await send_chunk(output.echo_chunk_choice(req, c), c)
            if text or lps or finished or (req.return_token_ids and out.new_token_ids):
                ch = output.chunk_choice(req, c, text, lps, finished=finished)
                if req.kind == "chat" and not (ch["delta"] or lps or finished
                                               or ch.get("token_ids")):
                    continue  # the reasoning/tool parsers hold this text back for now
                await send_chunk(ch, c)
        if req.include_usage:
            await http.send_event(output.chunk(req, [], output.usage(choices, num_prompts, n,
                                                                     details)))
        self._finish(req, choices, tracker)
        await http.end_events()


# ---------------------------------------------------------------- route handlers
# Parsing renders chat templates and tokenizes (up to a megabyte-scale prompt: about a second):
# in a worker thread, so the event loop keeps every other stream flowing meanwhile.
async def _parse(app: App, http: Http, parse: Callable[..., GenerateRequest],
                 body: Any) -> GenerateRequest:
    """In a worker thread; batch lines on their own, never queued ahead of interactive ones."""
    if BATCH_SCOPE_KEY in http.scope:
        return await asyncio.get_running_loop().run_in_executor(app.batch_parse_pool, parse,
                                                                body, app.ctx)
    return await asyncio.to_thread(parse, body, app.ctx)


async def chat_completions(app: App, http: Http) -> None:
    body = await http.read_json()
    app.check_chat_model(body)
    req = await _parse(app, http, parse_chat, body)
    if req.images:
        await _attach_images(app, req)
    await app.generate(http, req)


async def _attach_images(app: App, req: GenerateRequest) -> None:
    """Fetch the request's images (their own threads, all at once, each bounded by the fetch
    timeout: other streams flow meanwhile), decode them, expand the prompt."""
    from minserve.multimodal.image import MediaError
    from minserve.multimodal.inputs import load_images

    ctx = app.ctx
    try:
        images = await load_images(req.images, ctx.media_policy)
    except MediaError as e:
        raise media_error(e) from None
    await asyncio.to_thread(attach_images, req, images, ctx)


async def completions(app: App, http: Http) -> None:
    body = await http.read_json()
    app.check_chat_model(body)
    await app.generate(http, await _parse(app, http, parse_completion, body))


async def chat_completions_batch(app: App, http: Http) -> None:
    body = await http.read_json()
    app.check_chat_model(body)
    await app.generate(http, await asyncio.to_thread(parse_chat_batch, body, app.ctx))


async def invocations(app: App, http: Http) -> None:
    """SageMaker's one route: the body says which API it is, as vLLM routes it."""
    body = await http.read_json()
    if isinstance(body, dict) and "messages" in body:
        handler = chat_completions
    elif isinstance(body, dict) and "prompt" in body:
        handler = completions
    elif isinstance(body, dict) and "input" in body:
        handler = embedding_routes.embeddings
    else:
        raise OpenAIError(400, "Cannot find suitable handler for request. Expected one of: "
                          "a chat completion (messages), a completion (prompt) or an "
                          "embedding (input) request")
    replay = [{"type": "http.request", "body": orjson.dumps(body), "more_body": False}]
    receive = http.receive

    async def replayed() -> dict[str, Any]:  # the handler reads the body again; then as before
        return replay.pop() if replay else await receive()
    http.receive = replayed
    await handler(app, http)


async def tokenizer_info(app: App, http: Http) -> None:
    if not app.cfg.enable_tokenizer_info_endpoint:
        raise OpenAIError(404, "Not Found: GET /tokenizer_info (start the server with "
                          "--enable-tokenizer-info-endpoint)", type="NotFoundError")
    tok = _tokenizer(app)
    cfg = {k: v for k, v in tok.tokenizer_config.items() if k != "added_tokens_decoder"}
    await http.send_json(200, {**cfg, "tokenizer_class": cfg.get("tokenizer_class",
                                                                 "PreTrainedTokenizerFast"),
                               "chat_template": tok.chat_template,
                               "model_max_length": app.ctx.max_model_len,
                               "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                               "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                               "vocab_size": app.ctx.vocab_size})


async def server_load(app: App, http: Http) -> None:
    if not app.cfg.enable_server_load_tracking:
        raise OpenAIError(404, "Not Found: GET /load (start the server with "
                          "--enable-server-load-tracking)", type="NotFoundError")
    await http.send_json(200, {"server_load": app.server_load})


def _model_card(app: App, name: str) -> dict[str, Any]:
    lora = app.lora_adapters.get(name)
    if lora is not None:   # vLLM's card: parent = the base model, root = the adapter's path
        return {"id": name, "object": "model", "created": int(app.started),
                "owned_by": "minserve", "root": lora.path,
                "parent": lora.base_model_name or app.model_name,
                "max_model_len": app.ctx.max_model_len, "permission": []}
    return {"id": name, "object": "model", "created": int(app.started), "owned_by": "minserve",
            "root": app.cfg.model_root or name, "parent": None,
            "max_model_len": app.model_max_len(name), "permission": []}


async def list_models(app: App, http: Http) -> None:
    await http.send_json(200, {"object": "list", "data": [
        _model_card(app, name) for name in app.model_names() + list(app.lora_adapters)]})


async def get_model(app: App, http: Http) -> None:
    name = http.path_params["model"]
    if name not in app.model_names() and name not in app.lora_adapters:
        raise model_not_found(name, app.model_names())
    await http.send_json(200, _model_card(app, name))


async def health(app: App, http: Http) -> None:
    ok = all(s.is_ready and s.is_healthy for s in app.services)
    await http.send_body(200 if ok else 503, b"")


async def version(app: App, http: Http) -> None:
    await http.send_json(200, {"version": __version__})


async def metrics(app: App, http: Http) -> None:
    await http.send_body(200, app.metrics.render(),
                         [(b"content-type", METRICS_CONTENT_TYPE.encode())])


async def tokenize(app: App, http: Http) -> None:
    _tokenizer(app)
    body = await http.read_json()
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    chat = None
    if "messages" in body:
        chat = await asyncio.to_thread(parse_chat, {
            **body, "max_tokens": None, "max_completion_tokens": None, "stream": False,
            "stream_options": None}, app.ctx)
        if chat.images:     # counted as the model sees them: each image's tokens expanded
            await _attach_images(app, chat)
    await http.send_json(200, await asyncio.to_thread(_tokenize, body, app.ctx, chat))


def _tokenize(body: dict[str, Any], ctx: ServingContext,
              chat: GenerateRequest | None) -> dict[str, Any]:
    if chat is not None:
        ids = chat.prompts[0]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt: must be a string", param="prompt")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise OpenAIError(400, "add_special_tokens: must be a boolean",
                              param="add_special_tokens")
        ids = encode_prompt(ctx, prompt, "prompt", add_special_tokens=add)
    # NOTE: this bounds the response too: at most max_model_len ids and token strings (a 31 MB
    # prompt once took 53 s, answered 43 MB and kept 6 GB resident).
    if len(ids) > ctx.max_model_len:
        raise OpenAIError(400, f"This model's maximum context length is {ctx.max_model_len} "
                          f"tokens. However, your request has {len(ids)} input tokens. Please "
                          "reduce the length of the input.", param="prompt")
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
            "token_strs": strs}


def _tokenizer(app: App) -> Any:
    if app.ctx.tokenizer is None:
        raise OpenAIError(400, "this server runs with --skip-tokenizer-init: it has no "
                          "tokenizer (token ids in and out only)")
    return app.ctx.tokenizer


async def detokenize(app: App, http: Http) -> None:
    _tokenizer(app)
    body = await http.read_json()
    ids = body.get("tokens") if isinstance(body, dict) else None
    vocab = app.ctx.vocab_size
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise OpenAIError(400, f"tokens: must be a list of token ids in [0, {vocab})",
                          param="tokens")
    await http.send_json(200, {"prompt": app.ctx.tokenizer.decode(ids)})


# {path pattern: {method: handler}}; a route module adds its own table (http.match_path patterns).
ROUTES: dict[str, dict[str, Handler]] = {
    **embedding_routes.ROUTES,
    **batch_routes.ROUTES,
    **lora_routes.ROUTES,
    **webui_routes.ROUTES,
    "/v1/chat/completions": {"POST": chat_completions},
    "/v1/chat/completions/batch": {"POST": chat_completions_batch},
    "/v1/completions": {"POST": completions},
    "/invocations": {"POST": invocations},
    "/tokenizer_info": {"GET": tokenizer_info},
    "/load": {"GET": server_load},
    "/v1/models": {"GET": list_models},
    "/v1/models/{model:path}": {"GET": get_model},
    "/health": {"GET": health},
    "/ping": {"GET": health, "POST": health},
    "/version": {"GET": version},
    "/metrics": {"GET": metrics},
    "/tokenize": {"POST": tokenize},
    "/detokenize": {"POST": detokenize},
    "/v1/responses": {"POST": responses.create_response},
    "/v1/responses/{id}": {"GET": responses.get_response, "DELETE": responses.delete_response},
    "/v1/responses/{id}/cancel": {"POST": responses.cancel_response},
    "/v1/messages": {"POST": messages.create_message},
    "/v1/messages/count_tokens": {"POST": messages.count_tokens},
}
EMBEDDING_ROUTES = set(embedding_routes.ROUTES)  # answered by App.embedding
# A route of another API answers errors (its own and the dispatcher's: 401, 404...) in its shape.
ERROR_SHAPES = {"/v1/messages": messages.error_body,
                "/v1/messages/count_tokens": messages.error_body}
PROTECTED = {"/tokenize", "/detokenize", "/score", "/rerank", "/v2/rerank", "/invocations",
             "/tokenizer_info"}  # and every /v1/ route
ALWAYS_OPEN = {"/health", "/ping", "/version", "/metrics", "/load",
               *webui_routes.ROUTES}  # also while loading
# what GET /load counts (vLLM's load_aware_call routes)
LOAD_AWARE = {"/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions",
              "/v1/embeddings", "/invocations"}


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def create_app(engine_config: Any, server_config: ServerConfig,
               engine_factory: Callable[[Any], Any] | None = None, embedding: Any = None,
               batches: Any = None) -> App:
    """engine_config None + an EmbeddingService: serve the embedding model alone. batches: a
    BatchService for the Batch API (/v1/files, /v1/batches)."""
    chat = None if engine_config is None and embedding is not None else \
        AsyncEngine(engine_config, engine_factory)
    return App(server_config, chat, embedding, batches)
