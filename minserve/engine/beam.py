"""Beam search on the engine (vLLM's use_beam_search): each round runs every live beam one token
as its own sub-request asking 2 x width logprobs, then keeps the best `width` extensions. The
beams share their common prefix's KV blocks through the prefix cache (only full blocks: the
partial last block is recomputed per beam). Picks sequences; never touches tensors."""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from minserve.engine.request import EngineRequest, FinishReason, Request, RequestOutput
from minserve.sampling_params import SamplingParams


@dataclass(slots=True)
class Beam:
    token_ids: list[int]          # generated so far
    cum_logprob: float = 0.0
    finished: bool = False        # ended on EOS


def beam_score(num_prompt_tokens: int, beam: Beam, length_penalty: float) -> float:
    """vLLM's get_beam_search_score: cumulative logprob over the sequence length (prompt
    included, a final EOS not) to the power length_penalty."""
    length = num_prompt_tokens + len(beam.token_ids) - (1 if beam.finished else 0)
    return beam.cum_logprob / (max(length, 1) ** length_penalty)


@dataclass
class BeamSearch:
    request: EngineRequest
    eos_token_ids: frozenset[int]
    max_tokens: int
    beams: list[Beam] = field(default_factory=lambda: [Beam([])])
    completed: list[Beam] = field(default_factory=list)
    pending: dict[str, Beam] = field(default_factory=dict)    # sub-request id -> its beam
    results: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    round: int = 0

    @property
    def width(self) -> int:
        return self.request.sampling.n

    def score(self, beam: Beam) -> float:
        return beam_score(len(self.request.prompt_token_ids), beam,
                          self.request.sampling.length_penalty)

    def expand(self) -> None:
        """Every beam x its top 2 x width next tokens -> the best `width` live beams; those
        ending on EOS join the completed hypotheses (vLLM's order of operations)."""
        sp = self.request.sampling
        eos = frozenset() if sp.ignore_eos else self.eos_token_ids
        num_prompt, lp = len(self.request.prompt_token_ids), sp.length_penalty
        # PERF: n=128 is 32,768 candidates a round, inside an engine step: plain tuples, and a
        # token list copied for the `width` kept only. The key is beam_score's (same floats).
        live: list[tuple[Beam, int, float]] = []
        for sub_id, beam in self.pending.items():
            for tok, logprob in self.results[sub_id]:
                if tok in eos:
                    self.completed.append(Beam(beam.token_ids + [tok],
                                               beam.cum_logprob + logprob, True))
                else:
                    live.append((beam, tok, beam.cum_logprob + logprob))
        self.pending.clear()
        self.results.clear()
        best = heapq.nlargest(self.width, live, key=lambda c: c[2] / (
            max(num_prompt + len(c[0].token_ids) + 1, 1) ** lp))
        self.beams = [Beam(beam.token_ids + [tok], cum) for beam, tok, cum in best]
        self.round += 1

    @property
    def is_done(self) -> bool:
        if not self.beams or self.round >= self.max_tokens:
            return True
        early = self.request.sampling.early_stopping
        if early == "never" or len(self.completed) < self.width:
            return False
        if early is True:
            return True
        # early_stopping False: stop once no live beam can beat the worst of the best completed
        worst = sorted(map(self.score, self.completed), reverse=True)[self.width - 1]
        return self.score(self.beams[0]) <= worst

    def best(self) -> list[Beam]:
        return sorted(self.completed + self.beams, key=self.score, reverse=True)[:self.width]


class BeamSearchManager:
    """The engine's live beam searches: turns their rounds into sub-Requests for the scheduler
    and their sub-outputs into one final RequestOutput per beam (choice)."""

    def __init__(self, add: Callable[[Request], None], abort: Callable[[list[str]], None],
                 max_model_len: int) -> None:
        self._add, self._abort = add, abort
        self.max_model_len = max_model_len
        self.searches: dict[str, BeamSearch] = {}     # EngineRequest id -> search
        self._owner: dict[str, BeamSearch] = {}       # sub-request id -> search

    def add(self, request: EngineRequest, eos_token_ids: frozenset[int]) -> None:
        sp, num_prompt = request.sampling, len(request.prompt_token_ids)
        max_tokens = min(sp.max_tokens or self.max_model_len, self.max_model_len - num_prompt)
        search = BeamSearch(request, eos_token_ids, max_tokens)
        self.searches[request.request_id] = search
        self._submit(search)

    def _submit(self, search: BeamSearch) -> None:
        req = search.request
        sub_params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                    logprobs=2 * search.width)
        for i, beam in enumerate(search.beams):
            sub_id = f"{req.request_id}#beam{search.round}.{i}"
            search.pending[sub_id] = beam
            self._owner[sub_id] = search
            self._add(Request(sub_id, req.prompt_token_ids + beam.token_ids, sub_params,
                              arrival_time=req.arrival_time, cache_salt=req.cache_salt,
                              adapter_name=req.adapter_name, priority=req.priority,
                              beam_search_id=req.request_id))

    def abort(self, sample_ids: list[str]) -> list[str]:
        """Abort the searches these sample ids belong to; -> the ids that were not ours."""
        rest = []
        for sid in sample_ids:
            search = next((s for rid, s in self.searches.items()
                           if sid in s.request.sample_ids()), None)
            if search is None:
                rest.append(sid)
                continue
            self.searches.pop(search.request.request_id, None)
            subs = list(search.pending)
            for sub_id in subs:
                self._owner.pop(sub_id, None)
            search.pending.clear()
            self._abort(subs)
        return rest

    def process(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Take the sub-requests' outputs out of the step's; advance searches whose round is
        complete; -> the step's other outputs plus the finished searches' choices."""
        out: list[RequestOutput] = []
        for o in outputs:
            search = self._owner.pop(o.request_id, None)
            if search is None:
                out.append(o)
                continue
            if o.finish_reason in (FinishReason.ABORT, FinishReason.ERROR) or not o.logprobs:
                out += self._fail(search, o)
                continue
            lp = o.logprobs[0]
            search.results[o.request_id] = lp.top
            if len(search.results) == len(search.pending):
                search.expand()
                if search.is_done:
                    out += self._finish(search)
                else:
                    self._submit(search)
        return out

    def _finish(self, search: BeamSearch) -> list[RequestOutput]:
        self.searches.pop(search.request.request_id, None)
        num_prompt = len(search.request.prompt_token_ids)
        best = search.best()
        best += best[-1:] * (search.width - len(best))  # one output per choice, always
        return [RequestOutput(sid, beam.token_ids,
                              FinishReason.STOP if beam.finished else FinishReason.LENGTH,
                              beam.token_ids[-1] if beam.finished else None,
                              num_prompt_tokens=num_prompt)
                for sid, beam in zip(search.request.sample_ids(), best, strict=True)]

    def _fail(self, search: BeamSearch, o: RequestOutput) -> list[RequestOutput]:
        self.searches.pop(search.request.request_id, None)
        self._abort([s for s in search.pending if s != o.request_id])
        for sub_id in search.pending:
            self._owner.pop(sub_id, None)
        search.pending.clear()
        return [RequestOutput(sid, [], o.finish_reason or FinishReason.ERROR, error=o.error,
                              num_prompt_tokens=len(search.request.prompt_token_ids))
                for sid in search.request.sample_ids()]
