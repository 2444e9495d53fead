"""Anthropic's Messages API on the chat path: POST /v1/messages (system, content blocks, tools,
thinking -> a chat request for parse_chat; the generation's blocks back as content blocks and
Anthropic's stream events) and POST /v1/messages/count_tokens, with errors in Anthropic's shape.
Parsing, sampling and generation are the chat route's."""
from __future__ import annotations

import json
import uuid
from typing import Any

from minserve.blocks import Block, BlockWriter, parse
from minserve.http import OpenAIError
from minserve.request_fields import bad as _bad

# Request fields read as the chat route reads them (vLLM's extra sampling fields included).
PASSED = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "min_p",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos",
          "min_tokens", "structured_outputs")
RENAMES = {"stop": "stop_sequences", "response_format": "output_config.format"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
               529: "overloaded_error"}


def error_body(err: OpenAIError) -> dict[str, Any]:
    """Anthropic's error object, for every status a /v1/messages route answers."""
    return _error(err.status, err.message)


def _error(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _block_text(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text" and isinstance(block.get("text"), str):
        return block["text"]
    if kind in ("image", "document"):
        raise _bad(where, f"{kind} blocks are not supported: this model is text-only")
    raise _bad(where, 'must be a {"type": "text", "text": ...} block')


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined (the models served are text-only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of text blocks")
    return "\n".join(_block_text(b, f"{where}[{j}]") for j, b in enumerate(content))


def _message(m: Any, p: str) -> list[dict[str, Any]]:
    """One Anthropic message -> chat messages: tool_result blocks become tool messages (before
    the rest of the user's text), tool_use blocks the assistant's tool_calls; thinking blocks
    are not replayed (as chat templates do)."""
    role = m.get("role") if isinstance(m, dict) else None
    if role not in ("user", "assistant"):
        raise _bad(f"{p}.role", f"must be user or assistant, got {role!r}")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{p}.content", "must be a string or a list of content blocks")
    out, texts, calls = [], [], []
    for j, block in enumerate(content):
        kind, where = block.get("type") if isinstance(block, dict) else None, f"{p}.content[{j}]"
        if kind == "tool_use" and role == "assistant":
            if not all(isinstance(block.get(k), str) for k in ("id", "name")) or \
                    not isinstance(block.get("input", {}), dict):
                raise _bad(where, "a tool_use block needs id, name (strings) and input (object)")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad(f"{where}.tool_use_id", "must be a string")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "content": _text(block.get("content", ""), f"{where}.content")})
        elif kind not in ("thinking", "redacted_thinking") or role != "assistant":
            texts.append(_block_text(block, where))
    if texts or calls or not out:
        msg: dict[str, Any] = {"role": role, "content": "\n".join(texts) if texts else
                               (None if calls else "")}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _tools(body: dict[str, Any], chat: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _bad("tools", "must be a list of tool objects")
        for i, t in enumerate(tools):
            if t.get("type") not in (None, "custom"):
                raise _bad(f"tools[{i}].type", f"{t['type']!r} is not supported: only custom "
                           "tools (name, description, input_schema); Anthropic's server tools "
                           "(web search, code execution, bash, text editor, computer use) are "
                           "not available here")
            if not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
                raise _bad(f"tools[{i}]", "needs a name (string) and an input_schema (object)")
        chat["tools"] = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t["input_schema"]}} for t in tools] or None
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad("tool_choice", 'must be {"type": "auto" | "any" | "tool" | "none"}')
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise _bad("tool_choice.name", "must be a string")
    chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {
        "type": "function", "function": {"name": choice["name"]}}
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


def _options(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """thinking, output_config (format, effort) and metadata."""
    kwargs = {}
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled", "adaptive"):
            raise _bad("thinking", 'must be {"type": "enabled", "budget_tokens": N} or '
                       '{"type": "disabled"}')
        kwargs["enable_thinking"] = kind != "disabled"
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise _bad("output_config", "must be an object")
        fmt = config.get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or \
                    not isinstance(fmt.get("schema"), dict):
                raise _bad("output_config.format", 'must be {"type": "json_schema", "schema": '
                           "{...}}")
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt["schema"]}}
        if config.get("effort") is not None:
            kwargs["reasoning_effort"] = config["effort"]
    if kwargs:
        chat["chat_template_kwargs"] = kwargs
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise _bad("metadata", "must be an object")
        if meta.get("user_id") is not None:
            chat["user"] = meta["user_id"]


