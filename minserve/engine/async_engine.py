"""AsyncEngine: the bridge between the asyncio server and the synchronous Engine, which runs in its
own thread. Inbox: a SimpleQueue of adds/aborts; outbox: one call_soon_threadsafe per step.
The engine thread never awaits; the event loop never calls torch (the engine is built lazily)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from minserve.engine.request import FinishReason, RequestOutput
from minserve.sampling_params import SamplingParams

logger = logging.getLogger("minserve.engine")

_ADD, _ABORT, _STOP = "add", "abort", "stop"
_END = None  # queued to wake a RequestStream reader after an abort


class EngineError(Exception):
    """A request failed inside the engine. status 400: the engine rejected the input (e.g. too
    long); 500/503: the engine thread died or is shutting down."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RequestStream:
    """Async iterator of RequestOutput for one API request (all its prompts x n samples).
    index_of(out.request_id) gives the OpenAI choice index of an output."""

    def __init__(self, request_id: str, child_ids: list[str]) -> None:
        self.request_id = request_id
        self.child_ids = child_ids
        self._index = {cid: i for i, cid in enumerate(child_ids)}
        self._queue: asyncio.Queue[RequestOutput | EngineError | None] = asyncio.Queue()
        self._unfinished = set(child_ids)
        # Children stopped early (a stop string): outputs of theirs already queued when the
        # reader stopped them are skipped, since the engine thread runs ahead of the reader.
        self._dropped: set[str] = set()

    def index_of(self, child_id: str) -> int:
        return self._index[child_id]

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _put(self, item: RequestOutput | EngineError) -> None:
        if isinstance(item, RequestOutput) and item.finished:
            self._unfinished.discard(item.request_id)
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self.finished and self._queue.empty():
                raise StopAsyncIteration
            item = await self._queue.get()
            if not (isinstance(item, RequestOutput) and item.request_id in self._dropped):
                break
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, EngineError):
            self._unfinished.clear()
            raise item
        if item.finish_reason == FinishReason.ERROR:  # the engine could never run it
            self._unfinished.clear()
            raise EngineError(item.error or "request failed in the engine", 400)
        return item


def _default_engine_factory(config: Any) -> Any:
    from minserve.engine.engine import Engine  # torch lives behind this import

    return Engine(config)


