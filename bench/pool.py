"""The model pool's time to first token (issue 34): a cold model (unloaded: the load is in the
TTFT), a parked one (sleep level 1: the wake-up is in it) and a loaded one, for the default
model and a larger dummy-weight model (bench/configs/qwen3-0.6b's shape with the default model's
tokenizer and vocabulary: ~0.49B parameters), with room for one model, so loading one parks the
other. Each round runs both models in turn (cold A, loaded A, cold B, loaded B, parked A,
parked B, then both unloaded); the process's RSS is read before the first load, with each model
loaded, and after both are unloaded (at once, and --settle seconds later). Prints every round,
then the medians.

    python bench/pool.py [--rounds 3] [--device cpu|cuda] [--big bench/configs/qwen3-0.6b]

On a CPU, sleep level 1 keeps the weights where they are (host memory already): a parked model
there frees only its KV cache, and its wake-up only allocates it again. The pool parks only on a
GPU; this bench parks on a CPU too, to time the same path.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from minserve.config import EngineConfig  # noqa: E402
from minserve.models.loader import resolve_model  # noqa: E402
from minserve.models_dir import ModelSpec, PoolSpec  # noqa: E402
from minserve.pool import ModelPool  # noqa: E402
from minserve.server import ServerConfig, create_app  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def big_folder(config_dir: str, default: str, out: str) -> str:
    """config_dir's shape with the default model's tokenizer (and its vocabulary size)."""
    with open(os.path.join(config_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(default, "config.json")) as f:
        small = json.load(f)
    cfg.update(vocab_size=small["vocab_size"], bos_token_id=small.get("bos_token_id"),
               eos_token_id=small.get("eos_token_id"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(default, name)):
            shutil.copy(os.path.join(default, name), out)
    return out


async def ttft(app, model: str) -> float:
    """Seconds from sending a streamed completion to its first token's chunk."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 2, "stream": True,
                       "temperature": 0}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")]}
    sent, first, done = [False], [None], asyncio.Event()

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        if msg["type"] == "http.response.start" and msg["status"] != 200:
            raise RuntimeError(f"status {msg['status']}")
        if msg["type"] == "http.response.body":
            if first[0] is None and b'"text"' in msg.get("body", b""):
                first[0] = time.perf_counter()
            if not msg.get("more_body"):
                done.set()

    t0 = time.perf_counter()
    await app(scope, receive, send)
    if first[0] is None:
        raise RuntimeError(f"{model}: no token came back")
    return first[0] - t0


async def run(args: argparse.Namespace) -> None:
    base = EngineConfig(device=args.device, max_model_len=2048, kv_cache_memory=256 << 20)
    default = resolve_model(None, gguf_quantized=False)
    tmp = tempfile.mkdtemp(prefix="minserve-pool-bench-")
    big = big_folder(args.big, default, os.path.join(tmp, "big"))
    spec = PoolSpec([ModelSpec("default", base, 0),
                     ModelSpec("big", dataclasses.replace(base, model=big,
                                                          load_format="dummy"), 0)],
                    max_loaded=1, park=True)
    ModelPool._can_park = lambda self, m: True    # see the docstring: park on a CPU too
    app = create_app(None, ServerConfig(served_model_names=[], log_stats=False), pool=spec)
    await app.startup()
    rows: list[dict[str, float]] = []
    try:
        for i in range(args.rounds):
            row = {"rss_before": rss_mib()}
            for name in ("default", "big"):
                row[f"{name}_cold"] = await ttft(app, name)
                row[f"rss_{name}_loaded"] = rss_mib()
                row[f"{name}_loaded"] = await ttft(app, name)
            for name in ("default", "big"):
                row[f"{name}_parked"] = await ttft(app, name)
            for name in ("default", "big"):
                await app.pool.unload(name)
            row["rss_after_unload"] = rss_mib()
            await asyncio.sleep(args.settle)     # what a late thread or free gives back
            row["rss_settled"] = rss_mib()
            rows.append(row)
            print(f"round {i + 1}: " + " ".join(
                f"{k}={v:.1f}MiB" if k.startswith("rss") else f"{k}={v:.3f}s"
                for k, v in row.items()), flush=True)
    finally:
        await app.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print("medians: " + " ".join(
        f"{k}={statistics.median(r[k] for r in rows):.{1 if k.startswith('rss') else 3}f}"
        for k in rows[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds after the unloads before the last RSS reading")
    p.add_argument("--big", default=os.path.join(HERE, "configs", "qwen3-0.6b"))
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
