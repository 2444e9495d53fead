"""Side-by-side serving benchmark: starts each side's server in turn (fresh process per run, so
no prefix-cache hits carry over), waits for /health, runs one warm-up and then bench/serve.py at
each concurrency, stops it, and moves to the next side: sides alternate within every round.
Prints one row per (side, concurrency) with the median over rounds and the load average seen.

    python bench/compare.py --rounds 3 --concurrency 1 16 \\
      --side 'minserve||python -m minserve --port {port}' \\
      --side 'llama-server||/work/llamacpp/build/bin/llama-server -m MODEL.gguf --port {port} -np 16 -t 2 -c 8192'

A side is 'NAME|ENV=V ENV2=V|COMMAND' ({port} is filled in; ENV may be empty). The benchmark
arguments are bench/serve.py's: --input-len 200 --output-len 64 --ignore-eos, num prompts 16
at concurrency 1 and 2x the concurrency above it (--num-prompts overrides).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server on port {port} not healthy after {timeout:.0f}s")


def serve_bench(port: int, args: argparse.Namespace, concurrency: int, num_prompts: int,
                seed: int) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "serve.py"), "--base-url",
           f"http://127.0.0.1:{port}", "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--ignore-eos", "--max-concurrency", str(concurrency),
           "--num-prompts", str(num_prompts), "--seed", str(seed), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_side(side: tuple[str, dict, str], port: int, args: argparse.Namespace,
             round_index: int) -> list[dict]:
    name, env, command = side
    log = open(os.path.join(args.log_dir, f"{name}-r{round_index}.log"), "w")
    proc = subprocess.Popen(shlex.split(command.format(port=port)), env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        wait_healthy(port, proc, args.startup_timeout)
        serve_bench(port, args, 4, 4, 1)                      # warm-up
        for c in args.concurrency:
            n = args.num_prompts or (16 if c == 1 else 2 * c)
            load = os.getloadavg()[0]
            s = serve_bench(port, args, c, n, 1000 * round_index + c)
            rows.append({"side": name, "round": round_index, "concurrency": c,
                         "num_prompts": n, "load_before": round(load, 2),
                         "load_after": round(os.getloadavg()[0], 2),
                         **{k: s[k] for k in ("output_throughput", "median_ttft_ms",
                                              "median_tpot_ms", "median_itl_ms",
                                              "successful", "failed", "mean_input_tokens")}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return rows


def parse_side(text: str) -> tuple[str, dict, str]:
    name, env, command = text.split("|", 2)
    return name, dict(kv.split("=", 1) for kv in env.split()), command


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", action="append", required=True, type=parse_side)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        for i, side in enumerate(args.side):
            rows += run_side(side, args.port + i, args, r)
    print(f"\n{'side':<24}{'conc':>5}{'out tok/s':>11}{'TTFT ms':>10}{'TPOT ms':>10}"
          f"{'runs':>6}  load")
    for side in args.side:
        for c in args.concurrency:
            mine = [x for x in rows if x["side"] == side[0] and x["concurrency"] == c]
            if not mine:
                continue
            med = {k: statistics.median(x[k] for x in mine)
                   for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms")}
            loads = "/".join(f"{x['load_before']:.1f}" for x in mine)
            print(f"{side[0]:<24}{c:>5}{med['output_throughput']:>11.1f}"
                  f"{med['median_ttft_ms']:>10.0f}{med['median_tpot_ms']:>10.1f}"
                  f"{len(mine):>6}  {loads}")


if __name__ == "__main__":
    main()
