"""The Batch API's HTTP handlers, as the openai SDK's `files` and `batches` resources call them:
/v1/files (multipart upload, list, retrieve, content, delete) and /v1/batches (create, retrieve,
list, cancel). Every row belongs to the API key that made it (Http.owner, from the auth check);
another key gets a 404, as if it did not exist. Uploads are streamed to disk within
--max-batch-file-size and checked as JSONL."""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any
from urllib.parse import parse_qs

from minserve.batch.lines import ENDPOINTS, POOLING_ENDPOINTS
from minserve.batch.multipart import FileTooLarge, MultipartError, MultipartReader, boundary_of
from minserve.batch.service import COMPLETION_WINDOWS, UploadError, check_jsonl, known_endpoint
from minserve.batch.store import (
    DEFAULT_EXPIRES_S,
    FileInUse,
    QuotaExceeded,
    StorageFull,
    batch_object,
    file_object,
    is_full,
)
from minserve.http import Http, OpenAIError

MULTIPART_SLACK = 1 << 20        # the form's own bytes (boundaries, headers, fields)
MAX_METADATA = 16                # OpenAI's metadata limits
CONTENT_CHUNK = 1 << 20
MIN_EXPIRES_S, MAX_EXPIRES_S = 3600, 30 * 24 * 3600   # OpenAI's bounds on expires_after


async def _service(app: Any) -> Any:
    """The BatchService, its storage open (created on first use)."""
    if app.batches is None:
        raise OpenAIError(404, "the Batch API is not enabled on this server", type="NotFoundError")
    if not await app.batches.open():
        raise OpenAIError(503, f"the Batch API is unavailable: {app.batches.unavailable}")
    return app.batches


def _query(http: Any) -> dict[str, str]:
    raw = http.scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}


def _limit(query: dict[str, str], default: int, maximum: int) -> int:
    value = query.get("limit")
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise OpenAIError(400, f"limit must be an integer in [1, {maximum}]", param="limit")
    return int(value)


