"""Runs another API's request (Responses, Anthropic Messages) as a chat request through the chat
route's own path (App.generate: engine, parsers, usage, metrics, disconnect aborts) and reads its
output back as blocks (reasoning, text, tool calls) for that API's translator. Inside, the chat
request is always streamed; each API decides what its client sees. No torch, no engine calls."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from minserve.engine.async_engine import EngineError
from minserve.http import Http, OpenAIError
from minserve.protocol import GenerateRequest, parse_chat


@dataclass(slots=True)
class Block:
    kind: str          # "reasoning" | "text" | "tool_call"
    index: int         # position in the output
    text: str = ""     # the text, or a tool call's arguments (JSON text)
    name: str = ""     # tool_call: the function's name
    call_id: str = ""  # tool_call: "call_..."


class ChatReader:
    """Base of an API's translator. The chat chunks come in through feed(); subclasses turn the
    block callbacks into their own events, sent on `client` (the client's exchange, an
    http.Http; None: no client)."""

    def __init__(self, client: Any, stream: bool) -> None:
        self.client, self.stream = client, stream
        self.opened = False        # the client's event stream started
        self.blocks: list[Block] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False          # [DONE] came after a finish (not an error, not an abort)
        self.failed = False

    # ---- what subclasses implement
    async def start(self) -> None:
        """The chat stream opened (before the first token)."""

    async def open_block(self, block: Block) -> None: ...

    async def delta(self, block: Block, text: str) -> None: ...

    async def close_block(self, block: Block) -> None: ...

    async def finish(self) -> None:
        """After the last block closed; finish_reason, stop_reason and usage are known."""

    async def fail(self, status: int, error: dict[str, Any]) -> None:
        """error is OpenAI's {"message", "type", "param", "code"}."""

    # ---- the client's answer
    async def open_stream(self) -> None:
        if self.stream and not self.opened and self.client is not None:
            self.opened = True
            await self.client.start_events()

    async def send_event(self, kind: str, **fields: Any) -> None:
        """One named SSE event (`event: kind`), its data {"type": kind, **fields}."""
        if self.opened and self.client is not None:
            await self.client.send_event({"type": kind, **fields}, event=kind)

    async def close(self, status: int, body: dict[str, Any]) -> None:
        """The answer ends: the event stream, or the whole body (or error) for a client that
        waits for it."""
        client, self.client = self.client, None
        if client is None:
            return
        if self.opened:
            await client.end_events(done=False)
        else:
            await client.send_json(status, body)

    # ---- chat chunks -> blocks
    @property
    def has_tool_calls(self) -> bool:
        return any(b.kind == "tool_call" for b in self.blocks)

    async def _append(self, kind: str, text: str, **call: str) -> None:
        cur = self.blocks[-1] if self.blocks else None
        if cur is None or cur.kind != kind or call:
            if cur is not None:
                await self.close_block(cur)
            cur = Block(kind, len(self.blocks), **call)
            self.blocks.append(cur)
            await self.open_block(cur)
        if text:
            cur.text += text
            await self.delta(cur, text)

    async def feed(self, chunk: dict[str, Any]) -> None:
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk["choices"]:  # one: these APIs have no n
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                await self._append("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                await self._append("text", delta["content"])
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if "id" in call:
                    await self._append("tool_call", fn.get("arguments") or "",
                                       name=fn.get("name") or "", call_id=call["id"])
                elif fn.get("arguments"):
                    await self._append("tool_call", fn["arguments"])
            if choice.get("finish_reason"):
                self.finish_reason, self.stop_reason = choice["finish_reason"], \
                    choice.get("stop_reason")

    async def end(self) -> None:
        if self.failed or self.finish_reason is None:
            return
        if not self.blocks:  # an empty answer is still one (empty) text block
            await self._append("text", "")
        await self.close_block(self.blocks[-1])
        self.done = True
        await self.finish()

    async def error(self, status: int, error: Any) -> None:
        if not self.failed:
            self.failed = True
            err = error if isinstance(error, dict) else {"message": str(error)}
            await self.fail(status, err)


async def parse(app: Any, chat_body: dict[str, Any], renames: dict[str, str]) -> GenerateRequest:
    """The translated body through parse_chat (in a worker thread, as the chat route does).
    Errors name the caller's own field where it has another name (`renames`: chat -> API)."""
    app.check_chat_model(chat_body)
    try:
        return await asyncio.to_thread(parse_chat, chat_body, app.ctx)
    except OpenAIError as e:
        param = (e.param or "").split("[")[0].split(".")[0]
        if param in renames:
            new = renames[param] + e.param[len(param):]
            e.message = e.message.replace(e.param, new, 1) if e.message.startswith(e.param) \
                else e.message
            e.param = new
        raise


async def run(app: Any, http: Any, req: GenerateRequest, reader: ChatReader) -> None:
    """Generate `req` (parsed with stream and include_usage on) through App.generate, on an
    exchange whose send() reads what the chat path sends: its chunks become feed()/end(), an error
    event or a raised OpenAIError becomes error(). `http` itself (its receive(), watched for a
    disconnect) is the client's; the reader answers the client."""
    buf = b""

    async def send(msg: dict[str, Any]) -> None:
        nonlocal buf
        if msg["type"] == "http.response.start":
            return await reader.start()   # the chat path opens its (event) stream
        *frames, buf = (buf + msg.get("body", b"")).split(b"\n\n")
        for frame in frames:
            data = frame[len(b"data: "):]
            if data == b"[DONE]":
                await reader.end()
                continue
            obj = orjson.loads(data)
            if "error" in obj:
                await reader.error(obj["error"].get("code") or 500, obj["error"])
            else:
                await reader.feed(obj)

    req.stream = req.include_usage = True
    req.prompt_tokens_details = True   # both APIs report cached prompt tokens in their usage
    try:
        await app.generate(Http(http.scope, http.receive, send, http.path, http.headers,
                                http.max_body_bytes), req)
    except (OpenAIError, EngineError) as e:  # refused (busy, too long) or the engine failed
        err = e if isinstance(e, OpenAIError) else OpenAIError(e.status, e.message)
        await reader.error(err.status, err.to_dict()["error"])
