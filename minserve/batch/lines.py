"""The OpenAI batch line format, shared by run-batch and the online Batch API: one input line ->
BatchLine (the {"custom_id", "method", "url", "body"} envelope checked; a bad line carries its
error instead of failing the run), and the output lines ({"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}). No I/O."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

# What a line may call: the app's own POST routes (never /v1/files or /v1/batches themselves).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score",
             "/v1/rerank")
POOLING_ENDPOINTS = ("/v1/embeddings", "/v1/score", "/v1/rerank")  # the embedding model answers
ALIASES = {"/score": "/v1/score", "/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank"}
MAX_CUSTOM_ID_CHARS = 512


@dataclass(slots=True)
class BatchLine:
    """One request of a batch. index: 0-based among the file's non-blank lines (the order of the
    output); line_no: 1-based line of the file (what errors name)."""
    index: int
    line_no: int
    custom_id: str | None
    url: str | None = None
    body: dict[str, Any] | None = None   # the request body, as its route answers it
    error: dict[str, Any] | None = None   # {"code", "message", "param", "line"}: never runs


def _bad(index: int, line_no: int, custom_id: Any, code: str, message: str,
         param: str | None = None) -> BatchLine:
    cid = custom_id if isinstance(custom_id, str) else None
    return BatchLine(index, line_no, cid, error={"code": code, "message": message,
                                                 "param": param, "line": line_no})


def parse_line(raw: bytes, index: int, line_no: int, endpoint: str | None = None) -> BatchLine:
    """A raw JSONL line -> BatchLine. endpoint: the batch's (online: every url must equal it);
    None accepts any of ENDPOINTS (run-batch mixes them)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return _bad(index, line_no, None, "invalid_json", f"line {line_no} is not JSON: {e}")
    if not isinstance(obj, dict):
        return _bad(index, line_no, None, "invalid_request",
                    f"line {line_no} must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS:
        return _bad(index, line_no, cid, "invalid_request", f"line {line_no}: custom_id must be "
                    f"a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters",
                    "custom_id")
    if obj.get("method") != "POST":
        return _bad(index, line_no, cid, "invalid_request",
                    f"line {line_no}: method must be \"POST\", got {obj.get('method')!r}",
                    "method")
    url = obj.get("url")
    url = ALIASES.get(url, url) if isinstance(url, str) else url
    if endpoint is not None and url != endpoint:
        return _bad(index, line_no, cid, "invalid_request", f"line {line_no}: url {url!r} is "
                    f"not the batch's endpoint {endpoint!r}", "url")
    if url not in ENDPOINTS:
        return _bad(index, line_no, cid, "invalid_request", f"line {line_no}: url {url!r} is "
                    f"not supported (one of {', '.join(ENDPOINTS)})", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _bad(index, line_no, cid, "invalid_request",
                    f"line {line_no}: body must be a JSON object", "body")
    if body.get("stream") is True:
        return _bad(index, line_no, cid, "invalid_request",
                    f"line {line_no}: streaming is not supported in a batch", "body.stream")
    return BatchLine(index, line_no, cid, url, body)


def iter_lines(chunks: Any, endpoint: str | None = None):
    """Raw lines (an iterable of bytes lines, e.g. a binary file) -> BatchLines; blank lines
    are skipped but still counted in line numbers."""
    index = 0
    for line_no, raw in enumerate(chunks, start=1):
        if not raw.strip():
            continue
        yield parse_line(raw, index, line_no, endpoint)
        index += 1


def new_request_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def output_line(custom_id: str | None, status: int, body: Any) -> dict[str, Any]:
    """A request the route answered (2xx or a 4xx error object): the response as HTTP had it."""
    rid = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    return {"id": new_request_line_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": rid or f"req_{uuid.uuid4().hex}",
                         "body": body},
            "error": None}


def error_line(custom_id: str | None, error: dict[str, Any]) -> dict[str, Any]:
    """A request that never got a response (bad line, cancelled, expired)."""
    return {"id": new_request_line_id(), "custom_id": custom_id, "response": None,
            "error": {k: v for k, v in error.items() if v is not None}}


def is_success(line: dict[str, Any]) -> bool:
    response = line.get("response")
    return response is not None and 200 <= response["status_code"] < 300


def line_usage(line: dict[str, Any]) -> tuple[int, int, int]:
    """(input, output, cached) tokens of one output line, for the batch's usage."""
    body = (line.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    return (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
            int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0)
