"""Issue 40, item 1: the server's per-token CPU cost, without the engine or sockets: `--streams`
streamed completions, `--tokens` each, go through the serving path the server runs on its event
loop (RequestStream -> Serving.generate -> SampleState.update (detokenize) -> stream_chunks ->
orjson -> SSE framing -> a no-op ASGI send). The engine thread's side is played by putting one
output per stream per step; the reader reads after every `--lag` steps (1: it keeps up; 4: it lags
4 steps behind, and the 4 outputs arrive merged). Prints CPU microseconds per token (process
time, so a loaded machine changes it less than wall time) and, with --profile, the top of a
cProfile of one run.

    python bench/token_path.py --lag 1 4 --rounds 3
    python bench/token_path.py --lag 1 --profile
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


async def run_once(folder: str, streams: int, tokens: int, lag: int) -> float:
    """-> CPU seconds per output token of the serving path."""
    from minserve.engine.async_engine import AsyncEngine
    from minserve.engine.request import FinishReason, RequestOutput
    from minserve.http import Http
    from minserve.metrics import Metrics
    from minserve.output import stream_chunks
    from minserve.protocol import ServingContext, parse_completion
    from minserve.server import ServerConfig
    from minserve.serving import Serving
    from minserve.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    ctx = ServingContext(tokenizer=tok, model_names=["tiny"], max_model_len=4096,
                         vocab_size=tok.vocab_size)
    engine = AsyncEngine(None)   # never started: only its streams are used
    engine.is_ready = True
    serving = Serving(ServerConfig(["tiny"]), engine, Metrics("m", lambda: {}), {})
    serving._ctx = ctx

    async def no_send(msg):
        pass

    gens = []
    for i in range(streams):
        req = parse_completion({"prompt": "time person year way", "max_tokens": tokens,
                                "stream": True, "ignore_eos": True}, ctx)
        req.request_id = f"r{i}"
        gens.append(serving.generate(req))
    while not engine._inbox.empty():
        engine._inbox.get()
    ids = [5 + (i * 7) % 400 for i in range(tokens)]

    async def respond(gen):
        http = Http({}, None, no_send, "/v1/completions", {}, 1 << 20)
        await http.start_events()
        with gen:
            async for payload in stream_chunks(gen.req, gen):
                await http.send_event(payload)
        await http.end_events()

    tasks = [asyncio.create_task(respond(g)) for g in gens]
    await asyncio.sleep(0)
    t0 = time.process_time()
    for step in range(tokens):
        outs = [RequestOutput(cid, [ids[step]], FinishReason.LENGTH if step == tokens - 1
                              else None, num_prompt_tokens=4)
                for g in gens for cid in g.stream.child_ids]
        engine._deliver(outs)   # what the engine thread's call_soon_threadsafe runs
        if (step + 1) % lag == 0 or step == tokens - 1:
            for _ in range(3):   # let every reader take what it has
                await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return (time.process_time() - t0) / (streams * tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--lag", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    # NOTE: bench/kernels.py would shadow the `kernels` package transformers imports
    sys.path.remove(HERE)
    sys.path.append(HERE)
    from tiny_model import build
    folder = build(tempfile.mkdtemp(prefix="minserve-tiny-"))
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(asyncio.run, run_once(folder, args.streams, args.tokens, args.lag[0]))
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
        return
    rows: dict[int, list[float]] = {lag: [] for lag in args.lag}
    for r in range(args.rounds):
        for lag in args.lag:   # alternating, so a change in the machine's load hits both
            us = 1e6 * asyncio.run(run_once(folder, args.streams, args.tokens, lag))
            rows[lag].append(us)
            print(f"round {r} lag {lag}: {us:.1f} CPU us/token", flush=True)
    for lag, xs in rows.items():
        print(f"median lag {lag}: {statistics.median(xs):.1f} CPU us/token "
              f"({args.streams} streams x {args.tokens} tokens)")


if __name__ == "__main__":
    main()
