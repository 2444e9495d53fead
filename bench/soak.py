"""Soak: does the server's resident memory stay put under a long mixed load (issue 19.8)?

Starts `python -m minserve` (the default model unless --server-args say otherwise), sends
--requests mixed requests from --concurrency clients: chat and completions, whole and streamed,
structured outputs (JSON schemas, regexes and choices with per-request content, so every one
compiles a new grammar), tokenize, embeddings when the server answers them, and ~15% invalid
bodies (bad JSON, wrong types, 1,000-deep nesting, unknown models, prompts past the context).
Prompts are random words, so the prefix cache keeps taking new blocks. Prints the server's RSS
(VmRSS, the process and its children) when ready, every --every requests, after the first
--mark requests and at the end, and whether the end is within 10% of the mark; also the part outside the KV cache's mapping,
which on CPU is committed as blocks are first used, up to its fixed size. Any 5xx fails.

    python bench/soak.py                                  # 2,000 requests, mark at 200
    python bench/soak.py --requests 400 --mark 100 --server-args "--max-num-seqs 8"
    MALLOC_ARENA_MAX=2 python bench/soak.py               # the environment reaches the server
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

WORDS = ("alpha bravo cargo delta echo fable gamma harbor index jolly kettle lemon magnet north "
         "orbit piano quartz river sable tiger umbra velvet walnut xenon yonder zephyr apple "
         "bridge candle desert ember forest glacier honey island jungle kayak lantern meadow "
         "nectar ocean pepper quiver rocket saddle thunder utopia violet willow yogurt zinc").split()


def rss_kib(pid: int) -> int:
    """VmRSS of pid and every descendant (tensor-parallel workers), KiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (OSError, AttributeError):
            pass
    return total


def largest_anon_kib(pid: int) -> int:
    """Resident KiB of pid's largest anonymous mapping: on CPU, the KV cache (one mapping of
    --kv-cache-memory bytes, committed as its blocks are first used; weights are one allocation
    per tensor, far smaller). Growth there is the cache filling up to its fixed size."""
    best_size, best_rss, size, anon = 0, 0, 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    size, anon = hi - lo, len(head) < 6
                elif head[0] == "Rss:" and anon and size > best_size:
                    best_size, best_rss = size, int(head[1])
    except OSError:
        pass
    return best_rss


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def deep_body(model: str, msgs: list, field: str, n: int = 1000) -> bytes:
    """A chat body whose `field` is a list (or a role, a dict) n levels deep, as bytes: the json
    module cannot encode that deep."""
    if field == "role":
        value = '{"a": ' * n + "1" + "}" * n
        return json.dumps({"model": model, "messages": [{"role": "@", "content": "x"}]}
                          ).encode().replace(b'"@"', value.encode())
    value = "[" * n + "1" + "]" * n
    return json.dumps({"model": model, "messages": msgs, field: "@"}).encode().replace(
        b'"@"', value.encode())


def make_request(i: int, rng: random.Random, model: str, embeddings: bool
                 ) -> tuple[str, str, bytes | dict]:
    """(kind, path, body) for request i."""
    mt = rng.randint(1, 8)
    msgs = [{"role": "user", "content": words(rng, rng.randint(3, 40))}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    r = rng.random()
    if r < 0.15:   # invalid
        bad = rng.choice([
            b"{not json", b"[]", json.dumps({"model": model, "messages": "hi"}).encode(),
            deep_body(model, msgs, "top_p"), deep_body(model, msgs, "role"),
            {"model": "no-such-model", "messages": msgs},
            {"model": model, "prompt": words(rng, 9000), "max_tokens": 4},
            {"model": model, "messages": msgs, "response_format": {"type": "json_schema",
                                                                    "json_schema": {"schema": 5}}},
            {"model": model, "messages": msgs, "guided_regex": "[a-"},
            {"model": model, "messages": msgs, "temperature": "hot"},
        ])
        path = "/v1/completions" if isinstance(bad, dict) and "prompt" in bad \
            else "/v1/chat/completions"
        return "invalid", path, bad
    if r < 0.35:
        return "chat", "/v1/chat/completions", {"model": model, "messages": msgs,
                                                "max_tokens": mt, "temperature": 0.8,
                                                "logprobs": rng.random() < 0.3}
    if r < 0.5:
        return "chat-stream", "/v1/chat/completions", {
            "model": model, "messages": msgs, "max_tokens": mt, "stream": True,
            "stream_options": {"include_usage": True}, "stop": [words(rng, 1)]}
    if r < 0.6:
        return "completion", "/v1/completions", {"model": model, "prompt": words(rng, 40),
                                                 "max_tokens": mt, "n": rng.randint(1, 2)}
    if r < 0.7:
        return "completion-stream", "/v1/completions", {
            "model": model, "prompt": words(rng, 30), "max_tokens": mt, "stream": True}
    if r < 0.85:   # structured, a new grammar per request
        w = rng.choice(WORDS)
        spec = rng.choice([
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
                "type": "object", "properties": {w: {"type": "string", "maxLength": 8},
                                                 f"n{i}": {"type": "integer"}},
                "required": [w]}}}},
            {"structured_outputs": {"regex": f"{w}-[0-9]{{1,{1 + i % 5}}}"}},
            {"structured_outputs": {"choice": [w, f"{w}{i}", "other"]}},
        ])
        return "structured", "/v1/chat/completions", {"model": model, "messages": msgs,
                                                      "max_tokens": 16, **spec}
    if r < 0.93 or not embeddings:
        return "tokenize", "/tokenize", {"model": model, "prompt": words(rng, 50)}
    return "embeddings", "/v1/embeddings", {"model": model, "input": [words(rng, 20)] * 2}


