"""Online serving benchmark against any OpenAI-compatible base URL, like `vllm bench serve`:
random prompts of a given length (or a JSONL of prompts), fixed max concurrency or a Poisson
request rate, streaming completions (or chat, --endpoint chat); prints throughput and
TTFT/TPOT/ITL/E2E percentiles.
Stdlib only (asyncio sockets, a minimal HTTP/1.1 + SSE reader), so it runs anywhere.

    python bench/serve.py --base-url http://127.0.0.1:8000 --input-len 200 --output-len 64 \
        --num-prompts 64 --max-concurrency 4 --ignore-eos

--lora-names a,b,c,d spreads the requests over those LoRA adapters (request i asks for
names[i % len]), as a server started with --enable-lora --lora-modules a=... serves them.

--image WIDTHxHEIGHT sends each prompt as a chat message with a generated PNG (a different one
per request, so no cache hides the vision encoder) as a base64 image_url part.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import ssl
import statistics
import struct
import time
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point government company number group problem fact").split()


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    error: str = ""


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            yield await reader.readexactly(size)
            await reader.readline()
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def one_request(url: urllib.parse.ParseResult, path: str, body: dict,
                      api_key: str | None) -> Result:
    res, t0 = Result(), time.perf_counter()
    port = url.port or (443 if url.scheme == "https" else 80)
    ctx = ssl.create_default_context() if url.scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(url.hostname, port, ssl=ctx)
    except OSError as e:
        res.error = str(e)
        return res
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {len(data)}\r\n{auth}Connection: close\r\n\r\n").encode()
                 + data)
    try:
        status, headers = await _read_headers(reader)
        buf, last = b"", None
        async for piece in _body_pieces(reader, headers):
            if status != 200:
                res.error = piece.decode(errors="replace")[:200]
                continue
            buf += piece
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                if not frame.startswith(b"data: ") or frame == b"data: [DONE]":
                    continue
                event = json.loads(frame[6:])
                if "error" in event:
                    res.error = event["error"].get("message", "error")
                    continue
                if event.get("usage"):
                    res.num_output_tokens = event["usage"]["completion_tokens"]
                    res.num_prompt_tokens = event["usage"]["prompt_tokens"]
                choice = (event.get("choices") or [{}])[0]
                if not (choice.get("text") or (choice.get("delta") or {}).get("content")):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = time.perf_counter() - t0
        res.ok = status == 200 and not res.error and last is not None
        if status != 200 and not res.error:
            res.error = f"HTTP {status}"
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return res


def make_prompts(args: argparse.Namespace) -> list[str]:
    if args.dataset:
        with open(args.dataset) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        texts = [r["prompt"] if isinstance(r, dict) else str(r) for r in rows]
        return [texts[i % len(texts)] for i in range(args.num_prompts)]
    rng = random.Random(args.seed)
    # ~1 token per word for common English words with a leading space (BPE tokenizers);
    # the server's usage reports the real counts.
    return [" ".join(rng.choice(WORDS) for _ in range(args.input_len))
            for _ in range(args.num_prompts)]


def png_data_url(width: int, height: int, seed: int) -> str:
    """A noise PNG (stdlib only: zlib rows, filter 0) as a data: URL."""
    rng = random.Random(seed)
    rows = b"".join(b"\0" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0,
                                                                0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run(args: argparse.Namespace) -> dict:
    url = urllib.parse.urlparse(args.base_url)
    prefix = url.path.rstrip("/")
    v1 = prefix if prefix.endswith("/v1") else prefix + "/v1"
    image = getattr(args, "image", None)    # (bench/batch.py's namespace has none)
    chat = getattr(args, "endpoint", "completions") == "chat" or bool(image)   # images: chat
    path = v1 + ("/chat/completions" if chat else "/completions")
    model = args.model
    if model is None:
        req = urllib.request.Request(f"{url.scheme}://{url.netloc}{v1}/models",
                                     headers={"Authorization": f"Bearer {args.api_key or 'none'}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
    prompts = make_prompts(args)
    sem = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = random.Random(args.seed)
    images = []
    if image:
        width, height = (int(x) for x in image.lower().split("x"))
        images = [png_data_url(width, height, args.seed + i) for i in range(len(prompts))]

    names = [n for n in (args.lora_names or "").split(",") if n]

    async def limited(i: int, p: str) -> Result:
        async with sem:
            body = {"model": names[i % len(names)] if names else model,
                    "max_tokens": args.output_len, "stream": True,
                    "temperature": args.temperature, "ignore_eos": args.ignore_eos,
                    "stream_options": {"include_usage": True}}
            if images:
                body["messages"] = [{"role": "user", "content": [
                    {"type": "text", "text": p},
                    {"type": "image_url", "image_url": {"url": images[i]}}]}]
            elif chat:
                body["messages"] = [{"role": "user", "content": p}]
            else:
                body["prompt"] = p
            return await one_request(url, path, body, args.api_key)

    t0 = time.perf_counter()
    tasks = []
    for i, p in enumerate(prompts):
        tasks.append(asyncio.ensure_future(limited(i, p)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.num_output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    summary = {"model": ",".join(names) or model, "num_prompts": len(prompts),
               "successful": len(ok),
               "failed": len(results) - len(ok), "duration_s": duration,
               "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
               "request_throughput": len(ok) / duration,
               "output_throughput": out_tokens / duration, "total_output_tokens": out_tokens,
               # what the server counted (usage), not what --input-len asked for
               "mean_input_tokens": statistics.fmean(r.num_prompt_tokens for r in ok)
               if ok else float("nan")}
    for name, xs in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl),
                     ("e2e", [r.e2e for r in ok])):
        summary[f"mean_{name}_ms"] = 1000 * statistics.fmean(xs) if xs else float("nan")
        summary[f"median_{name}_ms"] = 1000 * pct(xs, 50)
        summary[f"p99_{name}_ms"] = 1000 * pct(xs, 99)
    errors = [r.error for r in results if not r.ok][:3]
    if errors:
        summary["first_errors"] = errors
    return summary


def print_summary(s: dict) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rows = [("Successful requests", s["successful"]), ("Failed requests", s["failed"]),
            ("Max concurrency", s["max_concurrency"]), ("Benchmark duration (s)", s["duration_s"]),
            ("Mean input tokens (server's count)", s["mean_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"])]
    for name in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)", s[f"{stat}_{name}_ms"]))
    for k, v in rows:
        print(f"{k:<40}{v:>20.2f}" if isinstance(v, float) else f"{k:<40}{v!s:>20}")
    for e in s.get("first_errors", []):
        print("error:", e)
    print("=" * 60)


def parser() -> argparse.ArgumentParser:
    """The load generator's flags (bench/batch.py builds its runs from these too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default=None, help='JSONL of {"prompt": ...} (default: random)')
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="chat: each prompt is one user message to /v1/chat/completions")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default inf: all at once)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-names", default=None,
                   help="comma-separated LoRA adapter names; requests are spread over them")
    p.add_argument("--image", default=None, metavar="WIDTHxHEIGHT",
                   help="send each prompt as a chat message with a generated image this size")
    p.add_argument("--json", action="store_true", help="print the summary as JSON too")
    return p


def main() -> None:
    args = parser().parse_args()
    s = asyncio.run(run(args))
    print_summary(s)
    if args.json:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
