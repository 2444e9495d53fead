"""Batch API state: SQLite (the standard library's sqlite3, WAL mode) for files, batches and
per-line results, plus a folder of file contents under --batch-storage-path. Every id is random
(128 bits) and made here, so no path is ever built from user input; every lookup is scoped to its
owner (a hash of the API key). Files count against a per-owner and a total byte quota, and expire
(OpenAI's expires_after; 30 days by default) unless an unfinished batch still reads them. One
thread owns the connection (run() hops onto it); each write is one transaction, so a SIGKILL
leaves either a line's result and its counters, or neither."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
FILE_ID = re.compile(r"file-[0-9a-f]{32}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    num_lines INTEGER NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    status TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, errors TEXT, created_at INTEGER NOT NULL,
    expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0, output_expires_s INTEGER);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, ok INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)) WITHOUT ROWID;
"""
# columns added after the first release: a database made before them gets them at open
_ADDED_COLUMNS = (("files", "expires_at", "INTEGER"), ("batches", "output_expires_s", "INTEGER"))
DEFAULT_EXPIRES_S = 30 * 24 * 3600     # OpenAI's default for purpose=batch files
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")


class StorageFull(Exception):
    """The disk (or the database) is full: the operation wrote nothing."""


class FileInUse(Exception):
    """A file an unfinished batch still reads."""


class StorageLocked(RuntimeError):
    """Another process holds this storage folder."""


class QuotaExceeded(Exception):
    """Storing this would pass the owner's or the total quota: nothing was written."""


@dataclass(frozen=True)
class Quota:
    """Bytes of file content the store may hold: per owner (API key) and in all."""
    max_bytes_per_owner: int
    max_bytes: int


def is_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, sqlite3.OperationalError) and (
        getattr(e, "sqlite_errorname", "") == "SQLITE_FULL" or "is full" in str(e))


