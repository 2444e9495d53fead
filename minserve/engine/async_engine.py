"""AsyncEngine: the bridge between the asyncio server and the synchronous Engine, which runs in its
own thread. Inbox: a SimpleQueue of EngineRequests to add, lists of sample ids to abort and
EngineCalls (one AsyncEngine method per operation: add_lora, remove_lora); outbox: one
call_soon_threadsafe per step.
The engine thread never awaits; the event loop never calls torch (the engine is built lazily).
WorkerService is the thread lifecycle it shares with the EmbeddingService."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from minserve.config import ConfigError
from minserve.engine import heap
from minserve.engine.request import EngineInfo, EngineRequest, FinishReason, RequestOutput
from minserve.errors import library_text

logger = logging.getLogger("minserve.engine")

STOP = None  # on the inbox: the worker thread returns
HEAP_TRIM_IDLE_S = 1.0   # idle this long after work: give freed heap memory back (engine/heap.py)


class EngineCall(NamedTuple):
    """On the inbox: run(engine) on the engine thread, in order with the requests around it;
    the result or a 400 comes back to `future`. `what` names it in the log."""
    what: str
    run: Callable[[Any], Any]
    future: asyncio.Future


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
    index_of(out.request_id) gives the OpenAI choice index of an output.

    PERF: outputs of a child that arrive before the reader took the previous one are merged
    into it (as vLLM V1's RequestOutputCollector does): a reader that lags behind the engine
    (128 streams on a fast engine) pays its per-output cost (detokenize, chunk, JSON, one SSE
    write) once per wake-up, not once per token, and so catches up instead of falling behind.
    A merged output reads as one with several new tokens (speculative decoding's shape)."""

    def __init__(self, request_id: str, child_ids: list[str]) -> None:
        self.request_id = request_id
        self.child_ids = child_ids
        self._index = {cid: i for i, cid in enumerate(child_ids)}
        self._ready: deque[RequestOutput | EngineError | None] = deque()
        self._unread: dict[str, RequestOutput] = {}   # child -> its output still in _ready
        self._waiter: asyncio.Future | None = None
        self._unfinished = set(child_ids)
        # Children stopped early (a stop string): outputs of theirs already queued when the
        # reader stopped them are skipped, since the engine thread runs ahead of the reader.
        self._dropped: set[str] = set()

    def index_of(self, child_id: str) -> int:
        return self._index[child_id]

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def put(self, item: RequestOutput | EngineError) -> None:
        if isinstance(item, RequestOutput):
            if item.finished:
                self._unfinished.discard(item.request_id)
            unread = self._unread.get(item.request_id)
            if unread is not None:
                merge_into(unread, item)
                return
            self._unread[item.request_id] = item
        self._push(item)

    def _push(self, item: RequestOutput | EngineError | None) -> None:
        self._ready.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> list[str]:
        """End the stream now (an abort): a waiting reader wakes up and stops. -> the children
        that had not finished."""
        live = [cid for cid in self.child_ids if cid in self._unfinished]
        self._unfinished.clear()
        self._push(_END)
        return live

    def drop(self, child_id: str) -> None:
        """Stop one child early: none of its outputs is read any more, queued ones included;
        the stream ends (waking a waiting reader) when that was its last child."""
        self._unfinished.discard(child_id)
        self._dropped.add(child_id)
        if self.finished:
            self._push(_END)

    def __aiter__(self) -> RequestStream:
        return self

    async def _get(self) -> RequestOutput | EngineError | None:
        while not self._ready:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._ready.popleft()
        if isinstance(item, RequestOutput) and self._unread.get(item.request_id) is item:
            del self._unread[item.request_id]
        return item

    async def __anext__(self) -> RequestOutput:
        while True:
            if self.finished and not self._ready:
                raise StopAsyncIteration
            item = await self._get()
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


