"""A batch survives SIGKILL: a real server is killed while its batch runs, a second one starts on
the same --batch-storage-path and finishes it. Every line is in the output exactly once, the lines
recorded before the kill are not run again (the second server's request count says so), and the
answers equal the same requests sent directly."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.request

import openai

from tests.serving import start_server, stop_server
from tests.test_batch_api import K1, _chat, _jsonl, _lines, wait_batch


def _args(model: str, storage: str) -> list[str]:
    return ["serve", model, "--served-model-name", "tiny", "--api-key", K1,
            "--kv-cache-memory", "8MiB", "--max-model-len", "256", "--max-num-seqs", "8",
            "--batch-storage-path", storage]


def _num_requests(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:e2e_request_latency_seconds_count{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigkill_mid_batch_then_restart_completes_every_line_once(tiny_model_dir, tmp_path):
    storage = str(tmp_path / "storage")
    bodies = {f"line-{i:03d}": _chat(i, max_tokens=4 + i % 7, ignore_eos=True)
              for i in range(48)}
    proc, url = start_server(_args(tiny_model_dir, storage))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=K1, max_retries=0)
        f = client.files.create(file=("in.jsonl", _jsonl(bodies)), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 300
        while client.batches.retrieve(batch.id).request_counts.completed < 8:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.kill()                     # SIGKILL: no shutdown code runs
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    with sqlite3.connect(os.path.join(storage, "batches.sqlite3")) as conn:
        status, = conn.execute("SELECT status FROM batches WHERE id = ?", (batch.id,)).fetchone()
        recorded, = conn.execute("SELECT COUNT(*) FROM results WHERE batch_id = ?",
                                 (batch.id,)).fetchone()
    assert status == "in_progress" and 8 <= recorded < len(bodies), (status, recorded)

    proc, url = start_server(_args(tiny_model_dir, storage))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=K1, max_retries=0)
        done = wait_batch(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts.completed == len(bodies) and done.request_counts.failed == 0
        # only the lines without a recorded result ran on this server
        assert _num_requests(url) == len(bodies) - recorded
        out = _lines(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(bodies)   # each exactly once
        assert done.error_file_id is None
        by_id = {x["custom_id"]: x["response"]["body"] for x in out}
        for cid in ("line-000", "line-005", "line-047"):   # before, around and after the kill
            body = {k: v for k, v in bodies[cid].items() if k != "ignore_eos"}
            direct = client.chat.completions.create(**body, extra_body={"ignore_eos": True})
            got = by_id[cid]["choices"][0]["message"]["content"]
            assert direct.choices[0].message.content == got, cid
            assert by_id[cid]["usage"]["completion_tokens"] == bodies[cid]["max_tokens"]
        assert json.loads(client.files.content(f.id).text.splitlines()[0])["custom_id"] == \
            "line-000"
    finally:
        code, log = stop_server(proc)
    assert code == 0, log
    assert f"resuming batch {batch.id}" in log
