"""Issue 36's figures, each against a real `python -m minserve` on 127.0.0.1 (stdlib client):

  bombs  peak and settled RSS while a tiny LLaVA gets --rounds requests of 30 data: PNGs that
         each decode to 49 megapixels (6 KB each), under default flags and with
         --limit-mm-per-prompt raised to 30 (then the pixel budget is what refuses)
  drip   a host that sends headers, then one byte every 2 s: one request with 16 image URLs on
         it, and meanwhile --drip-s seconds of one-at-a-time requests with an inline image;
         prints how many of those were served (200) and their latencies
  beam   a 1-token probe's TTFT idle and during {"n": 128, "use_beam_search": true,
         "max_tokens": 16} on the default model, with the fan-out cap (default) and without it
         (--max-fanout-rows 0, the behaviour before), the two servers alternating per round;
         --beam-window S: probe for S seconds, then stop the server (the search unfinished)
  fuzz   RSS of the default model's server when ready, after --fuzz-count seeded fuzz bodies
         (tests/test_fuzz.py's corpus: most are refused with a 4xx) and after 3 s idle

    python bench/hardening.py bombs --rounds 3
    python bench/hardening.py drip --drip-s 20
    python bench/hardening.py beam --rounds 2
    python bench/hardening.py beam --rounds 3 --beam-window 120
    python bench/hardening.py fuzz --fuzz-count 2000
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# the repo root instead of bench/ (bench/kernels.py would shadow the `kernels` package)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench.soak import largest_anon_kib, rss_kib  # noqa: E402
from tests.serving import start_server, stop_server  # noqa: E402


def post(url: str, path: str, body: dict, timeout: float = 600) -> tuple[int, bytes, float]:
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    t0 = time.monotonic()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data, time.monotonic() - t0


class PeakRSS:
    """Samples the server tree's RSS every 20 ms while in the with-block; .peak in MiB."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = rss_kib(self.pid) / 1024

        def loop() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, rss_kib(self.pid) / 1024)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pid) / 1024)


def mib(pid: int) -> float:
    return rss_kib(pid) / 1024


def chat(*urls: str) -> dict:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What's in these?"},
        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]}


def tiny_llava(folder: str) -> list[str]:
    from tests.tiny_vlm import make_tiny_vlm
    return ["serve", make_tiny_vlm(folder, "LlavaForConditionalGeneration"),
            "--served-model-name", "tiny", "--kv-cache-memory", "8MiB", "--max-model-len", "512"]


def bombs(args: argparse.Namespace) -> None:
    from tests.test_hardening_images import bomb_png
    png = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    body = chat(*[png] * 30)
    print(f"body: {len(json.dumps(body)) / 1024:.0f} KB, 30 images of 7000x7000 (49 MP each)")
    with tempfile.TemporaryDirectory() as d:
        base = tiny_llava(d)
        for name, extra in (("default flags", []),
                            ("--limit-mm-per-prompt 30", ["--limit-mm-per-prompt",
                                                          '{"image": 30}'])):
            proc, url = start_server(base + extra)
            try:
                ready = mib(proc.pid)
                for i in range(args.rounds):
                    with PeakRSS(proc.pid) as peak:
                        status, data, secs = post(url, "/v1/chat/completions", body)
                    time.sleep(3)     # the idle heap trim
                    print(f"{name} round {i + 1}: {status} in {secs:.2f} s, RSS ready "
                          f"{ready:.0f} MiB, peak {peak.peak:.0f} MiB, 3 s after "
                          f"{mib(proc.pid):.0f} MiB; {data[:160]!r}")
            finally:
                stop_server(proc)


def drip(args: argparse.Namespace) -> None:
    from tests.media_server import DripServer, png_bytes
    inline = chat("data:image/png;base64," + base64.b64encode(png_bytes()).decode())
    host = DripServer(interval=2.0, num_bytes=10_000)
    with tempfile.TemporaryDirectory() as d:
        proc, url = start_server(tiny_llava(d) + ["--allow-private-media-urls",
                                                  "--limit-mm-per-prompt", '{"image": 16}'])
        try:
            pool = ThreadPoolExecutor(1)
            slow = pool.submit(post, url, "/v1/chat/completions",
                               chat(*[host.url(f"/{i}.png") for i in range(16)]))
            while host.num_open == 0:
                time.sleep(0.01)
            served, seen, t_end = [], [], time.monotonic() + args.drip_s
            while time.monotonic() < t_end:
                status, data, secs = post(url, "/v1/chat/completions", inline)
                seen.append((status, secs))
                if status == 200:
                    served.append(secs)
            status, data, secs = slow.result()
            print(f"16-URL request on the dripping host: {status} after {secs:.1f} s "
                  f"({data[:120]!r}); host connections at most {host.max_open} at once, "
                  f"{host.num_cut} cut by the server")
            print(f"inline-image requests during {args.drip_s:.0f} s of drip: {len(served)} of "
                  f"{len(seen)} served (200); latency median "
                  f"{statistics.median(s for _, s in seen):.3f} s, max "
                  f"{max(s for _, s in seen):.3f} s; statuses {sorted({s for s, _ in seen})}")
        finally:
            host.stopped.set()
            stop_server(proc)


