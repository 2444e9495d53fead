"""Batched sampling on the device: logits processors, greedy/temperature/top-k/top-p/min-p, seeded
Gumbel sampling, logprobs. SamplingTensors are built from the Requests on the engine side, so the
runner gets tensors, not requests. Never syncs with the host (the runner does the one sync)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from minserve.engine.request import Logprob, Request

_M32 = 0xFFFFFFFF
# lowbias32 (Chris Wellons) with both multipliers < 2**31, so products of 32-bit values fit in a
# signed int64 and torch never relies on overflow wrapping.
_MUL1, _MUL2 = 0x7FEB352D, 0x5BD1E995


def mix32(x: int) -> int:
    """The integer hash, on a Python int (for per-row keys built on the host)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """The same hash on an int64 tensor holding uint32 values (bit-identical to mix32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def row_noise_key(seed: int, position: int) -> int:
    """Key of the noise row a request uses to sample the token at `position`. It depends on
    nothing else, so a seeded request samples the same tokens whatever shares its batch, and a
    preempted request recomputes to the same tokens."""
    return mix32(mix32(mix32(seed) ^ (seed >> 32)) ^ position)


@dataclass(slots=True)
class SamplingTensors:
    """A batch of SamplingParams as tensors (R = rows that sample). from_requests() builds them on
    the host, engine side (pinned when they go to a GPU); the runner moves them with to()."""
    temperature: torch.Tensor            # [R] float32, 1.0 on greedy rows
    noise_keys: torch.Tensor             # [R] int64 (uint32 values), see row_noise_key
    top_k: torch.Tensor | None           # [R] int64, V = off
    top_p: torch.Tensor | None           # [R] float32
    min_p: torch.Tensor | None           # [R] float32
    presence: torch.Tensor | None        # [R] float32
    frequency: torch.Tensor | None       # [R] float32
    repetition: torch.Tensor | None      # [R] float32
    output_tokens: tuple[torch.Tensor, torch.Tensor] | None   # rows, token ids (penalties)
    prompt_tokens: tuple[torch.Tensor, torch.Tensor] | None   # rows, token ids (repetition)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # rows, cols, values
    banned: tuple[torch.Tensor, torch.Tensor] | None               # rows, cols (min_tokens)
    bitmask: torch.Tensor | None         # [R, ceil(V/32)] int32, llguidance layout
    random_rows: list[int]               # rows that sample randomly (host list)
    logprob_rows: list[int]              # rows that asked for logprobs
    num_logprobs: list[int]              # top-k asked, per logprob row
    # vLLM's logprob_token_ids: [L, M] int64 per logprob row (padded by repeating the row's
    # first id; L = len(logprob_rows)) and how many of them each row asked; None if no row did
    logprob_token_ids: torch.Tensor | None = None
    num_logprob_token_ids: list[int] | None = None

    @classmethod
    def from_requests(cls, requests: Sequence[Request], vocab_size: int, pin: bool = False,
                      spec_token_ids: Sequence[list[int]] | None = None) -> SamplingTensors:
        """spec_token_ids: per request, the drafts its row verifies (engine/spec/); the request
        then samples at 1 + k positions, row after row, each as if the drafts before it were
        already its output (noise, penalties, min_tokens, grammar: engine/spec/rejection.py)."""
        def host(values: list, dtype: torch.dtype = torch.float32,
                 use: bool = True) -> torch.Tensor | None:
            t = torch.tensor(values, dtype=dtype) if use else None
            return t.pin_memory() if pin and use else t

        drafts = spec_token_ids or [[]] * len(requests)
        # (request, the drafts before the position): one per sampled position
        positions = [(r, d[:j]) for r, d in zip(requests, drafts, strict=True)
                     for j in range(len(d) + 1)]
        sps = [r.sampling for r, _ in positions]
        random_rows = [i for i, sp in enumerate(sps) if not sp.is_greedy]
        use_pen = any(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0
                      for sp in sps)
        rows, cols, prows, pcols = [], [], [], []
        brows, bcols, bvals, mrows, mcols = [], [], [], [], []
        for i, ((r, before), sp) in enumerate(zip(positions, sps, strict=True)):
            if sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0:
                rows += [i] * (r.num_output_tokens + len(before))
                cols += r.output_token_ids + before
            if sp.repetition_penalty != 1.0:
                prows += [i] * r.num_prompt_tokens
                pcols += r.prompt_token_ids
            for tok, val in (sp.logit_bias or {}).items():
                if 0 <= int(tok) < vocab_size:
                    brows.append(i)
                    bcols.append(int(tok))
                    bvals.append(float(val))
            # A constrained request's grammar decides when it may end: banning EOS there could
            # leave no allowed token at all, so min_tokens does not apply to it.
            if r.num_output_tokens + len(before) < sp.min_tokens and r.structured is None:
                banned = set(sp.stop_token_ids)
                if not sp.ignore_eos:
                    banned |= r.eos_token_ids
                banned = [t for t in banned if 0 <= t < vocab_size]
                mrows += [i] * len(banned)
                mcols += banned

        bitmask = None
        if any(r.structured is not None for r in requests):
            from minserve.structured import allocate_bitmask, fill_bitmasks
            bitmask = allocate_bitmask(len(positions), vocab_size)  # pinned on CUDA
            # rows in parallel, no GIL (a draft's later positions follow, one by one)
            fill_bitmasks([r.structured if not before else None for r, before in positions],
                          bitmask)
            if spec_token_ids:
                _fill_draft_bitmasks(positions, bitmask)

        logprob_rows = [i for i, sp in enumerate(sps) if sp.logprobs is not None]
        asked = [sps[i].logprob_token_ids or [] for i in logprob_rows]
        width = max(map(len, asked), default=0)
        asked_ids = host([a + [a[0] if a else 0] * (width - len(a)) for a in asked], torch.long,
                         width > 0)
        return cls(
            temperature=host([1.0 if sp.is_greedy else sp.temperature for sp in sps]),
            noise_keys=host([row_noise_key(r.sample_seed, r.num_tokens + len(before))
                             for r, before in positions], torch.long),
            top_k=host([sp.top_k if sp.top_k > 0 else vocab_size for sp in sps], torch.long,
                       any(sp.top_k > 0 for sp in sps)),
            top_p=host([sp.top_p for sp in sps], use=any(sp.top_p < 1.0 for sp in sps)),
            min_p=host([sp.min_p for sp in sps], use=any(sp.min_p > 0.0 for sp in sps)),
            presence=host([sp.presence_penalty for sp in sps], use=use_pen),
            frequency=host([sp.frequency_penalty for sp in sps], use=use_pen),
            repetition=host([sp.repetition_penalty for sp in sps], use=use_pen),
            output_tokens=(host(rows, torch.long), host(cols, torch.long)) if use_pen else None,
            prompt_tokens=(host(prows, torch.long), host(pcols, torch.long)) if use_pen else None,
            bias=(host(brows, torch.long), host(bcols, torch.long), host(bvals))
            if brows else None,
            banned=(host(mrows, torch.long), host(mcols, torch.long)) if mrows else None,
            bitmask=bitmask, random_rows=random_rows, logprob_rows=logprob_rows,
            num_logprobs=[sps[i].logprobs for i in logprob_rows],
            logprob_token_ids=asked_ids,
            num_logprob_token_ids=list(map(len, asked)) if width else None,
        )

    def to(self, device: torch.device) -> SamplingTensors:
        """The same batch on `device` (non-blocking copies: the host side is pinned for GPUs)."""
        if device.type == "cpu":
            return self

        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(device, non_blocking=True)
            return tuple(map(move, v)) if isinstance(v, tuple) else v
        return SamplingTensors(*(move(getattr(self, f.name)) for f in fields(self)))


@dataclass(slots=True)
class SamplerResult:
    """Device tensors; the runner copies them to the host in its one sync."""
    token_ids: torch.Tensor                 # [R] int64
    logprobs: LogprobsTensors | None        # for st.logprob_rows, in that order


@dataclass(slots=True)
class LogprobsTensors:
    token_logprobs: torch.Tensor   # [N] float32, logprob of the chosen/target token
    ranks: torch.Tensor            # [N] int64, 1 = most likely
    top_logprobs: torch.Tensor     # [N, k] float32
    top_ids: torch.Tensor          # [N, k] int64
    asked_ids: torch.Tensor | None = None        # [N, M] int64, logprob_token_ids
    asked_logprobs: torch.Tensor | None = None   # [N, M] float32

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LogprobsTensors:
        return LogprobsTensors(*(None if getattr(self, f.name) is None else
                                 fn(getattr(self, f.name)) for f in fields(self)))

    def to_list(self, token_ids: list[int], ks: list[int],
                num_asked: list[int] | None = None) -> list[Logprob]:
        """Host tensors -> one Logprob per row, its top list trimmed to the k the row asked, then
        the row's logprob_token_ids not already in it."""
        token_lp, ranks, top_lp, top_ids = (getattr(self, name).tolist() for name in (
            "token_logprobs", "ranks", "top_logprobs", "top_ids"))
        out = [Logprob(token_ids[i], token_lp[i], ranks[i],
                       list(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))
               for i, k in enumerate(ks)]
        if num_asked is not None and self.asked_ids is not None:
            ids, lps = self.asked_ids.tolist(), self.asked_logprobs.tolist()
            for i, (lp, m) in enumerate(zip(out, num_asked, strict=True)):
                seen = {t for t, _ in lp.top}
                lp.top += [(t, v) for t, v in zip(ids[i][:m], lps[i][:m], strict=True)
                           if t not in seen and not seen.add(t)]
        return out


