"""EmbeddingService: the asyncio face of an Embedder. One worker thread owns the model; embed()
and score() calls that arrive while it is busy are coalesced into the next round, so 32 concurrent
HTTP requests become a few forwards, not 32. Lower priority values go first (batch jobs wait
behind interactive calls). Imports no torch at module level (server.py may import it).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("minserve.embeddings")
MAX_ROUND_INPUTS = 4096  # inputs taken into one round; the rest wait for the next


@dataclass
class _Job:
    inputs: list[Any]
    truncate_prompt_tokens: int | None
    dimensions: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    token_lists: list[list[int]] = field(default_factory=list)
    # score() jobs: the text pairs, their names for errors, and what prepare_scores made of them
    pairs: list[tuple[str, str]] | None = None
    labels: list[str] | None = None
    prepared: Any = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs) if self.pairs is None else len(self.pairs)


def _resolve(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if fut.cancelled():  # the client went away while we were embedding
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class EmbeddingService:
    """service = EmbeddingService.lazy("all-minilm-l6-v2"); service.start();
    vectors, num_prompt_tokens = await service.embed(["a", "b"], dimensions=None).

    It has AsyncEngine's lifecycle surface (start, shutdown, is_ready, is_healthy, dead_reason,
    stats, on_ready/on_dead, engine), so server.py can run it next to the chat engine or alone."""

    def __init__(self, embedder: Any = None, loader: Any = None) -> None:
        self.embedder = embedder
        self._loader = loader     # () -> Embedder, run in the worker thread (model load)
        # (priority, arrival, job); job None = stop, queued last (priority +inf)
        self._inbox: queue.PriorityQueue[tuple[float, int, _Job | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_rounds = 0       # forwards rounds run; < requests when batching works
        self.num_requests = 0
        self.num_in_flight = 0
        self.is_ready = embedder is not None
        self.is_healthy = True
        self.dead_reason: str | None = None
        self.on_ready: Any = None
        self.on_dead: Any = None

    @classmethod
    def create(cls, model: str, **embedder_kwargs: Any) -> EmbeddingService:
        """Load the model now (blocking)."""
        from minserve.embeddings.embedder import Embedder
        return cls(Embedder(model, **embedder_kwargs))

    @classmethod
    def lazy(cls, model: str, **embedder_kwargs: Any) -> EmbeddingService:
        """Load the model in the worker thread once start() is called (the server's lifespan)."""
        def load() -> Any:
            from minserve.embeddings.embedder import Embedder
            return Embedder(model, **embedder_kwargs)
        return cls(None, load)

    # Facts the server needs for /v1/models, validation, usage and its startup log.
    @property
    def engine(self) -> Any:
        return self.embedder

    @property
    def stats(self) -> dict[str, Any]:
        return {"num_running": self.num_in_flight, "num_waiting": 0}

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
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
            self._thread = threading.Thread(target=self._run, name="minserve-embed", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put((float("inf"), next(self._arrivals), None))
            self._thread.join(timeout)
            self._thread = None

    async def wait_ready(self, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        while not self.is_ready:
            if not self.is_healthy:
                raise RuntimeError(self.dead_reason or "embedding model failed to load")
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError("embedding model not ready")
            await asyncio.sleep(0.05)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Let in-flight calls finish (they take one forward round each), then stop the thread."""
        t0 = time.monotonic()
        while self.num_in_flight and self.is_healthy and time.monotonic() - t0 < grace_s:
            await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, self.stop)
        self.is_ready = False

    async def embed(self, inputs: list[Any], truncate_prompt_tokens: int | None = None,
                    dimensions: int | None = None, priority: int = 0) -> tuple[list[Any], int]:
        """-> (float32 numpy vectors in input order, num_prompt_tokens). User errors raise
        EmbeddingsRequestError (an OpenAIError with status 400)."""
        loop = asyncio.get_running_loop()
        job = _Job(list(inputs), truncate_prompt_tokens, dimensions, loop, loop.create_future())
        return await self._submit(job, priority)

    async def score(self, pairs: list[tuple[str, str]], labels: list[str],
                    truncate_prompt_tokens: int | None = None, priority: int = 0
                    ) -> tuple[list[float], int]:
        """-> (one relevance score per pair, num_prompt_tokens): the cross-encoder's, or the
        cosine of the two embeddings (embeddings/scoring.py). labels name the pairs in errors."""
        loop = asyncio.get_running_loop()
        job = _Job([], truncate_prompt_tokens, None, loop, loop.create_future(), pairs=pairs,
                   labels=labels)
        return await self._submit(job, priority)

    async def _submit(self, job: _Job, priority: int) -> Any:
        if self._thread is None:
            raise RuntimeError("EmbeddingService.start() was not called")
        self.num_in_flight += 1
        try:
            self._inbox.put((priority, next(self._arrivals), job))
            return await job.future
        finally:
            self.num_in_flight -= 1

    def _on_loop(self, fn: Any, *args: Any) -> None:
        """Run a lifecycle callback on the server's loop (or here, without one or once closed)."""
        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(fn, *args)
                return
        except RuntimeError:  # the loop is closed (process exit)
            pass
        fn(*args)

    def _became_ready(self) -> None:
        self.is_ready = True
        if self.on_ready is not None:
            self.on_ready()

    def _died(self, reason: str) -> None:
        self.is_healthy, self.dead_reason = False, reason
        if self.on_dead is not None:
            self.on_dead(reason)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        if self.embedder is None:
            try:
                self.embedder = self._loader()
            except Exception as e:  # noqa: BLE001 - a bad model or config: report, never hang
                logger.exception("embedding model failed to load")
                reason = f"{type(e).__name__}: {e}"
                self._on_loop(self._died, reason)
                return
            self._on_loop(self._became_ready)
        while True:
            job = self._inbox.get()[2]
            if job is None:
                return
            jobs, count = [job], job.num_inputs
            stop = False
            while count < MAX_ROUND_INPUTS:   # take whatever else has queued up meanwhile
                try:
                    nxt = self._inbox.get_nowait()[2]
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                count += nxt.num_inputs
            self._round(jobs)
            if stop:
                return

    def _round(self, jobs: list[_Job]) -> None:
        from minserve.embeddings.protocol import EmbeddingsRequestError
        from minserve.embeddings.scoring import finish_scores, prepare_scores

        emb = self.embedder
        ready: list[_Job] = []
        for job in jobs:  # per-request validation: one bad request must not fail the others
            try:
                if job.pairs is not None:
                    job.prepared = prepare_scores(emb, job.pairs, job.labels,
                                                  job.truncate_prompt_tokens)
                    job.token_lists = job.prepared.token_lists
                else:
                    job.token_lists = emb.prepare(job.inputs, job.truncate_prompt_tokens,
                                                  job.dimensions)
                ready.append(job)
            except EmbeddingsRequestError as e:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, e)
        if not ready:
            return
        self.num_rounds += 1
        self.num_requests += len(ready)
        try:
            # a cross-encoder serves only score jobs, each of which carries segment ids
            types = ([t for job in ready for t in job.prepared.token_type_lists]
                     if emb.is_cross_encoder else None)
            pooled = emb.pool_token_ids([t for job in ready for t in job.token_lists], types)
            start = 0
            for job in ready:
                n = len(job.token_lists)
                rows = pooled[start:start + n]
                start += n
                num_tokens = sum(len(t) for t in job.token_lists)
                result = (finish_scores(emb, job.prepared, rows) if job.pairs is not None
                          else emb.finish(rows, job.dimensions))
                job.loop.call_soon_threadsafe(_resolve, job.future, (result, num_tokens))
        except Exception as e:  # noqa: BLE001 (an engine fault: fail this round's requests, keep serving)
            logger.exception("embedding forward failed")
            self.is_healthy, self.dead_reason = False, f"{type(e).__name__}: {e}"
            for job in ready:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, e)


def service_from_cli(args: Any) -> EmbeddingService | None:
    """The EmbeddingService `python -m minserve` runs: MODEL itself with --task embed, else
    --embedding-model next to the chat model; None when neither. Loads on start()."""
    if args.task == "embed":
        model, names, max_len = args.model, args.served_model_name, args.max_model_len
    elif args.embedding_model:
        model, names, max_len = args.embedding_model, None, None
    else:
        return None
    return EmbeddingService.lazy(model, dtype=args.dtype, device=args.device,
                                 max_model_len=max_len,
                                 served_model_name=(names or [model])[0])
