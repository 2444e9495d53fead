"""BatchService: the online Batch API's engine room. Uploads are checked JSONL; a batch goes
validating -> in_progress -> finalizing -> completed (or failed / cancelling -> cancelled /
expired), each step persisted in the store before it happens, so a server stopped at any point,
SIGKILL included, picks every unfinished batch up again at its next start: lines whose results are
recorded are not run again, and none is lost. Lines run through runner.py at batch priority."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson

from minserve.batch.lines import (
    ENDPOINTS,
    BatchLine,
    error_line,
    is_success,
    iter_lines,
    line_usage,
)
from minserve.batch.runner import BATCH_PRIORITY, LineRunner
from minserve.batch.store import BatchStore, Quota, StorageFull, StorageLocked, is_full

logger = logging.getLogger("minserve.batch")
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_REPORTED_ERRORS = 100          # validation errors listed in a failed batch


class UploadError(ValueError):
    """An uploaded file that is not valid batch JSONL (a 400)."""


@dataclass
class BatchLimits:
    max_file_bytes: int = 200 * 1024 * 1024      # OpenAI's limits
    max_file_lines: int = 50_000
    max_in_flight: int = 512                     # lines running at once, all batches together
    # file bytes stored (uploads and batch outputs): the defaults keep a small disk usable
    max_storage_per_key_bytes: int = 1 << 30
    max_storage_bytes: int = 2 << 30

    @property
    def quota(self) -> Quota:
        return Quota(self.max_storage_per_key_bytes, self.max_storage_bytes)


def check_jsonl(path: str, max_lines: int) -> int:
    """Every non-blank line a JSON object (UTF-8), at most max_lines -> the line count."""
    num_lines = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            num_lines += 1
            if num_lines > max_lines:
                raise UploadError(f"the file has more than {max_lines} lines (the per-file "
                                  "line limit, --max-batch-file-lines)")
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise UploadError(f"line {line_no} is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise UploadError(f"line {line_no} is not a JSON object")
    if num_lines == 0:
        raise UploadError("the file holds no requests")
    return num_lines


def validate_lines(path: str, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """The validating step: every line's envelope, and custom_ids unique -> (num lines, errors
    as OpenAI lists them: {code, message, param, line})."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    num_lines = 0
    with open(path, "rb") as f:
        for line in iter_lines(f, endpoint):
            num_lines += 1
            err = line.error
            if err is None and line.custom_id in seen:
                err = {"code": "duplicate_custom_id", "param": "custom_id", "line": line.line_no,
                       "message": f"line {line.line_no}: custom_id {line.custom_id!r} is used "
                                  "by an earlier line; each must be unique"}
            if err is not None:
                errors.append(err)
            seen.add(line.custom_id)
    return num_lines, errors


