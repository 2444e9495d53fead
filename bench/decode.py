"""Decode step time at fixed batch sizes: B requests with --input-len random prompt ids are
prefilled, then --steps decode steps of all B rows are timed one by one (engine.step(), no HTTP).
Prints the median step, tokens/s, and with --timers the per-phase self times of bench/phases.py
(wall and this thread's CPU, per step). One process, batch sizes in the order given. With
--activations int8 exact the native CPU int kernels' two activation paths (kernels/cpu_native.py;
exact: MINSERVE_CPU_EXACT_ACTIVATIONS=1) alternate within each of --rounds rounds on the same
requests; every round is printed, then the medians:

    python bench/decode.py --batch 1 4 16 --timers
    python bench/decode.py --batch 16 --dtype bfloat16 --threads 1
    python bench/decode.py --batch 1 --rounds 5 --activations int8 exact --timers
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="folder, .gguf or hub id (default: built-in)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads, as OMP_NUM_THREADS (default: the engine's)")
    ap.add_argument("--timers", action="store_true", help="per-phase self times")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of 3 steps")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--activations", nargs="+", choices=["int8", "exact"], default=None,
                    help="CPU int kernels' activations, alternating (default: as configured)")
    args = ap.parse_args()

    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)    # before torch is imported
    from minserve import LLM, SamplingParams, env
    from minserve.engine.request import EngineRequest

    llm = LLM(args.model, dtype=args.dtype)
    engine = llm.engine
    import torch

    timers = None
    if args.timers:
        from phases import PhaseTimers

        timers = PhaseTimers()
        timers.install(engine)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {engine.dtype}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    sides = args.activations or [None]
    rng = random.Random(0)
    vocab = min(10000, engine.info.vocab_size - 1)
    for batch in args.batch:
        for i in range(batch):
            engine.add_request(EngineRequest(
                f"b{batch}-{i}", [rng.randint(0, vocab) for _ in range(args.input_len)],
                SamplingParams(temperature=args.temperature, ignore_eos=True,
                               max_tokens=(args.steps + 1) * args.rounds * len(sides) + 4)))
        while engine.scheduler.num_waiting or any(
                r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
            engine.step()
        engine.step()                                    # first all-decode step: warm-up
        medians: dict[str | None, list[float]] = {side: [] for side in sides}
        for rnd in range(args.rounds):
            for side in sides:
                if side is not None:
                    env.CPU_EXACT_ACTIVATIONS = side == "exact"
                    engine.step()                        # warm-up after the switch
                line = _timed_steps(engine, args.steps, batch, timers)
                line.update(round=rnd, activations=side)
                medians[side].append(line["median_step_ms"])
                print(json.dumps(line) if args.json else
                      f"batch {batch:3d} round {rnd} {side or '':5s}: step median "
                      f"{line['median_step_ms']:8.2f} ms (min {line['min_step_ms']:.2f}, cpu: "
                      f"thread {line['median_thread_cpu_ms']:.2f}, process "
                      f"{line['median_process_cpu_ms']:.2f}) -> {line['tok_s']:7.1f} tok/s   "
                      f"load {line['load']}", flush=True)
                if timers and rnd == args.rounds - 1:
                    print(timers.table(args.steps), flush=True)
        if args.rounds > 1 or len(sides) > 1:
            print(f"batch {batch:3d} medians over {args.rounds} rounds: " + ", ".join(
                f"{side or 'step'} {statistics.median(v):.2f} ms" for side, v in medians.items()),
                flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        while engine.has_unfinished_requests():
            engine.step()


def _timed_steps(engine, steps: int, batch: int, timers) -> dict:
    if timers:
        timers.reset()
    wall, cpu, proc = [], [], []
    for _ in range(steps):
        w, c, p = time.perf_counter(), time.thread_time(), time.process_time()
        engine.step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.thread_time() - c)
        proc.append(time.process_time() - p)
    step = statistics.median(wall)
    return {"batch": batch, "median_step_ms": round(step * 1e3, 2),
            "min_step_ms": round(min(wall) * 1e3, 2),
            "median_thread_cpu_ms": round(statistics.median(cpu) * 1e3, 2),
            "median_process_cpu_ms": round(statistics.median(proc) * 1e3, 2),
            "tok_s": round(batch / step, 1), "load": round(os.getloadavg()[0], 2)}


if __name__ == "__main__":
    main()
