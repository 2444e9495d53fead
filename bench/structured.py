"""Structured outputs cost: output tokens/s of a batch of JSON-schema-constrained chat requests
against the same batch unconstrained, offline through LLM.chat, alternating the two sides and
printing each run and the medians. ignore_eos is off on both sides (a finished JSON document
ends its request), max_tokens is fixed, and the generated tokens are counted.

    python bench/structured.py [--model M] [--batch 32] [--max-tokens 64] [--repeats 3]
                               [--timers]

--timers wraps the structured-output hooks (mask fill, mask apply, token accept, compile) with
wall-clock timers and prints their totals per constrained run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}
JOBS = ("baker", "pilot", "nurse", "teacher", "chemist", "farmer", "poet", "carpenter")
CITIES = ("Lyon", "Osaka", "Lima", "Oslo")


def conversations(n: int) -> list[list[dict[str, str]]]:
    """n distinct chat prompts asking for one person record each."""
    return [[{"role": "user", "content":
              f"Invent a {JOBS[i % len(JOBS)]} number {i} living in {CITIES[i % len(CITIES)]}. "
              "Reply with a JSON object with fields name, age, email, tags and address."}]
            for i in range(n)]


def install_timers(totals: dict[str, float]) -> None:
    """Wrap the hooks the engine calls for constrained requests; engine files stay untouched."""
    from minserve import structured
    from minserve.engine import engine, sampler

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] += time.perf_counter() - t
        return wrapper

    # sampler.py imports fill_bitmasks from the module at call time and calls its own
    # apply_bitmask by global name, so patching the module attributes is enough.
    structured.fill_bitmasks = timed("fill_bitmasks", structured.fill_bitmasks)
    structured.allocate_bitmask = timed("allocate_bitmask", structured.allocate_bitmask)
    sampler.apply_bitmask = timed("apply_bitmask", sampler.apply_bitmask)
    sc = structured.StructuredConstraint
    sc.accept_token = timed("accept_token", sc.accept_token)
    sc.is_finished = timed("is_finished", sc.is_finished)
    engine.Engine._compile_structured = timed("compile", engine.Engine._compile_structured)


def run(llm, convs, params) -> tuple[float, int, int]:
    t = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = 0
    for o in outs:
        try:
            json.loads(o.outputs[0].text)
            valid += 1
        except ValueError:
            pass
    return elapsed, num_tokens, valid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="folder, .gguf or hub id (default: built-in)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--timers", action="store_true")
    args = ap.parse_args()

    from minserve import LLM, SamplingParams
    from minserve.structured import structured_from_request

    totals: dict[str, float] = defaultdict(float)
    if args.timers:
        install_timers(totals)
    llm = LLM(args.model)
    spec = structured_from_request({"guided_json": SCHEMA})
    convs = conversations(args.batch)

    def params(constrained: bool) -> list[SamplingParams]:
        # A seed per request: each run of a side samples the same way (up to batch effects).
        return [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.max_tokens,
                               ignore_eos=False, structured=dict(spec) if constrained else None)
                for i in range(args.batch)]

    run(llm, convs[:2], params(True)[:2])   # warm-up: compiles the schema once (it is cached)
    totals.clear()
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for rep in range(args.repeats):
        for side in ("unconstrained", "constrained"):
            totals.clear()
            elapsed, num_tokens, valid = run(llm, convs, params(side == "constrained"))
            rates[side].append(num_tokens / elapsed)
            line = {"run": rep, "side": side, "elapsed_s": round(elapsed, 2),
                    "output_tokens": num_tokens, "tok_s": round(num_tokens / elapsed, 1),
                    "valid_json": f"{valid}/{args.batch}"}
            if args.timers and side == "constrained":
                line["timers_s"] = {k: round(v, 3) for k, v in totals.items()}
            print(json.dumps(line), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"batch": args.batch, "max_tokens": args.max_tokens,
                      "median_tok_s": {k: round(v, 1) for k, v in med.items()},
                      "constrained_over_unconstrained": round(
                          med["constrained"] / med["unconstrained"], 3)}))


if __name__ == "__main__":
    main()
