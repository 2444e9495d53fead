"""Embeddings throughput (inputs/s, tokens/s) at batch 1, 32 and 256: minserve's Embedder, its
EmbeddingService under 32 concurrent single-input callers, an optional running server over HTTP
(--url), and sentence-transformers' encode() on the same inputs, in one process.

    python bench/embed.py [--model all-minilm-l6-v2] [--threads N] [--url http://host:8000]
                          [--install-st]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
         "this be or has had not but what all when we there can been one would their if more "
         "model language server batch token embedding vector search retrieval query document "
         "machine learning fascinating river mountain horse bread food city music quickly slowly "
         "engineer kernel memory cache attention layer network paris france weather report").split()


def make_inputs(n: int, seed: int = 0) -> list[str]:
    """Sentences of 5..120 words (roughly 7..160 tokens): short queries and longer passages."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 8, 12, 20, 40, 80, 120])))
            .capitalize() + "." for _ in range(n)]


def timed(fn, inputs: list[str], batch: int, min_seconds: float = 3.0) -> float:
    """Seconds per input: run fn over `inputs` in calls of `batch` until min_seconds have passed."""
    fn(inputs[:batch])  # warm-up (allocator, thread pool)
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, len(inputs), batch):
            fn(inputs[i:i + batch])
            done += len(inputs[i:i + batch])
            if time.perf_counter() - t0 > min_seconds and done >= batch:
                return (time.perf_counter() - t0) / done


def service_seconds_per_input(embedder, inputs: list[str], concurrency: int) -> float:
    from minserve.embedding_service import EmbeddingService

    service = EmbeddingService(embedder)
    service.start()

    async def run() -> float:
        sem = asyncio.Semaphore(concurrency)

        async def one(text: str) -> None:
            async with sem:
                await service.embed([text])

        await asyncio.gather(*(one(t) for t in inputs[:concurrency]))   # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t) for t in inputs))
        return (time.perf_counter() - t0) / len(inputs)

    try:
        return asyncio.run(run())
    finally:
        service.stop()


def http_seconds_per_input(url: str, model: str, inputs: list[str], batch: int,
                           concurrency: int) -> float:
    import httpx

    async def run() -> float:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def one(chunk: list[str]) -> None:
                async with sem:
                    r = await client.post("/v1/embeddings", json={"model": model, "input": chunk})
                    r.raise_for_status()

            chunks = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
            await asyncio.gather(*(one(c) for c in chunks[:concurrency]))  # warm-up
            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for c in chunks))
            return (time.perf_counter() - t0) / len(inputs)

    return asyncio.run(run())


def load_sentence_transformers(folder: str, install: bool):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        if not install:
            print("sentence-transformers is not installed: its column is skipped "
                  "(pass --install-st to pip install it; torch is left as it is)", file=sys.stderr)
            return None
        subprocess.run([sys.executable, "-m", "pip", "install", "sentence-transformers"], check=True)
        from sentence_transformers import SentenceTransformer
    return SentenceTransformer(folder, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--num-inputs", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    ap.add_argument("--url", default=None, help="also measure a running minserve over HTTP")
    ap.add_argument("--install-st", action="store_true")
    args = ap.parse_args()

    import torch

    from minserve.embedder import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    emb = Embedder(args.model, device="cpu", dtype="float32")
    inputs = make_inputs(args.num_inputs)
    num_tokens = sum(len(t) for t in emb.tokenize(inputs, truncate_prompt_tokens=-1))
    tokens_per_input = num_tokens / len(inputs)
    st = load_sentence_transformers(emb.model_path, args.install_st)
    print(f"# {args.model}, {len(inputs)} inputs, {tokens_per_input:.1f} tokens/input on average, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for batch in (1, 32, 256):
        ours = timed(lambda xs: emb.embed(xs, truncate_prompt_tokens=-1), inputs, batch,
                     args.seconds)
        theirs = None
        if st is not None:
            theirs = timed(lambda xs, b=batch: st.encode(xs, batch_size=b, convert_to_numpy=True),
                           inputs, batch, args.seconds)
        rows.append((f"minserve Embedder.embed, batch {batch}", ours))
        if theirs is not None:
            rows.append((f"sentence-transformers encode, batch_size {batch}", theirs))
    rows.append(("minserve EmbeddingService, 32 concurrent 1-input calls",
                 service_seconds_per_input(emb, inputs, 32)))
    if args.url:
        for batch in (1, 32):
            rows.append((f"HTTP /v1/embeddings, {batch} input(s)/request, 32 concurrent",
                         http_seconds_per_input(args.url, args.model, inputs, batch, 32)))
    print("| path | inputs/s | tokens/s |")
    print("|---|---:|---:|")
    for name, spi in rows:
        print(f"| {name} | {1 / spi:,.1f} | {tokens_per_input / spi:,.0f} |")


if __name__ == "__main__":
    main()
