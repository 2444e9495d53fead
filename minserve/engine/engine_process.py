"""The engine loop in its own process (--engine-process; issue 40): the server's interpreter then
only serves HTTP, and the engine's step never waits on the event loop's lock.

ProcessEngine is an AsyncEngine on the server side (the same streams, aborts, /health); its
inbox is the pipe to the engine process, and its worker thread only reads that pipe. The engine
process runs an _EngineCore: the same AsyncEngine._serve loop, whose deliveries go back over the
pipe, one message per step.

On the wire (multiprocessing Connection, send_bytes/recv_bytes):
    server -> engine: pickle of what the server made itself (EngineRequest, a list of sample ids
                      to abort, a (call id, op, args) tuple, STOP); the engine process trusts its
                      parent, as the tensor-parallel workers do.
    engine -> server: marshal of plain data only (tuples, lists, str, int, float, dict): the
                      server never unpickles what the engine sends, except EngineInfo once at
                      start-up (the tokenizer and image processor the engine built).
The engine process never outlives the server: PR_SET_PDEATHSIG (Linux) and a pipe EOF both end
it; if it dies, the reader thread's EOF marks the service dead (/health 503, in-flight fail)."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import marshal
import multiprocessing
import os
import pickle
import signal
import threading
import time
from typing import Any

from minserve.config import ConfigError
from minserve.engine import heap
from minserve.engine.async_engine import (HEAP_TRIM_IDLE_S, STOP, AsyncEngine, EngineCall,
                                          EngineError)
from minserve.engine.request import FinishReason, Logprob, RequestOutput, RequestTimings

logger = logging.getLogger("minserve.engine")

_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1
STATS_EVERY_S = 0.25   # the engine's stats (for /metrics, /load) ride on a step at most this often


# ---- the compact output encoding (plain data; marshal) ---------------------------------------
def _logprobs_out(lps: list[Logprob | None] | None) -> Any:
    if lps is None:
        return None
    return [None if lp is None else (lp.token_id, lp.logprob, lp.rank, lp.top) for lp in lps]


def _logprobs_in(rows: Any) -> list[Logprob | None] | None:
    if rows is None:
        return None
    return [None if r is None else Logprob(r[0], r[1], r[2], [tuple(t) for t in r[3]])
            for r in rows]


def encode_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    """One step's outputs as plain tuples: a decode step's output is (id, token ids) plus the
    few fields that are rarely set, None when unset."""
    rows = []
    for o in outputs:
        t = o.timings
        rows.append((o.request_id, o.new_token_ids,
                     o.finish_reason.value if o.finish_reason is not None else None,
                     o.stop_reason, o.num_prompt_tokens, o.num_cached_tokens,
                     _logprobs_out(o.logprobs), _logprobs_out(o.prompt_logprobs), o.error,
                     None if t is None else (t.queue, t.prefill, t.decode, t.inference),
                     o.num_preemptions))
    return rows


def decode_outputs(rows: list[tuple]) -> list[RequestOutput]:
    outs = []
    for (rid, tokens, finish, stop, n_prompt, n_cached, lps, plps, error, timings,
         n_preempt) in rows:
        outs.append(RequestOutput(
            rid, tokens, FinishReason(finish) if finish is not None else None, stop, n_prompt,
            n_cached, _logprobs_in(lps), _logprobs_in(plps), error,
            RequestTimings(*timings) if timings is not None else None, n_preempt))
    return outs


# ---- the server side ---------------------------------------------------------------------------
class _PipeInbox:
    """AsyncEngine's inbox, as the pipe to the engine process: put() sends at once (from the
    event loop, or stop()'s thread: hence the lock)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def put(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            try:
                self._conn.send_bytes(data)
            except OSError:   # the engine process is gone: the reader thread reports it
                pass


