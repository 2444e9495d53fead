"""Fan-out fairness: one client request's share of an engine step.

n > 1 samples and beam search turn one request into many rows (n=128 beam search: 128 rows a
round, each recomputing its partial last block). Admitted first come, first served, such a
request filled every step for seconds while other clients' one-token requests queued behind it
(issue 36, finding 5). Two rules bound what a one-row request waits for:

  - a fan-out runs at most `max_tokens` tokens a step (a decode row is one, a beam round's
    sub-request runs its recompute in chunks of at most that): the step in flight when the
    request arrives stays short. Tokens, not rows: on CPU a step's time follows its tokens
    (bench/hardening.py beam; a 160-token step cost ~9x a 1-token one, 8 tokens ~2x).
  - while a one-row request waits for its first token, fan-out rows of its priority or worse
    sit the step out (running ones keep their K/V, waiting ones stay queued): its first step is
    its own, as long as it is idle (the scheduler's hold_fanouts).

A fan-out of at most `max_tokens` rows (n=4, a 4-beam search) keeps its whole step, as one
row each would: the share is for the large ones, and a small beam search whose sub-requests
recompute up to a block each would otherwise take several steps a round. The fan-out's rows
take turns: the rows that ran longest ago go first."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from minserve.engine.request import Request


class FanoutShare:
    """Tokens per fan-out in the step being planned (max_tokens 0: no cap)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._step = 0
        self._used: dict[str, int] = {}      # fan-out -> tokens planned this step
        self._ran_at: dict[str, int] = {}    # row (request id) -> the last step it ran in
        self._rows: dict[str, int] = {}   # fan-out -> the most rows it had at once

    def begin_step(self, requests: Iterable[Request]) -> None:
        """requests: every running and waiting one. A fan-out's size is the most rows it has
        had at once: the tail of a beam round (its last sub-requests) stays under the share."""
        self._step += 1
        self._used.clear()
        rows = Counter(r.fanout for r in requests if r.fanout is not None)
        self._rows = {k: max(n, self._rows.get(k, 0)) for k, n in rows.items()}

    def turn(self, request: Request) -> int:
        """A sort key: rows that never ran (and one-row requests) first, then least recent."""
        return self._ran_at.get(request.request_id, -1)

    def room(self, request: Request, budget: int) -> int:
        """The step's token budget as far as the request's fan-out may use it (0: none left)."""
        key = request.fanout
        if key is None or self.max_tokens <= 0 or self._rows.get(key, 0) <= self.max_tokens:
            return budget
        return min(budget, self.max_tokens - self._used.get(key, 0))

    def take(self, request: Request, num_tokens: int) -> None:
        """The row runs num_tokens in this step."""
        key = request.fanout
        if key is not None:
            self._used[key] = self._used.get(key, 0) + num_tokens
            self._ran_at[request.request_id] = self._step

    def forget(self, request: Request) -> None:
        self._ran_at.pop(request.request_id, None)