class BatchService:
    """service = BatchService(folder, limits); await service.start(app) (resumes unfinished
    batches); create()/cancel(); await service.shutdown() stops the lines in flight (they run
    again at the next start). The folder is created on first use (await service.open()), so a
    server that never sees a batch leaves nothing on disk."""

    def __init__(self, root: str, limits: BatchLimits | None = None) -> None:
        self.store = BatchStore(root)
        self.limits = limits or BatchLimits()
        self.app: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._runners: dict[str, LineRunner] = {}
        self._cancelled: set[str] = set()
        self._stopping = False
        self._open_lock: asyncio.Lock | None = None
        self.unavailable: str | None = None     # why the storage cannot be used, if it cannot

    # ---- lifecycle
    async def start(self, app: Any) -> None:
        self.app = app
        self._slots = asyncio.Semaphore(self.limits.max_in_flight)
        self._open_lock = asyncio.Lock()
        if self.store.exists():    # batches from an earlier run may wait there
            await self.open()

    async def open(self) -> bool:
        """Open the storage (once) and resume its unfinished batches; False (and
        self.unavailable says why) when another process holds it or it cannot be created."""
        async with self._open_lock:
            if self.store.is_open:
                return True
            if self.unavailable is None:
                try:
                    await self.store.run(self.store.open)
                except (StorageLocked, OSError) as e:
                    self.unavailable = str(e)
                    logger.error("the Batch API is unavailable: %s", e)
                    return False
                for batch_id in await self.store.run(self.store.unfinished_batches):
                    logger.info("resuming batch %s", batch_id)
                    self._spawn(batch_id)
            return self.store.is_open

    async def shutdown(self) -> None:
        self._stopping = True
        for runner in self._runners.values():
            runner.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.run(self.store.close)
        await asyncio.get_running_loop().run_in_executor(None, self.store.shutdown)

    def _spawn(self, batch_id: str) -> None:
        task = asyncio.ensure_future(self._drive(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    # ---- API
    async def create(self, owner: str, input_file_id: str, endpoint: str,
                     completion_window: str, metadata: dict[str, str] | None,
                     output_expires_s: int) -> dict[str, Any]:
        batch = await self.store.run(self.store.create_batch, owner, input_file_id, endpoint,
                                     completion_window, metadata,
                                     COMPLETION_WINDOWS[completion_window], output_expires_s,
                                     self.limits.quota)
        self._spawn(batch["id"])
        return batch

    async def cancel(self, owner: str, batch_id: str) -> dict[str, Any] | None:
        """-> the batch (cancelling, or as it was when already past cancelling), None if it is
        not this owner's."""
        batch = await self.store.run(self.store.get_batch, owner, batch_id)
        if batch is None or batch["status"] not in ("validating", "in_progress"):
            return batch
        batch = await self.store.run(self.store.set_status, batch_id, "cancelling")
        self._cancelled.add(batch_id)
        runner = self._runners.get(batch_id)
        if runner is not None:
            runner.stop()
        if batch_id not in self._tasks and not self._stopping:
            self._spawn(batch_id)
        return batch

    # ---- one batch, from wherever it stands
    async def _drive(self, batch_id: str) -> None:
        store = self.store
        try:
            batch = await store.run(store.get_batch, None, batch_id)
            if batch["status"] == "validating":
                batch = await self._validate(batch)
            if batch["status"] == "in_progress":
                outcome = await self._run_lines(batch)
                if outcome is None:
                    return      # the server is stopping or cannot answer: resume next start
                batch = await store.run(store.set_status, batch_id, outcome)
            if batch["status"] in ("finalizing", "cancelling"):
                await self._finalize(batch)
        except StorageFull as e:
            await self._fail(batch_id, "storage_full", f"the batch storage is full: {e}")
        except Exception as e:  # noqa: BLE001 - a bug of ours fails this batch, not the server
            logger.exception("batch %s failed", batch_id)
            await self._fail(batch_id, "internal_error", f"{type(e).__name__}: {e}")

    async def _fail(self, batch_id: str, code: str, message: str) -> None:
        errors = {"object": "list", "data": [{"code": code, "message": message, "param": None,
                                              "line": None}]}
        try:
            await self.store.run(self.store.set_status, batch_id, "failed", errors=errors)
        except Exception:  # noqa: BLE001 - the disk may be too full even for this
            logger.exception("could not mark batch %s failed", batch_id)

    async def _validate(self, batch: dict[str, Any]) -> dict[str, Any]:
        path = self.store.file_path(batch["input_file_id"])
        num_lines, errors = await asyncio.to_thread(validate_lines, path, batch["endpoint"])
        store = self.store
        if errors:
            data = [{"object": "batch_error", **e} for e in errors[:MAX_REPORTED_ERRORS]]
            return await store.run(store.set_status, batch["id"], "failed", total=num_lines,
                                   errors={"object": "list", "data": data})
        if batch["id"] in self._cancelled:
            return await store.run(store.set_status, batch["id"], "cancelling", total=num_lines)
        return await store.run(store.set_status, batch["id"], "in_progress", total=num_lines)

    async def _wait_ready(self, endpoint: str) -> bool:
        services = self.app.answering(endpoint)
        while not all(s.is_ready for s in services):
            if not all(s.is_healthy for s in services) or self._stopping:
                return False
            await asyncio.sleep(0.1)
        return all(s.is_healthy for s in services)

    async def _run_lines(self, batch: dict[str, Any]) -> str | None:
        """-> the next status: "finalizing" (every line answered, or the batch expired) or
        "cancelling"; None: stopped short (the server is stopping, or cannot answer now)."""
        batch_id, store = batch["id"], self.store
        if not await self._wait_ready(batch["endpoint"]):
            return None
        done = await store.run(store.done_lines, batch_id)
        runner = LineRunner(self.app, self.limits.max_in_flight, BATCH_PRIORITY, self._slots)
        self._runners[batch_id] = runner
        if batch_id in self._cancelled:   # cancelled while it waited for the model
            runner.stop()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            runner.stop()

        timer = asyncio.get_running_loop().call_later(
            max(0.0, batch["expires_at"] - time.time()), expire)

        async def on_result(line: BatchLine, out: dict[str, Any]) -> None:
            await store.run(store.put_result, batch_id, line.index, is_success(out),
                            orjson.dumps(out), line_usage(out))

        try:
            with open(store.file_path(batch["input_file_id"]), "rb") as f:
                todo = (line for line in iter_lines(f, batch["endpoint"])
                        if line.index not in done)
                await runner.run(todo, on_result)
        finally:
            timer.cancel()
            self._runners.pop(batch_id, None)
        if batch_id in self._cancelled:
            return "cancelling"
        if expired:
            return "finalizing"     # _finalize sees the unrun lines: "expired"
        if self._stopping or runner.not_answered:
            return None
        done = await store.run(store.done_lines, batch_id)
        return "finalizing" if len(done) >= batch["total"] else None

    async def _finalize(self, batch: dict[str, Any]) -> None:
        """Write the output file (2xx responses) and the error file (the rest; lines a cancel
        or the expiry left unrun get a batch_cancelled / batch_expired error), in input order,
        then adopt both and set the final status in one transaction."""
        if batch["status"] == "cancelling":
            final = "cancelled"
        else:
            done = await self.store.run(self.store.done_lines, batch["id"])
            final = "completed" if len(done) >= batch["total"] else "expired"
        outputs = await self.store.run(self._write_outputs, batch, final)
        await self.store.run(self.store.finish_batch, batch["id"], final, outputs)
        self._cancelled.discard(batch["id"])

    def _write_outputs(self, batch: dict[str, Any], final: str) -> dict[str, tuple[str, int]]:
        """On the store's thread (it reads the results)."""
        store = self.store
        results = store.iter_results(batch["id"])
        nxt = next(results, None)
        paths = {"output_file_id": store.temp_path(), "error_file_id": store.temp_path()}
        counts = dict.fromkeys(paths, 0)
        missing = {"cancelled": ("batch_cancelled", "the batch was cancelled before this "
                                 "request ran"),
                   "expired": ("batch_expired", "the batch expired before this request ran"),
                   }.get(final, ("not_run", "this request did not run"))
        try:
            with open(store.file_path(batch["input_file_id"]), "rb") as src, \
                    open(paths["output_file_id"], "wb") as ok_out, \
                    open(paths["error_file_id"], "wb") as err_out:
                for line in iter_lines(src, batch["endpoint"]):
                    if nxt is not None and nxt[0] == line.index:
                        _, ok, data = nxt
                        nxt = next(results, None)
                    else:
                        ok, data = False, orjson.dumps(error_line(
                            line.custom_id, {"code": missing[0], "message": missing[1],
                                             "line": line.line_no}))
                    (ok_out if ok else err_out).write(data + b"\n")
                    counts["output_file_id" if ok else "error_file_id"] += 1
                for f in (ok_out, err_out):
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            for path in paths.values():
                with contextlib.suppress(OSError):
                    os.remove(path)
            if is_full(e):
                raise StorageFull(str(e)) from e
            raise
        out = {}
        for column, path in paths.items():
            if counts[column]:
                out[column] = (path, counts[column])
            else:
                os.remove(path)
        return out


def known_endpoint(endpoint: Any) -> bool:
    return isinstance(endpoint, str) and endpoint in ENDPOINTS