def send(port: int, path: str, body: bytes | dict) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()     # a stream reads to its end ([DONE])
        return resp.status
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start(server_args: list[str], port: int) -> tuple[subprocess.Popen, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "minserve", *server_args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if get(port, "/health")[0] == 200:
                return proc, time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--mark", type=int, default=200)
    ap.add_argument("--every", type=int, default=200, help="print RSS every this many requests")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="extra `python -m minserve` arguments")
    args = ap.parse_args()

    proc, ready_s = start(shlex.split(args.server_args), args.port)
    try:
        model = json.loads(get(args.port, "/v1/models")[1])["data"][0]["id"]
        embeddings = send(args.port, "/v1/embeddings", {"model": model, "input": "hi"}) == 200
        time.sleep(2)
        idle = rss_kib(proc.pid)
        print(f"ready in {ready_s:.1f} s; idle RSS {idle / 1024:.0f} MiB; model {model}; "
              f"embeddings {'served' if embeddings else 'not served'}", flush=True)
        rng = random.Random(args.seed)
        reqs = [make_request(i, rng, model, embeddings) for i in range(args.requests)]
        codes: collections.Counter = collections.Counter()
        done, marks, lock = 0, {}, threading.Lock()
        t0 = time.monotonic()

        def one(req: tuple[str, str, bytes | dict]) -> None:
            nonlocal done
            kind, path, body = req
            try:
                status = send(args.port, path, body)
            except OSError as e:
                status = f"error {type(e).__name__}"
            with lock:
                codes[(kind, status)] += 1
                done += 1
                if done == args.mark or done % args.every == 0 or done == args.requests:
                    marks[done] = rss_kib(proc.pid), largest_anon_kib(proc.pid)
                    print(f"{done:5d} requests  {time.monotonic() - t0:6.0f} s  "
                          f"RSS {marks[done][0] / 1024:6.0f} MiB (KV cache mapping "
                          f"{marks[done][1] / 1024:4.0f} MiB)", flush=True)

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, reqs))
        (end, end_kv), (mark, mark_kv) = marks[args.requests], marks[args.mark]
        print("answers:", dict(sorted(codes.items(), key=str)))
        server_errors = sum(n for (_, s), n in codes.items()
                            if not isinstance(s, int) or s >= 500)
        growth = end / mark - 1
        rest = (end - end_kv) / max(mark - mark_kv, 1) - 1
        ok = abs(growth) <= 0.10 and server_errors == 0
        print(f"idle {idle / 1024:.0f} MiB, after {args.mark}: {mark / 1024:.0f} MiB, after "
              f"{args.requests}: {end / 1024:.0f} MiB ({growth:+.1%}); without the KV cache "
              f"mapping: {(mark - mark_kv) / 1024:.0f} -> {(end - end_kv) / 1024:.0f} MiB "
              f"({rest:+.1%}); 5xx/transport errors: {server_errors}; "
              f"{'PASS' if ok else 'FAIL'} (end within 10% of the mark)")
        return 0 if ok else 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
