"""Fan-out fairness: one client request's share of an engine step.

n > 1 samples and beam search turn one request into many rows (n=128 beam search: 128 rows a
round). Admitted first come, first served, such a request filled every step for seconds while
other clients' one-token requests queued behind it (issue 36, finding 5). So while the box
holds rows of more than one client request, each fan-out runs at most `max_rows` rows per step;
its other rows sit the step out (running ones keep their K/V, waiting ones stay queued) and take
turns: the rows that ran longest ago go first. A request of one row is never held back, so a new
request is admitted in the next step whatever runs; a fan-out alone runs at full width."""
from __future__ import annotations

from collections.abc import Iterable

from minserve.engine.request import Request


class FanoutShare:
    """Rows per fan-out in the step being planned (max_rows 0: no cap)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._step = 0
        self._shared = False             # rows of more than one client request this step
        self._used: dict[str, int] = {}      # fan-out -> rows planned this step
        self._ran_at: dict[str, int] = {}    # row (request id) -> the last step it ran in

    def begin_step(self, rows: Iterable[Request]) -> None:
        """rows: every running and waiting row; the cap holds only when they belong to more
        than one client request (a one-row request is its own)."""
        self._step += 1
        self._used.clear()
        keys: set[str] = set()
        for r in rows:
            keys.add(r.fanout or r.request_id)
            if len(keys) > 1:
                break
        self._shared = len(keys) > 1

    def turn(self, request: Request) -> int:
        """A sort key: rows that never ran (and one-row requests) first, then least recent."""
        return self._ran_at.get(request.request_id, -1)

    def admits(self, request: Request) -> bool:
        key = request.fanout
        return (key is None or not self._shared or self.max_rows <= 0
                or self._used.get(key, 0) < self.max_rows)

    def take(self, request: Request) -> None:
        """The row runs in this step."""
        key = request.fanout
        if key is not None:
            self._used[key] = self._used.get(key, 0) + 1
            self._ran_at[request.request_id] = self._step

    def forget(self, request: Request) -> None:
        self._ran_at.pop(request.request_id, None)