class ProcessEngine(AsyncEngine):
    """AsyncEngine whose engine runs in a spawned process (the default factory only)."""
    thread_name = "minserve-engine-reader"

    def __init__(self, engine_config: Any) -> None:
        super().__init__(engine_config)
        self.process: Any = None          # the engine process (tests kill it)
        self._conn: Any = None
        self._calls: dict[int, Any] = {}  # call id -> its asyncio future
        self._next_call = 0

    def _load(self) -> None:
        """Spawn the engine process and wait until its engine is built (in the reader thread)."""
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        # not a daemon: the engine process starts tensor-parallel workers of its own
        self.process = ctx.Process(target=engine_main, args=(self.config, theirs, os.getpid()),
                                   name="minserve-engine", daemon=False)
        self.process.start()
        theirs.close()
        self._conn = ours
        self._inbox = _PipeInbox(ours)   # type: ignore[assignment]
        try:
            first = ours.recv_bytes()
        except (EOFError, OSError):
            raise ConfigError(f"the engine process exited while loading (code "
                              f"{self._reap()}); see its log above") from None
        if first[:1] == b"D":   # died while loading: its one-line reason
            self._reap()
            raise ConfigError(marshal.loads(first[1:]))
        self.info, self.stats = pickle.loads(first[1:])   # our own child's EngineInfo

    def _reap(self) -> int | None:
        self.process.join(10)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(5)
        return self.process.exitcode

    def _serve(self) -> None:
        recv, poll, on_loop = self._conn.recv_bytes, self._conn.poll, self._on_loop
        while True:
            try:
                if not poll(HEAP_TRIM_IDLE_S):
                    # the server's own heap (HTTP work notes itself): the engine thread's job
                    # before the split (heap.py), the engine process trims its own
                    heap.trim_after_work()
                    continue
                data = recv()
            except (EOFError, OSError):
                code = self._reap()
                if not self._stopping:
                    on_loop(self._died, f"the engine process exited (code {code})")
                return
            kind, body = data[:1], marshal.loads(data[1:])
            if kind == b"O":      # one step: (outputs, stats or None)
                if body[1] is not None:
                    self.stats = body[1]
                on_loop(self._deliver, decode_outputs(body[0]))
            elif kind == b"R":    # rejected: [(sample id, message, status)]
                on_loop(self._reject, [(cid, EngineError(m, s)) for cid, m, s in body])
            elif kind == b"C":    # a call's answer: (call id, result, (message, status) | None)
                future = self._calls.pop(body[0], None)
                if future is not None:
                    on_loop(self._resolve, future, body[1],
                            None if body[2] is None else EngineError(*body[2]))
            elif kind == b"D":    # the engine failed (its reason, formatted there)
                logger.error("the engine process failed: %s", body)
                self._reap()
                on_loop(self._died, body)
                return

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping = True   # the reader thread then takes the pipe's EOF as the end
        super().stop(timeout)   # STOP down the pipe
        if self.process is not None and self.process.exitcode is None:
            self._reap()
        if self._conn is not None:
            self._conn.close()

    async def add_lora(self, name: str, path: str) -> None:
        await self._remote("add_lora", name, path)

    async def remove_lora(self, name: str) -> None:
        await self._remote("remove_lora", name)

    async def _remote(self, op: str, *args: Any) -> Any:
        """engine.op(*args) in the engine process, between two steps; ValueError -> 400."""
        self._check_accepting()
        future = asyncio.get_running_loop().create_future()
        self._next_call += 1
        self._calls[self._next_call] = future
        self._inbox.put((self._next_call, op, args))
        return await future

    def _fail_in_flight(self, err: EngineError) -> None:
        super()._fail_in_flight(err)
        calls, self._calls = self._calls, {}
        for future in calls.values():
            self._resolve(future, None, err)


# ---- the engine process ------------------------------------------------------------------------
class _EngineCore(AsyncEngine):
    """AsyncEngine's engine loop, run on the engine process's main thread; what it would hand
    the event loop goes down the pipe instead."""

    def __init__(self, engine_config: Any, conn: Any) -> None:
        super().__init__(engine_config)
        self._conn = conn
        self._stats_at = 0.0

    def _send(self, kind: bytes, body: Any) -> None:
        self._conn.send_bytes(kind + marshal.dumps(body))

    def _became_ready(self) -> None:
        self._conn.send_bytes(b"I" + pickle.dumps((self.info, self.stats)))

    def _died(self, reason: str) -> None:
        self._send(b"D", reason)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        stats = None
        if now - self._stats_at >= STATS_EVERY_S or not self._engine.has_unfinished_requests():
            stats, self._stats_at = dict(self._engine.stats()), now
        self._send(b"O", (encode_outputs(outputs), stats))

    def _reject(self, rejected: list[tuple[str, EngineError]]) -> None:
        self._send(b"R", [(cid, e.message, e.status) for cid, e in rejected])

    def _resolve(self, call_id: Any, result: Any, error: EngineError | None) -> None:
        self._send(b"C", (call_id, None, None if error is None else (error.message,
                                                                     error.status)))

    def _next_when_idle(self) -> Any:
        # idle: the server's last word on the queues and the KV cache (an abort that freed
        # blocks makes no step, hence no output to carry the stats)
        self._send(b"O", ([], dict(self._engine.stats())))
        return super()._next_when_idle()

    def read_pipe(self) -> None:
        """The server's messages into the inbox; EOF (the server is gone): exit now."""
        try:
            while True:
                msg = pickle.loads(self._conn.recv_bytes())
                if isinstance(msg, tuple):   # (call id, op, args): a named engine method
                    call_id, op, args = msg
                    msg = EngineCall(op, lambda engine, op=op, args=args:
                                     getattr(engine, op)(*args), call_id)
                self._inbox.put(msg)
                if msg is STOP:
                    return
        except (EOFError, OSError):
            pass
        os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the server dies (Linux), even if this process is stuck in a step."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(_PR_SET_NAME, b"minserve-engine", 0, 0, 0)   # what ps and top show
    except (OSError, AttributeError):   # not Linux: the pipe EOF still ends us
        return
    if os.getppid() != parent_pid:   # the server died before prctl took effect
        os._exit(1)


def engine_main(config: Any, conn: Any, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C and SIGTERM are the server's
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s (engine process): %(message)s")
    core = _EngineCore(config, conn)
    threading.Thread(target=core.read_pipe, name="minserve-engine-pipe", daemon=True).start()
    core._run()   # load, then serve until STOP; a failure was sent as b"D"
    conn.close()
