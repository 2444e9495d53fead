"""MoE decode step against the memory-bandwidth bound (CPU): a dummy-weight model (default the
gpt-oss-20b shape, MXFP4 experts served from their blocks), B requests prefilled, then decode
steps timed one by one (engine.step(), no HTTP). Each round measures the copy bandwidth and then
every batch size, so the bound and the steps are taken under the same load; prints every round
and the medians. One process:

    OMP_NUM_THREADS=2 python bench/moe_decode.py --batch 1 16 --rounds 3
    python bench/moe_decode.py --layers 4 --batch 1 --rounds 2 --steps 3     # a quick check

The bound is the bytes a step must read (every dense weight but the embedding, whose rows are
gathered, plus each layer's experts that the batch routes to; with dummy weights the routing is
close to uniform, so the expected count E * (1 - (1 - k/E)^B) of distinct experts stands in)
over the copy bandwidth (read + write counted, as STREAM's copy) of a 256 MiB buffer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
SPARE_TOKENS = 64


def model_folder(src: str, layers: int | None) -> str:
    """`src`, or a copy of its config.json with num_hidden_layers (and layer_types) cut to
    `layers`, plus a byte-level tokenizer when it has none."""
    from offline import byte_level_tokenizer

    if layers is None and os.path.isfile(os.path.join(src, "tokenizer.json")):
        return src
    folder = tempfile.mkdtemp(prefix="minserve-bench-moe-")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if cfg.get("layer_types"):
            cfg["layer_types"] = cfg["layer_types"][:layers]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        shutil.copy(os.path.join(src, "tokenizer.json"), folder)
    else:
        byte_level_tokenizer(folder)
    return folder


def copy_bandwidth(rounds: int = 5) -> float:
    """Bytes/s of the best of `rounds` copies of a 256 MiB CPU buffer (read + write counted;
    far beyond any cache, and small beside the model)."""
    import torch

    src = torch.ones(1 << 26, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def step_bytes(model, num_experts: int, top_k: int, batch: int) -> tuple[int, int, float]:
    """(dense bytes, one expert's bytes summed over the layers, experts read per layer)."""
    dense = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if ".experts." not in name and "embed_tokens" not in name)
    per_expert = sum(m.nbytes() // m.weights.num_experts for m in model.modules()
                     if getattr(m, "weights", None) is not None and hasattr(m, "nbytes"))
    touched = num_experts * (1 - (1 - top_k / num_experts) ** batch)
    return dense, per_expert, touched


def run_batch(engine, batch: int, input_len: int, steps: int,
              rng: random.Random) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of `steps` all-decode steps of `batch` fresh
    requests (on a loaded machine CPU time is the steadier figure)."""
    from minserve import SamplingParams
    from minserve.engine.request import EngineRequest

    vocab = min(10000, engine.info.vocab_size - 1)
    ids = [f"b{batch}-{rng.random()}-{i}" for i in range(batch)]
    for rid in ids:     # room to spare: rows prefilled in an early chunk decode while others fill
        engine.add_request(EngineRequest(
            rid, [rng.randint(0, vocab) for _ in range(input_len)],
            SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=SPARE_TOKENS + steps)))
    while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    engine.step()                                        # first all-decode step: warm-up
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        engine.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(HERE, "configs", "gpt-oss-20b"),
                    help="a folder with config.json (weights are random: --load-format dummy)")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    import torch

    from minserve import LLM

    llm = LLM(model_folder(args.model, args.layers), load_format="dummy", dtype=args.dtype,
              max_model_len=args.input_len + args.steps + SPARE_TOKENS + 8,
              max_num_seqs=max(args.batch),
              kv_cache_memory=256 << 20)
    engine = llm.engine
    model = engine.runner.model
    moe = engine.model_config.moe
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {engine.dtype}, "
          f"{engine.model_config.num_hidden_layers} layers, {moe.num_experts} experts top "
          f"{moe.top_k}; peak RSS after load {rss:.2f} GiB; load {os.getloadavg()[0]:.2f}",
          flush=True)
    rng = random.Random(0)
    rows: dict[int, list[float]] = {b: [] for b in args.batch}
    cpu_rows: dict[int, list[float]] = {b: [] for b in args.batch}
    bws = []
    for r in range(args.rounds):
        bws.append(copy_bandwidth())
        print(f"round {r}: copy {bws[-1] / 1e9:.2f} GB/s   load {os.getloadavg()[0]:.2f}",
              flush=True)
        for b in args.batch:
            times, cpu = run_batch(engine, b, args.input_len, args.steps, rng)
            rows[b].append(statistics.median(times))
            cpu_rows[b].append(statistics.median(cpu))
            print(f"round {r}: batch {b:3d} steps ms "
                  f"{' '.join(f'{t * 1e3:.0f}' for t in times)} (process CPU "
                  f"{' '.join(f'{t * 1e3:.0f}' for t in cpu)})   load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    bw = statistics.median(bws)
    print(f"# median copy bandwidth {bw / 1e9:.2f} GB/s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} GiB")
    for b in args.batch:
        dense, per_expert, touched = step_bytes(model, moe.num_experts, moe.top_k, b)
        nbytes = dense + per_expert * touched
        step = statistics.median(rows[b])
        print(json.dumps({
            "batch": b, "median_step_ms": round(step * 1e3, 1),
            "rounds_ms": [round(t * 1e3, 1) for t in rows[b]], "tok_s": round(b / step, 2),
            "median_process_cpu_ms": round(statistics.median(cpu_rows[b]) * 1e3, 1),
            "step_gb": round(nbytes / 1e9, 3), "bound_ms": round(nbytes / bw * 1e3, 1),
            "of_bound": round(nbytes / bw / step, 3)}), flush=True)


if __name__ == "__main__":
    main()
