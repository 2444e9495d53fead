"""The online Batch API through the official openai SDK against one real `python -m minserve`
(tiny model, two API keys): files.create -> batches.create -> batches.retrieve until completed ->
files.content, every line exactly once and equal to the same request sent directly; the cancel
flow; isolation between keys; upload limits and batches that fail validation."""
from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from tests.serving import sdk_server

K1, K2 = "key-one", "key-two"
DONE = ("completed", "failed", "cancelled", "expired")


server = sdk_server("--api-key", K1, K2, "--max-model-len", "256", "--max-num-seqs", "16",
                    "--max-batch-file-size", "64KiB", "--max-batch-file-lines", "300")


@pytest.fixture(scope="module")
def c1(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=K1, max_retries=0)


@pytest.fixture(scope="module")
def c2(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=K2, max_retries=0)


def _chat(i: int, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": f"Say {i} things"}],
            "max_tokens": 3 + i % 5, "temperature": 0, **extra}


def _jsonl(bodies: dict[str, dict], url: str = "/v1/chat/completions") -> bytes:
    return "\n".join(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": b})
                     for cid, b in bodies.items()).encode() + b"\n"


def _upload(client, data: bytes, name: str = "in.jsonl"):
    return client.files.create(file=(name, data), purpose="batch")


def wait_batch(client, batch_id: str, statuses=DONE, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.1)


