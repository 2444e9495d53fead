"""`python -m minserve run-batch`: a mixed 200-line file (chat, completions, embeddings, and lines
bad in every way) is killed halfway as a real process, leaving -o untouched; the rerun (stdin in,
in this process) writes every line, in order, in the documented shape, each answer equal to the
same request through the app; `-o -` streams to stdout."""
from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import sys

import pytest

from tests.asgi import call
from tests.tiny import make_tiny_encoder

FLAGS = ["--kv-cache-memory", "8MiB", "--max-model-len", "256", "--served-model-name", "tiny"]


def _mixed_lines() -> list[str]:
    lines: list[str] = []

    def req(cid, url, body):
        lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}))

    for i in range(200):
        kind = i % 10
        if kind in (0, 1, 2, 3):
            req(f"chat-{i}", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"Tell me about {i}"}],
                "max_tokens": 2 + i % 9, "temperature": 0})
        elif kind in (4, 5, 6):
            req(f"comp-{i}", "/v1/completions", {"prompt": f"Once upon a time {i}",
                                                 "max_tokens": 3 + i % 4, "temperature": 0})
        elif kind == 7:
            req(f"emb-{i}", "/v1/embeddings", {"input": [f"hello {i}", "world"]})
        elif kind == 8:     # answered by the route with a 400, as HTTP would
            bad = [{"messages": 5}, {"prompt": "x", "max_tokens": -1},
                   {"prompt": "word " * 400, "max_tokens": 4}, {"input": ""},
                   {"messages": [{"role": 5, "content": "x"}]}][i // 10 % 5]
            url = "/v1/embeddings" if "input" in bad else (
                "/v1/chat/completions" if "messages" in bad else "/v1/completions")
            req(f"bad-body-{i}", url, bad)
        else:               # bad envelopes: never reach a route
            lines.append([
                "{this is not json", json.dumps([1, 2]),
                json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
                json.dumps({"custom_id": f"get-{i}", "method": "GET",
                            "url": "/v1/completions", "body": {}}),
                json.dumps({"custom_id": f"url-{i}", "method": "POST", "url": "/v1/batches",
                            "body": {}}),
                json.dumps({"custom_id": f"stream-{i}", "method": "POST",
                            "url": "/v1/completions", "body": {"prompt": "x", "stream": True}}),
                json.dumps({"custom_id": f"body-{i}", "method": "POST",
                            "url": "/v1/completions", "body": "x"}),
            ][i // 10 % 7])
        if i % 50 == 49:
            lines.append("")   # blank lines are skipped
    return lines


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run-batch")
    path = folder / "in.jsonl"
    path.write_text("\n".join(_mixed_lines()) + "\n")
    bert, _ = make_tiny_encoder(str(folder / "bert"), "bert")
    return str(path), bert


def _run_in_process(argv: list[str], monkeypatch, stdin: bytes | None = None) -> tuple[int, bytes]:
    from minserve.batch.offline import main

    out = io.BytesIO()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    with pytest.raises(SystemExit) as e:
        main(argv)
    sys.stdout.flush()
    return e.value.code, out.getvalue()


def _reference(model: str, bert: str, lines: list[dict]) -> dict[str, tuple[int, dict]]:
    """The same bodies through the app's own routes, one at a time."""
    from minserve.config import EngineConfig
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.asgi import lifespan

    app = create_app(EngineConfig(model=model, kv_cache_memory=8 << 20, max_model_len=256),
                     ServerConfig(served_model_names=["tiny"], embedding_model_names=[bert]),
                     embedding=EmbeddingService.lazy(bert, served_model_name=bert))

    async def main():
        async with lifespan(app):
            await app.embedding.wait_ready(120)
            out = {}
            for line in lines:
                r = await call(app, "POST", line["url"], line["body"])
                out[line["custom_id"]] = (r.status, r.json())
            return out
    return asyncio.run(main())


def _strip(body: dict) -> dict:
    """What may differ between two runs: ids, times, and prefix-cache hits (order-dependent)."""
    out = {k: v for k, v in body.items() if k not in ("id", "created")}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items()
                        if k not in ("prompt_tokens_details", "cache_read_input_tokens")}
    return out


def test_killed_run_leaves_no_output_and_the_rerun_is_complete(tiny_model_dir, batch_file,
                                                               tmp_path, monkeypatch):
    path, bert = batch_file
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")
    argv = ["-i", path, "-o", str(out), "--model", tiny_model_dir, "--embedding-model", bert,
            *FLAGS]
    # halfway: SIGKILL once progress shows some lines done (few in flight, so many remain)
    proc = subprocess.Popen([sys.executable, "-m", "minserve", "run-batch", *argv,
                             "--max-num-seqs", "2"], stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for text in proc.stderr:
            seen.append(text)
            m = re.search(r"Processed lines: (\d+)/200", text)
            if m and 0 < int(m.group(1)) < 200:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert out.read_text() == "previous contents\n"      # -o is replaced whole, or not at all

    raw = open(path, "rb").read()
    code, _ = _run_in_process(["-i", "-", *argv[2:]], monkeypatch, stdin=raw)
    assert code == 0
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(results) == 200
    inputs = [x for x in _mixed_lines() if x]
    for text, res in zip(inputs, results, strict=True):
        assert set(res) == {"id", "custom_id", "response", "error"}
        assert res["id"].startswith("batch_req_")
        try:
            want_id = json.loads(text).get("custom_id") if text.startswith("{") else None
        except json.JSONDecodeError:
            want_id = None
        assert res["custom_id"] == want_id
    good = [json.loads(x) for x in inputs if x.startswith('{"custom_id": "') and not
            json.loads(x)["custom_id"].startswith(("get-", "url-", "stream-", "body-"))]
    want = _reference(tiny_model_dir, bert, good)
    by_id = {r["custom_id"]: r for r in results}
    for line in good:
        cid = line["custom_id"]
        status, body = want[cid]
        res = by_id[cid]
        assert res["error"] is None and res["response"]["status_code"] == status, (cid, res)
        got = res["response"]["body"]
        if status == 200 and line["url"] == "/v1/embeddings":
            for a, b in zip(got["data"], body["data"], strict=True):
                assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-5)
            assert got["usage"] == body["usage"]
        else:
            assert _strip(got) == _strip(body), cid
        assert (status == 200) == (not cid.startswith("bad-body-"))
    envelopes = [r for r in results if r["response"] is None]
    assert len(envelopes) == 20
    assert {r["error"]["code"] for r in envelopes} == {"invalid_json", "invalid_request"}
    assert all(isinstance(r["error"]["line"], int) for r in envelopes)


def test_stdout_output(tiny_model_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({
        "custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
        "body": {"prompt": "Hello", "max_tokens": 2, "temperature": 0}}) for i in range(3)))
    code, data = _run_in_process(["-i", str(path), "-o", "-", "--model", tiny_model_dir, *FLAGS],
                                 monkeypatch)
    assert code == 0
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert [x["custom_id"] for x in lines] == ["c0", "c1", "c2"]
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 2 for x in lines)
    assert "3 lines" in capsys.readouterr().err
