"""OpenAI's Responses API on the chat path: POST /v1/responses (input items -> chat messages and
fields for parse_chat; the generation's blocks back as output items and semantic SSE events), a
bounded store for previous_response_id and GET/DELETE /v1/responses/{id}, and background runs
with POST /v1/responses/{id}/cancel. Parsing, sampling and generation are the chat route's."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from minserve.blocks import Block, BlockWriter, parse
from minserve.http import OpenAIError, run_unless
from minserve.request_fields import bad as _bad

logger = logging.getLogger("minserve.responses")

# Request fields read as the chat route reads them (vLLM's extra sampling fields included).
PASSED = ("model", "temperature", "top_p", "user", "parallel_tool_calls", "seed", "top_k", "min_p",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "ignore_eos",
          "min_tokens", "structured_outputs")
RENAMES = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _text(content: Any, where: str) -> str:
    """A content string, or a list of text parts joined (the models served are text-only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype in _TEXT_PARTS and isinstance(part.get("text", part.get("refusal")), str):
            texts.append(part.get("text", part.get("refusal")))
        elif ptype in ("input_image", "input_file", "input_audio"):
            raise _bad(f"{where}[{j}]", f"{ptype} parts are not supported: this model is "
                       "text-only")
        else:
            raise _bad(f"{where}[{j}]", 'must be a {"type": "input_text", "text": ...} part')
    return "\n".join(texts)


def _input_items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise _bad("input", "must be a string or a list of input items")
    return value


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items (and earlier responses' output items) -> chat messages. Function calls join
    the assistant message before them; reasoning items are not replayed (as chat templates do)."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        p, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{p}.role", f"must be user, assistant, system or developer, got "
                           f"{role!r}")
            out.append({"role": role, "content": _text(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            args = item.get("arguments")
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name")) or \
                    not isinstance(args, str):
                raise _bad(p, "a function_call needs call_id, name and arguments (strings)")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": args}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{p}.call_id", "must be a string")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text(item.get("output"), f"{p}.output")})
        elif kind != "reasoning":
            raise _bad(f"{p}.type", f"input items of type {kind!r} are not supported (message, "
                       "function_call, function_call_output and reasoning are)")
    return out


def _tools(body: dict[str, Any]) -> tuple[list[dict] | None, Any]:
    """Function tools and tool_choice in the chat route's shapes. Built-in tools are OpenAI's."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise _bad("tools", "must be a list of tool objects")
    chat_tools = []
    for i, t in enumerate(tools or []):
        if t.get("type") != "function":
            raise _bad(f"tools[{i}].type", f"{t.get('type')!r} tools are not supported: only "
                       "function tools (built-in tools such as web_search, file_search, "
                       "code_interpreter, computer_use and mcp are not available here)")
        if not isinstance(t.get("name"), str):
            raise _bad(f"tools[{i}].name", "must be a string")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        chat_tools.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _bad("tool_choice", f"{choice.get('type')!r} is not supported: use \"auto\", "
                       "\"none\", \"required\" or {\"type\": \"function\", \"name\": ...}")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return chat_tools or None, choice


def _text_format(body: dict[str, Any]) -> tuple[dict | None, dict]:
    """text.format -> (response_format for the chat route, what the response echoes)."""
    text = body.get("text")
    if text is None:
        return None, {"type": "text"}
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or not isinstance(fmt, (dict, type(None))):
        raise _bad("text", 'must be an object like {"format": {"type": "json_schema", ...}}')
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None, {"type": "text"}
    if kind == "json_object":
        return {"type": "json_object"}, fmt
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema", "must be a JSON schema object")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}, {"name": "response", **fmt}
    raise _bad("text.format.type", f"must be text, json_object or json_schema, got {kind!r}")


def _reasoning(body: dict[str, Any]) -> str | None:
    r = body.get("reasoning")
    if r is None:
        return None
    if not isinstance(r, dict):
        raise _bad("reasoning", 'must be an object like {"effort": "low"}')
    effort = r.get("effort")
    if effort not in (None, "none", "minimal", "low", "medium", "high", "xhigh"):
        raise _bad("reasoning.effort", f"must be none, minimal, low, medium or high, got "
                   f"{effort!r}")
    return effort


def _check(body: Any) -> None:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    for name in ("stream", "background", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise _bad(name, "must be a boolean")
    for name in ("instructions", "previous_response_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise _bad(name, "must be a string")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(v, str) for v in meta.values())):
        raise _bad("metadata", "must be an object of at most 16 string values")
    if body.get("input") is None:
        raise _bad("input", "is required")
    if body.get("conversation") is not None:
        raise _bad("conversation", "is not supported: use previous_response_id")
    if body.get("background") and body.get("store") is False:
        raise _bad("background", "needs store=true")


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]
              ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """-> (the chat request, the conversation's items so far, fields the response echoes)."""
    items = history + _input_items(body["input"])
    messages = to_messages(items)
    if body.get("instructions") is not None:  # not carried on: each request sends its own
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    chat = {k: body[k] for k in PASSED if k in body}
    chat.update(messages=messages, max_tokens=body.get("max_output_tokens"))
    chat["tools"], chat["tool_choice"] = _tools(body)
    chat["response_format"], fmt = _text_format(body)
    effort = _reasoning(body)
    if effort is not None:  # templates that know it read reasoning_effort; Qwen3 enable_thinking
        chat["chat_template_kwargs"] = {"reasoning_effort": effort,
                                        **({"enable_thinking": False} if effort == "none" else {})}
    echo = {"tools": [{"type": "function", "description": None, "parameters": None,
                       "strict": None, **t["function"]} for t in chat["tools"] or []],
            "tool_choice": body.get("tool_choice") or "auto", "text": {"format": fmt},
            "reasoning": {"effort": effort, "summary": None}}
    return {k: v for k, v in chat.items() if v is not None}, items, echo


# ---------------------------------------------------------------- the store
@dataclass
class Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]        # the conversation's input items (instructions aside)
    owner: str = ""                    # Http.owner of the key that created it
    task: asyncio.Future | None = None  # background: the run
    cancel: asyncio.Event | None = None


class ResponseStore:
    """The last `max_size` stored responses, oldest evicted first (an evicted background run is
    cancelled). Each is its creator's, as batch files are: an evicted or unknown id, or one
    another API key created, is the same 404."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._records: OrderedDict[str, Stored] = OrderedDict()

    def get(self, response_id: str | None, owner: str, param: str | None = None) -> Stored:
        record = self._records.get(response_id or "")
        if record is None or record.owner != owner:
            raise OpenAIError(404, f"Response with id '{response_id}' not found.", param=param,
                              type="NotFoundError")
        return record

    def put(self, record: Stored) -> None:
        self._records[record.response["id"]] = record
        while len(self._records) > self.max_size:
            _, old = self._records.popitem(last=False)
            if old.cancel is not None:
                old.cancel.set()

    def pop(self, response_id: str, owner: str) -> Stored:
        record = self.get(response_id, owner)
        del self._records[response_id]
        if record.cancel is not None:
            record.cancel.set()
        return record


# ---------------------------------------------------------------- chat output -> a response
class ResponseWriter(BlockWriter):
    """Builds the response object from the chat output and, for a streaming client, sends the
    semantic events in OpenAI's order, each with its sequence_number."""

    def __init__(self, response: dict[str, Any], client: Any, stream: bool,
                 tokenizer: Any) -> None:
        super().__init__(client, stream)
        self.response, self.tokenizer = response, tokenizer
        self.num_events = 0
        self.ids: list[str] = []   # the output items' ids

    async def emit(self, kind: str, **fields: Any) -> None:
        await self.send_event(kind, sequence_number=self.num_events, **fields)
        self.num_events += 1

    async def open(self) -> None:
        if not self.opened:
            await self.open_stream()
            await self.emit("response.created", response=self.response)

    async def start(self) -> None:
        await self.open()
        self.response["status"] = "in_progress"
        await self.emit("response.in_progress", response=self.response)

    def item(self, b: Block, status: str) -> dict[str, Any]:
        rid = self.ids[b.index]
        if b.kind == "tool_call":
            return {"id": rid, "type": "function_call", "call_id": b.call_id, "name": b.name,
                    "arguments": b.text, "status": status}
        if b.kind == "reasoning":
            return {"id": rid, "type": "reasoning", "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": b.text}]}
        return {"id": rid, "type": "message", "role": "assistant", "status": status,
                "content": [self.part(b)] if b.text or status != "in_progress" else []}

    @staticmethod
    def part(b: Block) -> dict[str, Any]:
        if b.kind == "reasoning":
            return {"type": "reasoning_text", "text": b.text}
        return {"type": "output_text", "text": b.text, "annotations": [], "logprobs": []}

    async def open_block(self, b: Block) -> None:
        prefix = {"tool_call": "fc", "reasoning": "rs", "text": "msg"}[b.kind]
        self.ids.append(f"{prefix}_{uuid.uuid4().hex}")
        item = self.item(b, "in_progress")
        self.response["output"].append(item)
        await self.emit("response.output_item.added", output_index=b.index, item=item)
        if b.kind != "tool_call":
            await self.emit("response.content_part.added", item_id=item["id"],
                            output_index=b.index, content_index=0, part=self.part(Block(b.kind, 0)))

    async def delta(self, b: Block, text: str) -> None:
        at = {"item_id": self.ids[b.index], "output_index": b.index}
        self.response["output"][b.index] = self.item(b, "in_progress")
        if b.kind == "tool_call":
            await self.emit("response.function_call_arguments.delta", **at, delta=text)
        elif b.kind == "reasoning":
            await self.emit("response.reasoning_text.delta", **at, content_index=0, delta=text)
        else:
            await self.emit("response.output_text.delta", **at, content_index=0, delta=text,
                            logprobs=[])

    async def close_block(self, b: Block) -> None:
        item = self.item(b, "incomplete" if self.finish_reason == "length" else "completed")
        self.response["output"][b.index] = item
        at = {"item_id": item["id"], "output_index": b.index}
        if b.kind == "tool_call":
            await self.emit("response.function_call_arguments.done", **at, name=b.name,
                            arguments=b.text)
        else:
            if b.kind == "reasoning":
                await self.emit("response.reasoning_text.done", **at, content_index=0,
                                text=b.text)
            else:
                await self.emit("response.output_text.done", **at, content_index=0, text=b.text,
                                logprobs=[])
            await self.emit("response.content_part.done", **at, content_index=0,
                            part=self.part(b))
        await self.emit("response.output_item.done", output_index=b.index, item=item)

    async def finish(self) -> None:
        r, u = self.response, self.usage
        reasoning = "".join(b.text for b in self.blocks if b.kind == "reasoning")
        r["usage"] = {
            "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": len(self.tokenizer.encode(
                reasoning, add_special_tokens=False)) if reasoning else 0}}
        r["completed_at"] = int(time.time())
        if self.finish_reason == "length":
            r["status"], r["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        else:
            r["status"] = "completed"
        await self.emit(f"response.{r['status']}", response=r)
        await self.close(200, r)

    async def fail(self, status: int, error: dict[str, Any]) -> None:
        message = error.get("message") or "the request failed"
        r = self.response
        r["status"] = "failed"
        r["error"] = {"code": "server_error" if status >= 500 else "invalid_prompt",
                      "message": message}
        if self.opened:
            await self.emit("error", code=r["error"]["code"], message=message,
                            param=error.get("param"))
            await self.emit("response.failed", response=r)
        await self.close(status, {"error": {"message": message, "type": error.get("type"),
                                            "param": error.get("param"), "code": status}})


# ---------------------------------------------------------------- route handlers
def _new_response(body: dict[str, Any], req: Any, echo: dict[str, Any]) -> dict[str, Any]:
    p = req.params
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
            "created_at": int(time.time()),
            "status": "queued" if body.get("background") else "in_progress",
            "background": bool(body.get("background")), "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "model": req.model, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "store": body.get("store", True), "temperature": p.temperature, "top_p": p.top_p,
            "truncation": "disabled", "usage": None, "user": body.get("user"), **echo}