def merge_into(first: RequestOutput, later: RequestOutput) -> None:
    """`later` (the same sample's next output) appended to `first`, not yet read: one output
    with both steps' tokens. The engine hands each output over once, so `first` is ours to
    change; its lists are replaced, never extended (the engine may still hold them)."""
    first.new_token_ids = first.new_token_ids + later.new_token_ids
    if later.logprobs is not None:
        first.logprobs = (first.logprobs or []) + later.logprobs
    if first.prompt_logprobs is None:
        first.prompt_logprobs = later.prompt_logprobs
    if later.num_prompt_tokens:
        first.num_prompt_tokens = later.num_prompt_tokens
    first.num_cached_tokens = max(first.num_cached_tokens, later.num_cached_tokens)
    first.finish_reason, first.stop_reason = later.finish_reason, later.stop_reason
    first.error, first.num_preemptions = later.error, later.num_preemptions
    if later.timings is not None:
        first.timings = later.timings


class WorkerService:
    """A model served from its own worker thread, as the server's lifespan and /health see it.
    start() returns at once; the thread runs the subclass's _load() (then is_ready, on_ready)
    and _serve() until STOP reaches the inbox. A failure in either marks it dead (is_healthy
    False, on_dead). Readiness and death reach the event loop through _on_loop."""

    thread_name: str   # the subclass's

    def __init__(self) -> None:
        self.is_ready = False          # the model is loaded; /health 200 while also healthy
        self.is_healthy = True         # false once the worker thread died
        self.dead_reason: str | None = None
        self.info: EngineInfo | None = None   # published when ready
        self.on_ready: Callable[[], None] | None = None
        self.on_dead: Callable[[str], None] | None = None
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    num_in_flight: int              # API requests still waiting for an answer
    _load: Callable[[], None]       # build the model (in the worker thread)
    _serve: Callable[[], None]      # answer the inbox until STOP

    def _fail_in_flight(self, err: EngineError) -> None:
        """Fail whatever is still waiting for an answer (on the event loop)."""

    # ---- event loop side ----
    def start(self) -> None:
        if self._thread is not None:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:   # used without a server (tests, scripts)
            self._loop = None
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        while not self.is_ready:
            if not self.is_healthy:
                raise EngineError(self.dead_reason or "the model failed to load", 503)
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.thread_name} not ready")
            await asyncio.sleep(0.05)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for grace_s, then fail the rest and
        stop the thread."""
        self._stopping = True
        t0 = time.monotonic()
        while self.num_in_flight and self.is_healthy and time.monotonic() - t0 < grace_s:
            await asyncio.sleep(0.05)
        self._fail_in_flight(EngineError("server is shutting down", 503))
        await asyncio.get_running_loop().run_in_executor(None, self.stop)
        self.is_ready = False

    def fail_in_flight(self, message: str) -> None:
        """End every request in flight with a 503 and refuse new ones (the shutdown deadline);
        work already running in the worker finishes there, its results dropped."""
        self._stopping = True
        self._fail_in_flight(EngineError(message, 503))

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker thread after what it is doing, and wait for it (blocking)."""
        if self._thread is not None:
            self._inbox.put(STOP)
            self._thread.join(timeout)
            self._thread = None

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn on the server's loop (or here, without one or once it is closed)."""
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
        self._fail_in_flight(EngineError(f"engine failed: {reason}", 500))
        if self.on_dead is not None:
            self.on_dead(reason)

    # ---- the worker thread ----
    def _run(self) -> None:
        loaded = False
        try:
            self._load()
            loaded = True
            self._on_loop(self._became_ready)
            self._serve()
        except Exception as e:  # a bad model, or a step that failed: report, never hang
            if not loaded:
                # A model that does not load: the reason is the one error line the owner (cli)
                # prints; the traceback only at --log-level debug.
                logger.debug("%s did not load", self.thread_name, exc_info=True)
                self._on_loop(self._died, str(e) if isinstance(e, ConfigError)
                              else f"{type(e).__name__}: {e}")
                return
            logger.exception("%s failed; failing all in-flight requests", self.thread_name)
            self._on_loop(self._died, f"{type(e).__name__}: {library_text(e)}")


