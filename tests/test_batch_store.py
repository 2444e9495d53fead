"""The Batch API's pieces without a model: the line format, the store (ids, owners, pagination,
results recorded exactly once, a full disk as an error, orphans, one process per folder) and the
streaming multipart reader (any chunking, every limit, malformed forms)."""
from __future__ import annotations

import io
import os
import random
import sqlite3

import orjson
import pytest

from minserve.batch.lines import error_line, iter_lines, output_line, parse_line
from minserve.batch.multipart import (
    FileTooLarge,
    MultipartError,
    MultipartReader,
    boundary_of,
)
from minserve.batch.service import UploadError, check_jsonl, validate_lines
from minserve.batch.store import (
    BatchStore,
    StorageFull,
    StorageLocked,
    Quota,
    QuotaExceeded,
    batch_object,
    file_object,
)
from minserve.http import owner_of

CHAT = "/v1/chat/completions"


def _line(cid, url=CHAT, body=None, method="POST") -> bytes:
    return orjson.dumps({"custom_id": cid, "method": method, "url": url,
                         "body": body if body is not None else {"messages": []}})


def test_line_envelopes():
    ok = parse_line(_line("a", body={"messages": [], "max_tokens": 2}), 0, 1)
    assert ok.error is None and ok.url == CHAT and ok.body["max_tokens"] == 2
    alias = parse_line(_line("a", url="/rerank", body={}), 0, 1)
    assert alias.url == "/v1/rerank"
    cases = {b"{not json": "invalid_json", b"[1, 2]": "invalid_request",
             _line(None): "custom_id", _line(""): "custom_id", _line(5): "custom_id",
             _line("a", method="GET"): "method", _line("a", url="/v1/batches"): "url",
             _line("a", url=["x"]): "url", _line("a", body=[1]): "body",
             _line("a", body={"stream": True}): "body.stream",
             _line("x" * 600): "custom_id"}
    for raw, what in cases.items():
        line = parse_line(raw, 3, 7)
        assert line.error is not None and line.error["line"] == 7, raw
        assert what in (line.error["code"], line.error["param"]), (raw, line.error)
    assert parse_line(_line("a", url="/v1/completions"), 0, 1, CHAT).error["param"] == "url"
    # blank lines are skipped but counted in line numbers
    lines = list(iter_lines([_line("a"), b"\n", b"  \r\n", _line("b")]))
    assert [(x.index, x.line_no, x.custom_id) for x in lines] == [(0, 1, "a"), (1, 4, "b")]
    out = output_line("a", 200, {"id": "chatcmpl-1", "usage": {}})
    assert out["response"]["request_id"] == "chatcmpl-1" and out["error"] is None
    assert set(out) == {"id", "custom_id", "response", "error"}
    err = error_line("a", {"code": "x", "message": "m", "param": None})
    assert err["response"] is None and err["error"] == {"code": "x", "message": "m"}


def test_validation_lists_every_bad_line(tmp_path):
    path = str(tmp_path / "in.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join([_line("a"), _line("a"), _line("b", url="/v1/embeddings"),
                            b'{"custom_id": "c"}', _line("d")]) + b"\n")
    num, errors = validate_lines(path, CHAT)
    assert num == 5
    assert [(e["line"], e["code"]) for e in errors] == [
        (2, "duplicate_custom_id"), (3, "invalid_request"), (4, "invalid_request")]
    with open(path, "wb") as f:
        f.write(_line("a") + b"\n\n" + b"[1]\n")
    with pytest.raises(UploadError, match="line 3 is not a JSON object"):
        check_jsonl(path, 10)
    with open(path, "wb") as f:
        f.write(_line("a") + b"\n" + b'{"a": "\xff"}\n')
    with pytest.raises(UploadError, match="line 2 is not valid JSON"):
        check_jsonl(path, 10)
    with open(path, "wb") as f:
        f.write(b"\n".join(_line(str(i)) for i in range(5)))
    assert check_jsonl(path, 5) == 5
    with pytest.raises(UploadError, match="more than 4 lines"):
        check_jsonl(path, 4)
    with open(path, "wb") as f:
        f.write(b"\n \n")
    with pytest.raises(UploadError, match="no requests"):
        check_jsonl(path, 4)


@pytest.fixture
def store(tmp_path):
    s = BatchStore(str(tmp_path / "store"))
    s.open()
    yield s
    s.close()


ROOMY = Quota(1 << 30, 1 << 30)


def _file(store: BatchStore, owner: str, lines: list[bytes]) -> dict:
    temp = _temp_with(store, lines)
    return store.add_file(owner, "batch", "in.jsonl", temp, len(lines), 3600, ROOMY)


