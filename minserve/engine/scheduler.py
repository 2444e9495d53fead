"""Continuous batching in the vLLM V1 manner: decides which tokens of which requests run this step
and applies the sampled tokens afterwards. Never touches tensors (the runner does that).

There is no prefill phase and no decode phase: each request's num_computed_tokens catches up with
its num_tokens. A decode is a request one token behind; a prefill chunk is one further behind."""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import (
    FinishReason,
    Logprob,
    Request,
    RequestOutput,
    RequestStatus,
)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # vLLM's name: at most this many prompt tokens of one request per step (0: no cap), so a
    # long prompt leaves room in each step for the requests queued behind it.
    long_prefill_token_threshold: int = 0
    # At most this many (query token, context token) pairs in one request's prefill chunk (0: no
    # cap). Attention work grows with the context: on CPU a late chunk of an 8,000-token prompt
    # cost 20x what the first did; this keeps late chunks as short as early ones.
    max_chunk_attention: int = 0


@dataclass(slots=True)
class StepPlan:
    """One step: which requests run how many tokens. Holds references, not diffs (in-process)."""
    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    finished_outputs: list[RequestOutput] = field(default_factory=list)  # aborted / failed

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass(slots=True)
class SampledTokens:
    """What the runner hands back, one entry per plan row (token -1: the row did not sample,
    a prefill chunk that stops short of the prompt's end)."""
    token_ids: list[int]
    logprobs: list[Logprob | None] | None = None
    prompt_logprobs: list[list[Logprob] | None] | None = None  # for the row's target tokens