def probe_ttft(url: str) -> float:
    status, data, secs = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 1})
    assert status == 200, data
    return secs


def beam(args: argparse.Namespace) -> None:
    big = {"prompt": "1, 2, 3,", "max_tokens": 16, "n": 128, "use_beam_search": True}
    sides = {"cap (default)": [], "no cap (--max-fanout-rows 0)": ["--max-fanout-rows", "0"]}
    sides = {k: v for k, v in sides.items() if k.split(" (")[0] in args.sides}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
    for rnd in range(args.rounds):
        for name, extra in sides.items():
            proc, url = start_server(["serve", *extra])
            try:
                idle = statistics.median(probe_ttft(url) for _ in range(5))
                pool = ThreadPoolExecutor(1)
                fut = pool.submit(post, url, "/v1/completions", big)
                probes = []
                time.sleep(1.0)        # the search under way
                t0 = time.monotonic()
                while not fut.done() and (args.beam_window is None
                                          or time.monotonic() - t0 < args.beam_window):
                    probes.append(probe_ttft(url))
                if fut.done():
                    status, data, secs = fut.result()
                    assert status == 200, data
                else:                  # the window ended first: the server stops it below
                    secs = float("nan")
                busy = statistics.median(probes) if probes else float("nan")
                print(f"round {rnd + 1} {name}: idle probe {idle * 1000:.0f} ms; beam search "
                      f"{secs:.1f} s (nan: unfinished in the window); {len(probes)} probes "
                      f"during it: median {busy * 1000:.0f} ms, max {max(probes, default=0) * 1000:.0f} ms "
                      f"({busy / idle:.1f}x idle)")
                results[name].append((idle, busy, max(probes, default=0)))
            finally:
                stop_server(proc)
    for name, rows in results.items():
        print(f"{name}: median idle {statistics.median(r[0] for r in rows) * 1000:.0f} ms, "
              f"median probe during beam {statistics.median(r[1] for r in rows) * 1000:.0f} ms,"
              f" worst {max(r[2] for r in rows) * 1000:.0f} ms")


def fuzz(args: argparse.Namespace) -> None:
    from tests.test_fuzz import _bodies
    proc, url = start_server(["serve", "--served-model-name", "tiny"])
    try:
        ready, kv_ready = mib(proc.pid), largest_anon_kib(proc.pid) / 1024
        statuses: dict[int, int] = {}
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for status, _, _ in pool.map(lambda pb: post(url, pb[0], pb[1]),
                                         _bodies(args.seed, args.fuzz_count)):
                statuses[status] = statuses.get(status, 0) + 1
        end = mib(proc.pid)
        time.sleep(3)
        kv = largest_anon_kib(proc.pid) / 1024
        print(f"{args.fuzz_count} fuzz bodies (seed {args.seed}) in {time.monotonic() - t0:.0f}"
              f" s, statuses {dict(sorted(statuses.items()))}; RSS ready {ready:.0f} MiB (KV "
              f"cache mapping {kv_ready:.0f}), at the end {end:.0f} MiB, 3 s idle after "
              f"{mib(proc.pid):.0f} MiB (KV cache mapping {kv:.0f}: it fills as blocks are "
              "first used, up to its fixed size)")
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["bombs", "drip", "beam", "fuzz"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sides", type=lambda s: s.split(","), default=["cap", "no cap"],
                   help="beam: which servers, comma-separated (default: cap,no cap)")
    p.add_argument("--drip-s", type=float, default=20.0)
    p.add_argument("--beam-window", type=float, default=None,
                   help="beam: seconds of probes during the search (default: until it ends)")
    p.add_argument("--fuzz-count", type=int, default=2000)
    p.add_argument("--seed", type=int, default=36)
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()}")
    {"bombs": bombs, "drip": drip, "beam": beam, "fuzz": fuzz}[args.figure](args)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
