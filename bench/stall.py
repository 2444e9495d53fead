"""How long one long prompt stalls everyone else: against any OpenAI-compatible base URL, a
"ticker" stream decodes while a long prompt (exact token ids) is prefilled, and a 1-token probe
request is sent just after the long prompt. Prints the probe's latency, the ticker's longest gap
between tokens (about the longest engine step) and the long prompt's time to first token.
Stdlib only.

    python -m minserve serve --port 8000 &
    python bench/stall.py --base-url http://127.0.0.1:8000 --prompt-len 2000 --repeats 3
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def _post(base: str, body: dict, on_event=None) -> float:
    """POST /v1/completions; calls on_event(t) per SSE event when streaming, and hangs up (the
    server aborts the request) once it returns False; -> seconds."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {r.read()[:300]!r}")
    if on_event is None:
        r.read()
    else:
        while line := r.readline():
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                if on_event(time.monotonic()) is False:
                    break
    conn.close()
    return time.monotonic() - t0


def one_run(base: str, model: str | None, prompt_len: int, vocab: int, seed: int,
            delay: float) -> dict:
    rng = random.Random(seed)  # fresh ids each run: no prefix-cache hits between runs
    extra = {"model": model} if model else {}
    ticks: list[float] = []
    stop = threading.Event()

    def tick(t: float) -> bool:
        ticks.append(t)
        return not stop.is_set()

    ticker = threading.Thread(target=_post, args=(base, {
        **extra, "prompt": [rng.randrange(vocab) for _ in range(8)], "max_tokens": 1000,
        "ignore_eos": True, "stream": True}, tick))
    ticker.start()
    while len(ticks) < 5:
        time.sleep(0.01)
    long_ids = [rng.randrange(vocab) for _ in range(prompt_len)]
    long_out: dict = {}

    def long_prompt() -> None:
        first: list[float] = []
        t0 = time.monotonic()
        long_out["total"] = _post(base, {**extra, "prompt": long_ids, "max_tokens": 1,
                                         "stream": True}, first.append)
        long_out["ttft"] = first[0] - t0 if first else None
        long_out["start"], long_out["first"] = t0, first[0] if first else None

    lt = threading.Thread(target=long_prompt)
    lt.start()
    # NOTE: a fixed delay, not a metric: the engine's gauges refresh only between steps, and
    # an unchunked prefill is one step.
    time.sleep(delay)
    probe = _post(base, {**extra, "prompt": [rng.randrange(vocab) for _ in range(4)],
                         "max_tokens": 1})
    lt.join()
    stop.set()
    ticker.join()
    start, end = long_out["start"], long_out["first"] or time.monotonic()
    during = [t for t in ticks if start <= t <= end]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    before = [b - a for a, b in zip(ticks[:5], ticks[1:5], strict=False)]
    return {"probe_s": probe, "long_ttft_s": long_out["ttft"],
            "ticker_max_gap_s": max(gaps) if gaps else end - start,
            "ticker_tokens_during_prefill": len(during),
            "ticker_gap_before_s": statistics.median(before) if before else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-len", type=int, default=2000)
    p.add_argument("--vocab", type=int, default=10000, help="prompt ids are drawn below this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0,
                   help="first run's seed; use a new one against a server that already ran "
                        "one (its prefix cache would hold the long prompt)")
    p.add_argument("--probe-delay", type=float, default=0.5,
                   help="seconds between sending the long prompt and the probe")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    runs = [one_run(a.base_url, a.model, a.prompt_len, a.vocab, seed, a.probe_delay)
            for seed in range(a.seed, a.seed + a.repeats)]
    if a.json:
        print(json.dumps(runs))
        return
    for key in runs[0]:
        vals = [r[key] for r in runs if r[key] is not None]
        shown = " / ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals)
        print(f"{key:30s} {shown:40s} median {statistics.median(vals):.2f}")


if __name__ == "__main__":
    main()