def _page(rows: list[dict[str, Any]], has_more: bool, to_object: Any) -> dict[str, Any]:
    data = [to_object(r) for r in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _not_found(kind: str, value: str | None, param: str) -> OpenAIError:
    return OpenAIError(404, f"No such {kind}: {value!r}", param=param, type="NotFoundError")


def _expires_s(anchor: Any, seconds: Any, param: str) -> int:
    """OpenAI's expires_after {anchor: "created_at", seconds: 3600..2592000} -> seconds; both
    absent: the 30-day default."""
    if anchor is None and seconds is None:
        return DEFAULT_EXPIRES_S
    if isinstance(seconds, str) and seconds.isdigit():   # a multipart form field
        seconds = int(seconds)
    if anchor != "created_at" or not isinstance(seconds, int) or isinstance(seconds, bool) \
            or not MIN_EXPIRES_S <= seconds <= MAX_EXPIRES_S:
        raise OpenAIError(400, f"{param} must be {{\"anchor\": \"created_at\", \"seconds\": "
                          f"N}} with N in [{MIN_EXPIRES_S}, {MAX_EXPIRES_S}]", param=param)
    return seconds


def _quota_error(e: QuotaExceeded, status: int) -> OpenAIError:
    return OpenAIError(status, f"batch storage quota exceeded: {e}", type="QuotaExceeded",
                       code="storage_quota_exceeded")


# ---------------------------------------------------------------- files
async def upload_file(app: Any, http: Http) -> None:
    service = await _service(app)
    owner = http.owner
    limit = service.limits.max_file_bytes
    declared = http.headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise OpenAIError(413, f"the file is larger than the limit of {limit} bytes "
                          "(--max-batch-file-size)")
    try:
        boundary = boundary_of(http.headers.get(b"content-type", b""))
    except MultipartError as e:
        raise OpenAIError(400, f"{e} (upload the file as a multipart form with `file` and "
                          "`purpose` fields)") from None
    store = service.store
    temp = store.temp_path()
    try:
        with open(temp, "wb") as out:
            reader = MultipartReader(boundary, "file", out, limit)
            received = 0
            while True:
                msg = await http.receive()
                if msg["type"] == "http.disconnect":
                    raise OpenAIError(400, "client disconnected")
                chunk = msg.get("body", b"")
                received += len(chunk)
                if received > limit + MULTIPART_SLACK:
                    raise FileTooLarge(f"the file is larger than the limit of {limit} bytes")
                reader.feed(chunk)
                if not msg.get("more_body", False):
                    break
            upload = reader.close()
            out.flush()
            os.fsync(out.fileno())
        purpose = upload.fields.get("purpose")
        if purpose != "batch":
            raise OpenAIError(400, f"purpose must be \"batch\" (the only purpose minserve "
                              f"stores files for), got {purpose!r}", param="purpose")
        if upload.filename is None:
            raise OpenAIError(400, "the form has no `file` field", param="file")
        expires_s = _expires_s(upload.fields.get("expires_after[anchor]"),
                               upload.fields.get("expires_after[seconds]"), "expires_after")
        num_lines = await asyncio.to_thread(check_jsonl, temp, service.limits.max_file_lines)
        filename = "".join(c for c in upload.filename if c.isprintable())[:255] or "upload.jsonl"
        row = await store.run(store.add_file, owner, "batch", filename, temp, num_lines,
                              expires_s, service.limits.quota)
    except QuotaExceeded as e:
        raise _quota_error(e, 413) from None
    except FileTooLarge as e:
        raise OpenAIError(413, f"{e} (--max-batch-file-size)", param="file") from None
    except (MultipartError, UploadError) as e:
        raise OpenAIError(400, str(e), param="file") from None
    except (OSError, StorageFull) as e:
        if isinstance(e, StorageFull) or is_full(e):
            raise OpenAIError(507, f"the batch storage is full: {e}",
                              type="InsufficientStorage") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
    await http.send_json(200, file_object(row))


async def list_files(app: Any, http: Http) -> None:
    service = await _service(app)
    query = _query(http)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise OpenAIError(400, "order must be \"asc\" or \"desc\"", param="order")
    rows, more = await service.store.run(service.store.list_files, http.owner,
                                         query.get("purpose"), _limit(query, 10_000, 10_000),
                                         order, query.get("after"))
    await http.send_json(200, _page(rows, more, file_object))


async def _own_file(app: Any, http: Http) -> dict[str, Any]:
    service = await _service(app)
    file_id = http.path_params["file_id"]
    row = await service.store.run(service.store.get_file, http.owner, file_id)
    if row is None:
        raise _not_found("file", file_id, "file_id")
    return row


async def get_file(app: Any, http: Http) -> None:
    await http.send_json(200, file_object(await _own_file(app, http)))


async def file_content(app: Any, http: Http) -> None:
    row = await _own_file(app, http)
    # opened before the response starts: a delete meanwhile cannot cut the body short
    f = open(app.batches.store.file_path(row["id"]), "rb")  # noqa: SIM115 (closed below)
    try:
        await http.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(row["bytes"]).encode())]})
        while chunk := await asyncio.to_thread(f.read, CONTENT_CHUNK):
            await http.send({"type": "http.response.body", "body": chunk, "more_body": True})
        await http.send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        f.close()


async def delete_file(app: Any, http: Http) -> None:
    service = await _service(app)
    file_id = http.path_params["file_id"]
    try:
        deleted = await service.store.run(service.store.delete_file, http.owner,
                                          file_id)
    except FileInUse as e:
        raise OpenAIError(400, f"file {file_id!r} is the input of batch {e}, which has not "
                          "finished; cancel it or wait", param="file_id") from None
    if not deleted:
        raise _not_found("file", file_id, "file_id")
    await http.send_json(200, {"id": file_id, "object": "file", "deleted": True})