class AsyncEngine:
    def __init__(self, engine_config: Any,
                 engine_factory: Callable[[Any], Any] | None = None) -> None:
        self.config = engine_config
        self._factory = engine_factory or _default_engine_factory
        self.engine: Any = None
        self.is_ready = False          # engine built; /health 200 while also healthy
        self.is_healthy = True         # false once the engine thread died
        self.dead_reason: str | None = None
        self.stats: dict[str, Any] = {}
        self.on_ready: Callable[[], None] | None = None
        self.on_dead: Callable[[str], None] | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}    # child id -> stream (event-loop side)
        self._parents: dict[str, RequestStream] = {}    # API request id -> stream
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- lifecycle (event loop side) ----
    def start(self) -> None:
        """Start the engine thread; the engine loads there, so this returns at once."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="minserve-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        while not self.is_ready:
            if not self.is_healthy:
                raise EngineError(self.dead_reason or "engine failed", 503)
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError("engine not ready")
            await asyncio.sleep(0.05)

    @property
    def num_in_flight(self) -> int:
        return len(self._parents)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for grace_s, then abort the rest."""
        self._stopping = True
        t0 = time.monotonic()
        while self._parents and self.is_healthy and time.monotonic() - t0 < grace_s:
            await asyncio.sleep(0.05)
        self._fail_all(EngineError("server is shutting down", 503))
        self._inbox.put((_STOP, None))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self.is_ready = False

    # ---- requests (event loop side) ----
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> RequestStream:
        return self.add_batch(request_id, [prompt_token_ids], params)

    def add_batch(self, request_id: str, prompts: list[list[int]],
                  params: SamplingParams, priority: int = 0) -> RequestStream:
        """Fan len(prompts) x params.n out into single-sample engine requests. Choice index
        p * n + i (OpenAI's order for a list of prompts); child id = request_id when there is
        one, else f"{request_id}-{index}". priority: lower runs first (vLLM's)."""
        if not self.is_healthy:
            raise EngineError(self.dead_reason or "engine is not healthy", 503)
        if not self.is_ready or self._stopping:
            raise EngineError("engine is not ready", 503)
        if request_id in self._parents:
            raise EngineError(f"duplicate request id {request_id!r}", 400)
        n = params.n
        single = len(prompts) == 1 and n == 1
        child_ids = [request_id] if single else [
            f"{request_id}-{k}" for k in range(len(prompts) * n)]
        stream = RequestStream(request_id, child_ids)
        self._parents[request_id] = stream
        child_params = dataclasses.replace(params, n=1) if n > 1 else params
        arrival = time.monotonic()
        for k, cid in enumerate(child_ids):
            self._streams[cid] = stream
            self._inbox.put((_ADD, (cid, prompts[k // n], child_params,
                                    None if single else request_id, k % n, arrival, priority)))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort an API request (all its children); a no-op once it finished."""
        stream = self._parents.pop(request_id, None)
        if stream is None:
            return
        live = [cid for cid in stream.child_ids if cid in stream._unfinished]
        for cid in stream.child_ids:
            self._streams.pop(cid, None)
        stream._unfinished.clear()
        stream._queue.put_nowait(_END)
        if live:
            self._inbox.put((_ABORT, live))

    def abort_child(self, stream: RequestStream, child_id: str) -> None:
        """Stop one sample early (a stop string hit); `stream` yields no more of it, not even
        outputs already queued (the engine thread runs ahead of the reader, and may have
        finished the sample meanwhile)."""
        stream._unfinished.discard(child_id)
        stream._dropped.add(child_id)
        if self._streams.pop(child_id, None) is None:
            return  # its last output is already queued: nothing left to abort in the engine
        self._inbox.put((_ABORT, [child_id]))
        if stream.finished:
            self._parents.pop(stream.request_id, None)
            stream._queue.put_nowait(_END)  # wake a reader waiting on the queue

    # ---- delivery (runs on the event loop via call_soon_threadsafe) ----
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._streams[out.request_id]
            stream._put(out)
            if stream.finished:
                self._parents.pop(stream.request_id, None)

    def _reject(self, rejected: list[tuple[str, EngineError]]) -> None:
        for cid, err in rejected:
            stream = self._streams.get(cid)
            if stream is not None:  # its siblings are aborted by the server's finally
                stream._put(err)

    def _fail_all(self, err: EngineError) -> None:
        for stream in list(self._parents.values()):
            stream._put(err)
        self._parents.clear()
        self._streams.clear()

    def _engine_died(self, reason: str) -> None:
        self.is_healthy = False
        self.dead_reason = reason
        self._fail_all(EngineError(f"engine failed: {reason}", 500))
        if self.on_dead is not None:
            self.on_dead(reason)

    def _became_ready(self) -> None:
        self.is_ready = True
        if self.on_ready is not None:
            self.on_ready()

    # ---- the engine thread ----
    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            self.engine = self._factory(self.config)
            self.stats = dict(self.engine.stats())
        except Exception as e:  # a bad model or config: report, never hang
            logger.exception("engine failed to load")
            loop.call_soon_threadsafe(self._engine_died, f"{type(e).__name__}: {e}")
            return
        loop.call_soon_threadsafe(self._became_ready)
        engine = self.engine
        try:
            while True:
                # NOTE: block on the inbox only when idle; while busy, drain it without waiting.
                msgs = [] if engine.has_unfinished_requests() else [self._inbox.get()]
                while True:
                    try:
                        msgs.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                rejected: list[tuple[str, EngineError]] = []
                for kind, payload in msgs:
                    if kind == _STOP:
                        return
                    if kind == _ABORT:
                        engine.abort_request(payload)
                        continue
                    cid, prompt, params, parent_id, sample_index, arrival, priority = payload
                    try:
                        engine.add_request(cid, prompt, params, parent_id=parent_id,
                                           sample_index=sample_index, arrival_time=arrival,
                                           priority=priority)
                    except ValueError as e:  # the engine's word on a bad input: a 400
                        rejected.append((cid, EngineError(str(e), 400)))
                    except Exception as e:  # one bad request must not take the engine down
                        logger.exception("add_request(%s) failed", cid)
                        rejected.append((cid, EngineError(f"{type(e).__name__}: {e}", 500)))
                if rejected:
                    loop.call_soon_threadsafe(self._reject, rejected)
                outputs = engine.step() if engine.has_unfinished_requests() else []
                self.stats = dict(engine.stats())
                if outputs:
                    loop.call_soon_threadsafe(self._deliver, outputs)
        except Exception as e:
            logger.exception("engine step failed; failing all in-flight requests")
            try:
                loop.call_soon_threadsafe(self._engine_died, f"{type(e).__name__}: {e}")
            except RuntimeError:  # the loop is already closed (process exit)
                pass
