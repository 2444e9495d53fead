"""The engine's side of speculative decoding: which rows verify drafts this step (and, with a
drafter model, which rows draft in the runner after it), then the tally, the acceptance switch
and each request's next drafts (prompt lookup here; a drafter's come back from the runner).
Never touches tensors; the scheduler only sees Request.spec_token_ids."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from minserve.config import SpeculativeConfig
from minserve.engine.request import Request, RequestStatus
from minserve.engine.scheduler import SampledTokens, StepPlan
from minserve.engine.spec.ngram import propose_ngram
from minserve.engine.spec.policy import SpecPolicy, SpecState
from minserve.engine.spec.stats import SpecStats

logger = logging.getLogger("minserve.spec")


@dataclass(slots=True)
class CatchUp:
    """A draft model's run over one plan row. Its cache holds the row's tokens up to draft_end,
    which may run past the known tokens (its last drafts, valid as far as the target accepts
    them) or fall behind them (a row that drafted nothing for a while). After the verification
    it runs from the first position it lacks to the row's last token, then drafts:

        positions:  |--- known tokens --------------------------|-- emitted this step --|
                    |--- draft cache ---------|                 E (the known tokens' end)
                          catchup_start = min(draft_end, E); token_ids: from there to E
    A catch-up too long for one step stops short of E (whole False: no emitted, no drafts)."""
    row: int
    draft_end: int
    catchup_start: int
    token_ids: list[int]
    whole: bool


@dataclass(slots=True)
class DraftInputs:
    """What the runner's drafter needs beyond the step."""
    num_drafts: list[int]              # [R] how many tokens to draft after the step (0: none)
    next_token_ids: list[int]          # [R] EAGLE: the prompt token after a chunk (-1: samples)
    catch_ups: list[CatchUp]           # draft model: the rows it runs


class Speculator:
    def __init__(self, config: SpeculativeConfig, policy: SpecPolicy,
                 max_num_batched_tokens: int, block_size: int) -> None:
        self.config, self.policy = config, policy
        self.method = config.method
        self.stats = SpecStats()
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size

    def add(self, request: Request) -> None:
        request.spec_state = SpecState(num_draft_computed=-1)

    # ---- before the step ----------------------------------------------------------------------
    def step_inputs(self, plan: StepPlan, num_requests: int
                    ) -> tuple[list[int] | None, DraftInputs | None]:
        """-> [R] the drafts each row verifies (None: none), and the drafter's inputs (None:
        no drafter model, or it has nothing to do)."""
        num_verify = [len(r.spec_token_ids) for r in plan.requests]
        if self.method == "ngram":
            return (num_verify if any(num_verify) else None), None
        enabled = self.policy.step_enabled(num_requests)
        num_drafts = [self.policy.num_drafts(r) if enabled and self._samples(r, n) else 0
                      for r, n in zip(plan.requests, plan.num_scheduled_tokens, strict=True)]
        if self.method == "draft_model":
            draft = self._catch_up(plan, num_drafts) if enabled else None
        else:   # a head over the target's hidden states keeps its cache on every step
            draft = DraftInputs(num_drafts, [_next_token(r, n) for r, n in zip(
                plan.requests, plan.num_scheduled_tokens, strict=True)], [])
        return (num_verify if any(num_verify) else None), draft

    @staticmethod
    def _samples(request: Request, num_scheduled: int) -> bool:
        return request.num_computed_tokens + num_scheduled >= request.num_tokens

    def _catch_up(self, plan: StepPlan, num_drafts: list[int]) -> DraftInputs:
        """The draft model's share of the step: every row, with the known tokens its cache lacks
        (at most a step's token budget in all; prefill chunks keep it level with the target)."""
        catch_ups = []
        budget = self.max_num_batched_tokens
        for i, (r, n) in enumerate(zip(plan.requests, plan.num_scheduled_tokens, strict=True)):
            state = r.spec_state
            if state.num_draft_computed < 0 or state.num_preemptions != r.num_preemptions:
                # first seen, or preempted: trust what a prefix hit brought (both caches)
                state.num_draft_computed = r.num_computed_tokens
                state.num_preemptions = r.num_preemptions
            known_end = min(r.num_computed_tokens + n, r.num_tokens)
            draft_end = min(state.num_draft_computed, len(r.block_ids) * self.block_size)
            start = min(draft_end, known_end)
            # the catch-up, the step's emitted tokens (1 + its drafts), the drafting steps
            cost = known_end - start + n + num_drafts[i]
            whole = cost <= budget
            if not whole:
                known_end, num_drafts[i] = start + max(budget, 0), 0
            if known_end > start or whole:
                catch_ups.append(CatchUp(i, draft_end, start, r.all_token_ids[start:known_end],
                                         whole))
                budget -= min(cost, budget)
        return DraftInputs(num_drafts, [], catch_ups)

    # ---- after the step -----------------------------------------------------------------------
    def update(self, plan: StepPlan, num_verify: list[int] | None, draft: DraftInputs | None,
               sampled: SampledTokens, num_requests: int) -> None:
        """Tally the verified drafts, then give every row that goes on decoding its drafts for
        the next step."""
        if num_verify is not None:
            for r, (request, k) in enumerate(zip(plan.requests, num_verify, strict=True)):
                if k:
                    accepted = len(sampled.token_ids[r]) - 1
                    self.stats.observe(k, accepted)
                    self.policy.observe(request, k, accepted)
        if draft is not None and draft.catch_ups:
            self._advance_draft_cache(draft, plan, sampled)
        enabled = self.method != "ngram" or self.policy.step_enabled(num_requests)
        for r, request in enumerate(plan.requests):
            if request.status != RequestStatus.RUNNING or request.num_uncomputed != 1 \
                    or not enabled:
                continue
            if self.method == "ngram":
                k = self.policy.num_drafts(request)
                drafts = propose_ngram(np.asarray(request.all_token_ids, dtype=np.int64),
                                       self.config.prompt_lookup_min,
                                       self.config.prompt_lookup_max, k) if k else []
            else:
                drafts = (sampled.draft_token_ids or [[]] * len(plan.requests))[r]
                drafts = drafts[:self.policy.room(request)]
            if drafts and request.structured is not None:
                drafts = drafts[:request.structured.num_valid(drafts)]
            request.spec_token_ids = drafts

    @staticmethod
    def _advance_draft_cache(draft: DraftInputs, plan: StepPlan, sampled: SampledTokens) -> None:
        """Where each row's draft cache now ends: its catch-up, the step's emitted tokens, then
        all but the last of its drafts (each ran to draft the next). Rejected ones are dropped
        at the next catch-up (it starts at most where the accepted tokens end)."""
        drafted = sampled.draft_token_ids or [[]] * len(plan.requests)
        for c in draft.catch_ups:
            end = c.catchup_start + len(c.token_ids)
            if c.whole:
                end += len(sampled.token_ids[c.row]) + max(len(drafted[c.row]) - 1, 0)
            plan.requests[c.row].spec_state.num_draft_computed = end

    def stats_dict(self) -> dict[str, object]:
        return self.stats.as_dict()


def _next_token(request: Request, num_scheduled: int) -> int:
    end = request.num_computed_tokens + num_scheduled
    if end >= request.num_tokens:
        return -1
    num_prompt = request.num_prompt_tokens
    return (request.prompt_token_ids[end] if end < num_prompt
            else request.output_token_ids[end - num_prompt])
