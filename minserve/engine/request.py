"""The engine's interface types, torch-free so protocol, server and LLM can use them:
EngineRequest in, RequestOutput out, EngineInfo once loaded; and Request, the per-sample state
(token lists and the glossary's counters) the scheduler works on."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from minserve.sampling_params import SamplingParams


@dataclass(slots=True)
class MultiModalItem:
    """One image (or other media) in a prompt: its placeholder tokens and a hash of its content.

        prompt_token_ids:  ... t t [f r i i i i f r i i i i \n f g i i i i f] t t ...
                                   |<-------------- length ------------->|
                                   offset            embed_mask: the i's (None: every token)

    The encoder's output rows go, in order, to the tokens embed_mask selects."""
    offset: int          # index of its first placeholder token in prompt_token_ids
    length: int          # number of placeholder tokens
    content_hash: str    # equal content, equal hash: only then may KV blocks be shared
    data: dict[str, Any] = field(default_factory=dict)   # the encoder's inputs (numpy arrays)
    embed_mask: Any = None   # [length] bool numpy array, or None: every token takes an embedding

    @property
    def num_embeds(self) -> int:
        return self.length if self.embed_mask is None else int(self.embed_mask.sum())

    def embed_runs(self) -> list[tuple[int, int]]:
        """[start, end) prompt positions of each run of consecutive embedding tokens (an
        image's soft tokens, without the markers around them)."""
        if self.embed_mask is None:
            return [(self.offset, self.offset + self.length)]
        runs, start = [], None
        for i, selected in enumerate([*self.embed_mask.tolist(), False]):
            if selected and start is None:
                start = i
            elif not selected and start is not None:
                runs.append((self.offset + start, self.offset + i))
                start = None
        return runs


@dataclass(slots=True)
class EngineRequest:
    """One prompt as every front door hands it to the engine (protocol.py, llm.py). The engine
    fans sampling.n out into n Requests named by sample_ids()."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_name: str | None = None      # a LoRA adapter, by the name it is served under
    mm_items: list[MultiModalItem] = field(default_factory=list)
    cache_salt: str | None = None        # requests with different salts never share KV blocks
    priority: int = 0                    # lower runs first, as vLLM's priority policy
    arrival_time: float = field(default_factory=time.monotonic)
    # Qwen2-VL's M-RoPE: [3, num_prompt_tokens] int64 positions; output token i (counting the
    # prompt) takes position i + mrope_position_delta on all three rows. None: 1-D positions.
    mrope_positions: Any = None
    mrope_position_delta: int = 0

    def sample_ids(self) -> list[str]:
        """The engine request id of each of the n samples."""
        n = self.sampling.n
        return [self.request_id] if n == 1 else [f"{self.request_id}-{i}" for i in range(n)]


@dataclass(slots=True)
class EngineInfo:
    """What a loaded model tells its callers (server, LLM, CLI log), published once it is ready."""
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    architecture: str = "?"
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    eos_token_ids: frozenset[int] = frozenset()
    num_kv_blocks: int = 0
    block_size: int = 0
    # Vision-language models: the image processor (models/vision/; None: text only) and the
    # most images one prompt may carry (where images may come from: the front doors' MediaPolicy)
    image_processor: Any = None
    image_limit: int = 0


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
    num_preemptions: int = 0                 # so far (vllm:request_num_preemptions)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class Request:
    """One sample of an EngineRequest, as the scheduler tracks it."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    adapter_name: str | None = None       # these come from the EngineRequest
    adapter_load: int = 0                 # which load of adapter_name (LoRAManager.add counts
    #                                       them): the prefix-cache root, so reloaded weights
    #                                       under an old name never hit the old ones' blocks
    mm_items: list[MultiModalItem] = field(default_factory=list)
    cache_salt: str | None = None
    priority: int = 0
    mrope_positions: Any = None           # as EngineRequest's
    mrope_position_delta: int = 0
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
    beam_search_id: str | None = None   # a beam's sub-request: the request searching (beam.py)
    sample_seed: int = 0        # every request samples from a seeded stream (see sampler.py)
    num_preemptions: int = 0
    prompt_logprobs_done: bool = False
    structured: object | None = None  # a compiled constraint (structured.py), or None
    # speculative decoding (engine/spec/): the drafts the next step verifies (the scheduler runs
    # them after the last token), and engine/spec's own state (None: speculation off)
    spec_token_ids: list[int] = field(default_factory=list)
    spec_state: Any = None
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
    def fanout(self) -> str | None:
        """The client request this row is one of when it has several (n > 1, beams): the
        scheduler bounds each fan-out's rows per step (engine/fairness.py)."""
        return self.parent_id if self.parent_id is not None else self.beam_search_id

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
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


def whole_images(request: Request, context_len: int, num_new: int, budget: int) -> int:
    """num_new cut so that the chunk does not end inside an image's run of tokens: before the
    image, or, when the chunk starts inside or at it, through its end if the step's budget
    allows it (the per-request caps give way), else 0 (the request waits a step).

        prompt   t t t [i i i i i i] t t        chunk from 3, num_new 4 ends inside: -> 0..3
                       ^3           ^9          chunk from 3 (the image's start): -> 6 or 0
    """
    end = context_len + num_new
    for item in request.mm_items or ():
        for start, stop in item.embed_runs():
            if start < end < stop:
                if start > context_len:
                    return start - context_len
                return stop - context_len if stop - context_len <= budget else 0
    return num_new
