"""Speculative sampling keeps the target's distribution: a tiny vocabulary, thousands of seeded
rows verifying two drafts, and a chi-square bound on the emitted tokens (the first, and the
second given the first draft was accepted) against the processed target distribution
(temperature, top-k, penalties counting the draft before the position). Two broken samplers,
one that resamples a rejected position from the whole distribution and one that reuses a
position's noise for the next, fail the same bound."""
from __future__ import annotations

import torch

from minserve.engine.request import Request
from minserve.engine.sampler import SamplingTensors, sample
from minserve.engine.spec.rejection import accept_drafts
from minserve.sampling_params import SamplingParams

V, N = 8, 6000
DRAFTS = [2, 5]
LOGITS = torch.tensor([[1.0, 0.2, 1.5, -0.5, 0.8, 0.0, 1.2, -1.0],    # position 0
                       [0.3, 1.1, 0.0, 0.9, -0.2, 1.4, 0.5, 0.7],     # after the first draft
                       [0.0] * V])                                    # after both (unused)
PARAMS = SamplingParams(temperature=0.8, top_k=6, frequency_penalty=0.4, max_tokens=50)
CHI2_BOUND = 24.3   # 7 degrees of freedom, p = 0.001


def target_probs(position: int, output: list[int]) -> torch.Tensor:
    """The processed distribution a lone decode samples from at this position."""
    x = LOGITS[position].clone()
    for t in output:
        x[t] -= PARAMS.frequency_penalty
    x = x / PARAMS.temperature
    x[x < x.topk(PARAMS.top_k).values[-1]] = float("-inf")
    return x.softmax(-1)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token outside the distribution's support was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def run(accept=accept_drafts, shared_noise: bool = False) -> tuple[float, float]:
    requests = [Request(f"r{i}", [1, 3], PARAMS, sample_seed=i) for i in range(N)]
    st = SamplingTensors.from_requests(requests, V, spec_token_ids=[DRAFTS] * N)
    if shared_noise:   # a broken expansion: every position of a row with the first's noise
        st.noise_keys = st.noise_keys.view(N, 3)[:, :1].expand(N, 3).reshape(-1).clone()
    toks = sample(LOGITS.repeat(N, 1), st).token_ids.view(N, 3).tolist()
    emitted = [accept(t, DRAFTS, i) if accept is not accept_drafts else accept(t, DRAFTS)
               for i, t in enumerate(toks)]
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=V).float()
    second = torch.bincount(torch.tensor([e[1] for e in emitted if len(e) > 1]),
                            minlength=V).float()
    return chi2(first, target_probs(0, [])), chi2(second, target_probs(1, [DRAFTS[0]]))


def test_emitted_tokens_follow_the_target_distribution():
    first, second = run()
    assert first < CHI2_BOUND and second < CHI2_BOUND


def test_broken_samplers_fail_the_bound():
    def resample_anew(sampled: list[int], drafts: list[int], i: int) -> list[int]:
        # rejects like the real one but then draws from the whole p (the draft included)
        out = accept_drafts(sampled, drafts)
        if len(out) == 1 and out[0] != drafts[0]:
            g = torch.Generator().manual_seed(10_000 + i)
            out = [int(torch.multinomial(target_probs(0, []), 1, generator=g))]
        return out

    assert run(resample_anew)[0] > CHI2_BOUND
    assert run(shared_noise=True)[1] > CHI2_BOUND
