"""Runs batch lines through the app's own routes: each line's body goes to App.answer, which
answers it with the JSON its route gives an HTTP client (parsed, validated, scheduled and
answered by the same code: one behaviour, one place), at batch priority; no ASGI exchange is
built and no auth is re-checked (the batch's owner passed it when the batch was created). Bounded
concurrency, cancellable."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from minserve.batch.lines import BatchLine, error_line, output_line
from minserve.http import run_unless

logger = logging.getLogger("minserve.batch")

# vLLM's priority: lower runs first; interactive requests have 0.
BATCH_PRIORITY = 1 << 20
# Statuses that say "not now" rather than "this line is wrong": the line runs again later.
RETRY_STATUSES = (503,)


class NotAnswered(Exception):
    """The server could not answer the line now (shutting down, engine not healthy, cancelled):
    nothing is recorded for it, so it runs again on resume."""


async def run_line(app: Any, line: BatchLine, priority: int = BATCH_PRIORITY,
                   gone: asyncio.Event | None = None) -> dict[str, Any]:
    """One line -> its output line. `gone` set: the line's run is cancelled (its engine request
    aborted). NotAnswered when it must run again later."""
    if line.error is not None:
        return error_line(line.custom_id, line.error)
    gone = gone or asyncio.Event()
    answered = await run_unless(app.answer(line.url, line.body, priority), gone.wait())
    if answered is None or gone.is_set():
        raise NotAnswered("cancelled")
    if answered[0] in RETRY_STATUSES:
        raise NotAnswered(str(answered)[:200])
    return output_line(line.custom_id, *answered)


OnResult = Callable[[BatchLine, dict[str, Any]], Awaitable[None]]


class LineRunner:
    """runner.run(lines, on_result): at most max_in_flight lines at once (vLLM's run-batch uses
    2 x max_num_seqs, enough to keep continuous batching full); on_result(line, output line)
    for each answered line, in completion order. stop() makes every line in flight go away
    (aborting its engine request) and dispatches no more; run() then returns. Lines the server
    could not answer are in not_answered (they stop the run too)."""

    def __init__(self, app: Any, max_in_flight: int, priority: int = BATCH_PRIORITY,
                 slots: asyncio.Semaphore | None = None) -> None:
        self.app = app
        self.priority = priority
        # shared by every batch of a server, so two batches do not double the load
        self.slots = slots or asyncio.Semaphore(max(1, max_in_flight))
        self.stopped = False
        self.not_answered: list[BatchLine] = []
        self._gone: set[asyncio.Event] = set()

    def stop(self) -> None:
        self.stopped = True
        for gone in self._gone:
            gone.set()

    async def run(self, lines: Iterable[BatchLine], on_result: OnResult) -> None:
        slots = self.slots
        tasks: set[asyncio.Task] = set()
        try:
            for line in lines:
                await slots.acquire()
                if self.stopped:
                    slots.release()
                    break
                task = asyncio.ensure_future(self._one(line, on_result))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: slots.release())
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            self.stop()
            for task in tasks:
                task.cancel()
            if tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, line: BatchLine, on_result: OnResult) -> None:
        gone = asyncio.Event()
        self._gone.add(gone)
        try:
            out = await run_line(self.app, line, self.priority, gone)
        except NotAnswered as e:
            # the server cannot answer now (shutting down, engine unhealthy): neither can it
            # answer the lines after this one, so stop here; they all run again later
            self.not_answered.append(line)
            if not self.stopped:
                logger.info("batch line %d not answered (%s); stopping", line.line_no, e)
            self.stop()
            return
        finally:
            self._gone.discard(gone)
        await on_result(line, out)