def test_store_owners_ids_and_pagination(store):
    a, b = owner_of("key-a"), owner_of("key-b")
    assert a != b and owner_of(None) == "" and "key-a" not in a
    files = [_file(store, a, [_line(str(i))]) for i in range(5)]
    other = _file(store, b, [_line("x")])
    assert all(f["id"].startswith("file-") and len(f["id"]) == 37 for f in files)
    assert store.get_file(b, files[0]["id"]) is None and store.get_file(a, other["id"]) is None
    assert store.get_file(a, "../../etc/passwd") is None and store.get_file(a, 5) is None
    rows, more = store.list_files(a, None, 2, "desc", None)
    assert [r["id"] for r in rows] == [files[4]["id"], files[3]["id"]] and more
    rows, more = store.list_files(a, None, 10, "desc", rows[-1]["id"])
    assert [r["id"] for r in rows] == [f["id"] for f in files[2::-1]] and not more
    rows, _ = store.list_files(a, None, 10, "asc", None)
    assert [r["id"] for r in rows] == [f["id"] for f in files]
    assert store.list_files(a, None, 10, "desc", other["id"]) == ([], False)  # b's cursor
    assert store.list_files(a, "batch_output", 10, "desc", None) == ([], False)
    obj = file_object(files[0])
    assert obj["object"] == "file" and obj["purpose"] == "batch" and obj["bytes"] > 0
    assert not store.delete_file(b, files[0]["id"])
    assert store.delete_file(a, files[0]["id"])
    assert not os.path.exists(store.file_path(files[0]["id"]))
    with pytest.raises(ValueError):
        store.file_path("../x")


def test_results_are_recorded_once_and_finish_atomically(store):
    owner = owner_of("k")
    f = _file(store, owner, [_line("a"), _line("b")])
    batch = store.create_batch(owner, f["id"], CHAT, "24h", {"x": "y"}, 3600, 3600, ROOMY)
    assert batch["status"] == "validating" and store.get_batch(owner_of("z"), batch["id"]) is None
    store.set_status(batch["id"], "in_progress", total=2)
    data = orjson.dumps(output_line("a", 200, {"usage": {"prompt_tokens": 3,
                                                         "completion_tokens": 4}}))
    assert store.put_result(batch["id"], 0, True, data, (3, 4, 0))
    assert not store.put_result(batch["id"], 0, True, data, (3, 4, 0))   # exactly once
    assert store.put_result(batch["id"], 1, False, b"{}", (0, 0, 0))
    obj = batch_object(store.get_batch(owner, batch["id"]))
    assert obj["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert obj["usage"]["input_tokens"] == 3 and obj["usage"]["total_tokens"] == 7
    assert obj["metadata"] == {"x": "y"} and obj["in_progress_at"] is not None
    assert store.done_lines(batch["id"]) == {0, 1}
    assert store.unfinished_batches() == [batch["id"]]
    out = store.temp_path()
    with open(out, "wb") as fh:
        fh.write(data + b"\n")
    done = store.finish_batch(batch["id"], "completed", {"output_file_id": (out, 1)})
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert store.get_file(owner, done["output_file_id"])["purpose"] == "batch_output"
    assert list(store.iter_results(batch["id"])) == [] and store.unfinished_batches() == []


def test_full_disk_is_an_error_not_a_crash(store):
    """SQLite's own "database or disk is full", from a page cap the test sets."""
    owner = owner_of("k")
    f = _file(store, owner, [_line("a")])
    batch = store.create_batch(owner, f["id"], CHAT, "24h", None, 3600, 3600, ROOMY)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageFull):
        for i in range(1000):
            store.put_result(batch["id"], i, True, os.urandom(3000), (0, 0, 0))
    # the failed transaction left the counters matching the recorded rows
    row = store.get_batch(owner, batch["id"])
    assert row["completed"] == len(store.done_lines(batch["id"]))


def test_quota_per_owner_and_in_all(store):
    """Issue 36, finding 4: one key could store without bound. A file that does not fit the
    owner's or the total quota is refused and leaves nothing behind; other owners still fit."""
    a, b, c = owner_of("a"), owner_of("b"), owner_of("c")
    size = os.path.getsize(_temp_with(store, [_line("x" * 40)]))
    quota = Quota(max_bytes_per_owner=2 * size, max_bytes=5 * size)

    def add(owner: str) -> dict:
        return store.add_file(owner, "batch", "f", _temp_with(store, [_line("x" * 40)]), 1,
                              3600, quota)

    add(a), add(a)
    with pytest.raises(QuotaExceeded, match="this API key's .*--max-batch-storage-per-key"):
        add(a)
    assert store.usage(a) == (2 * size, 2 * size)
    f = add(b)
    add(b), add(c)
    with pytest.raises(QuotaExceeded, match=r"the server's .*\(--max-batch-storage\)"):
        add(c)
    stored = [n for n in os.listdir(store.files_dir) if n.startswith("file-")]
    assert len(stored) == 5      # the refused uploads were not adopted
    with pytest.raises(QuotaExceeded, match="this API key's"):   # a full key makes no batch
        store.create_batch(a, store.list_files(a, None, 1, "desc", None)[0][0]["id"], CHAT,
                           "24h", None, 3600, 3600, quota)
    assert store.delete_file(b, f["id"])
    add(c)