def chat_body(body: Any, count_only: bool = False) -> dict[str, Any]:
    """An Anthropic request -> the chat route's request. A final assistant message is a prefill:
    the answer continues it (continue_final_message)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    if not count_only and body.get("max_tokens") is None:
        raise _bad("max_tokens", "Field required")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _bad("stream", "must be a boolean")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list of messages")
    messages = [] if body.get("system") is None else [
        {"role": "system", "content": _text(body["system"], "system")}]
    for i, m in enumerate(msgs):
        messages += _message(m, f"messages[{i}]")
    chat = {k: body[k] for k in PASSED if k in body and not (count_only and k == "max_tokens")}
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str)
                                                                    for x in stop)):
        raise _bad("stop_sequences", "must be a list of strings")
    chat.update(messages=messages, stop=stop)
    last = messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        chat["continue_final_message"] = True
    _tools(body, chat)
    _options(body, chat)
    return {k: v for k, v in chat.items() if v is not None}


# ---------------------------------------------------------------- chat output -> a message
class MessageWriter(BlockWriter):
    """Builds the message from the chat output and, for a streaming client, sends Anthropic's
    events: message_start, ping, content_block_start/delta/stop, message_delta, message_stop."""

    def __init__(self, message: dict[str, Any], client: Any, stream: bool) -> None:
        super().__init__(client, stream)
        self.message = message

    async def start(self) -> None:
        await self.open_stream()
        await self.send_event("message_start", message=self.message)
        await self.send_event("ping")

    @staticmethod
    def block(b: Block, whole: bool) -> dict[str, Any]:
        text = b.text if whole else ""
        if b.kind == "reasoning":
            return {"type": "thinking", "thinking": text, "signature": ""}
        if b.kind == "text":
            return {"type": "text", "text": text}
        args = _loads(b.text) if whole else {}
        return {"type": "tool_use", "id": b.call_id, "name": b.name,
                "input": args if isinstance(args, dict) else {}}

    async def open_block(self, b: Block) -> None:
        await self.send_event("content_block_start", index=b.index,
                              content_block=self.block(b, False))

    async def delta(self, b: Block, text: str) -> None:
        delta = {"reasoning": {"type": "thinking_delta", "thinking": text},
                 "text": {"type": "text_delta", "text": text},
                 "tool_call": {"type": "input_json_delta", "partial_json": text}}[b.kind]
        await self.send_event("content_block_delta", index=b.index, delta=delta)

    async def close_block(self, b: Block) -> None:
        await self.send_event("content_block_stop", index=b.index)

    async def finish(self) -> None:
        m, u = self.message, self.usage
        if self.finish_reason == "length":
            m["stop_reason"] = "max_tokens"
        elif self.has_tool_calls:
            m["stop_reason"] = "tool_use"
        elif isinstance(self.stop_reason, str):
            m["stop_reason"], m["stop_sequence"] = "stop_sequence", self.stop_reason
        else:
            m["stop_reason"] = "end_turn"
        # Anthropic's input_tokens leave out the tokens read from the (prefix) cache.
        m["usage"] = {"input_tokens": u.prompt_tokens - u.cached_tokens,
                      "output_tokens": u.completion_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": u.cached_tokens}
        m["content"] = [self.block(b, True) for b in self.blocks]
        await self.send_event("message_delta", delta={"stop_reason": m["stop_reason"],
                                                "stop_sequence": m["stop_sequence"]},
                        usage=m["usage"])
        await self.send_event("message_stop")
        await self.close(200, m)

    async def fail(self, status: int, error: dict[str, Any]) -> None:
        body = _error(status, error.get("message") or "the request failed")
        await self.send_event("error", error=body["error"])
        await self.close(status, body)


def _loads(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}


# ---------------------------------------------------------------- route handlers
async def create_message(app: Any, http: Any) -> None:
    body = await http.read_json()
    chat = chat_body(body)
    async with app.serving_for(body) as serving:    # a pooled model loads on demand
        req = await parse(serving, chat, RENAMES)
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                   "model": req.model, "content": [], "stop_reason": None,
                   "stop_sequence": None,
                   "usage": {"input_tokens": len(req.prompts[0]), "output_tokens": 0}}
        writer = MessageWriter(message, http, bool(body.get("stream")))
        await http.watched(writer.run(serving, req))


async def count_tokens(app: Any, http: Any) -> None:
    raw = await http.read_json()
    body = chat_body(raw, count_only=True)
    async with app.serving_for(raw) as serving:
        req = await parse(serving, body, RENAMES)
    await http.send_json(200, {"input_tokens": len(req.prompts[0])})
