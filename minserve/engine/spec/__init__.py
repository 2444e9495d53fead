"""Speculative decoding, as vLLM spells it (--speculative-config): a proposer drafts k tokens
per request, the target verifies them all in the step's one forward pass, next to the rows
without drafts, and keeps what its own sampling confirms (exact: rejection.py).

    speculator.py  engine side: which rows verify and draft, tallies, next drafts (no torch)
    policy.py      when drafting pays: batch size, each request's acceptance, max_tokens
    ngram.py       prompt lookup ("ngram"): drafts from the request's own tokens
    drafter.py     runner side, rank 0: a draft model ("draft_model") or an EAGLE-3 head
                   ("eagle3"; the model is models/eagle3.py) with its own paged KV cache;
                   MTP ("mtp") plugs in as a head of the target's (mtp.py)
    rejection.py   which drafts a row keeps, and why that is exact
    stats.py       the tallies behind vLLM's spec_decode metrics
"""
from __future__ import annotations

import logging
from typing import Any

from minserve.config import EngineConfig
from minserve.engine.spec.policy import (
    DEFAULT_DISABLE_BY_BATCH_SIZE,
    DEFAULT_MIN_ACCEPTANCE_RATE,
    SpecPolicy,
)
from minserve.engine.spec.speculator import Speculator

logger = logging.getLogger("minserve.spec")


def make_speculator(config: EngineConfig, device: Any) -> Speculator | None:
    """The engine's Speculator (None: speculation off), its defaults filled for the device and
    stated in the start-up log."""
    spec = config.speculative_config
    if spec is None:
        return None
    batch = spec.disable_by_batch_size or DEFAULT_DISABLE_BY_BATCH_SIZE.get(
        getattr(device, "type", "cpu"), DEFAULT_DISABLE_BY_BATCH_SIZE["cuda"])
    rate = (DEFAULT_MIN_ACCEPTANCE_RATE if spec.min_acceptance_rate is None
            else spec.min_acceptance_rate)
    policy = SpecPolicy(spec.num_speculative_tokens, batch, rate, config.max_model_len)
    what = spec.method + (f" ({spec.model})" if spec.model else "")
    if spec.method == "ngram":
        what += f", n-grams of {spec.prompt_lookup_min} to {spec.prompt_lookup_max} tokens"
    logger.info("speculative decoding: %s; %s", what, policy.describe())
    return Speculator(spec, policy, config.max_num_batched_tokens, config.block_size)


def num_lookahead_tokens(config: EngineConfig) -> int:
    """Slots a sampling row needs past its tokens for its drafter's KV cache (0: none)."""
    spec = config.speculative_config
    return 0 if spec is None or spec.method == "ngram" else spec.num_speculative_tokens