def _lines(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_batch_roundtrip_through_the_sdk(c1):
    bodies = {f"req-{i}": _chat(i) for i in range(40)}
    bodies["bad-request"] = {"messages": "not a list"}        # the route's own 400
    data = _jsonl(bodies)
    f = _upload(c1, data)
    assert f.purpose == "batch" and f.bytes == len(data) and f.filename == "in.jsonl"
    batch = c1.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    batch = wait_batch(c1, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 41 and batch.request_counts.completed == 40
    assert batch.request_counts.failed == 1
    assert batch.completed_at >= batch.finalizing_at >= batch.in_progress_at >= batch.created_at
    ok, errors = _lines(c1, batch.output_file_id), _lines(c1, batch.error_file_id)
    assert sorted(x["custom_id"] for x in ok) == sorted(c for c in bodies if c != "bad-request")
    assert [x["custom_id"] for x in errors] == ["bad-request"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "messages"
    usage = 0
    for line in ok:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["body"]["object"] == "chat.completion"
        assert response["request_id"] == response["body"]["id"]
        usage += response["body"]["usage"]["completion_tokens"]
    assert batch.usage.output_tokens == usage
    # the same requests sent directly give the same answers (greedy)
    by_id = {x["custom_id"]: x["response"]["body"] for x in ok}
    for cid in ("req-0", "req-7", "req-39"):
        direct = c1.chat.completions.create(**bodies[cid])
        assert direct.choices[0].message.content == \
            by_id[cid]["choices"][0]["message"]["content"]
        assert direct.usage.completion_tokens == by_id[cid]["usage"]["completion_tokens"]
    assert c1.files.content(f.id).content == data
    out_file = c1.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.filename.endswith("_output.jsonl")
    listed = [x.id for x in c1.files.list()]
    assert {f.id, batch.output_file_id, batch.error_file_id} <= set(listed)
    assert [x.id for x in c1.files.list(purpose="batch_output")] == [
        batch.error_file_id, batch.output_file_id]
    assert c1.batches.list().data[0].id == batch.id
    with pytest.raises(openai.BadRequestError, match="only a validating or in-progress"):
        c1.batches.cancel(batch.id)
    # the output file is not a batch input
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c1.batches.create(input_file_id=batch.output_file_id, endpoint="/v1/chat/completions",
                          completion_window="24h")
    assert c1.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c1.files.retrieve(f.id)


def test_cancel_flow(c1, server):
    # a few short lines finish first; of the long ones, only 2 x --max-num-seqs run at once,
    # so most have not started when the cancel comes
    bodies = {f"short-{i}": _chat(i, max_tokens=2) for i in range(4)}
    bodies |= {f"long-{i}": _chat(i, max_tokens=200, ignore_eos=True) for i in range(56)}
    f = _upload(c1, _jsonl(bodies))
    batch = c1.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    deadline = time.monotonic() + 300
    while (b := c1.batches.retrieve(batch.id)).request_counts.completed < 1:
        assert b.status == "in_progress" or b.status == "validating", b
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.BadRequestError, match="has not finished"):
        c1.files.delete(f.id)           # a running batch's input stays
    cancelled = c1.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    batch = wait_batch(c1, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    ok, errors = _lines(c1, batch.output_file_id), _lines(c1, batch.error_file_id)
    # every line exactly once across the two files; the ones not run say so
    assert sorted(x["custom_id"] for x in ok + errors) == sorted(bodies)
    assert len(ok) == batch.request_counts.completed >= 1 and errors
    assert all(x["error"]["code"] == "batch_cancelled" and x["response"] is None
               for x in errors)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] in (1, 2, 200) for x in ok)
    assert c1.batches.cancel(batch.id).status == "cancelled"     # again: nothing changes
    # nothing of the batch is left running in the engine
    deadline = time.monotonic() + 60
    while _gauge(server, "vllm:num_requests_running") or _gauge(server,
                                                                  "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c1.files.delete(f.id).deleted


def _gauge(server: str, name: str) -> float:
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


def test_keys_are_isolated(c1, c2, server):
    f = _upload(c1, _jsonl({"a": _chat(1)}))
    batch = c1.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    for call in (lambda: c2.files.retrieve(f.id), lambda: c2.files.content(f.id),
                 lambda: c2.files.delete(f.id), lambda: c2.batches.retrieve(batch.id),
                 lambda: c2.batches.cancel(batch.id),
                 lambda: c2.batches.create(input_file_id=f.id, completion_window="24h",
                                           endpoint="/v1/chat/completions")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in c2.files.list()]
    assert batch.id not in [x.id for x in c2.batches.list()]
    own = _upload(c2, _jsonl({"b": _chat(2)}))
    assert [x.id for x in c2.files.list()] == [own.id]
    assert own.id not in [x.id for x in c1.files.list()]
    bad = openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.files.list()
    assert wait_batch(c1, batch.id).status == "completed"


def test_limits_and_batches_that_fail_validation(c1):
    with pytest.raises(openai.APIStatusError) as e:
        _upload(c1, b'{"a": "' + b"x" * 70_000 + b'"}\n')
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="more than 300 lines"):
        _upload(c1, _jsonl({f"r{i}": {} for i in range(301)}))
    with pytest.raises(openai.BadRequestError, match="line 2 is not valid JSON"):
        _upload(c1, b'{"custom_id": "a"}\n{oops\n')
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c1.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="fine-tune")
    f = _upload(c1, _jsonl({"a": _chat(1), "b": _chat(2)}))
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        c1.batches.create(input_file_id=f.id, endpoint="/v1/batches", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="needs an embedding model"):
        c1.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        c1.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                          completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        c1.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                          completion_window="24h", metadata={"k": "v" * 600})
    with pytest.raises(openai.NotFoundError):
        c1.batches.create(input_file_id="file-" + "0" * 32, endpoint="/v1/chat/completions",
                          completion_window="24h")
    # lines that do not fit the batch: it fails, naming each line
    mixed = (_jsonl({"a": _chat(1), "a2": _chat(2)}) + _jsonl({"a": _chat(3)})
             + _jsonl({"e": {"input": "x"}}, url="/v1/embeddings"))
    f = _upload(c1, mixed)
    batch = wait_batch(c1, c1.batches.create(input_file_id=f.id, completion_window="24h",
                                             endpoint="/v1/chat/completions").id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (3, "duplicate_custom_id"), (4, "invalid_request")]
    assert batch.errors.data[1].param == "url"
