"""Continuous batching in the vLLM V1 manner: decides which tokens of which requests run this step
and applies the sampled tokens afterwards. Never touches tensors (the runner does that).

There is no prefill phase and no decode phase: each request's num_computed_tokens catches up with
its num_tokens. A decode is a request one token behind; a prefill chunk is one further behind.

Priorities follow vLLM's priority policy (lower first; all 0 is plain FCFS): waiting requests are
admitted in (priority, arrival) order, running ones get the token budget in priority order, and a
waiting request that cannot be admitted (no sequence slot or no room in the cache) preempts the
lowest-priority running request below it. Beyond vLLM: while a request waits for its first
token, running rows of a worse priority sit the steps out (keeping their K/V) until it has it.
So batch lines, sent at a large priority, never keep an interactive request waiting behind them,
not even behind one step of theirs."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from minserve.engine.fairness import FanoutShare
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import (
    FinishReason,
    Logprob,
    Request,
    RequestOutput,
    RequestStatus,
    whole_images,
)
from minserve.engine.waiting import WaitingQueue


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
    max_loras: int = 0   # distinct LoRA adapters in one step (0: LoRA off)
    # a model whose image tokens attend to each other both ways (Gemma 3): a prefill chunk
    # never ends inside an image's tokens, whose first ones must see its last
    whole_images: bool = False
    # At most this many tokens of one n > 1 or beam-search request per step (0: no cap; a decode
    # row is one: --max-fanout-rows), so a fan-out never keeps others waiting (fairness.py).
    max_fanout_rows: int = 0
    # speculative decoding with a drafter that has a KV cache: the slots it writes past a
    # sampling row's tokens in the same step (k), allocated with the row's (vLLM's lookahead)
    num_lookahead_tokens: int = 0
    # a hybrid model's prefix cache (engine/state_cache.py): a prefill chunk that crosses a
    # block boundary ends on the last one, where its linear layers' states are saved
    align_chunks: bool = False


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
    """What the runner hands back, one entry per plan row: the tokens the row emits, [] when it
    did not sample (a prefill chunk short of the prompt's end), else its sampled token, or with
    speculative decoding its accepted drafts and then the target's own token (engine/spec)."""
    token_ids: list[list[int]]
    logprobs: list[list[Logprob]] | None = None   # one per emitted token, for rows that asked
    prompt_logprobs: list[list[Logprob] | None] | None = None  # for the row's target tokens
    # model drafters (engine/spec/drafter.py): per row, the drafts proposed for the next step
    draft_token_ids: list[list[int]] | None = None


def is_sampling_row(request: Request, num_scheduled: int) -> bool:
    """A row samples a token only when the step brings it fully up to date (past it: drafts)."""
    return request.num_computed_tokens + num_scheduled >= request.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.block_size = kv_cache_manager.block_size
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()
        # parent_id -> the sibling admitted first; its prompt blocks are the ones to share
        self._leaders: dict[str, Request] = {}
        self._prompt_logprobs: dict[str, list[Logprob | None]] = {}
        self.fanout = FanoutShare(config.max_fanout_rows)
        self.num_preemptions = 0   # cumulative, for vllm:num_preemptions_total
        self.num_prompt_tokens_computed = 0   # cumulative, for the throughput log line
        self.num_generation_tokens = 0

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

    @property
    def num_waiting_deferred(self) -> int:
        """Waiting for a reason other than room (vLLM's "deferred"): n > 1 siblings held back
        until the first one's prompt is in the prefix cache."""
        return sum(1 for r in self.waiting if self._child_must_wait(r))

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._prompt_logprobs.pop(request.request_id, None)
        self.fanout.forget(request)
        if request.parent_id is not None and self._leaders.get(request.parent_id) is request:
            del self._leaders[request.parent_id]

    def _out(self, request: Request, new_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request.request_id, new_token_ids, request.finish_reason, request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            timings=(request.timings(time.monotonic()) if request.finish_reason is not None
                     else None),
            num_preemptions=request.num_preemptions,
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
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        plan.preempted.append(request)

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._apply_aborts(plan)
        self._preempt_for_priority(plan)
        self.fanout.begin_step([*self.running, *self.waiting])
        num_priority_preempted = len(plan.preempted)
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []

        # Running requests first, decodes (one token behind) before prefill chunks, so a long
        # prompt never stalls running streams; all of it in priority order. Victims of
        # preemption come from the tail of this order (the lowest priority), which is never
        # scheduled yet when the head needs room. Within a priority, a fan-out's rows take
        # turns (those that ran longest ago first): each runs at most max_fanout_rows a step.
        order = sorted([r for r in self.running if r.num_uncomputed == 1]
                       + [r for r in self.running if r.num_uncomputed != 1],
                       key=lambda r: (r.priority, self.fanout.turn(r)))
        # While a request of a better priority waits for its first token, the rows below it sit
        # this step out (they keep their K/V): its TTFT is then one step of its own class, not
        # one step of a 256-row batch. They stay at the tail of `order`, first to be preempted.
        urgent = self._urgent_priority()
        limit = len(order) if urgent is None else sum(r.priority <= urgent for r in order)
        held = self._hold_fanouts()
        i = 0
        while i < min(limit, len(order)) and budget > 0:
            request = order[i]
            room = self.fanout.room(request, budget)
            if room <= 0 or request.fanout is not None and request.priority >= held:
                i += 1   # its fan-out had its share of this step: it sits out, keeping its K/V
                continue
            # a decode row with drafts runs them too (speculative decoding: the step verifies)
            num_new = self._chunk(request.num_computed_tokens,
                                  request.num_uncomputed + len(request.spec_token_ids), room)
            if self.config.whole_images:
                num_new = whole_images(request, request.num_computed_tokens, num_new, budget)
                if num_new == 0:     # its next image does not fit in what is left of the step
                    i += 1
                    continue
            del request.spec_token_ids[max(num_new - request.num_uncomputed, 0):]
            while self.kv.allocate_slots(request, self._with_lookahead(
                    request, request.num_computed_tokens, num_new)) is None:
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
            self.fanout.take(request, num_new)
            plan.requests.append(request)
            plan.num_scheduled_tokens.append(num_new)
            budget -= num_new
            i += 1
        self.running = [r for r in order if r.status == RequestStatus.RUNNING]

        # Then waiting requests, unless this step already had to preempt for room (none is
        # left anyway); preempting for priority made room precisely for them.
        if len(plan.preempted) == num_priority_preempted:
            budget = self._schedule_waiting(plan, budget, urgent, held)
        plan.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        return plan

    def _with_lookahead(self, request: Request, context_len: int, num_new: int) -> int:
        """num_new, plus the slots a drafter writes after a row that samples (never past
        max_model_len: the block table has no room there)."""
        if context_len + num_new < request.num_tokens or not self.config.num_lookahead_tokens:
            return num_new
        room = self.config.max_model_len - context_len
        return max(num_new, min(num_new + self.config.num_lookahead_tokens, room))

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
        if self.config.align_chunks and num_new > 1:
            aligned = (context_len + num_new) // self.block_size * self.block_size - context_len
            num_new = aligned if aligned > 0 else num_new
        return num_new

    def _preempt_for_priority(self, plan: StepPlan) -> None:
        """vLLM's priority preemption: while the first waiting request cannot be admitted (no
        sequence slot, or too few free blocks for its first chunk) and a running request has a
        lower priority (a larger value), preempt the lowest (latest arrived among equals)."""
        while self.waiting and self.running:
            head = self.waiting.peek()
            victim = max(self.running, key=lambda r: (r.priority, r.arrival_time))
            if victim.priority <= head.priority or self._can_start(head):
                return
            self.running.remove(victim)
            self._preempt(victim, plan)

    def _can_start(self, request: Request) -> bool:
        """A sequence slot is free, and blocks for the waiting request's first chunk."""
        need = -(-min(request.num_tokens + 1, self.config.max_num_batched_tokens)
                 // self.block_size)
        return len(self.running) < self.config.max_num_seqs and need <= self.kv.num_free_blocks

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

    def _urgent_priority(self) -> int | None:
        """The best priority with a first token pending (waiting, or running its prompt) when it
        beats some running request's; None when no row has to sit out."""
        if not self.running:
            return None
        pending = [r.priority for r in self.running
                   if r.num_output_tokens == 0 and r.num_computed_tokens < r.num_prompt_tokens]
        adapters = {r.adapter_name for r in self.running if r.adapter_name is not None}
        for r in self.waiting:   # the first that may start (one waiting on an adapter cannot:
            if not (self._child_must_wait(r) or self._over_max_loras(r, adapters)):
                pending.append(r.priority)   # holding the rows back would only stall them)
                break
        if not pending:
            return None
        best = min(pending)
        return best if max(r.priority for r in self.running) > best else None

    def _hold_fanouts(self) -> float:
        """The best priority of a one-row request due its first token (running its prompt, or
        the first waiting one that can start now); fan-out rows of it or worse sit out."""
        if self.fanout.max_tokens <= 0:
            return math.inf
        pending = [r.priority for r in self.running if r.fanout is None
                   and r.num_output_tokens == 0 and r.num_computed_tokens < r.num_prompt_tokens]
        first = next((r for r in self.waiting if r.fanout is None), None)
        if first is not None and self._can_start(first) and not self._over_max_loras(
                first, {r.adapter_name for r in self.running if r.adapter_name is not None}):
            pending.append(first.priority)
        return min(pending, default=math.inf)   # inf: none, nothing sits out

    def _schedule_waiting(self, plan: StepPlan, budget: int, max_priority: int | None,
                          held: float = math.inf) -> int:
        skipped: list[Request] = []
        num_blocks = self.kv.num_blocks
        adapters = {r.adapter_name for r in self.running if r.adapter_name is not None}
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if max_priority is not None and self.waiting.peek().priority > max_priority:
                break   # sorted by priority: the rest sit this step out too
            request = self.waiting.popleft()
            room = self.fanout.room(request, budget)
            if self._child_must_wait(request) or self._over_max_loras(request, adapters) or \
                    room <= 0 or request.fanout is not None and request.priority >= held:
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
            num_new = self._chunk(num_cached, request.num_tokens - num_cached, room)
            if self.config.whole_images:
                num_new = whole_images(request, num_cached, num_new, budget)
            if num_new == 0 or self.kv.allocate_slots(
                    request, self._with_lookahead(request, num_cached, num_new),
                    computed_blocks) is None:
                self.waiting.appendleft(request)
                break
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.adapter_name is not None:
                adapters.add(request.adapter_name)
            if request.scheduled_time is None:   # a preempted request keeps its first time
                request.scheduled_time = time.monotonic()
            if request.parent_id is not None:
                self._leaders.setdefault(request.parent_id, request)
            self.running.append(request)
            self.fanout.take(request, num_new)
            plan.requests.append(request)
            plan.num_scheduled_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _over_max_loras(self, request: Request, adapters: set[str]) -> bool:
        """A new adapter beyond --max-loras waits (not fails) until one in use drains."""
        name = request.adapter_name
        return (name is not None and name not in adapters
                and len(adapters) >= self.config.max_loras)

    # ---- update -------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: SampledTokens | list[int]) -> list[RequestOutput]:
        """Advance counters, append sampled tokens, publish full blocks, finish requests."""
        if not isinstance(sampled, SampledTokens):   # one token per row (-1: none)
            sampled = SampledTokens([[t] if t >= 0 else [] for t in sampled])
        outputs = list(plan.finished_outputs)
        rows = zip(plan.requests, plan.num_scheduled_tokens, strict=True)
        for i, (request, num) in enumerate(rows):
            if request.status != RequestStatus.RUNNING:
                continue
            num_prompt_lps = self._collect_prompt_logprobs(request, sampled, i)
            self.num_prompt_tokens_computed += max(0, min(
                num, request.num_prompt_tokens - request.num_computed_tokens))
            if request.num_computed_tokens + num < request.num_tokens:
                request.num_computed_tokens += num   # a prefill chunk short of the end:
                self.kv.cache_full_blocks(request)   # it samples nothing
                continue
            if not request.output_token_ids:
                request.first_token_time = time.monotonic()
            new_token_ids = self._append(request, sampled.token_ids[i])
            # NOTE: every token but the new last one is computed, rejected drafts are not: the
            # blocks published next hold accepted tokens only.
            request.num_computed_tokens = request.num_tokens - 1
            # NOTE: publish before the finish check: a request that ends in the step that computed
            # its prompt (max_tokens 1, a choice, a loglikelihood) still leaves its blocks cached.
            self.kv.cache_full_blocks(request)
            if request.spec_token_ids or self.config.num_lookahead_tokens:
                request.spec_token_ids = []   # verified: the slots of rejected ones go back
                self.kv.rollback(request, request.num_tokens + self.config.num_lookahead_tokens)
            out = self._out(request, new_token_ids)
            if request.finish_reason == FinishReason.ERROR and request.structured is not None:
                out.error = f"structured output: {request.structured.error}"
            if sampled.logprobs is not None and request.sampling.logprobs is not None:
                out.logprobs = sampled.logprobs[i][:len(new_token_ids)]
            if num_prompt_lps:
                out.prompt_logprobs = self._prompt_logprobs.pop(request.request_id)
                request.prompt_logprobs_done = True
            if request.finish_reason is not None:
                self.running.remove(request)
                self._finish(request, request.finish_reason)
            outputs.append(out)
        return outputs

    def _append(self, request: Request, token_ids: list[int]) -> list[int]:
        """Append a row's tokens in order; the first that finishes the request is its last (a
        verified draft after an EOS, a stop token or max_tokens is dropped)."""
        for n, token in enumerate(token_ids, 1):
            request.output_token_ids.append(token)
            self.num_generation_tokens += 1
            self._check_stop(request, token)
            if request.finish_reason is not None:
                return token_ids[:n]
        return token_ids

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
