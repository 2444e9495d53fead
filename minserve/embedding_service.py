"""EmbeddingService: the asyncio face of an Embedder. One worker thread owns the model; embed()
calls that arrive while it is busy are coalesced into the next round, so 32 concurrent HTTP
requests become a few forwards, not 32. Imports no torch at module level (server.py may import it).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

MAX_ROUND_INPUTS = 4096  # inputs taken into one round; the rest wait for the next


@dataclass
class _Job:
    inputs: list[Any]
    truncate_prompt_tokens: int | None
    dimensions: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    token_lists: list[list[int]] = field(default_factory=list)


def _resolve(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if fut.cancelled():  # the client went away while we were embedding
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class EmbeddingService:
    """service = EmbeddingService.create("all-minilm-l6-v2"); service.start();
    vectors, num_prompt_tokens = await service.embed(["a", "b"], dimensions=None)."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.num_rounds = 0       # forwards rounds run; < requests when batching works
        self.num_requests = 0
        self.healthy = True

    @classmethod
    def create(cls, model: str, **embedder_kwargs: Any) -> EmbeddingService:
        """Load the model (blocking: call it from a thread in lifespan startup)."""
        from minserve.embedder import Embedder
        return cls(Embedder(model, **embedder_kwargs))

    # Facts the server needs for /v1/models, validation and usage.
    @property
    def model_name(self) -> str:
        return self.embedder.model_name

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    @property
    def max_model_len(self) -> int:
        return self.embedder.max_model_len

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="minserve-embed", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout)
            self._thread = None

    async def embed(self, inputs: list[Any], truncate_prompt_tokens: int | None = None,
                    dimensions: int | None = None) -> tuple[list[Any], int]:
        """-> (float32 numpy vectors in input order, num_prompt_tokens). User errors raise
        EmbeddingsRequestError (an OpenAIError with status 400)."""
        if self._thread is None:
            raise RuntimeError("EmbeddingService.start() was not called")
        loop = asyncio.get_running_loop()
        job = _Job(list(inputs), truncate_prompt_tokens, dimensions, loop, loop.create_future())
        self._inbox.put(job)
        return await job.future

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                return
            jobs, count = [job], len(job.inputs)
            stop = False
            while count < MAX_ROUND_INPUTS:   # take whatever else has queued up meanwhile
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                count += len(nxt.inputs)
            self._round(jobs)
            if stop:
                return

    def _round(self, jobs: list[_Job]) -> None:
        from minserve.embeddings_protocol import EmbeddingsRequestError
        from minserve.pooling import check_dimensions

        emb = self.embedder
        ready: list[_Job] = []
        for job in jobs:  # per-request validation: one bad request must not fail the others
            try:
                check_dimensions(job.dimensions, emb.dimension, emb.pooling, emb.model_name)
                job.token_lists = emb.tokenize(job.inputs, job.truncate_prompt_tokens)
                ready.append(job)
            except EmbeddingsRequestError as e:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, e)
        if not ready:
            return
        self.num_rounds += 1
        self.num_requests += len(ready)
        try:
            pooled = emb.pool_token_ids([t for job in ready for t in job.token_lists])
            start = 0
            for job in ready:
                n = len(job.token_lists)
                vectors = emb.finish(pooled[start:start + n], job.dimensions)
                start += n
                num_tokens = sum(len(t) for t in job.token_lists)
                job.loop.call_soon_threadsafe(_resolve, job.future, (vectors, num_tokens))
        except Exception as e:  # noqa: BLE001 (an engine fault: fail this round's requests, keep serving)
            self.healthy = False
            for job in ready:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, e)
