"""Fan-out fairness: one client request's share of an engine step.

n > 1 samples and beam search turn one request into many rows (n=128 beam search: 128 rows a
round). Admitted first come, first served, such a request filled every step for seconds while
other clients' one-token requests queued behind it (issue 36, finding 5). So each fan-out runs
at most `max_rows` rows per step; its other rows sit the step out (running ones keep their K/V,
waiting ones stay queued) and take turns: the rows that ran longest ago go first. A request of
one row is never held back, so a new request is admitted in the next step whatever runs."""
from __future__ import annotations

from minserve.engine.request import Request


class FanoutShare:
    """Rows per fan-out in the step being planned (max_rows 0: no cap)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._step = 0
        self._used: dict[str, int] = {}      # fan-out -> rows planned this step
        self._ran_at: dict[str, int] = {}    # row (request id) -> the last step it ran in

    def begin_step(self) -> None:
        self._step += 1
        self._used.clear()

    def turn(self, request: Request) -> int:
        """A sort key: rows that never ran (and one-row requests) first, then least recent."""
        return self._ran_at.get(request.request_id, -1)

    def admits(self, request: Request) -> bool:
        key = request.fanout
        return key is None or self.max_rows <= 0 or self._used.get(key, 0) < self.max_rows

    def take(self, request: Request) -> None:
        """The row runs in this step."""
        key = request.fanout
        if key is not None:
            self._used[key] = self._used.get(key, 0) + 1
            self._ran_at[request.request_id] = self._step

    def forget(self, request: Request) -> None:
        self._ran_at.pop(request.request_id, None)
