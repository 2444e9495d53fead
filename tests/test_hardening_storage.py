"""Issue 36, findings 3 and 4, through the ASGI app (a fake engine, two API keys): a stored
response is its creator's (GET, DELETE, cancel and previous_response_id by another key are 404s),
`x-api-key` owns batch files and batches as `Authorization: Bearer` does, and the batch storage
quota answers a clear 4xx (413 on upload, 400 on a batch create) while other keys still fit."""
from __future__ import annotations

import pytest

from minserve.batch.service import BatchLimits, BatchService
from minserve.server import ServerConfig, create_app
from minserve.tokenizer import Tokenizer
from tests.asgi import call
from tests.fake_engine import FakeEngine
from tests.serving import run

K1, K2 = "key-one", "key-two"
BEARER1, BEARER2 = {"authorization": f"Bearer {K1}"}, {"authorization": f"Bearer {K2}"}
X1, X2 = {"x-api-key": K1}, {"x-api-key": K2}
BOUNDARY = "b0undary"


def _app(model_dir: str, tmp_path, limits: BatchLimits | None = None):
    tokenizer = Tokenizer.from_folder(model_dir)
    cfg = ServerConfig(served_model_names=["tiny"], api_keys=[K1, K2])
    batches = BatchService(str(tmp_path / "batches"), limits)
    return create_app(None, cfg, lambda _config: FakeEngine(tokenizer), batches=batches)


def _form(data: bytes, **fields: str) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in {"purpose": "batch", **fields}.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="in.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                 + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def _upload(app, headers: dict, data: bytes, **fields: str):
    return await call(app, "POST", "/v1/files", body=_form(data, **fields), headers={
        **headers, "content-type": f"multipart/form-data; boundary={BOUNDARY}"})


LINE = (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
        b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}}\n')


def test_stored_responses_belong_to_their_key(tiny_model_dir, tmp_path):
    async def fn(app):
        created = await call(app, "POST", "/v1/responses", {
            "model": "tiny", "input": "secret plans", "max_output_tokens": 3}, headers=BEARER1)
        rid = created.json()["id"]
        other = {
            "get": await call(app, "GET", f"/v1/responses/{rid}", headers=BEARER2),
            "get by x-api-key": await call(app, "GET", f"/v1/responses/{rid}", headers=X2),
            "continue": await call(app, "POST", "/v1/responses", {
                "model": "tiny", "input": "go on", "max_output_tokens": 2,
                "previous_response_id": rid}, headers=BEARER2),
            "cancel": await call(app, "POST", f"/v1/responses/{rid}/cancel", headers=BEARER2),
            "delete": await call(app, "DELETE", f"/v1/responses/{rid}", headers=BEARER2),
        }
        own = {
            "get": await call(app, "GET", f"/v1/responses/{rid}", headers=X1),
            "continue": await call(app, "POST", "/v1/responses", {
                "model": "tiny", "input": "go on", "max_output_tokens": 2,
                "previous_response_id": rid}, headers=BEARER1),
            "delete": await call(app, "DELETE", f"/v1/responses/{rid}", headers=BEARER1),
        }
        return created, other, own

    created, other, own = run(_app(tiny_model_dir, tmp_path), fn)
    assert created.status == 200, created.body
    for name, res in other.items():
        assert res.status == 404, (name, res.body)
        assert res.json()["error"]["message"] == \
            f"Response with id '{created.json()['id']}' not found.", name
        assert b"secret" not in res.body and created.json()["output"][0]["content"][0][
            "text"].encode() not in res.body, name
    assert [res.status for res in own.values()] == [200, 200, 200], \
        {k: r.body for k, r in own.items()}
    assert own["get"].json()["output"] == created.json()["output"]


def test_x_api_key_owns_files_and_batches(tiny_model_dir, tmp_path):
    """Finding 4: x-api-key passed auth but the owner lookup read only Authorization (401)."""
    async def fn(app):
        up = await _upload(app, X1, LINE)
        fid = up.json()["id"]
        batch = await call(app, "POST", "/v1/batches", {
            "input_file_id": fid, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}, headers=X1)
        return (up, batch, await call(app, "GET", f"/v1/files/{fid}", headers=BEARER1),
                await call(app, "GET", "/v1/files", headers=X1),
                await call(app, "GET", f"/v1/files/{fid}", headers=X2),
                await call(app, "GET", f"/v1/batches/{batch.json()['id']}", headers=BEARER1),
                await call(app, "GET", f"/v1/batches/{batch.json()['id']}", headers=X2))

    up, batch, same_by_bearer, listed, other_file, same_batch, other_batch = run(
        _app(tiny_model_dir, tmp_path), fn)
    assert up.status == 200 and batch.status == 200, (up.body, batch.body)
    assert same_by_bearer.status == 200 and same_batch.status == 200
    assert [f["id"] for f in listed.json()["data"]] == [up.json()["id"]]
    assert other_file.status == 404 and other_batch.status == 404


def test_batch_storage_quota_and_expiry(tiny_model_dir, tmp_path):
    limits = BatchLimits(max_storage_per_key_bytes=3 * len(LINE),
                         max_storage_bytes=5 * len(LINE))

    async def fn(app):
        first = [await _upload(app, BEARER1, LINE) for _ in range(3)]
        full = await _upload(app, BEARER1, LINE)
        create = await call(app, "POST", "/v1/batches", {
            "input_file_id": first[0].json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}, headers=BEARER1)
        others = [await _upload(app, BEARER2, LINE) for _ in range(3)]
        expiring = await _upload(app, BEARER1, LINE, **{"expires_after[anchor]": "created_at",
                                                        "expires_after[seconds]": "7200"})
        bad_expiry = await _upload(app, BEARER2, LINE, **{
            "expires_after[anchor]": "created_at", "expires_after[seconds]": "60"})
        return first, full, create, others, expiring, bad_expiry

    first, full, create, others, expiring, bad_expiry = run(
        _app(tiny_model_dir, tmp_path, limits), fn)
    assert all(r.status == 200 for r in first)
    f = first[0].json()
    assert f["expires_at"] == f["created_at"] + 30 * 24 * 3600   # OpenAI's default
    assert full.status == 413, full.body
    err = full.json()["error"]
    assert "this API key's batch storage holds" in err["message"]
    assert "--max-batch-storage-per-key" in err["message"] and err["code"] == \
        "storage_quota_exceeded"
    assert create.status == 400 and "--max-batch-storage-per-key" in create.json()["error"][
        "message"]
    assert [r.status for r in others] == [200, 200, 413]   # the total (5 lines) is reached
    assert "--max-batch-storage)" in others[2].json()["error"]["message"]
    assert expiring.status == 413          # key one is still full: expiry asked or not
    assert bad_expiry.status == 400 and "expires_after" in bad_expiry.json()["error"]["message"]


@pytest.mark.parametrize("argv, message", [
    (["--max-batch-storage", "0"], "must be positive"),
    (["--max-batch-storage-per-key", "0"], "must be positive")])
def test_quota_flags_checked(argv, message, capsys):
    from minserve.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