def test_files_expire(store, monkeypatch):
    """expires_after: an expired file is gone at once (404, not listed) and its content is
    removed at the next sweep, unless an unfinished batch still reads it."""
    import time as time_module

    owner = owner_of("k")
    keep = store.add_file(owner, "batch", "f", _temp_with(store, [_line("a")]), 1, 3600, ROOMY)
    used = store.add_file(owner, "batch", "f", _temp_with(store, [_line("a")]), 1, 3600, ROOMY)
    batch = store.create_batch(owner, used["id"], CHAT, "24h", None, 3600, 3600, ROOMY)
    assert file_object(keep)["expires_at"] == keep["created_at"] + 3600
    later = time_module.time() + 3601
    monkeypatch.setattr(time_module, "time", lambda: later)
    assert store.get_file(owner, keep["id"]) is None
    assert store.list_files(owner, None, 10, "desc", None) == ([], False)
    assert store.expire_files() == 1     # the batch's input stays while the batch runs
    assert not os.path.exists(store.file_path(keep["id"]))
    assert os.path.exists(store.file_path(used["id"]))
    store.set_status(batch["id"], "failed")
    assert store.expire_files() == 1 and not os.path.exists(store.file_path(used["id"]))


def _temp_with(store: BatchStore, lines: list[bytes]) -> str:
    temp = store.temp_path()
    with open(temp, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return temp


def test_orphans_removed_and_one_process_per_folder(tmp_path):
    root = str(tmp_path / "s")
    s = BatchStore(root)
    s.open()
    f = _file(s, "", [_line("a")])
    temp = s.temp_path()
    open(temp, "wb").close()
    stray = os.path.join(s.files_dir, "file-" + "0" * 32)   # content that never got its row
    open(stray, "wb").close()
    with pytest.raises(StorageLocked):
        BatchStore(root).open()
    s.close()
    s2 = BatchStore(root)
    s2.open()
    assert sorted(os.listdir(s2.files_dir)) == [f["id"]]
    s2.close()
    with sqlite3.connect(os.path.join(root, "batches.sqlite3")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------------------------
# multipart
# ---------------------------------------------------------------------------------------------

def _form(boundary: bytes, content: bytes, purpose: bytes = b"batch",
          filename: bytes = b"in.jsonl") -> bytes:
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            + purpose + b"\r\n--" + boundary + b"\r\nContent-Disposition: form-data; "
            b"name=\"file\"; filename=\"" + filename + b"\"\r\nContent-Type: "
            b"application/octet-stream\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n")


def _read(body: bytes, boundary: bytes, chunk_sizes, limit: int = 1 << 20):
    out = io.BytesIO()
    reader = MultipartReader(boundary, "file", out, limit)
    i = 0
    for size in chunk_sizes:
        reader.feed(body[i:i + size])
        i += size
    reader.feed(body[i:])
    return reader.close(), out.getvalue()


def test_multipart_any_chunking():
    boundary = b"----minserve-1234"
    # content that contains near-boundaries and CRLFs
    content = b"line1\r\n--" + boundary[:-1] + b"x\r\n\r\n--\r\nlast"
    body = _form(boundary, content)
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randrange(1, 9) for _ in range(rng.randrange(1, 80))]
        upload, data = _read(body, boundary, sizes)
        assert data == content and upload.fields == {"purpose": "batch"}
        assert upload.filename == "in.jsonl" and upload.file_bytes == len(content)
    assert boundary_of(b'multipart/form-data; boundary="' + boundary + b'"') == boundary
    assert boundary_of(b"multipart/form-data; charset=utf-8; boundary=abc") == b"abc"


@pytest.mark.parametrize("ctype", [b"application/json", b"multipart/form-data",
                                   b"multipart/form-data; boundary=", b"multipart/mixed; b=x",
                                   b"multipart/form-data; boundary=" + b"x" * 80])
def test_multipart_bad_content_type(ctype):
    with pytest.raises(MultipartError):
        boundary_of(ctype)


def test_multipart_limits_and_malformed():
    b = b"bnd"
    with pytest.raises(FileTooLarge):
        _read(_form(b, b"x" * 100), b, [7] * 20, limit=99)
    _read(_form(b, b"x" * 99), b, [7] * 20, limit=99)
    bad = [
        _form(b, b"x")[:-8],                                        # no closing boundary
        b"--bnd\r\nContent-Type: text/plain\r\n\r\nx\r\n--bnd--",    # no disposition
        b"--bnd\r\nContent-Disposition: attachment\r\n\r\nx\r\n--bnd--",
        b"--bnd" + b"\r\nX: " + b"y" * 20000,                       # endless headers
        b"x" * 20000,                                               # no boundary at all
        b"--bndXX",                                                 # garbage after delimiter
        _form(b, b"a").replace(b"--bnd--", b"--bnd\r\nContent-Disposition: form-data; "
                               b"name=\"file\"\r\n\r\nb\r\n--bnd--"),   # two files
        (b"--bnd\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + b"p" * 70000
         + b"\r\n--bnd--"),                                          # field too long
        (b"--bnd\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n\xff\r\n--bnd--"),
        b"".join(b"--bnd\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i
                 for i in range(20)) + b"--bnd--",                  # too many parts
    ]
    for body in bad:
        with pytest.raises(MultipartError):
            _read(body, b, [5] * (len(body) // 5))
