"""One verification step against one decode step, one stream (engine.step(), no HTTP): a request
with a --input-len random prompt decodes; steps alternate between no drafts and k drafted
tokens (random: the cost, not the acceptance, is measured), each timed with bench/phases.py's
per-phase timers (wall and this thread's CPU). Prints every step, the medians and both tables.

    python bench/spec_step.py                 # the built-in model, as `minserve serve` loads it
    python bench/spec_step.py --k 7 --steps 20
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="folder, .gguf or hub id (default: built-in)")
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per verification")
    ap.add_argument("--input-len", type=int, default=300)
    ap.add_argument("--steps", type=int, default=12, help="steps of each kind")
    args = ap.parse_args()

    from phases import PhaseTimers

    from minserve import LLM, SamplingParams
    from minserve.engine.request import EngineRequest

    llm = LLM(args.model, speculative_config={
        "method": "ngram", "num_speculative_tokens": args.k, "min_acceptance_rate": 0,
        "disable_by_batch_size": 64})
    engine = llm.engine
    rng = random.Random(0)
    vocab = min(9000, engine.info.vocab_size - 1)
    engine.add_request(EngineRequest("r", [rng.randint(100, vocab) for _ in range(
        args.input_len)], SamplingParams(max_tokens=4 * args.steps * (args.k + 1) + 8,
                                         temperature=0, ignore_eos=True)))
    while not engine.scheduler.running or engine.scheduler.running[0].num_output_tokens < 2:
        engine.step()
    request = engine.scheduler.running[0]
    timers = PhaseTimers()
    timers.install(engine)
    kinds = {"decode": [], f"verify k={args.k}": []}
    tables = {name: (collections.defaultdict(float), collections.defaultdict(float),
                     collections.Counter()) for name in kinds}
    for i in range(2 * args.steps):
        name = list(kinds)[i % 2]
        timers.wall, timers.cpu, timers.calls = tables[name]
        # the drafts the step verifies (the speculator's own are replaced)
        request.spec_token_ids = [rng.randint(100, vocab) for _ in range(args.k * (i % 2))]
        t = time.perf_counter()
        engine.step()
        kinds[name].append(time.perf_counter() - t)
    print(f"# {args.input_len}-token prompt, load {os.getloadavg()[0]:.2f}")
    for name, steps in kinds.items():
        timers.wall, timers.cpu, timers.calls = tables[name]
        print(f"== {name}: median step {statistics.median(steps) * 1e3:.1f} ms; every step "
              f"{[round(s * 1e3) for s in steps]}")
        print(timers.table(args.steps))
    ratio = statistics.median(kinds[f"verify k={args.k}"]) / statistics.median(kinds["decode"])
    print(f"verify / decode step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
