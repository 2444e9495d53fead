"""Per-request state that the scheduler and runner share: token lists and the counters of the
glossary. No torch here."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from minserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # eos, stop token id, stop string, grammar complete
    LENGTH = "length"    # max_tokens or max_model_len
    ABORT = "abort"      # client went away / server shutdown
    ERROR = "error"      # could never run (e.g. prompt longer than the cache)


@dataclass(slots=True)
class RequestTimings:
    """Seconds spent in each phase (vLLM's request_{queue,prefill,decode,inference}_time). A
    request that never ran has only queue time; one aborted in prefill has no decode time."""
    queue: float
    prefill: float | None
    decode: float | None
    inference: float | None


@dataclass(slots=True)
class Logprob:
    """Logprob of the chosen token plus the top alternatives, at one position."""
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (new tokens are a delta, not the whole list)."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None     # the stop token id / stop string that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[Logprob] | None = None    # one per new token when asked
    prompt_logprobs: list[Logprob | None] | None = None  # once, when the prompt is done
    error: str | None = None                 # finish_reason ERROR: why
    timings: RequestTimings | None = None    # once, when finished (for /metrics)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0           # lower runs first, as vLLM (batch lines run at a large one)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # NOTE: n > 1 children share a parent id; a child waits until its first sibling has its prompt
    # in the prefix cache, so the siblings share those KV blocks instead of recomputing them.
    parent_id: str | None = None
    sample_seed: int = 0        # every request samples from a seeded stream (see sampler.py)
    num_preemptions: int = 0
    prompt_logprobs_done: bool = False
    structured: object | None = None  # a compiled constraint (structured.py), or None
    scheduled_time: float | None = None     # time.monotonic() when first scheduled
    first_token_time: float | None = None   # ... when its first output token was sampled

    def timings(self, now: float) -> RequestTimings:
        if self.scheduled_time is None:
            return RequestTimings(now - self.arrival_time, None, None, None)
        first = self.first_token_time
        return RequestTimings(self.scheduled_time - self.arrival_time,
                              (first if first is not None else now) - self.scheduled_time,
                              now - first if first is not None else None,
                              now - self.scheduled_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
