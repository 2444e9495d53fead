"""Issue 40: does the HTTP side keep up with the engine? On the near-free model of
bench/tiny_model.py (built here into a temporary folder), alternately per round:
  offline: bench/offline.py, the engine alone (LLM), `--num-prompts` requests of `--input-len`
           prompt tokens and `--output-len` output tokens, ignore_eos, `--max-concurrency` at once;
  server:  `python -m minserve` on the same model, driven by bench/serve.py's load generator
           (streaming completions, ignore_eos) at the same concurrency; the server's CPU seconds
           come from /proc.
Prints every round and the medians (output tok/s, the server's ratio to offline, TPOT).

    python bench/serve_speed.py --rounds 3 --max-concurrency 128
    python bench/serve_speed.py --rounds 3 --max-concurrency 1 --num-prompts 8
    python bench/serve_speed.py --rounds 3 --engine-process   # the server with the engine
        # thread (--no-engine-process) and with the engine process (split_*), same rounds
    python bench/serve_speed.py --rounds 1 --profile /tmp/server.prof   # cProfile of the
        # server's main thread (the event loop: everything but the engine thread)
    git archive main minserve | tar -x -C /tmp/base && \
        python bench/serve_speed.py --rounds 3 --compare-src /tmp/base   # + main's server
With --compare-src DIR each round also runs the server from DIR's `minserve` package (put first on
PYTHONPATH; minserve.kernels still comes from the installed tree): before/after in one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """(the server process's CPU seconds, its child processes' (the engine process's))."""
    kids = 0.0
    for k in children(pid):
        try:
            kids += cpu_seconds(k)
        except FileNotFoundError:
            pass
    return cpu_seconds(pid), kids


def offline(args: argparse.Namespace, model: str) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "offline.py"), "--model", model,
           "--num-requests", str(args.num_prompts), "--min-input-len", str(args.input_len),
           "--max-input-len", str(args.input_len), "--min-output-len", str(args.output_len),
           "--max-output-len", str(args.output_len), "--max-num-seqs", str(args.max_concurrency),
           "--max-model-len", str(args.max_model_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def server(args: argparse.Namespace, model: str, port: int, src: str | None = None,
           extra: tuple[str, ...] = ()) -> dict:
    sys.path.insert(0, HERE)
    import serve
    from compare import wait_healthy

    prefix = [sys.executable, "-m", "cProfile", "-o", args.profile] if args.profile else \
        [sys.executable]
    cmd = [*prefix, "-m", "minserve", "--model", model, "--port", str(port),
           "--max-num-seqs", str(args.max_concurrency), "--max-model-len",
           str(args.max_model_len), *extra, *args.server_args]
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    # cwd: `-m` puts it first on sys.path, where a checkout's minserve/ would shadow src's
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=src or os.path.dirname(os.path.abspath(model)))
    try:
        wait_healthy(port, proc, 300)
        load = serve.parser().parse_args([
            "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "4",
            "--input-len", str(args.input_len), "--output-len", "4", "--ignore-eos"])
        asyncio.run(serve.run(load))   # warm-up
        load.num_prompts, load.output_len = args.num_prompts, args.output_len
        load.max_concurrency = args.max_concurrency
        (api0, eng0), t0 = tree_cpu_seconds(proc.pid), time.perf_counter()
        s = asyncio.run(serve.run(load))
        api1, eng1 = tree_cpu_seconds(proc.pid)
        s["server_cpu_s"] = api1 - api0 + eng1 - eng0
        s["api_cpu_s"] = api1 - api0
        s["wall_s"] = time.perf_counter() - t0
        return s
    finally:
        proc.terminate()   # SIGTERM: drains, and cProfile writes its file on the way out
        proc.wait(60)


def figures(srv: dict, prefix: str, off: dict) -> dict:
    row = {prefix + "server_tok_s": round(srv["output_throughput"], 1),
           prefix + "median_tpot_ms": round(srv["median_tpot_ms"], 3),
           prefix + "server_cores": round(srv["server_cpu_s"] / srv["wall_s"], 2),
           # the process that serves HTTP (with --engine-process: without the engine)
           prefix + "api_cores": round(srv["api_cpu_s"] / srv["wall_s"], 2),
           # the server process's CPU (engine thread included) per output token: a loaded
           # machine changes it less than the wall-clock figures
           prefix + "cpu_us_per_token": round(1e6 * srv["server_cpu_s"] /
                                              max(srv["total_output_tokens"], 1), 1),
           prefix + "failed": srv["failed"]}
    if off.get("output_tok_s"):
        row[prefix + "ratio"] = round(srv["output_throughput"] / off["output_tok_s"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-concurrency", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--port", type=int, default=18740)
    ap.add_argument("--model", default=None, help="default: bench/tiny_model.py's, built now")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--compare-src", default=None,
                    help="a folder holding another minserve/ (e.g. main's): its server too")
    ap.add_argument("--engine-process", action="store_true",
                    help="each round also runs the server with --engine-process (split_*)")
    ap.add_argument("--profile", default=None, help="cProfile output of the server (1 round)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                    help="the rest goes to `python -m minserve`")
    args = ap.parse_args()
    model = args.model
    if model is None:
        # NOTE: bench/ holds kernels.py, which would shadow the package transformers imports
        sys.path.remove(HERE)
        sys.path.append(HERE)
        from tiny_model import build
        model = build(tempfile.mkdtemp(prefix="minserve-tiny-"))
    rows = []
    for r in range(args.rounds):
        off = {} if args.skip_offline else offline(args, model)
        srv = server(args, model, args.port,
                     extra=("--no-engine-process",) if args.engine_process else ())
        row = {"round": r, "offline_tok_s": off.get("output_tok_s"), **figures(srv, "", off)}
        if args.engine_process:
            row.update(figures(server(args, model, args.port, extra=("--engine-process",)),
                               "split_", off))
        if args.compare_src:
            row.update(figures(server(args, model, args.port, args.compare_src), "base_", off))
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]
           if k != "round" and not k.endswith("failed") and rows[0][k] is not None}
    print("median", json.dumps({k: round(v, 3) for k, v in med.items()}))


if __name__ == "__main__":
    main()