class BatchStore:
    """store = BatchStore(folder); await store.run(store.create_batch, ...). Methods are
    synchronous and must run on the store's thread: call them through run()."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.files_dir = os.path.join(root, "files")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="minserve-batch-store")
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # ---- lifecycle (on the store's thread)
    @property
    def db_path(self) -> str:
        return os.path.join(self.root, "batches.sqlite3")

    def exists(self) -> bool:
        return os.path.exists(self.db_path)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def open(self) -> None:
        os.makedirs(self.files_dir, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StorageLocked(f"{self.root} is in use by another minserve process (one "
                                "--batch-storage-path per server)") from None
        conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (the WAL is in the
        # OS); only a power loss may drop the last commits, never corrupt the database.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        conn.row_factory = sqlite3.Row
        for table, column, kind in _ADDED_COLUMNS:
            if column not in {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self._conn = conn
        self._remove_orphans()
        self.expire_files()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)

    def _remove_orphans(self) -> None:
        """Content written but never committed (a kill between the rename and the commit), and
        half-written temporary files."""
        known = {r["id"] for r in self._conn.execute("SELECT id FROM files")}
        for name in os.listdir(self.files_dir):
            if name not in known:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.files_dir, name))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:   # SQLite rolls back by itself on some errors (a full disk)
                conn.execute("ROLLBACK")
            if is_full(e):
                raise StorageFull(str(e)) from e
            raise

    # ---- file contents
    def temp_path(self) -> str:
        """A fresh path in the files folder for content being written (removed if orphaned)."""
        return os.path.join(self.files_dir, f".tmp-{secrets.token_hex(16)}")

    def file_path(self, file_id: str) -> str:
        """Only for ids this store made (FILE_ID), read back from its own rows."""
        if not FILE_ID.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return os.path.join(self.files_dir, file_id)

    # ---- quota and expiry
    def usage(self, owner: str) -> tuple[int, int]:
        """(bytes the owner's files hold, bytes all files hold)."""
        mine, total = self._conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN owner = ? THEN bytes END), 0), "
            "COALESCE(SUM(bytes), 0) FROM files", (owner,)).fetchone()
        return mine, total

    def check_quota(self, owner: str, quota: Quota, adding: int = 0) -> None:
        """QuotaExceeded naming the limit unless `adding` more bytes fit (adding 0: unless
        the owner and the store are still below their limits)."""
        self.expire_files()
        mine, total = self.usage(owner)
        for used, limit, whose, flag in (
                (mine, quota.max_bytes_per_owner, "this API key's", "--max-batch-storage-per-key"),
                (total, quota.max_bytes, "the server's", "--max-batch-storage")):
            if used + adding > limit or (adding == 0 and used >= limit):
                need = f"another {adding} bytes do not fit: " if adding else ""
                raise QuotaExceeded(
                    f"{need}{whose} batch storage holds {used} of its {limit} bytes ({flag}); "
                    "delete files (DELETE /v1/files/{file_id}) or wait for them to expire")

    def expire_files(self) -> int:
        """Delete the files past their expires_at that no unfinished batch reads -> how many."""
        rows = self._conn.execute(
            f"SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? AND id NOT IN "
            f"(SELECT input_file_id FROM batches WHERE status IN "
            f"({', '.join('?' * len(UNFINISHED))}))", (int(time.time()), *UNFINISHED)).fetchall()
        for row in rows:
            with self._tx() as conn:
                conn.execute("DELETE FROM files WHERE id = ?", (row["id"],))
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file_path(row["id"]))
        return len(rows)

    # ---- files
    def add_file(self, owner: str, purpose: str, filename: str, temp_path: str,
                 num_lines: int, expires_s: int, quota: Quota) -> dict[str, Any]:
        """Adopt temp_path (complete and flushed) as a new file, expiring expires_s after now
        (QuotaExceeded: it does not fit)."""
        file_id = f"file-{secrets.token_hex(16)}"
        size = os.path.getsize(temp_path)
        self.check_quota(owner, quota, size)
        os.replace(temp_path, self.file_path(file_id))
        now = int(time.time())
        try:
            with self._tx() as conn:
                conn.execute("INSERT INTO files (id, owner, purpose, filename, bytes, num_lines, "
                             "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (file_id, owner, purpose, filename, size, num_lines, now,
                              now + expires_s))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(self.file_path(file_id))
            raise
        return self.get_file(owner, file_id)

    def get_file(self, owner: str, file_id: str) -> dict[str, Any] | None:
        if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
            return None
        row = self._conn.execute("SELECT * FROM files WHERE id = ? AND owner = ?",
                                 (file_id, owner)).fetchone()
        if row is None or (row["expires_at"] is not None and row["expires_at"] <= time.time()):
            return None      # expired: gone, even before the next sweep removes it
        return dict(row)

    def list_files(self, owner: str, purpose: str | None, limit: int, order: str,
                   after: str | None) -> tuple[list[dict[str, Any]], bool]:
        sql = "SELECT * FROM files WHERE owner = ? AND (expires_at IS NULL OR expires_at > ?)"
        args = [owner, int(time.time())]
        if purpose is not None:
            sql, args = sql + " AND purpose = ?", [*args, purpose]
        return self._page("files", sql, args, limit, order, after, owner)

    def delete_file(self, owner: str, file_id: str) -> bool:
        if self.get_file(owner, file_id) is None:
            return False
        busy = self._conn.execute(
            f"SELECT id FROM batches WHERE input_file_id = ? AND status IN "
            f"({', '.join('?' * len(UNFINISHED))})", (file_id, *UNFINISHED)).fetchone()
        if busy is not None:
            raise FileInUse(busy["id"])
        with self._tx() as conn:
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.file_path(file_id))
        return True

    def _page(self, table: str, sql: str, args: list[Any], limit: int, order: str,
              after: str | None, owner: str) -> tuple[list[dict[str, Any]], bool]:
        """Cursor pagination as OpenAI's lists: `after` is the last id of the previous page."""
        desc = order != "asc"
        if after is not None:
            row = self._conn.execute(f"SELECT seq FROM {table} WHERE id = ? AND owner = ?",
                                     (after, owner)).fetchone()
            if row is None:
                return [], False
            sql, args = sql + (" AND seq < ?" if desc else " AND seq > ?"), [*args, row["seq"]]
        sql += f" ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?"
        rows = [dict(r) for r in self._conn.execute(sql, [*args, limit + 1])]
        return rows[:limit], len(rows) > limit

    # ---- batches
    def create_batch(self, owner: str, input_file_id: str, endpoint: str,
                     completion_window: str, metadata: dict[str, str] | None,
                     window_s: int, output_expires_s: int, quota: Quota) -> dict[str, Any]:
        """QuotaExceeded when the owner's files (or all) already fill their quota: the output
        would not fit."""
        self.check_quota(owner, quota)
        batch_id = f"batch_{secrets.token_hex(16)}"
        now = int(time.time())
        with self._tx() as conn:
            conn.execute("INSERT INTO batches (id, owner, status, endpoint, input_file_id, "
                         "completion_window, metadata, created_at, expires_at, "
                         "output_expires_s) VALUES (?, ?, 'validating', ?, ?, ?, ?, ?, ?, ?)",
                         (batch_id, owner, endpoint, input_file_id, completion_window,
                          None if metadata is None else json.dumps(metadata), now,
                          now + window_s, output_expires_s))
        return self.get_batch(owner, batch_id)

    def get_batch(self, owner: str | None, batch_id: str) -> dict[str, Any] | None:
        """owner None: the service's own lookups (resume)."""
        if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
            return None
        row = self._conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return dict(row)

    def list_batches(self, owner: str, limit: int, after: str | None
                     ) -> tuple[list[dict[str, Any]], bool]:
        return self._page("batches", "SELECT * FROM batches WHERE owner = ?", [owner], limit,
                          "desc", after, owner)

    def unfinished_batches(self) -> list[str]:
        return [r["id"] for r in self._conn.execute(
            f"SELECT id FROM batches WHERE status IN ({', '.join('?' * len(UNFINISHED))}) "
            "ORDER BY seq", UNFINISHED)]

    def set_status(self, batch_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Move a batch on; a `<status>_at` column gets the time (once), `errors` is JSON."""
        now = int(time.time())
        values: dict[str, Any] = {"status": status, **fields}
        if f"{status}_at" in _TIMES:
            values[f"{status}_at"] = now
        if "errors" in values:
            values["errors"] = json.dumps(values["errors"])
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as conn:
            conn.execute(f"UPDATE batches SET {cols} WHERE id = ?",
                         (*values.values(), batch_id))
        return self.get_batch(None, batch_id)

    # ---- per-line results
    def put_result(self, batch_id: str, line: int, ok: bool, data: bytes,
                   usage: tuple[int, int, int]) -> bool:
        """Record one line's output line and count it, atomically and at most once (a line
        already recorded is left as it is). -> whether it was new."""
        with self._tx() as conn:
            cur = conn.execute("INSERT OR IGNORE INTO results (batch_id, line, ok, data) "
                               "VALUES (?, ?, ?, ?)", (batch_id, line, int(ok), data))
            if cur.rowcount != 1:
                return False
            conn.execute("UPDATE batches SET completed = completed + ?, failed = failed + ?, "
                         "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, "
                         "cached_tokens = cached_tokens + ? WHERE id = ?",
                         (int(ok), int(not ok), *usage, batch_id))
        return True

    def done_lines(self, batch_id: str) -> set[int]:
        return {r["line"] for r in self._conn.execute(
            "SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def iter_results(self, batch_id: str) -> Iterator[tuple[int, bool, bytes]]:
        for r in self._conn.execute("SELECT line, ok, data FROM results WHERE batch_id = ? "
                                    "ORDER BY line", (batch_id,)):
            yield r["line"], bool(r["ok"]), r["data"]

    def finish_batch(self, batch_id: str, status: str, outputs: dict[str, tuple[str, int]]
                     ) -> dict[str, Any]:
        """The last step, in one transaction: adopt the written output/error files
        (outputs: {"output_file_id" | "error_file_id": (temp path, num lines)}), set the final
        status, drop the per-line results (the files hold them now)."""
        batch = self.get_batch(None, batch_id)
        now = int(time.time())
        moved: list[str] = []
        try:
            values: dict[str, Any] = {"status": status, f"{status}_at": now}
            rows = []
            for column, (temp, num_lines) in outputs.items():
                file_id = f"file-{secrets.token_hex(16)}"
                size = os.path.getsize(temp)
                os.replace(temp, self.file_path(file_id))
                moved.append(file_id)
                kind = "output" if column == "output_file_id" else "error"
                expires_s = batch["output_expires_s"] or DEFAULT_EXPIRES_S
                rows.append((file_id, batch["owner"], "batch_output",
                             f"{batch_id}_{kind}.jsonl", size, num_lines, now, now + expires_s))
                values[column] = file_id
            with self._tx() as conn:
                conn.executemany("INSERT INTO files (id, owner, purpose, filename, bytes, "
                                 "num_lines, created_at, expires_at) VALUES "
                                 "(?, ?, ?, ?, ?, ?, ?, ?)", rows)
                cols = ", ".join(f"{k} = ?" for k in values)
                conn.execute(f"UPDATE batches SET {cols} WHERE id = ?",
                             (*values.values(), batch_id))
                conn.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
        except BaseException:
            for file_id in moved:
                with contextlib.suppress(OSError):
                    os.remove(self.file_path(file_id))
            raise
        return self.get_batch(None, batch_id)


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A files row -> OpenAI's File object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "expires_at": row["expires_at"],
            "status_details": None}


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    """A batches row -> OpenAI's Batch object."""
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": errors,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"], "created_at": row["created_at"],
        "expires_at": row["expires_at"], **{t: row[t] for t in _TIMES},
        "request_counts": {"total": row["total"], "completed": row["completed"],
                           "failed": row["failed"]},
        "usage": {"input_tokens": row["input_tokens"],
                  "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
                  "output_tokens": row["output_tokens"],
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": row["input_tokens"] + row["output_tokens"]},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
    }
