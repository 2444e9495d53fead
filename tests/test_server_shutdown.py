"""SIGTERM and SIGINT (Ctrl-C) on a real `python -m minserve` (granian in-process): the listener
closes at once, the request in flight streams to its end, and the process exits 0; past
--shutdown-timeout, requests in flight are cut and a client that never reads is disconnected."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import orjson
import pytest

from tests.serving import start_server, stop_server, wait_until


def _open_stream(port: int, body: dict) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    data = orjson.dumps(body)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):
        # reset: the connect landed in the backlog of a listener that was closing (a race CI
        # hit once); either way the server no longer accepts
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_accepting_and_finishes_in_flight(tiny_model_dir, sig):
    proc, url = start_server(["serve", tiny_model_dir, "--kv-cache-memory", "8MiB",
                              "--max-model-len", "1024", "--shutdown-timeout", "900"])
    try:
        port = int(url.rsplit(":", 1)[1])
        s = _open_stream(port, {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True,
                                "stream": True, "stream_options": {"include_usage": True}})
        buf = b""
        while b"data: " not in buf:
            buf += s.recv(65536)
        proc.send_signal(sig)
        asyncio.run(wait_until(lambda: _refused(port), 60, "the listener to close"))
        # 400 tokens take seconds; the process is still draining when the listener is gone.
        alive_when_refused = proc.poll() is None
        while piece := s.recv(65536):
            buf += piece
        s.close()
        code, out = stop_server(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert alive_when_refused
    # SSE frames inside HTTP/1.1 chunked framing: take what follows each "data: "
    events = [f[f.index(b"data: ") + 6:] for f in buf.split(b"\n\n") if b"data: " in f]
    assert events[-1] == b"[DONE]"
    usage = orjson.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 400
    assert orjson.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert code == 0, out


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "shutdown.py")


def test_deadline_cuts_in_flight_and_closes_a_client_that_never_reads(tiny_model_factory):
    """bench/shutdown.py with a 2 s deadline: 8,000-token requests cannot finish by then; the
    third client never reads a response of megabytes, so the server's writes to it block
    (granian drains connections before the lifespan shutdown runs: that kept the process alive
    until SIGKILL). Outcomes only; the script's own --kill-after is the only clock."""
    model = tiny_model_factory(max_position_embeddings=8192)
    proc = subprocess.run([sys.executable, BENCH, "--model", model, "--shutdown-timeout", "2",
                           "--max-tokens", "8000", "--kill-after", "120", "--json",
                           "--server-args", "--max-model-len 8192 --kv-cache-memory 64MiB"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    log = res["log_tail"]
    assert res["exit"] == "exited" and res["exit_code"] == 0, log
    stream, whole, silent = res["stream"], res["whole"], res["never_read"]
    assert stream["done"] and stream["complete"] and stream["finish_reasons"] == [], stream
    assert stream["error"]["code"] == 503 and "shutting down" in stream["error"]["message"]
    assert whole["status"] == 503 and whole["error"]["code"] == 503, whole
    assert "closed 1 connection(s) still open" in log and not silent["complete"], log
