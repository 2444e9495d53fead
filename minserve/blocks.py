"""The generation's events folded into output blocks (reasoning, text, tool calls), for the APIs
that answer in blocks (Responses, Anthropic Messages): their bodies become a chat request
(parse), and BlockWriter.run drives serving.generate and calls its subclass's block callbacks,
which speak the API's own wire format to its client. No torch, no engine calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minserve.http import OpenAIError
from minserve.output import Delta, Usage
from minserve.protocol import GenerateRequest


@dataclass(slots=True)
class Block:
    kind: str          # "reasoning" | "text" | "tool_call"
    index: int         # position in the output
    text: str = ""     # the text, or a tool call's arguments (JSON text)
    name: str = ""     # tool_call: the function's name
    call_id: str = ""  # tool_call: "call_..."


async def parse(serving: Any, chat_body: dict[str, Any], renames: dict[str, str]
                ) -> GenerateRequest:
    """Another API's body, translated to a chat request, through the chat route's parsing. It
    is always streamed inside (the parsers split each delta); each API decides what its client
    sees. Errors name the caller's own field where it has another name (`renames`: chat ->
    API)."""
    try:
        return await serving.parse("chat", {**chat_body, "stream": True})
    except OpenAIError as e:
        param = (e.param or "").split("[")[0].split(".")[0]
        if param in renames:
            new = renames[param] + e.param[len(param):]
            e.message = e.message.replace(e.param, new, 1) if e.message.startswith(e.param) \
                else e.message
            e.param = new
        raise


class BlockWriter:
    """Base of an API's writer. run() turns the events into block callbacks; subclasses turn
    those into their own events, sent on `client` (the client's exchange, an http.Http; None: no
    client)."""

    def __init__(self, client: Any, stream: bool) -> None:
        self.client, self.stream = client, stream
        self.opened = False        # the client's event stream started
        self.blocks: list[Block] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.usage = Usage(0, 0, 0)
        self.done = False          # the output ended (not an error, not an abort)
        self.failed = False

    # ---- what subclasses implement
    async def start(self) -> None:
        """The request is on the engine (before the first token)."""

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

    # ---- events -> blocks
    @property
    def has_tool_calls(self) -> bool:
        return any(b.kind == "tool_call" for b in self.blocks)

    async def run(self, serving: Any, req: GenerateRequest) -> None:
        """Generate req (from parse()) and write its blocks; a refusal (busy, too long) or an
        engine failure becomes fail()."""
        try:
            with serving.generate(req) as gen:
                await self.start()
                async for ev in gen:
                    if type(ev) is Usage:
                        self.usage = ev
                    else:
                        await self._feed(ev)
        except OpenAIError as e:
            return await self.error(e.status, e.to_dict()["error"])
        await self._end()

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

    async def _feed(self, d: Delta) -> None:   # one choice: these APIs have no n
        if d.reasoning:
            await self._append("reasoning", d.reasoning)
        if d.text:
            await self._append("text", d.text)
        for call in d.tool_calls or []:
            fn = call.get("function") or {}
            if "id" in call:
                await self._append("tool_call", fn.get("arguments") or "",
                                   name=fn.get("name") or "", call_id=call["id"])
            elif fn.get("arguments"):
                await self._append("tool_call", fn["arguments"])
        if d.finished:
            self.finish_reason, self.stop_reason = d.choice.api_finish_reason, d.choice.stop_reason

    async def _end(self) -> None:
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
