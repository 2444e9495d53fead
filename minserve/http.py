"""HTTP plumbing for the route modules (server.py, embeddings/routes.py, ...): OpenAIError, the
exchange (Http: body with a size limit, JSON and error responses, SSE framing, the disconnect
watcher) and path matching for the route tables. Knows no model and no route; imports nothing
of minserve, so every route module imports it downward."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]
T = TypeVar("T")
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 415: "BadRequestError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class OpenAIError(ValueError):
    """A user-facing error: `status` and the {"error": {...}} body that goes with it. A
    ValueError, as LLM raises it: the offline API refuses input in the routes' words."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, code: str | int | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []    # extra response headers (a 503's Retry-After)
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "BadRequestError")
        self.code = code if code is not None else status

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def model_not_found(model: str, served: list[str]) -> OpenAIError:
    """The 404 for a model this server does not serve: vLLM's sentence, then what is served."""
    shown = model if len(model) <= 100 else model[:100] + "…"
    names = ", ".join(f"`{n}`" for n in served) or "none"
    return OpenAIError(404, f"The model `{shown}` does not exist. This server serves {names} "
                       "(the names come from --served-model-name; by default the model "
                       "argument).", param="model", type="NotFoundError")


def owner_of(api_key: str | None) -> str:
    """Whose a stored thing is (a batch file, a batch, a stored response): never the key itself,
    and "" when the server has no key. NOTE: the batch store's rows are keyed by it on disk."""
    if not api_key:
        return ""
    return hashlib.sha256(b"minserve batch owner\0" + api_key.encode()).hexdigest()


@dataclass
class Http:
    """One HTTP exchange as the handlers see it. send() tracks whether the response started
    (errors can then no longer be a status) and adds `extra_headers` (CORS) to the start."""
    scope: Scope
    receive: Receive
    raw_send: Send
    path: str
    headers: dict[bytes, bytes]
    max_body_bytes: int
    extra_headers: Headers = field(default_factory=list)
    path_params: dict[str, str] = field(default_factory=dict)
    started: bool = False
    sse: bool = False       # the response is an event stream: a late error becomes an event
    # The route's error shape (another API's routes set their own; OpenAI's by default).
    error_body: Callable[[OpenAIError], Any] = OpenAIError.to_dict
    head_only: bool = False  # HEAD: answered as GET, its headers kept, without the body
    api_key: str | None = None   # the key that passed auth (None: the server has none)

    @property
    def owner(self) -> str:
        """The owner of what this exchange stores or reads (owner_of its API key)."""
        return owner_of(self.api_key)

    async def send(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            self.started = True
            self.sse = SSE_HEADERS[0] in msg.get("headers", ())
            if self.extra_headers:
                msg = {**msg, "headers": list(msg.get("headers", [])) + self.extra_headers}
        elif self.head_only:
            msg = {**msg, "body": b""}
        await self.raw_send(msg)

    # ---- the request
    async def read_body(self) -> bytes:
        """The whole body, refused with 413 past max_body_bytes (declared or received)."""
        limit = self.max_body_bytes
        declared = self.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise OpenAIError(413, f"request body is larger than the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                raise OpenAIError(400, "client disconnected")
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                raise OpenAIError(413, f"request body is larger than the limit of {limit} bytes")
            chunks.append(body)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def read_json(self) -> Any:
        ctype = self.headers.get(b"content-type")
        if ctype is not None and b"json" not in ctype.lower():
            raise OpenAIError(415, f"Content-Type must be application/json, got "
                              f"{ctype.decode('latin-1')!r}")
        body = await self.read_body()
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise OpenAIError(400, f"invalid JSON body: {e}") from None
        return exact_big_ints(body, obj)

    async def wait_disconnect(self) -> None:
        """Returns when the client goes away: under granian, send() after a disconnect does not
        raise, so only receive() tells."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def watched(self, work: Awaitable[Any]) -> None:
        """Run work (the response) until it ends or the client goes away, whichever is first."""
        await run_unless(work, self.wait_disconnect())

    # ---- whole responses
    async def send_body(self, status: int, body: bytes, headers: Headers = ()) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": [
            *headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def send_json(self, status: int, obj: Any, headers: Headers = ()) -> None:
        await self.send_body(status, orjson.dumps(obj), [*JSON_HEADERS, *headers])

    async def send_error(self, err: OpenAIError) -> None:
        """An error as a status when nothing was sent yet; inside an open event stream as one
        error event and the end of the stream; otherwise the body just ends."""
        if not self.started:
            extra = [(b"www-authenticate", b"Bearer")] if err.status == 401 else []
            extra += err.headers
            return await self.send_json(err.status, self.error_body(err), extra)
        if self.sse:
            await self.send_event(self.error_body(err))
            await self.end_events()
        else:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    # ---- server-sent events
    async def start_events(self) -> None:
        """Headers go out before the first event, so clients see the stream open at once."""
        await self.send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def send_event(self, obj: Any, event: str | None = None) -> None:
        head = b"event: " + event.encode() + b"\n" if event else b""
        await self.send({"type": "http.response.body", "more_body": True,
                         "body": head + b"data: " + orjson.dumps(obj) + b"\n\n"})

    async def end_events(self, done: bool = True) -> None:
        """OpenAI streams end with `data: [DONE]`; done=False ends without it."""
        await self.send({"type": "http.response.body", "more_body": False,
                         "body": b"data: [DONE]\n\n" if done else b""})


def exact_big_ints(body: bytes, obj: Any) -> Any:
    """orjson reads an integer past 64 bits as a rounded float; a body with such a number among
    its top-level fields (seed, say) is read again with the json module, whose integers are
    exact, so the 400 shows the number as sent. orjson has checked the body already."""
    if not isinstance(obj, dict) or not any(type(v) is float and abs(v) >= 2**63
                                            for v in obj.values()):
        return obj
    try:
        again = json.loads(body)
    except (ValueError, RecursionError):  # over int's digit limit, or nested too deep
        return obj
    return again if isinstance(again, dict) else obj


async def run_unless(work: Awaitable[T], gone: Awaitable[Any]) -> T | None:
    """work's result, or None when `gone` (a disconnect, a cancel) comes first: work is then
    cancelled, and its finally blocks abort what it started. work's errors are raised."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(gone)
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        watcher.cancel()
        task.cancel()


def match_path(pattern: str, path: str) -> dict[str, str] | None:
    """"/v1/models/{model:path}" against a path -> {"model": ...}, or None. `{name}` matches one
    non-empty segment, `{name:path}` the non-empty rest (model ids may hold slashes)."""
    want, got = pattern.split("/"), path.split("/")
    params: dict[str, str] = {}
    for i, part in enumerate(want):
        if part.startswith("{") and part.endswith("}"):
            name, _, kind = part[1:-1].partition(":")
            value = "/".join(got[i:]) if kind == "path" else (got[i] if i < len(got) else "")
            if not value:
                return None
            params[name] = value
            if kind == "path":
                return params
        elif i >= len(got) or got[i] != part:
            return None
    return params if len(got) == len(want) else None


def find_route(routes: dict[str, dict[str, Any]], path: str
               ) -> tuple[dict[str, Any], dict[str, str]] | None:
    """A route table {pattern: {method: handler}} -> (its methods, path params) for `path`."""
    if path in routes:
        return routes[path], {}
    for pattern, methods in routes.items():
        if "{" in pattern and (params := match_path(pattern, path)) is not None:
            return methods, params
    return None