def _default_engine_factory(config: Any) -> Any:
    from minserve.engine.engine import Engine  # torch lives behind this import

    return Engine(config)


class AsyncEngine(WorkerService):
    thread_name = "minserve-engine"

    def __init__(self, engine_config: Any,
                 engine_factory: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self.config = engine_config
        self._factory = engine_factory or _default_engine_factory
        self._engine: Any = None
        self.stats: dict[str, Any] = {}
        self._streams: dict[str, RequestStream] = {}    # sample id -> stream (event-loop side)
        self._parents: dict[str, RequestStream] = {}    # API request id -> stream
        self.sleep_level = 0    # sleep mode: 1 or 2 while asleep (or falling asleep)

    @property
    def num_in_flight(self) -> int:
        return len(self._parents)

    def stop(self, timeout: float | None = 10.0) -> None:
        super().stop(timeout)
        # the engine's memory goes with its last reference (the model pool unloads models),
        # not with this object, which a finished executor job may still hold for a moment
        self._engine = None

    # ---- requests (event loop side) ----
    def add_request(self, request_id: str, requests: list[EngineRequest]) -> RequestStream:
        """Queue an API request's prompts, one EngineRequest each (the engine fans n out). The
        stream's children are every sample id in order: choice index p * n + i, OpenAI's order
        for a list of prompts."""
        if not self.is_healthy:
            raise EngineError(self.dead_reason or "engine is not healthy", 503)
        if not self.is_ready or self._stopping:
            raise EngineError("engine is not ready", 503)
        if self.sleep_level:
            raise EngineError("the model is sleeping: POST /wake_up first", 503)
        if request_id in self._parents:
            raise EngineError(f"duplicate request id {request_id!r}", 400)
        stream = RequestStream(request_id, [sid for r in requests for sid in r.sample_ids()])
        self._parents[request_id] = stream
        for sid in stream.child_ids:
            self._streams[sid] = stream
        for r in requests:
            self._inbox.put(r)
        return stream

    def abort(self, request_id: str) -> None:
        """Abort an API request (all its children); a no-op once it finished."""
        stream = self._parents.pop(request_id, None)
        if stream is None:
            return
        for cid in stream.child_ids:
            self._streams.pop(cid, None)
        live = stream.close()
        if live:
            self._inbox.put(live)

    def abort_child(self, stream: RequestStream, child_id: str) -> None:
        """Stop one sample early (a stop string hit); `stream` yields no more of it, not even
        outputs already queued (the engine thread runs ahead of the reader, and may have
        finished the sample meanwhile)."""
        stream.drop(child_id)
        if self._streams.pop(child_id, None) is None:
            return  # its last output is already queued: nothing left to abort in the engine
        self._inbox.put([child_id])
        if stream.finished:
            self._parents.pop(stream.request_id, None)

    async def add_lora(self, name: str, path: str) -> None:
        """Read and check a LoRA adapter in a worker thread (a large or slow one never holds up
        a step), then hand its weights to the engine thread between two steps."""
        self._check_accepting()
        read = getattr(self._engine, "read_lora", None)
        weights = None
        if read is not None:
            try:
                weights = await asyncio.to_thread(read, name, path)
            except ValueError as e:
                raise EngineError(str(e), 400) from None
            except Exception as e:  # noqa: BLE001 - a bug of ours answers 500, serving goes on
                logger.exception("reading LoRA adapter %r failed", name)
                raise EngineError(f"{type(e).__name__}: {e}", 500) from None
        await self._call(f"add_lora({name!r})",
                         lambda engine: engine.add_lora(name, path, weights))

    async def remove_lora(self, name: str) -> None:
        await self._call(f"remove_lora({name!r})", lambda engine: engine.remove_lora(name))

    async def sleep(self, level: int) -> None:
        """Sleep mode (engine.py): from now on new requests are refused (a 503 naming
        /wake_up); those in flight finish first, then the engine frees its memory."""
        self._check_accepting()
        if self.sleep_level:
            return
        self.sleep_level = level
        try:
            while self.num_in_flight and self.is_healthy:
                await asyncio.sleep(0.05)
            await self._call(f"sleep({level})", lambda engine: engine.sleep(level))
        except BaseException:
            self.sleep_level = 0
            raise

    async def wake_up(self) -> None:
        if self.sleep_level:
            await self._call("wake_up", lambda engine: engine.wake_up())
            self.sleep_level = 0

    def _check_accepting(self) -> None:
        if not self.is_healthy or not self.is_ready or self._stopping:
            raise EngineError(self.dead_reason or "engine is not ready", 503)

    async def _call(self, what: str, run: Callable[[Any], Any]) -> Any:
        """run(engine) on the engine thread; its ValueError is an EngineError 400."""
        self._check_accepting()
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(EngineCall(what, run, future))
        return await future

    @staticmethod
    def _resolve(future: asyncio.Future, result: Any, error: EngineError | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # ---- delivery (runs on the event loop via call_soon_threadsafe) ----
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)
            if stream.finished:
                self._parents.pop(stream.request_id, None)

    def _reject(self, rejected: list[tuple[str, EngineError]]) -> None:
        for cid, err in rejected:
            stream = self._streams.get(cid)
            if stream is not None:  # its siblings are aborted by the server's finally
                stream.put(err)

    def _fail_in_flight(self, err: EngineError) -> None:
        for stream in list(self._parents.values()):
            stream.put(err)
        self._parents.clear()
        self._streams.clear()

    # ---- the engine thread ----
    def _load(self) -> None:
        self._engine = self._factory(self.config)
        self.stats = dict(self._engine.stats())
        self.info = self._engine.info

    def _run_call(self, engine: Any, call: EngineCall) -> None:
        try:
            result, error = call.run(engine), None
        except ValueError as e:
            result, error = None, EngineError(str(e), 400)
        except Exception as e:  # one bad call must not take the engine down
            logger.exception("engine %s failed", call.what)
            result, error = None, EngineError(f"{type(e).__name__}: {e}", 500)
        self._on_loop(self._resolve, call.future, result, error)

    def _next_when_idle(self) -> Any:
        """The next inbox message; meanwhile, each HEAP_TRIM_IDLE_S without one, the heap that
        work (steps, HTTP requests) freed since the last trim goes back to the OS (heap.py)."""
        while True:
            try:
                return self._inbox.get(timeout=HEAP_TRIM_IDLE_S)
            except queue.Empty:
                heap.trim_after_work()

    def _serve(self) -> None:
        engine, loop = self._engine, self._on_loop
        # loading freed its staging copies (a GGUF's raw blocks and unpacked shards: ~120 MiB
        # for the default model): the first idle wait gives them back
        heap.note_work()
        while True:
            # NOTE: block on the inbox only when idle; while busy, drain it without waiting.
            msgs = [] if engine.has_unfinished_requests() else [self._next_when_idle()]
            while True:
                try:
                    msgs.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            rejected: list[tuple[str, EngineError]] = []
            for msg in msgs:
                if msg is STOP:
                    getattr(engine, "shutdown", lambda: None)()   # tensor-parallel workers
                    return
                if isinstance(msg, EngineCall):
                    self._run_call(engine, msg)
                    continue
                if not isinstance(msg, EngineRequest):
                    engine.abort_request(msg)
                    continue
                try:
                    engine.add_request(msg)
                except ValueError as e:  # the engine's word on a bad input: a 400
                    rejected.append((msg.sample_ids()[0], EngineError(str(e), 400)))
                except Exception as e:  # one bad request must not take the engine down
                    logger.exception("add_request(%s) failed", msg.request_id)
                    rejected.append((msg.sample_ids()[0],
                                     EngineError(f"{type(e).__name__}: {library_text(e)}",
                                                 500)))
            if rejected:
                loop(self._reject, rejected)
            outputs = engine.step() if engine.has_unfinished_requests() else []
            if msgs:
                heap.note_work()
            self.stats = dict(engine.stats())
            if outputs:
                loop(self._deliver, outputs)
