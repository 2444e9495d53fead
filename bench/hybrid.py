"""Hybrid linear-attention models on the CPU (dummy weights, engine.step(), no HTTP), both sides
of each comparison alternating in one run; prints every round and the medians:

  1. decode step at each batch size: Qwen3.5-0.8B's shape (18 Gated DeltaNet + 6 gated attention
     layers) next to Qwen3-0.6B's (28 attention layers);
  2. a second chat turn's TTFT (turn one's prompt and answer, then a new message) with the
     prefix cache's state snapshots and without prefix caching (the whole turn recomputed).

    OMP_NUM_THREADS=2 python bench/hybrid.py --batch 1 16 --rounds 3
    python bench/hybrid.py --layers 4 --batch 1 --rounds 2 --steps 3 --turn1 256   # quick check

--layers cuts both models to that many layers (Qwen3.5 keeps its 3:1 pattern)."""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def engine_args(args, max_len: int) -> dict:
    return dict(load_format="dummy", dtype=args.dtype, max_model_len=max_len,
                max_num_seqs=max(args.batch), kv_cache_memory=512 << 20,
                max_num_batched_tokens=512)


def decode_rounds(args) -> None:
    from moe_decode import model_folder, run_batch

    from minserve import LLM

    names = {"qwen3.5-0.8b": "Qwen3.5-0.8B shape", "qwen3-0.6b": "Qwen3-0.6B shape"}
    max_len = args.input_len + args.steps + 64 + 8
    engines = {n: LLM(model_folder(os.path.join(HERE, "configs", n), args.layers),
                      **engine_args(args, max_len)).engine for n in names}
    rng = random.Random(0)
    rows = {(n, b): [] for n in names for b in args.batch}
    for r in range(args.rounds):
        for b in args.batch:
            for n, engine in engines.items():      # both sides, alternating, each round
                wall, cpu = run_batch(engine, b, args.input_len, args.steps, rng)
                rows[n, b].append(statistics.median(wall))
                print(f"round {r}: {names[n]:18s} batch {b:3d} step ms "
                      f"{' '.join(f'{t * 1e3:.1f}' for t in wall)} (cpu ms "
                      f"{' '.join(f'{t * 1e3:.1f}' for t in cpu)})   load "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
    for b in args.batch:
        a, q = (statistics.median(rows[n, b]) * 1e3 for n in names)
        print(f"median decode step, batch {b}: Qwen3.5-0.8B shape {a:.1f} ms, Qwen3-0.6B shape "
              f"{q:.1f} ms ({a / q:.2f}x)")
    for engine in engines.values():
        engine.shutdown()


def chat_rounds(args) -> None:
    from moe_decode import model_folder

    from minserve import LLM, SamplingParams

    folder = model_folder(os.path.join(HERE, "configs", "qwen3.5-0.8b"), args.layers)
    max_len = args.turn1 + 16 + 32 + 8
    llms = {"snapshots": LLM(folder, enable_prefix_caching=True, **engine_args(args, max_len)),
            "no prefix cache": LLM(folder, enable_prefix_caching=False,
                                   **engine_args(args, max_len))}
    rng = random.Random(1)
    answer = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    ttft = {k: [] for k in llms}
    for r in range(args.rounds):
        turn1 = [rng.randrange(1000, 100000) for _ in range(args.turn1)]
        new = [rng.randrange(1000, 100000) for _ in range(32)]
        for name, llm in llms.items():
            (one,) = llm.generate([turn1], answer, use_tqdm=False)
            turn2 = turn1 + one.outputs[0].token_ids + new
            t = time.perf_counter()
            (two,) = llm.generate([turn2], first, use_tqdm=False)
            ttft[name].append(time.perf_counter() - t)
            print(f"round {r}: {name:16s} turn 2 ({len(turn2)} tokens, {two.num_cached_tokens} "
                  f"cached) TTFT {ttft[name][-1] * 1e3:.1f} ms   load {os.getloadavg()[0]:.2f}",
                  flush=True)
    a, b = (statistics.median(ttft[k]) * 1e3 for k in llms)
    print(f"median second-turn TTFT: with state snapshots {a:.1f} ms, without prefix caching "
          f"{b:.1f} ms ({b / a:.2f}x)")
    for llm in llms.values():
        llm.engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="cut both models to this many")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turn1", type=int, default=1024, help="turn one's prompt tokens")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", choices=("decode", "chat"), default=None)
    args = ap.parse_args()
    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    if args.only != "chat":
        decode_rounds(args)
    if args.only != "decode":
        chat_rounds(args)


if __name__ == "__main__":
    main()
