"""Verification of drafted tokens: which of them a row keeps. Pure Python, host side.

Every proposer here drafts deterministic tokens (prompt lookup, or a draft model's argmax), so
its draft distribution q is one-hot on the drafted token d. Rejection sampling (Leviathan et
al.) then accepts d with probability min(1, p(d) / q(d)) = p(d), and on rejection samples from
the residual norm(max(p - q, 0)): p without d, renormalized. Drawing x ~ p and accepting iff
x == d is the same law: P(accept) = p(d), and given x != d, x is p restricted to the other
tokens. So the runner samples the target's token at every position of a verified row, each
position with the noise of its own place in the sequence (sampler.row_noise_key: the noise the
same position gets without speculation), and keeps the drafts up to the first mismatch plus
the target's token there:

    drafts d1 d2 d3 d4            row input: t  d1 d2 d3 d4   (t: the last emitted token)
    sampled s0 s1 s2 s3 s4        s_j: the target's token after input j, with the row's
    s0 == d1, s1 == d2, s2 != d3  ->  emits s0 s1 s2 (d1, d2, and the target's own third)

Greedy rows are the temperature -> 0 case (argmax). The target distribution is the processed
one (temperature, top-k/top-p/min-p, penalties counting the drafts before the position, the
grammar's mask after them), exactly as without speculation; a seeded request therefore
samples the very tokens it samples without speculation."""
from __future__ import annotations


def accept_drafts(sampled: list[int], drafts: list[int]) -> list[int]:
    """sampled [k + 1]: the target's token at each position of the row; drafts [k]. -> the
    tokens the row emits: the accepted drafts, then the target's token after them."""
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return sampled[:n + 1]