async def create_response(app: Any, http: Any) -> None:
    body = await http.read_json()
    _check(body)
    store = app.responses
    prev = None
    if body.get("previous_response_id") is not None:
        prev = store.get(body["previous_response_id"], http.owner, "previous_response_id")
        if prev.response["status"] in ("queued", "in_progress"):
            raise _bad("previous_response_id", "that response is still in progress")
    history = prev.items + prev.response["output"] if prev else []
    chat, items, echo = chat_body(body, history)
    async with contextlib.AsyncExitStack() as held:
        # a pooled model loads on demand and stays leased until the run ends (a background
        # run takes the lease with it)
        serving = await held.enter_async_context(app.serving_for(body))
        await _create(body, http, store, serving, await parse(serving, chat, RENAMES),
                      items, echo, held)


async def _create(body: dict[str, Any], http: Any, store: ResponseStore, serving: Any, req: Any,
                  items: list[dict[str, Any]], echo: dict[str, Any],
                  held: contextlib.AsyncExitStack) -> None:
    response = _new_response(body, req, echo)
    record = Stored(response, items, http.owner) if response["store"] else None
    stream, background = bool(body.get("stream")), response["background"]
    # a background run's client has its answer at once: the writer sends it nothing more
    writer = ResponseWriter(response, None if background and not stream else http, stream,
                            serving.ctx.tokenizer)
    if record is not None:
        store.put(record)
    if not background:
        await http.watched(writer.run(serving, req))
        if not (writer.done or writer.failed):   # the client went away: the run was aborted
            response["status"] = "cancelled"
        return
    record.cancel = cancel = asyncio.Event()
    if stream:
        await writer.open()
    else:
        await http.send_json(200, response)
    record.task = task = asyncio.ensure_future(
        _background(serving, req, writer, cancel, held.pop_all()))
    if stream:  # the events go out as the run makes them; a client that leaves does not stop it
        gone = asyncio.ensure_future(http.wait_disconnect())
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        writer.client = None


