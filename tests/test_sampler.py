"""The batched sampler on hand-made logits: each knob, seeded reproducibility whatever shares the
batch, distribution sanity, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from minserve.engine.request import Request
from minserve.engine.sampler import (
    SamplingTensors,
    apply_penalties,
    compute_logprobs,
    mix32,
    mix32_,
    sample,
)
from minserve.sampling_params import SamplingParams

V = 8
EOS = 7


def mk(seed: int = 0, prompt=(1, 2), output=(), **kw) -> Request:
    r = Request(f"r{seed}", list(prompt), SamplingParams(**kw), eos_token_ids=frozenset([EOS]),
                sample_seed=seed)
    r.output_token_ids = list(output)
    return r


def run(logits: torch.Tensor, reqs: list[Request]):
    st = SamplingTensors.from_requests(reqs, logits.shape[1])
    return sample(logits.clone(), st)


def test_hash_matches_between_python_and_torch():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert mix32_(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]


def test_greedy_is_argmax():
    logits = torch.randn(5, V)
    res = run(logits, [mk(i, temperature=0) for i in range(5)])
    assert res.token_ids.tolist() == logits.argmax(-1).tolist()


def test_seeded_sampling_is_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, V).repeat(6, 1)
    alone = run(logits[:1], [mk(42, temperature=1.0)]).token_ids.item()
    others = [mk(7, temperature=0.3, top_k=3), mk(8, temperature=0), mk(9, top_p=0.5),
              mk(42, temperature=1.0), mk(10, min_p=0.2)]
    batch = run(logits[:5], [others[0], others[1], others[2], others[3], others[4]])
    assert batch.token_ids[3].item() == alone
    # the same request at the same position draws the same token; at another position, anew
    draws = {run(logits[:1], [mk(42, output=[0] * k)]).token_ids.item() for k in range(40)}
    assert len(draws) > 1


def test_temperature_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    temp = 0.7
    reqs = [mk(s, temperature=temp) for s in range(4000)]
    toks = run(logits, reqs).token_ids
    freq = torch.bincount(toks, minlength=4).float() / 4000
    expected = torch.softmax(logits[0] / temp, -1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_k_top_p_min_p():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0, -3.0, -4.0]]).repeat(500, 1)
    toks = run(logits, [mk(s, top_k=2) for s in range(500)]).token_ids
    assert set(toks.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)
    # top_p just above p0 + p1 keeps exactly three tokens
    toks = run(logits, [mk(s, top_p=float(p[0] + p[1]) + 1e-3) for s in range(500)]).token_ids
    assert set(toks.tolist()) == {0, 1, 2}
    toks = run(logits, [mk(s, min_p=0.5) for s in range(500)]).token_ids
    assert set(toks.tolist()) == {0, 1, 2}
    toks = run(logits, [mk(s) for s in range(500)]).token_ids
    assert len(set(toks.tolist())) > 3


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(3, V)
    logits[:, EOS] = 5.0
    logits[:, 4] = 4.0
    reqs = [mk(0, temperature=0, logit_bias={2: 10.0}),
            mk(1, temperature=0, min_tokens=2, output=[5]),
            mk(2, temperature=0, min_tokens=1, output=[5], stop_token_ids=[4])]
    assert run(logits, reqs).token_ids.tolist() == [2, 4, EOS]
    # min_tokens masks stop_token_ids too
    reqs = [mk(0, temperature=0, min_tokens=3, stop_token_ids=[4], ignore_eos=True)]
    logits[0, EOS] = 0.0
    assert run(logits[:1], reqs).token_ids.item() not in (4, EOS)


def test_penalties_follow_vllm():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0]])
    r = mk(0, prompt=[0, 1], output=[2, 2, 4], repetition_penalty=2.0,
           frequency_penalty=0.1, presence_penalty=0.3)
    st = SamplingTensors.from_requests([r], V)
    out = logits.clone()
    apply_penalties(out, st)
    expected = torch.tensor([[1.0, -4.0, 0.5 - 0.2 - 0.3, 1.0, 0.25 - 0.1 - 0.3, 0, 0, 0]])
    assert torch.allclose(out, expected)
    # greedy sees the penalties: token 3 wins after them
    logits[0, 3] = 1.1
    assert run(logits, [mk(0, prompt=[0, 1], output=[2, 2, 4], temperature=0,
                           repetition_penalty=2.0, frequency_penalty=0.1,
                           presence_penalty=0.3)]).token_ids.item() == 3


def test_bitmask_restricts_tokens():
    logits = torch.randn(2, 40)

    class OnlyTok:
        def fill_bitmask(self, bitmask, row):
            bitmask[row].zero_()
            bitmask[row, 1] = 1 << 3          # token 35

    r0, r1 = mk(0, temperature=0), mk(1, temperature=1.0)
    r0.structured = OnlyTok()
    res = run(logits, [r0, r1])
    assert res.token_ids[0].item() == 35


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    reqs = [mk(0, temperature=0, logprobs=3), mk(1), mk(2, temperature=0.8, logprobs=0,
                                                        logit_bias={0: 50.0})]
    res = run(logits, reqs)
    lp = torch.log_softmax(logits, -1)
    assert res.logprobs is not None
    toks = res.token_ids
    assert toks[2].item() == 0
    got = res.logprobs
    for j, row in enumerate([0, 2]):
        assert got.token_logprobs[j].item() == pytest.approx(lp[row, toks[row]].item(), abs=1e-5)
        rank = int((lp[row] > lp[row, toks[row]]).sum()) + 1
        assert got.ranks[j].item() == rank
    assert got.top_ids[0].tolist() == lp[0].topk(3).indices.tolist()
    assert got.ranks[0].item() == 1


def test_compute_logprobs_targets():
    logits = torch.randn(4, V)
    targets = torch.tensor([1, 2, 3, 4])
    out = compute_logprobs(logits, targets, 2)
    lp = torch.log_softmax(logits, -1)
    assert torch.allclose(out.token_logprobs, lp[torch.arange(4), targets])
    assert out.top_logprobs.shape == (4, 2)
    assert math.isclose(out.top_logprobs[0, 0].item(), lp[0].max().item(), rel_tol=1e-6)


def test_gumbel_noise_is_always_finite():
    """u must stay inside (0, 1): +inf noise would pick a token whatever its (masked) logit."""
    from minserve.engine.sampler import gumbel_noise
    keys = torch.arange(2000, dtype=torch.long) * 7919 + 12345
    noise = gumbel_noise(keys, 49152)
    assert torch.isfinite(noise).all()