def is_sampling_row(request: Request, num_scheduled: int) -> bool:
    """A row samples a token only when the step brings it fully up to date."""
    return request.num_computed_tokens + num_scheduled == request.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.block_size = kv_cache_manager.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()
        # parent_id -> the sibling admitted first; its prompt blocks are the ones to share
        self._leaders: dict[str, Request] = {}
        self._prompt_logprobs: dict[str, list[Logprob | None]] = {}
        self.num_preemptions = 0   # cumulative, for vllm:num_preemptions_total

    # ---- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Takes effect at the next schedule(), so a step in flight is never disturbed."""
        self._pending_aborts.update(request_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_aborts)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._prompt_logprobs.pop(request.request_id, None)
        if request.parent_id is not None and self._leaders.get(request.parent_id) is request:
            del self._leaders[request.parent_id]

    def _out(self, request: Request, new_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request.request_id, new_token_ids, request.finish_reason, request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            timings=(request.timings(time.monotonic()) if request.finish_reason is not None
                     else None),
        )

    def _apply_aborts(self, plan: StepPlan) -> None:
        for request_id in self._pending_aborts:
            request = self.requests.get(request_id)
            if request is None:
                continue  # finished already: an abort after the fact is a no-op
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, FinishReason.ABORT)
            plan.finished_outputs.append(self._out(request, []))
        self._pending_aborts.clear()

    def _fail(self, request: Request, message: str, plan: StepPlan) -> None:
        self._finish(request, FinishReason.ERROR)
        out = self._out(request, [])
        out.error = message
        plan.finished_outputs.append(out)

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Preemption by recompute: drop the K/V, go back to the front of the waiting queue.
        Blocks published to the prefix cache usually survive, so the recompute is often cheap."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        plan.preempted.append(request)

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._apply_aborts(plan)
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []

        # Running requests first, decodes (one token behind) before prefill chunks, so a long
        # prompt never stalls running streams. Victims of preemption come from the tail of this
        # order, which is never scheduled yet when the head needs room.
        order = ([r for r in self.running if r.num_uncomputed == 1]
                 + [r for r in self.running if r.num_uncomputed != 1])
        i = 0
        while i < len(order) and budget > 0:
            request = order[i]
            num_new = self._chunk(request.num_computed_tokens, request.num_uncomputed, budget)
            while self.kv.allocate_slots(request, num_new) is None:
                if len(order) - 1 > i:
                    victim = order.pop()
                    self._preempt(victim, plan)
                    continue
                # Nothing left to preempt but this request itself. If nothing else holds blocks
                # either, it cannot grow even alone: fail it rather than loop forever.
                order.pop()
                if not scheduled:
                    self._fail(request, "the request no longer fits in the whole KV cache "
                               f"({self.kv.num_blocks} blocks of {self.block_size} tokens)", plan)
                else:
                    self._preempt(request, plan)
                request = None
                break
            if request is None:
                break
            scheduled.append(request)
            plan.requests.append(request)
            plan.num_scheduled_tokens.append(num_new)
            budget -= num_new
            i += 1
        self.running = [r for r in order if r.status == RequestStatus.RUNNING]

        # Then waiting requests, unless this step already had to preempt (no room anyway).
        if not plan.preempted:
            budget = self._schedule_waiting(plan, budget)
        plan.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        return plan

    def _chunk(self, context_len: int, num_uncomputed: int, budget: int) -> int:
        """Tokens to run for one request this step (at least 1 while budget is left).

            |---- context_len ----|-- query_len --|   a prefill chunk computes
                                                      query_len * (context_len + query_len) pairs
        """
        num_new = min(num_uncomputed, budget)
        cap = self.config.long_prefill_token_threshold
        if cap > 0:
            num_new = min(num_new, cap)
        area = self.config.max_chunk_attention
        if area > 0 and num_new > 1:
            c = context_len  # the largest q with q * (c + q) <= area
            num_new = min(num_new, max(1, (math.isqrt(c * c + 4 * area) - c) // 2))
        return num_new

    def _child_must_wait(self, request: Request) -> bool:
        """n > 1 siblings: the first one admitted computes the prompt; the others wait until its
        prompt's full blocks are published, then admit with a prefix hit on them."""
        if request.parent_id is None or request.sampling.prompt_logprobs is not None:
            return False
        leader = self._leaders.get(request.parent_id)
        if leader is None or leader is request:
            return False
        return (leader.status == RequestStatus.RUNNING
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> int:
        skipped: list[Request] = []
        num_blocks = self.kv.num_blocks
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            if self._child_must_wait(request):
                skipped.append(request)
                continue
            # +1: the first sampled token must fit too
            if -(-(request.num_tokens + 1) // self.block_size) > num_blocks:
                self._fail(request, f"the prompt ({request.num_tokens} tokens) can never fit in "
                           f"the KV cache ({num_blocks} blocks of {self.block_size} tokens)", plan)
                continue
            # Prompt logprobs need logits at every prompt position, so such requests skip hits.
            if request.sampling.prompt_logprobs is not None and not request.prompt_logprobs_done:
                computed_blocks, num_cached = [], 0
            else:
                computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = self._chunk(num_cached, request.num_tokens - num_cached, budget)
            if self.kv.allocate_slots(request, num_new, computed_blocks) is None:
                self.waiting.appendleft(request)
                break
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:   # a preempted request keeps its first time
                request.scheduled_time = time.monotonic()
            if request.parent_id is not None:
                self._leaders.setdefault(request.parent_id, request)
            self.running.append(request)
            plan.requests.append(request)
            plan.num_scheduled_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    # ---- update -------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: SampledTokens | list[int]) -> list[RequestOutput]:
        """Advance counters, append sampled tokens, publish full blocks, finish requests."""
        if not isinstance(sampled, SampledTokens):
            sampled = SampledTokens(list(sampled))
        outputs = list(plan.finished_outputs)
        rows = zip(plan.requests, plan.num_scheduled_tokens, strict=True)
        for i, (request, num) in enumerate(rows):
            if request.status != RequestStatus.RUNNING:
                continue
            num_prompt_lps = self._collect_prompt_logprobs(request, sampled, i)
            request.num_computed_tokens += num
            if request.num_computed_tokens < request.num_tokens:
                self.kv.cache_full_blocks(request)
                continue  # a prefill chunk short of the end samples nothing
            token = sampled.token_ids[i]
            if not request.output_token_ids:
                request.first_token_time = time.monotonic()
            request.output_token_ids.append(token)
            self._check_stop(request, token)
            out = self._out(request, [token])
            if request.finish_reason == FinishReason.ERROR and request.structured is not None:
                out.error = f"structured output: {request.structured.error}"
            if sampled.logprobs is not None and request.sampling.logprobs is not None:
                out.logprobs = [sampled.logprobs[i]]
            if num_prompt_lps:
                out.prompt_logprobs = self._prompt_logprobs.pop(request.request_id)
                request.prompt_logprobs_done = True
            if request.finish_reason is not None:
                self.running.remove(request)
                self._finish(request, request.finish_reason)
            else:
                self.kv.cache_full_blocks(request)
            outputs.append(out)
        return outputs

    def _collect_prompt_logprobs(self, request: Request, sampled: SampledTokens, i: int) -> bool:
        """Accumulate the prompt logprobs of this chunk; True once the prompt is complete."""
        if request.sampling.prompt_logprobs is None or request.prompt_logprobs_done:
            return False
        acc = self._prompt_logprobs.setdefault(request.request_id, [None])
        if sampled.prompt_logprobs is not None and sampled.prompt_logprobs[i]:
            acc.extend(sampled.prompt_logprobs[i])
        return len(acc) >= request.num_prompt_tokens

    def _check_stop(self, request: Request, token: int) -> None:
        sp = request.sampling
        num_out = request.num_output_tokens
        if num_out >= sp.min_tokens:
            if not sp.ignore_eos and token in request.eos_token_ids:
                request.finish_reason = FinishReason.STOP
                return
            if token in sp.stop_token_ids:
                request.finish_reason, request.stop_reason = FinishReason.STOP, token
                return
        if request.structured is not None:
            # False: the token broke the grammar (only if a mask was skipped) -> an error, not
            # a "stop" that would pass invalid output off as complete.
            if not request.structured.accept_token(token):
                request.finish_reason = FinishReason.ERROR
                return
            if request.structured.is_finished():
                request.finish_reason = FinishReason.STOP
                return
        if (sp.max_tokens is not None and num_out >= sp.max_tokens) or \
                request.num_tokens >= self.config.max_model_len:
            request.finish_reason = FinishReason.LENGTH
