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
from dataclasses import dataclass, field
from typing import Any

from minserve.engine.async_engine import STOP, WorkerService
from minserve.engine.request import EngineInfo
from minserve.errors import library_text
from minserve.protocol import OpenAIError

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


class _PriorityInbox:
    """The worker's inbox in (priority, arrival) order, with SimpleQueue's put/get; STOP goes
    behind every job."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._arrivals = itertools.count()

    def put(self, job: Any, priority: float = 0) -> None:
        self._queue.put((float("inf") if job is STOP else priority, next(self._arrivals), job))

    def get(self, block: bool = True) -> Any:
        return self._queue.get(block)[2]


def _resolve(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():  # the client went away meanwhile, or the shutdown deadline failed it
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class EmbeddingService(WorkerService):
    """service = EmbeddingService.lazy("all-minilm-l6-v2"); service.start();
    vectors, num_prompt_tokens = await service.embed(["a", "b"], dimensions=None).

    Its lifecycle is AsyncEngine's (WorkerService), so server.py runs it next to the chat engine
    or alone."""

    thread_name = "minserve-embed"

    def __init__(self, embedder: Any = None, loader: Any = None) -> None:
        super().__init__()
        self._inbox = _PriorityInbox()
        self.embedder = embedder
        self._loader = loader     # () -> Embedder, run in the worker thread (model load)
        self.num_rounds = 0       # forwards rounds run; < requests when batching works
        self.num_requests = 0
        self.num_in_flight = 0
        self._futures: set[asyncio.Future] = set()   # the in-flight calls' (event-loop side)
        self.is_ready = embedder is not None

    @classmethod
    def lazy(cls, model: str, **embedder_kwargs: Any) -> EmbeddingService:
        """Load the model in the worker thread once start() is called (the server's lifespan)."""
        def load() -> Any:
            from minserve.embeddings.embedder import Embedder
            return Embedder(model, **embedder_kwargs)
        return cls(None, load)

    @property
    def stats(self) -> dict[str, Any]:
        return {"num_running": self.num_in_flight, "num_waiting": 0}

    @property
    def max_model_len(self) -> int:
        return self.embedder.max_model_len

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
        if self._stopping:
            raise OpenAIError(503, "the server is shutting down")
        self.num_in_flight += 1
        self._futures.add(job.future)
        try:
            self._inbox.put(job, priority)
            return await job.future
        finally:
            self.num_in_flight -= 1
            self._futures.discard(job.future)

    def _fail_in_flight(self, err: Exception) -> None:
        """A round already running finishes in the worker, its results dropped."""
        for fut in list(self._futures):
            _resolve(fut, None, OpenAIError(err.status, str(err)))

    # ------------------------------------------------------------------ worker thread

    def _load(self) -> None:
        if self.embedder is None:
            self.embedder = self._loader()
        emb = self.embedder
        self.info = EngineInfo(emb.tokenizer, emb.vocab_size, emb.max_model_len,
                               emb.model_config.architecture)

    def _serve(self) -> None:
        stop = False
        while not stop:
            jobs, count = [], 0
            while count < MAX_ROUND_INPUTS:   # wait for one job, then take what queued up
                try:
                    job = self._inbox.get(block=not jobs)
                except queue.Empty:
                    break
                if job is STOP:
                    stop = True
                    break
                jobs.append(job)
                count += job.num_inputs
            if jobs:
                self._round(jobs)
        getattr(self.embedder, "shutdown", lambda: None)()   # tensor-parallel ranks

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
            self.is_healthy, self.dead_reason = False, f"{type(e).__name__}: {library_text(e)}"
            for job in ready:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, e)


def service_from_cli(args: Any) -> EmbeddingService | None:
    """The EmbeddingService `python -m minserve` runs: MODEL itself with --task embed, else
    --embedding-model next to the chat model; None when neither. Loads on start()."""
    tp, beside = 1, False
    if args.task == "embed":
        model, names, max_len = args.model, args.served_model_name, args.max_model_len
        tp = args.tensor_parallel_size
    elif args.embedding_model:
        model, names, max_len = args.embedding_model, None, None
        beside = args.tensor_parallel_size > 1   # runs whole, on rank 0 of the chat model
    else:
        return None
    return EmbeddingService.lazy(model, dtype=args.dtype, device=args.device,
                                 max_model_len=max_len,
                                 served_model_name=(names or [model])[0],
                                 tensor_parallel_size=tp, beside_tensor_parallel=beside)
