"""When speculation pays ("never slower"): no drafts in a step with a large batch (vLLM's
disable_by_batch_size), none for a while from a request whose drafts keep being rejected (its
acceptance, measured), and never a draft past max_tokens or max_model_len. Pure Python."""
from __future__ import annotations

from dataclasses import dataclass

from minserve.engine.request import Request

# Defaults, used where the config leaves them out (the start-up log states them).
# PERF: on a 2-core CPU a verified row of 1 + k tokens costs about what many decode rows cost,
# and a batch of decodes already fills the cores: from this many running requests on, drafts
# stopped paying (bench/spec.py, bench/RESULTS.md "Speculative decoding"). A GPU step stays
# memory-bound much longer.
DEFAULT_DISABLE_BY_BATCH_SIZE = {"cpu": 4, "cuda": 32}
# Below this recent acceptance rate (accepted / drafted) a draft costs more than it gives.
DEFAULT_MIN_ACCEPTANCE_RATE = 0.3
_EMA_WEIGHT = 0.3            # of the latest verification in a request's acceptance
_MIN_BACKOFF, _MAX_BACKOFF = 4, 256   # steps without drafts after a low-acceptance spell


@dataclass(slots=True)
class SpecState:
    """A request's speculative state (Request.spec_state), kept by engine/spec only."""
    acceptance: float = 1.0           # moving average of accepted / drafted
    backoff: int = 0                  # steps left without drafts
    next_backoff: int = _MIN_BACKOFF
    num_draft_computed: int = 0       # draft model: positions its KV cache holds
    num_preemptions: int = 0          # as last seen: a preemption drops the draft's KV too


class SpecPolicy:
    def __init__(self, num_speculative_tokens: int, disable_by_batch_size: int,
                 min_acceptance_rate: float, max_model_len: int) -> None:
        self.k = num_speculative_tokens
        self.disable_by_batch_size = disable_by_batch_size
        self.min_acceptance_rate = min_acceptance_rate
        self.max_model_len = max_model_len

    def describe(self) -> str:
        return (f"{self.k} tokens per step; off from {self.disable_by_batch_size} requests "
                f"running; a request drafts nothing for a while when under "
                f"{self.min_acceptance_rate:.0%} of its recent drafts are accepted")

    def step_enabled(self, num_requests: int) -> bool:
        return num_requests < self.disable_by_batch_size

    def num_drafts(self, request: Request) -> int:
        """How many tokens `request` may draft now: 0 while backing off; never more than its
        max_tokens or max_model_len leave room for (the last emitted token is the target's)."""
        state = request.spec_state
        if state.backoff > 0:
            state.backoff -= 1
            return 0
        return self.room(request)

    def room(self, request: Request) -> int:
        """At most k, and no draft past max_tokens or max_model_len."""
        room = self.max_model_len - request.num_tokens - 1
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return max(0, min(self.k, room))

    def observe(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        state = request.spec_state
        rate = num_accepted / num_drafted
        state.acceptance += _EMA_WEIGHT * (rate - state.acceptance)
        if state.acceptance >= self.min_acceptance_rate:
            if rate >= self.min_acceptance_rate:   # a good round, not the average's slack
                state.next_backoff = _MIN_BACKOFF
            return
        state.backoff = state.next_backoff
        state.next_backoff = min(2 * state.next_backoff, _MAX_BACKOFF)
        # the next try is a probe: one more bad round backs off again (twice as long), a good
        # one goes on drafting
        state.acceptance = self.min_acceptance_rate
