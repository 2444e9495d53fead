"""The shutdown deadline, measured: start `python -m minserve` with --shutdown-timeout T, put a
streamed request, a whole (non-streamed) request and a client that never reads its stream in
flight, send SIGTERM, and report when each request ended and how, and when the process exited.
Stdlib only. tests/test_server_shutdown.py runs it and asserts on the outcomes (--json).

    python bench/shutdown.py --model MODEL --shutdown-timeout 3 --max-tokens 200 \
        [--server-args "--max-model-len 1024"] [--json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:  # a small receive window, so the server's writes block soon
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def _read_all(s: socket.socket, out: dict, t0: list[float]) -> None:
    """Read a response to its end; out gets its bytes, how it ended and when."""
    buf = b""
    try:
        while piece := s.recv(65536):
            buf += piece
            if b"data: " in buf:
                out.setdefault("first_event", True)
        out["end"] = "eof"
    except OSError as e:
        out["end"] = type(e).__name__
    out["t"] = time.monotonic() - t0[0] if t0[0] else None
    out["raw"] = buf
    s.close()


def _dechunk(body: bytes) -> tuple[bytes, bool]:
    """HTTP/1.1 chunked body -> (data, complete); a cut connection leaves it incomplete."""
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol == -1:
            return b"".join(out), False
        size = int(body[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            return b"".join(out), True
        out.append(body[eol + 2:eol + 2 + size])
        if eol + 2 + size > len(body):
            return b"".join(out), False
        pos = eol + 4 + size


def _classify(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    if b"chunked" in head.lower():
        body, complete = _dechunk(body)
    else:
        complete = b"content-length" in head.lower()
    if b"text/event-stream" in head:
        events, finish = [], set()
        for frame in body.split(b"\n\n"):
            if frame.startswith(b"data: "):
                data = frame[6:]
                try:
                    events.append(data if data == b"[DONE]" else json.loads(data))
                except ValueError:
                    complete = False  # an event cut in the middle
        error = next((e["error"] for e in events if isinstance(e, dict) and "error" in e), None)
        for e in events:
            if isinstance(e, dict):
                finish |= {c.get("finish_reason") for c in e.get("choices", [])} - {None}
        return {"status": status, "kind": "stream", "complete": complete,
                "done": bool(events) and events[-1] == b"[DONE]", "error": error,
                "finish_reasons": sorted(finish)}
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    return {"status": status, "kind": "whole", "complete": complete,
            "error": (obj or {}).get("error") if isinstance(obj, dict) else None}


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(port: int, name: str, value: float, log: list[bytes]) -> None:
    t0 = time.monotonic()
    while _metric(port, name) < value:
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"{name} never reached {value}: " + b"".join(log).decode())
        time.sleep(0.05)


def run(model: str, shutdown_timeout: float, max_tokens: int, n_never_read: int,
        never_read_words: int, server_args: list[str], kill_after: float) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "minserve", "serve", *([model] if model else []), "--port",
           str(port), "--shutdown-timeout", str(shutdown_timeout), *server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log: list[bytes] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(b"".join(log).decode()) from None
                time.sleep(0.2)
        # The client that never reads, first: echo + logprobs 20 makes its first chunks
        # megabytes (the prompt's logprobs), more than the socket buffers hold, so once its one
        # token is sampled the server's writes to it block.
        silent = _post(port, {"prompt": "Hello world " * never_read_words, "max_tokens": 1,
                              "echo": True, "logprobs": 20, "stream": True,
                              "n": n_never_read}, rcvbuf=4096)
        _wait_for(port, "vllm:generation_tokens_total", n_never_read, log)
        # Then a stream and a whole response that cannot finish before the deadline.
        common = {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True}
        t0 = [0.0]
        results: dict[str, dict] = {"stream": {}, "whole": {}}
        readers = [threading.Thread(target=_read_all, args=(_post(port, {**common, "stream": True}),
                                                            results["stream"], t0)),
                   threading.Thread(target=_read_all, args=(_post(port, common),
                                                            results["whole"], t0))]
        for r in readers:
            r.start()
        _wait_for(port, "vllm:num_requests_running", 2, log)
        t0[0] = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        refused_at = None
        while refused_at is None and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.02)
            except OSError:
                refused_at = time.monotonic() - t0[0]
        try:
            code = proc.wait(timeout=kill_after)
            exited = "exited"
        except subprocess.TimeoutExpired:
            proc.kill()
            code, exited = proc.wait(), "killed"
        exit_s = time.monotonic() - t0[0]
        for r in readers:
            r.join(30)
        silent.settimeout(10)
        silent_out: dict = {}
        _read_all(silent, silent_out, [0.0])  # after the exit: what the server left us
        out = {"shutdown_timeout": shutdown_timeout, "exit": exited, "exit_code": code,
               "never_read_bytes": len(silent_out["raw"]),
               "exit_s": round(exit_s, 2),
               "refused_s": None if refused_at is None else round(refused_at, 2),
               "never_read": {"end": silent_out["end"], **_classify(silent_out["raw"])}}
        for name, res in results.items():
            out[name] = {"t": None if res.get("t") is None else round(res["t"], 2),
                         "end": res.get("end"), **_classify(res.get("raw", b""))}
        out["log_tail"] = b"".join(log).decode(errors="replace")[-3000:]
        return out
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model for `minserve serve` (default: its own)")
    p.add_argument("--shutdown-timeout", type=float, default=3.0)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--never-read-n", type=int, default=4, help="n of the never-read stream")
    p.add_argument("--never-read-words", type=int, default=500,
                   help="its prompt, echoed with logprobs: 'Hello world ' x this")
    p.add_argument("--server-args", default="", help="more `minserve serve` flags, one string")
    p.add_argument("--kill-after", type=float, default=150.0,
                   help="SIGKILL the server this long after SIGTERM")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = run(a.model or "", a.shutdown_timeout, a.max_tokens, a.never_read_n,
              a.never_read_words, shlex.split(a.server_args), a.kill_after)
    if a.json:
        print(json.dumps(res))
        return
    print(f"--shutdown-timeout {a.shutdown_timeout}: listener closed after {res['refused_s']} s; "
          f"process {res['exit']} (code {res['exit_code']}) {res['exit_s']} s after SIGTERM")
    for name in ("stream", "whole", "never_read"):
        r = res[name]
        how = (f"error {r['error'].get('code')}: {r['error'].get('message')}" if r.get("error")
               else f"finish {r.get('finish_reasons')}" if r["kind"] == "stream"
               else f"status {r.get('status')}")
        print(f"  {name:10s} ended after {r.get('t')} s ({r.get('end')}): {how}"
              + (", [DONE]" if r.get("done") else "")
              + ("" if r.get("complete") else ", the connection was cut mid-response"))


if __name__ == "__main__":
    main()
