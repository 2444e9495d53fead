"""Issue 31's CPU target: a new architecture's decode step is not slower per byte of weights than
the Llama path's by more than 10%. Each pair is the new architecture and a Llama of the same
linear shapes (same layers, hidden, heads, vocab, tied embedding), both int4 (GPTQ g128, random
weights: --load-format dummy), both loaded at once; rounds alternate between them, each round
--steps decode steps of B rows after a --input-len prompt each, all rows in one step:

    python bench/archs.py                                   # both pairs, B = 1 and 16
    python bench/archs.py --pair gemma3 --batch 1 --rounds 9 --steps 10

Prints every round, then per model and batch the median step (ms), the weights (GiB, as loaded:
int4 layers, fp32 embedding), ms per GiB, and the ratio to the Llama twin (target <= 1.10).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAIRS = {   # name -> (new architecture, its Llama twin), bench/configs folders
    "gemma3": ("gemma-3-1b-int4", "llama-gemma-3-1b-shape-int4"),
    "smollm3": ("smollm3-3b-int4", "llama-smollm3-3b-shape-int4"),
}


def start(llm, batch: int, input_len: int, max_tokens: int, tag: str) -> None:
    """B fresh requests, prefilled; the engine is left in an all-decode state."""
    import random

    from minserve import SamplingParams
    from minserve.engine.request import EngineRequest

    engine, rng = llm.engine, random.Random(0)
    for i in range(batch):
        engine.add_request(EngineRequest(
            f"{tag}-{i}", [rng.randint(3, 10000) for _ in range(input_len)],
            SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)))
    while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    engine.step()     # the first all-decode step: warm-up


def time_steps(llm, steps: int) -> float:
    """Median wall time (s) of `steps` decode steps."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), nargs="+", default=sorted(PAIRS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads, as OMP_NUM_THREADS (default: the engine's)")
    args = ap.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)    # before torch is imported
    import torch

    from minserve import LLM
    from minserve.models.quant.loading import weight_bytes

    print(f"# torch {torch.__version__}, load {os.getloadavg()[0]:.2f}", flush=True)
    for pair in args.pair:
        llms = {name: LLM(os.path.join(HERE, "configs", name), load_format="dummy",
                          skip_tokenizer_init=True, kv_cache_memory=256 << 20,
                          max_model_len=4096, max_num_seqs=max(args.batch))
                for name in PAIRS[pair]}
        gib = {name: weight_bytes(llm.engine.runner.model) / 2**30 for name, llm in llms.items()}
        for batch in args.batch:
            for name, llm in llms.items():
                start(llm, batch, args.input_len, args.rounds * args.steps + 4, f"{name}{batch}")
            rounds: dict[str, list[float]] = {name: [] for name in llms}
            for r in range(args.rounds):
                for name, llm in (list(llms.items())[::1 if r % 2 == 0 else -1]):
                    rounds[name].append(time_steps(llm, args.steps))
                    print(json.dumps({"pair": pair, "batch": batch, "round": r, "model": name,
                                      "median_step_ms": round(rounds[name][-1] * 1e3, 2),
                                      "load": round(os.getloadavg()[0], 2)}), flush=True)
            for llm in llms.values():      # finish the requests so the next batch starts clean
                while llm.engine.has_unfinished_requests():
                    llm.engine.step()
            new, twin = PAIRS[pair]
            per_gib = {name: statistics.median(times) * 1e3 / gib[name]
                       for name, times in rounds.items()}
            for name, times in rounds.items():
                print(json.dumps({
                    "pair": pair, "batch": batch, "model": name,
                    "median_step_ms": round(statistics.median(times) * 1e3, 2),
                    "rounds_ms": [round(t * 1e3, 2) for t in times],
                    "weights_gib": round(gib[name], 3), "ms_per_gib": round(per_gib[name], 2),
                    "ratio_to_llama": round(per_gib[name] / per_gib[twin], 3)}), flush=True)
        del llms


if __name__ == "__main__":
    main()
