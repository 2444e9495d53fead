"""Batch throughput and the cost of a batch to interactive traffic, side by side in one run:
the same N-line chat workload (1) through bench/serve.py at high concurrency, (2) as an online
batch (/v1/files + /v1/batches), (3) through `python -m minserve run-batch`; and the TTFT of
interactive streaming chat requests with no batch, while a batch runs, and with no batch again.
Starts its own server (a free port, a temporary --batch-storage-path). Stdlib only.

    python bench/batch.py --num-lines 1000 --input-len 32 --output-len 32 --ttft-requests 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (bench/serve.py: the load generator and its streaming client)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _http(url: str, method: str = "GET", body: bytes | None = None,
          ctype: str = "application/json") -> dict:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": ctype} if body is not None else {})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _lines(args: argparse.Namespace, prompts: list[str]) -> bytes:
    return b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": {
                                    "messages": [{"role": "user", "content": p}],
                                    "max_tokens": args.output_len, "temperature": 0,
                                    "ignore_eos": True}}).encode() + b"\n"
                    for i, p in enumerate(prompts))


def upload(base: str, data: bytes) -> str:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"bench.jsonl\"\r\n\r\n")
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return _http(base + "/v1/files", "POST", body,
                 f"multipart/form-data; boundary={boundary}")["id"]


async def interactive_ttft(base: str, count: int, output_len: int, during=None) -> list[float]:
    """count streaming chat requests, one after another -> their TTFTs (s). during(): whether
    the condition still held after a request (a sample counts only then)."""
    url = urllib.parse.urlparse(base)
    out = []
    for i in range(count):
        body = {"messages": [{"role": "user", "content": f"Interactive question number {i}"}],
                "max_tokens": output_len, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}}
        res = await serve.one_request(url, "/v1/chat/completions", body, None)
        if not res.ok:
            raise RuntimeError(f"interactive request failed: {res.error}")
        if during is None or during():
            out.append(res.ttft)
    return out


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return (f"median {1000 * statistics.median(xs):.0f} ms, p90 {1000 * serve.pct(xs, 90):.0f} "
            f"ms (n={len(xs)})")


def start_server(args: argparse.Namespace, storage: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "minserve", "serve", *([args.model] if args.model else []),
           "--port", str(port), "--batch-storage-path", storage, "--max-num-seqs",
           str(args.max_num_seqs), *args.server_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def online_batch(base: str, data: bytes, ttft_count: int, output_len: int) -> dict:
    """Upload, create, poll to completion; meanwhile measure interactive TTFT while it runs."""
    t0 = time.perf_counter()
    file_id = upload(base, data)
    batch = _http(base + "/v1/batches", "POST", json.dumps({
        "input_file_id": file_id, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).encode())
    status = {"batch": batch}

    def running() -> bool:
        b = status["batch"] = _http(f"{base}/v1/batches/{batch['id']}")
        return b["status"] == "in_progress"

    while not running() or status["batch"]["request_counts"]["completed"] < 1:
        if status["batch"]["status"] not in ("validating", "in_progress"):
            break
        time.sleep(0.05)
    load = _load()
    ttft = asyncio.run(interactive_ttft(base, ttft_count, output_len, during=running))
    while status["batch"]["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
        running()
    wall = time.perf_counter() - t0
    b = status["batch"]
    if b["status"] != "completed" or b["request_counts"]["failed"]:
        raise RuntimeError(f"the batch did not complete cleanly: {b}")
    return {"wall_s": wall, "output_tokens": b["usage"]["output_tokens"], "ttft": ttft,
            "load_during": load}


def run_batch_cli(args: argparse.Namespace, path: str) -> dict:
    out = path + ".out"
    cmd = [sys.executable, "-m", "minserve", "run-batch", "-i", path, "-o", out,
           *([args.model] if args.model else []), "--max-num-seqs", str(args.max_num_seqs),
           *args.server_args.split()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"run-batch: (\d+) lines in ([\d.]+)s: (\d+) succeeded", proc.stderr)
    if proc.returncode != 0 or m is None or int(m.group(3)) != int(m.group(1)):
        raise RuntimeError(f"run-batch failed: {proc.stderr[-2000:]}")
    tokens = 0
    with open(out) as f:
        for line in f:
            tokens += json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
    return {"wall_s": float(m.group(2)), "process_wall_s": wall, "output_tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the server's default model")
    p.add_argument("--num-lines", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=256,
                   help="bench/serve.py's concurrency for the same requests")
    p.add_argument("--ttft-requests", type=int, default=16)
    p.add_argument("--ttft-output-len", type=int, default=8)
    p.add_argument("--server-args", default="", help="more flags for the server and run-batch")
    p.add_argument("--skip-run-batch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    print(f"{args.num_lines} chat lines, ~{args.input_len} words in, {args.output_len} tokens out"
          f" (ignore_eos), max_num_seqs {args.max_num_seqs}; load avg 1/5/15 min", flush=True)

    class Rows(list):
        def append(self, row: tuple[str, str, str]) -> None:   # printed as soon as measured
            super().append(row)
            print(f"{row[0]:<44}  {row[1]:<56}  {row[2]}", flush=True)

    prompts = serve.make_prompts(argparse.Namespace(dataset=None, seed=args.seed,
                                                    input_len=args.input_len,
                                                    num_prompts=args.num_lines))
    data = _lines(args, prompts)
    rows = Rows()
    with tempfile.TemporaryDirectory(prefix="minserve-bench-batch-") as tmp:
        path = os.path.join(tmp, "batch.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        proc, base = start_server(args, os.path.join(tmp, "storage"))
        try:
            asyncio.run(interactive_ttft(base, 2, args.ttft_output_len))      # warm-up
            before = asyncio.run(interactive_ttft(base, args.ttft_requests, args.ttft_output_len))
            rows.append(("TTFT, no batch (before)", _ms(before), _load()))
            load0 = _load()
            s = asyncio.run(serve.run(serve.parser().parse_args([
                "--base-url", base, "--seed", str(args.seed), "--endpoint", "chat",
                "--num-prompts", str(args.num_lines), "--input-len", str(args.input_len),
                "--output-len", str(args.output_len), "--ignore-eos",
                "--max-concurrency", str(args.max_concurrency)])))
            rows.append((f"bench/serve.py, concurrency {args.max_concurrency}",
                         f"{s['duration_s']:.1f} s, {s['output_throughput']:.1f} output tok/s "
                         f"({s['successful']}/{args.num_lines} ok)", f"{load0} -> {_load()}"))
            load0 = _load()
            online = online_batch(base, data, args.ttft_requests, args.ttft_output_len)
            rows.append(("online batch (upload to completed)",
                         f"{online['wall_s']:.1f} s, "
                         f"{online['output_tokens'] / online['wall_s']:.1f} output tok/s",
                         f"{load0} -> {_load()}"))
            rows.append(("TTFT while the batch runs", _ms(online["ttft"]), online["load_during"]))
            after = asyncio.run(interactive_ttft(base, args.ttft_requests, args.ttft_output_len))
            rows.append(("TTFT, no batch (after)", _ms(after), _load()))
        finally:
            proc.terminate()
            proc.wait(120)
        if not args.skip_run_batch:
            load0 = _load()
            offline = run_batch_cli(args, path)
            rows.append(("run-batch (lines only; process incl. load)",
                         f"{offline['wall_s']:.1f} s ({offline['process_wall_s']:.1f} s), "
                         f"{offline['output_tokens'] / offline['wall_s']:.1f} output tok/s",
                         f"{load0} -> {_load()}"))
    base_ttft = before + after
    if base_ttft and online["ttft"]:
        ratio = statistics.median(online["ttft"]) / statistics.median(base_ttft)
        rows.append(("median TTFT ratio, batch / no batch", f"{ratio:.2f}x", ""))


if __name__ == "__main__":
    main()
