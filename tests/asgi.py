"""A small in-test ASGI driver: calls app(scope, receive, send) directly and records every
message, so SSE framing and client disconnects can be tested (httpx's ASGITransport buffers)."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)   # body pieces in the order sent
    closed: bool = False                                 # saw more_body=False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[Any]:
        """SSE `data:` payloads, parsed ("[DONE]" kept as the string)."""
        out = []
        for frame in self.body.decode().split("\n\n"):
            if frame.startswith("data: "):
                data = frame[len("data: "):]
                out.append(data if data == "[DONE]" else orjson.loads(data))
        return out

    def named_events(self) -> list[tuple[str | None, Any]]:
        """SSE frames as (event name, parsed data), for the APIs that name their events."""
        out = []
        for frame in self.body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
            if "data" in fields:
                out.append((fields.get("event"), orjson.loads(fields["data"])))
        return out


async def call(app: Any, method: str, path: str, json: Any = None, *, body: bytes | None = None,
               headers: dict[str, str] | list[tuple[str, str]] | None = None,
               disconnect_after: int | None = None, chunked: bool = False) -> Result:
    """disconnect_after=k: the client goes away once k body chunks arrived. headers as a list
    of pairs may repeat a name."""
    if body is None:
        body = b"" if json is None else orjson.dumps(json)
    hdrs = {"content-type": "application/json"} if json is not None else {}
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    hdrs.update(pairs if isinstance(headers, dict) else {})
    pairs = list(hdrs.items()) + ([] if isinstance(headers, dict) else pairs)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in pairs]}
    res, gone = Result(), asyncio.Event()
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)] if chunked else [body]

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            res.status = msg["status"]
            res.headers = {k.decode(): v.decode() for k, v in msg.get("headers", [])}
        elif msg["type"] == "http.response.body" and not gone.is_set():
            res.chunks.append(msg.get("body", b""))
            res.closed = not msg.get("more_body", False)
            if disconnect_after is not None and len(res.chunks) >= disconnect_after:
                gone.set()

    await app(scope, receive, send)
    gone.set()
    return res


@contextlib.asynccontextmanager
async def lifespan(app: Any, wait_ready: bool = True):
    """Run the app's lifespan (startup ... shutdown) around the block."""
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                     inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    if wait_ready:
        for service in app.services:
            await service.wait_ready(timeout=120)
    try:
        yield app
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 60)