def _fill_draft_bitmasks(positions: list[tuple[Request, list[int]]],
                        bitmask: torch.Tensor) -> None:
    """The grammar's mask at a draft's later positions: each after the drafts before it
    (the engine checked they are valid), then the grammar is rolled back to where it was."""
    for i, (r, before) in enumerate(positions):
        if r.structured is not None and before:
            r.structured.accept_token(before[-1])
            r.structured.fill_bitmask(bitmask, i)
            if i + 1 == len(positions) or positions[i + 1][0] is not r:   # the row's last
                r.structured.rollback(len(before))


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int,
                     asked_ids: torch.Tensor | None = None) -> LogprobsTensors:
    """Raw log-softmax of the model's logits (vLLM V1's default), the given tokens' logprobs and
    ranks, the top-k alternatives, and the logprobs of asked_ids ([N, M]) when given."""
    lp = torch.log_softmax(logits.float(), dim=-1)                   # [N, V]
    token_lp = lp.gather(1, token_ids[:, None]).squeeze(1)           # [N]
    ranks = (lp > token_lp[:, None]).sum(dim=-1) + 1                 # [N]
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], token_ids[:, None][:, :0])
    asked_lp = lp.gather(1, asked_ids) if asked_ids is not None else None   # [N, M]
    return LogprobsTensors(token_lp, ranks, top_lp, top_ids, asked_ids, asked_lp)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Structured outputs: bit j of word w allows token 32*w + j (llguidance's layout)."""
    V = logits.shape[1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :V].bool()   # [R, V]
    logits.masked_fill_(~allowed, float("-inf"))


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> None:
    """vLLM semantics: repetition over prompt+output tokens (divide positive logits, multiply
    negative ones); frequency and presence over output tokens only."""
    assert st.output_tokens is not None and st.prompt_tokens is not None
    counts = torch.zeros_like(logits)                                      # [R, V]
    counts.index_put_(st.output_tokens, torch.ones_like(st.output_tokens[1], dtype=logits.dtype),
                      accumulate=True)
    in_output = counts > 0
    seen = in_output.clone()
    seen[st.prompt_tokens] = True
    rep = st.repetition[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= st.frequency[:, None] * counts
    logits -= st.presence[:, None] * in_output.float()


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask everything outside the top-k and outside the smallest set whose mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    V = logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (V - top_k.clamp(1, V))[:, None])      # [R, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p[:, None])
        drop[:, -1] = False          # always keep the most likely token
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] Gumbel noise from a counter-based hash of (row key, token index): integer ops only,
    so no torch.Generator per request and nothing to sync."""
    cols = mix32_(torch.arange(vocab_size, device=keys.device, dtype=torch.long))   # [V]
    bits = mix32_(keys[:, None] ^ cols[None, :])                                    # [R, V]
    # 23 bits: (k + 0.5) / 2**23 is exact in float32, so u < 1 strictly; with 24 bits the top
    # value rounds to 1.0, the noise becomes +inf and beats even a masked (-inf) token.
    u = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))                             # (0, 1)
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, st: SamplingTensors) -> SamplerResult:
    """logits: [R, V] float32 (modified in place). Returns the sampled token per row."""
    if st.bitmask is not None:
        apply_bitmask(logits, st.bitmask)
    logprobs_src = logits[st.logprob_rows].clone() if st.logprob_rows else None
    if st.banned is not None:
        logits[st.banned] = float("-inf")
    if st.bias is not None:
        logits.index_put_(st.bias[:2], st.bias[2], accumulate=True)
    if st.output_tokens is not None:
        apply_penalties(logits, st)

    token_ids = logits.argmax(dim=-1)
    if st.random_rows:
        rows = st.random_rows
        x = logits if len(rows) == logits.shape[0] else logits[rows]
        x = x / st.temperature[rows][:, None]
        if st.min_p is not None:
            probs = x.softmax(dim=-1)
            keep = probs >= st.min_p[rows][:, None] * probs.amax(dim=-1, keepdim=True)
            x = x.masked_fill(~keep, float("-inf"))
        if st.top_k is not None or st.top_p is not None:
            x = apply_top_k_top_p(x, None if st.top_k is None else st.top_k[rows],
                                  None if st.top_p is None else st.top_p[rows])
        # PERF: argmax(logits/T + Gumbel) == a draw from softmax(logits/T); no sort, no sync.
        sampled = (x + gumbel_noise(st.noise_keys[rows], x.shape[1])).argmax(dim=-1)
        if len(rows) == logits.shape[0]:
            token_ids = sampled
        else:
            token_ids[rows] = sampled

    lp = None
    if logprobs_src is not None:
        lp = compute_logprobs(logprobs_src, token_ids[st.logprob_rows], max(st.num_logprobs),
                              st.logprob_token_ids)
    return SamplerResult(token_ids, lp)
