"""What every /v1/responses and /v1/messages answer must be: each body and each stream event
valid for the official SDKs' own typed models (pydantic validation, stricter than the SDKs'
lenient construct), events in the documented order, and the streamed pieces adding up to the
final object (accumulated by the SDKs' own stream state machines)."""
from __future__ import annotations

import re
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai import NOT_GIVEN
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)
MESSAGE_EVENT = TypeAdapter(RawMessageStreamEvent)

# One token per event; an item's events carry its kind (m message, r reasoning, f function call).
_OPEN_ITEM = (r"(added:m part_added (text_delta )*|added:r part_added (reasoning_delta )*|"
              r"added:f (args_delta )*)")
_RESPONSE_ORDER = re.compile(
    r"created (queued )?in_progress "
    r"((added:m part_added (text_delta )*text_done part_done |added:r part_added "
    r"(reasoning_delta )*reasoning_done part_done |added:f (args_delta )*args_done )item_done )*"
    rf"((completed|incomplete) |{_OPEN_ITEM}?error failed )$")
_TOKENS = {"response.created": "created", "response.queued": "queued",
           "response.in_progress": "in_progress", "response.content_part.added": "part_added",
           "response.content_part.done": "part_done", "response.output_text.delta": "text_delta",
           "response.output_text.done": "text_done", "response.reasoning_text.delta":
           "reasoning_delta", "response.reasoning_text.done": "reasoning_done",
           "response.function_call_arguments.delta": "args_delta",
           "response.function_call_arguments.done": "args_done",
           "response.output_item.done": "item_done", "response.completed": "completed",
           "response.incomplete": "incomplete", "error": "error", "response.failed": "failed"}
_KIND = {"message": "m", "reasoning": "r", "function_call": "f"}


def response_body(body: Any) -> Response:
    return Response.model_validate(body)


def response_events(named: list[tuple[str | None, Any]]) -> tuple[Response, list[str]]:
    """-> (the last lifecycle event's response, the event types). Checks names, sequence numbers,
    the order, the indexes, and that the SDK's ResponseStreamState accumulates the final output."""
    tokens, types = [], []
    state = ResponseStreamState(input_tools=[], text_format=NOT_GIVEN)
    final = None
    for i, (name, ev) in enumerate(named):
        parsed = RESPONSE_EVENT.validate_python(ev)
        assert name == ev["type"] and ev["sequence_number"] == i, (name, ev)
        types.append(ev["type"])
        kind = _KIND[ev["item"]["type"]] if ev["type"] == "response.output_item.added" else ""
        tokens.append(f"added:{kind}" if kind else _TOKENS[ev["type"]])
        state.handle_event(parsed)
        if "response" in ev:
            final = response_body(ev["response"])
    assert _RESPONSE_ORDER.match(" ".join(tokens) + " "), tokens
    added = [ev["output_index"] for _, ev in named if ev["type"] == "response.output_item.added"]
    assert added == list(range(len(added)))
    snapshot = state._ResponseStreamState__current_snapshot
    if types[-1] in ("response.completed", "response.incomplete"):
        for got, want in zip(snapshot.output, final.output, strict=True):
            assert _item_text(got) == _item_text(want), (got, want)
    return final, types


def _item_text(item: Any) -> str:
    if item.type == "function_call":
        return item.name + item.arguments
    if item.type == "message":
        return "".join(c.text for c in item.content)
    return ""  # reasoning: the SDK's state keeps the item as it was added


_MESSAGE_ORDER = re.compile(
    r"message_start (ping )?(content_block_start (content_block_delta )*content_block_stop )*"
    r"(message_delta message_stop |(content_block_start (content_block_delta )*)?error )$")


def message_body(body: Any) -> Message:
    return Message.model_validate(body)


def message_events(named: list[tuple[str | None, Any]]) -> tuple[Message | None, list[str]]:
    """-> (the message the SDK's accumulate_event builds, the event types). Checks names, the
    order and the block indexes."""
    snapshot, bufs, types = None, {}, []
    for name, ev in named:
        assert name == ev["type"], (name, ev)
        types.append(ev["type"])
        if ev["type"] in ("ping", "error"):
            continue
        event = MESSAGE_EVENT.validate_python(ev)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    assert _MESSAGE_ORDER.match(" ".join(types) + " "), types
    starts = [ev["index"] for _, ev in named if ev["type"] == "content_block_start"]
    assert starts == list(range(len(starts)))
    if snapshot is not None:
        message_body(snapshot.to_dict())
    return snapshot, types
