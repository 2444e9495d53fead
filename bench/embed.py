"""Embeddings throughput (inputs/s, tokens/s) at batch 1, 32 and 256 on the same inputs:
transformers' BertModel + mean pooling (the reference), minserve's Embedder, sentence-transformers'
encode() when installed, the EmbeddingService under 32 concurrent 1-input callers, and with --http
a `python -m minserve serve MODEL --task embed` process over HTTP.

    python bench/embed.py [--model all-minilm-l6-v2] [--threads N] [--http | --url URL]
"""
from __future__ import annotations

import argparse
import asyncio
import os
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
    from minserve.embeddings.service import EmbeddingService

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
    """Through the official openai SDK (AsyncOpenAI; base64 vectors, decoded by the SDK)."""
    import openai

    async def run() -> float:
        sem = asyncio.Semaphore(concurrency)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                    timeout=600)

        async def one(chunk: list[str]) -> None:
            async with sem:
                await client.embeddings.create(model=model, input=chunk)

        chunks = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
        await asyncio.gather(*(one(c) for c in chunks[:concurrency]))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        elapsed = (time.perf_counter() - t0) / len(inputs)
        await client.close()
        return elapsed

    return asyncio.run(run())


def load_sentence_transformers(folder: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: its column is skipped", file=sys.stderr)
        return None
    return SentenceTransformer(folder, device="cpu")


def transformers_reference(folder: str):
    """transformers' BertModel + mean pooling + L2 normalization (what sentence-transformers runs
    for this model), one padded batch per call: the reference column, same inputs."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.inference_mode()
    def encode(texts: list[str]):
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return encode


def start_server(model: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen([sys.executable, "-m", "minserve", "serve", model, "--task", "embed",
                             "--port", str(port), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--num-inputs", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    ap.add_argument("--http", action="store_true",
                    help="also start `python -m minserve serve MODEL --task embed` and measure it")
    ap.add_argument("--url", default=None, help="measure an already running minserve over HTTP")
    args = ap.parse_args()

    import torch

    from minserve.embeddings.embedder import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    emb = Embedder(args.model, device="cpu", dtype="float32")
    inputs = make_inputs(args.num_inputs)
    num_tokens = sum(len(t) for t in emb.tokenize(inputs, truncate_prompt_tokens=-1))
    tokens_per_input = num_tokens / len(inputs)
    ref = transformers_reference(emb.model_path)
    st = load_sentence_transformers(emb.model_path)
    print(f"# {args.model}, {len(inputs)} inputs, {tokens_per_input:.1f} tokens/input on average, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| path | inputs per call | inputs/s | tokens/s | vs transformers |")
    print("|---|---:|---:|---:|---:|", flush=True)
    reference: dict[int, float] = {}

    def report(name: str, batch: int, spi: float) -> None:
        """One table row as soon as it is measured (spi: seconds per input)."""
        if name.startswith("transformers"):
            reference[batch] = spi
        print(f"| {name} | {batch} | {1 / spi:,.1f} | {tokens_per_input / spi:,.0f} | "
              f"{reference[batch] / spi:.2f}x |", flush=True)

    for batch in (1, 32, 256):
        report("transformers BertModel + mean pool (reference)", batch,
               timed(ref, inputs, batch, args.seconds))
        report("minserve Embedder.embed", batch,
               timed(lambda xs: emb.embed(xs, truncate_prompt_tokens=-1), inputs, batch,
                     args.seconds))
        if st is not None:
            report("sentence-transformers encode", batch, timed(
                lambda xs, b=batch: st.encode(xs, batch_size=b, convert_to_numpy=True),
                inputs, batch, args.seconds))
    report("minserve EmbeddingService, 32 concurrent 1-input calls", 1,
           service_seconds_per_input(emb, inputs, 32))
    proc, url = (None, args.url)
    if args.http and url is None:
        proc, url = start_server(args.model, args.threads)
    try:
        if url:
            for batch in (1, 32, 256):
                concurrency = 32 if batch == 1 else 2
                report(f"HTTP /v1/embeddings (openai SDK), {concurrency} concurrent clients",
                       batch, http_seconds_per_input(url, args.model, inputs, batch, concurrency))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