# ---------------------------------------------------------------- batches
def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()):
        raise OpenAIError(400, f"metadata must be an object of at most {MAX_METADATA} string "
                          "pairs (keys up to 64 characters, values up to 512)", param="metadata")
    return value


async def create_batch(app: Any, http: Http) -> None:
    service = await _service(app)
    body = await http.read_json()
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    endpoint = body.get("endpoint")
    if not known_endpoint(endpoint):
        raise OpenAIError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}, got "
                          f"{endpoint!r}", param="endpoint")
    pooling = endpoint in POOLING_ENDPOINTS
    if pooling and app.embedding is None and not (app.pool and app.pool.names("embed")):
        raise OpenAIError(400, f"{endpoint} needs an embedding model, and this server has none "
                          "(--embedding-model or --task embed)", param="endpoint")
    if not pooling and app.chat is None and app.pool is None:   # pooled lines lease their model
        raise OpenAIError(400, f"{endpoint} needs a chat model; this server serves only an "
                          "embedding model", param="endpoint")
    window = body.get("completion_window")
    if not isinstance(window, str) or window not in COMPLETION_WINDOWS:
        raise OpenAIError(400, f"completion_window must be one of {sorted(COMPLETION_WINDOWS)}, "
                          f"got {window!r}", param="completion_window")
    metadata = _metadata(body.get("metadata"))
    expires = body.get("output_expires_after")
    if expires is not None and not isinstance(expires, dict):
        raise OpenAIError(400, "output_expires_after must be an object",
                          param="output_expires_after")
    expires_s = _expires_s((expires or {}).get("anchor"), (expires or {}).get("seconds"),
                           "output_expires_after")
    owner = http.owner
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise OpenAIError(400, "input_file_id must be a file id", param="input_file_id")
    row = await service.store.run(service.store.get_file, owner, file_id)
    if row is None:
        raise _not_found("file", file_id, "input_file_id")
    if row["purpose"] != "batch":
        raise OpenAIError(400, f"file {file_id!r} has purpose {row['purpose']!r}; a batch "
                          "reads a file uploaded with purpose \"batch\"", param="input_file_id")
    try:
        batch = await service.create(owner, file_id, endpoint, window, metadata, expires_s)
    except QuotaExceeded as e:
        raise _quota_error(e, 400) from None
    except StorageFull as e:
        raise OpenAIError(507, f"the batch storage is full: {e}",
                          type="InsufficientStorage") from None
    await http.send_json(200, batch_object(batch))


async def get_batch(app: Any, http: Http) -> None:
    service = await _service(app)
    batch_id = http.path_params["batch_id"]
    row = await service.store.run(service.store.get_batch, http.owner, batch_id)
    if row is None:
        raise _not_found("batch", batch_id, "batch_id")
    await http.send_json(200, batch_object(row))


async def list_batches(app: Any, http: Http) -> None:
    service = await _service(app)
    query = _query(http)
    rows, more = await service.store.run(service.store.list_batches, http.owner,
                                         _limit(query, 20, 100), query.get("after"))
    await http.send_json(200, _page(rows, more, batch_object))


async def cancel_batch(app: Any, http: Http) -> None:
    service = await _service(app)
    batch_id = http.path_params["batch_id"]
    row = await service.cancel(http.owner, batch_id)
    if row is None:
        raise _not_found("batch", batch_id, "batch_id")
    if row["status"] not in ("cancelling", "cancelled"):
        raise OpenAIError(400, f"batch {batch_id!r} is {row['status']}: only a validating or "
                          "in-progress batch can be cancelled", param="batch_id")
    await http.send_json(200, batch_object(row))


ROUTES = {
    "/v1/files": {"POST": upload_file, "GET": list_files},
    "/v1/files/{file_id}": {"GET": get_file, "DELETE": delete_file},
    "/v1/files/{file_id}/content": {"GET": file_content},
    "/v1/batches": {"POST": create_batch, "GET": list_batches},
    "/v1/batches/{batch_id}": {"GET": get_batch},
    "/v1/batches/{batch_id}/cancel": {"POST": cancel_batch},
}