async def _background(serving: Any, req: Any, writer: ResponseWriter,
                      cancel: asyncio.Event, lease: contextlib.AsyncExitStack) -> None:
    """The run goes on without its client (the writer holds it, if any) until done or
    cancelled; the model's lease is released when it ends."""
    try:
        async with lease:
            await run_unless(writer.run(serving, req), cancel.wait())
    except Exception as e:  # noqa: BLE001 - a run nobody awaits must still end as "failed"
        logger.exception("background response %s failed", writer.response["id"])
        await writer.error(500, {"message": f"internal server error: {type(e).__name__}: {e}"})
    if not (writer.done or writer.failed):
        writer.response["status"] = "cancelled"
        await writer.close(200, writer.response)


async def get_response(app: Any, http: Any) -> None:
    if parse_qs(http.scope.get("query_string", b"").decode("latin-1")).get("stream") == ["true"]:
        raise _bad("stream", "streaming a stored response again is not supported")
    await http.send_json(200, app.responses.get(http.path_params["id"], http.owner).response)


async def delete_response(app: Any, http: Any) -> None:
    rid = http.path_params["id"]
    app.responses.pop(rid, http.owner)
    await http.send_json(200, {"id": rid, "object": "response", "deleted": True})


async def cancel_response(app: Any, http: Any) -> None:
    record = app.responses.get(http.path_params["id"], http.owner)
    if record.task is None:
        raise OpenAIError(400, "Only responses created with background=true can be cancelled.")
    record.cancel.set()
    await asyncio.shield(record.task)
    await http.send_json(200, record.response)
