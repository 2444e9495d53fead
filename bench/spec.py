"""Speculative decoding against none, side by side in one process (engine.step(), no HTTP): each
side is an engine built once; every round runs every workload on every side, the sides'
order alternating round by round. Prints every round and the medians, with the load average.

    workloads  grounded  one stream: rewrite a ~300-token text given in the prompt (the output
                         copies the input: what prompt lookup is for)
               chat      one stream, open-ended (little to look up)
               c16       16 grounded requests at once (disable_by_batch_size decides)
    suites     ngram     none | ngram                     on grounded, chat, c16
               draft     none | draft = the target (the ceiling) | an unrelated random draft
                         with the target's vocabulary (the floor)   on grounded

    python bench/spec.py --suite ngram --rounds 3
    python bench/spec.py --suite draft --rounds 3 --max-tokens 96

Per request: TPOT = (last token time - first token time) / (tokens - 1), greedy, ignore_eos.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

TEXT = """The lighthouse on Gannet Point was built in 1871 from granite quarried two miles inland
and hauled to the cliff by ox cart. Its first keeper, Thomas Arkwright, kept a log of every ship
that passed, every storm that struck, and every repair he made to the lamp. In the winter of 1883 a
storm tore the lantern glass from its frame, and Arkwright held a canvas sheet against the wind for
six hours so that the flame would not go out. The schooner Margaret Ellen, carrying coal from
Newcastle, saw the light and turned away from the rocks in time. Her captain later sent the keeper
a silver watch engraved with the date. The lamp burned whale oil until 1902, then kerosene, and
was finally electrified in 1938, when a cable was laid along the old cart track. The last keeper
left in 1987, when the light was automated; since then a small museum in the keeper's cottage has
shown the log books, the silver watch and a model of the Margaret Ellen. Visitors can climb the
ninety-six steps of the tower on summer weekends, weather permitting, and on a clear day they can
see the coast of the next county across the bay. The museum is run by volunteers from the village,
who also maintain the garden that Arkwright's wife planted with roses and lavender in 1875."""

GROUNDED = ("Rewrite the following text exactly as it is, but in the present tense where it "
            "describes the museum. Keep every other sentence word for word.\n\n" + TEXT)
CHAT = "Tell me about your favourite season of the year and why you like it."
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}


def random_draft(target: str, folder: str) -> str:
    """A 2-layer random Llama with the target's vocabulary and tokenizer (transformers, a
    test dependency: only this side needs it)."""
    import sys

    # python bench/spec.py puts bench/ first on the path, where bench/kernels.py would shadow
    # the `kernels` package transformers imports
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import torch
    import transformers

    with open(os.path.join(target, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=4096)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(target, name)):
            shutil.copy(os.path.join(target, name), folder)
    return folder


def run(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts at once; -> median TPOT (ms), output tokens/s overall, the tokens."""
    from minserve.engine.request import EngineRequest
    from minserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    drafts0 = engine.stats().get("spec_num_draft_tokens", 0)
    accepted0 = engine.stats().get("spec_num_accepted_tokens", 0)
    first, last, tokens = {}, {}, {}
    steps = 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}-{time.monotonic_ns()}", p, params))
    while engine.has_unfinished_requests():
        steps += 1
        for o in engine.step():
            now = time.perf_counter()
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    wall = time.perf_counter() - t0
    tpots = [(last[r] - first[r]) / max(len(t) - 1, 1) * 1e3 for r, t in tokens.items()]
    s = engine.stats()
    drafted = s.get("spec_num_draft_tokens", 0) - drafts0
    return {"tpot_ms": statistics.median(tpots),
            "tok_s": sum(len(t) for t in tokens.values()) / wall,
            "steps": steps,
            "accept": (s.get("spec_num_accepted_tokens", 0) - accepted0) / drafted
            if drafted else None,
            "tokens": [tokens[r] for r in sorted(tokens, key=lambda r: int(r[1:].split("-")[0]))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the target (default: the built-in model)")
    ap.add_argument("--suite", choices=("ngram", "draft"), default="ngram")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--k", type=int, default=None, help="num_speculative_tokens (default 4; 3 "
                                                         "for the draft suite)")
    ap.add_argument("--kv-cache-mib", type=int, default=512, help="each side's KV cache")
    ap.add_argument("--workloads", nargs="+", default=None,
                    help="a subset of the suite's workloads")
    args = ap.parse_args()

    from minserve import LLM
    from minserve.models.loader import resolve_model

    target = resolve_model(args.model)
    # a bounded KV cache per engine: the sides are all alive at once (c16 needs ~310 MiB)
    kw = {"max_model_len": 2048, "kv_cache_memory": args.kv_cache_mib << 20}
    tmp = tempfile.mkdtemp(prefix="spec-bench-")
    try:
        if args.suite == "ngram":
            k = args.k or 4
            sides = {"none": None, "ngram": {**NGRAM, "num_speculative_tokens": k}}
            workloads = args.workloads or ["grounded", "chat", "c16"]
        else:
            k = args.k or 3
            sides = {"none": None,
                     "draft=target": {"model": target, "num_speculative_tokens": k},
                     "draft=random": {"model": random_draft(target, os.path.join(tmp, "d")),
                                      "num_speculative_tokens": k, "min_acceptance_rate": 0}}
            workloads = args.workloads or ["grounded"]
        # the ngram suite serves what `minserve serve` serves (the default model: its GGUF
        # blocks on CPU); the draft suite the resolved folder, so draft=target is exact
        served = args.model if args.suite == "ngram" else target
        engines = {name: LLM(served, speculative_config=spec, **kw) for name, spec in
                   sides.items()}
        tok = engines["none"].get_tokenizer()

        def encode(text: str) -> list[int]:
            return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                              add_special_tokens=False)

        grounded = encode(GROUNDED)
        prompts = {"grounded": [grounded], "chat": [encode(CHAT)],
                   "c16": [encode(f"Request {i}. " + GROUNDED) for i in range(16)]}
        import torch

        label = served or "the built-in model, as `minserve serve` loads it"
        print(f"# target {label} ({engines['none'].engine.runner.dtype}), "
              f"{torch.get_num_threads()} threads, grounded prompt "
              f"{len(grounded)} tokens, max_tokens {args.max_tokens}, k {k}, load "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        for llm in engines.values():   # warm-up: first-call builds, verification shapes
            run(llm.engine, prompts["grounded"], 16)
        results: dict = {}
        names = list(engines)
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for w in workloads:
                for name in order:
                    r = run(engines[name].engine, prompts[w], args.max_tokens)
                    results.setdefault((w, name), []).append(r)
                    acc = "" if r["accept"] is None else f" accept {r['accept']:.2f}"
                    print(f"round {rnd} {w:9s} {name:13s} TPOT {r['tpot_ms']:7.2f} ms  "
                          f"{r['tok_s']:7.1f} tok/s  {r['steps']:4d} steps{acc}  "
                          f"load {os.getloadavg()[0]:.2f}",
                          flush=True)
        print("\n# medians over rounds (speed-up: none's TPOT / this side's)")
        for w in workloads:
            base = statistics.median(r["tpot_ms"] for r in results[(w, "none")])
            ref = results[(w, "none")][0]["tokens"]
            for name in names:
                rs = results[(w, name)]
                tpot = statistics.median(r["tpot_ms"] for r in rs)
                same = all(r["tokens"] == ref for r in rs)
                print(f"{w:9s} {name:13s} TPOT {tpot:7.2f} ms  "
                      f"{statistics.median(r['tok_s'] for r in rs):7.1f} tok/s  "
                      f"x{base / tpot:.2f}  same tokens as none: {same}")
        print(f"# load {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
