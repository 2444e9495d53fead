"""Hybrid linear-attention models (models/qwen3_next.py) against transformers on tiny random
weights: Qwen3-Next (MoE with a shared expert, a dense layer), Qwen3.5 (dense, split
projections), Qwen3.5-MoE. Logits through the paged KV cache and the state slots: whole
prefill, chunks that cut a Gated DeltaNet layer's sequence (continuing from the saved state),
token-by-token decode, and a mixed batch of rows of different lengths."""
from __future__ import annotations

import random

import pytest
import torch

from minserve.models.qwen3_next import GatedDeltaNet
from tests.paged_runner import PagedRunner, hf_logits, load_hf, load_ours
from tests.tiny import make_tiny_model

ATOL = 1e-3   # float32 noise of two chunked forms (MoE: up to 7e-4 at 70 tokens)
# 4 layers (3 linear, then full attention), 2 key / 4 value heads of the linear layers
HYBRID = {"num_hidden_layers": 4, "head_dim": 16, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 8,
          "linear_conv_kernel_dim": 4}
VARIANTS = {
    "qwen3next-moe": ("Qwen3NextForCausalLM", {
        **HYBRID, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]}),
    "qwen3.5-dense": ("Qwen3_5ForCausalLM", {**HYBRID, "tie_word_embeddings": True}),
    "qwen3.5-moe": ("Qwen3_5MoeForCausalLM", {
        **HYBRID, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32}),
}


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    return make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch, **overrides)


@pytest.fixture(scope="module")
def pair(folder):
    return load_ours(folder), load_hf(folder)


def test_layer_kinds_follow_layer_types(pair):
    ours, hf = pair
    kinds = [isinstance(getattr(layer, "linear_attn", None), GatedDeltaNet)
             for layer in ours.model.layers]
    assert kinds == [t == "linear_attention" for t in hf.config.layer_types] == \
        [True, True, True, False]
    assert len(ours.kv_cache_layout()) == 1 and len(ours.state_cache_shapes()) == 3


def test_prefill_chunks_and_decode_match_hf(pair):
    ours, hf = pair
    p = prompt(72, 1)      # past one 64-token chunk of the chunked rule
    ref = hf_logits(hf, p)
    (whole,) = PagedRunner(ours, block_size=16).step([("a", p)])
    torch.testing.assert_close(whole, ref, atol=ATOL, rtol=0)
    runner, got, start = PagedRunner(ours, block_size=4), [], 0
    for size in (5, 17, 1, 3, 46):            # chunks continue from the saved states
        got.append(runner.step([("c", p[start:start + size])])[0])
        start += size
    torch.testing.assert_close(torch.cat(got), ref, atol=ATOL, rtol=0)
    runner = PagedRunner(ours, block_size=16)
    got = [runner.step([("d", p[:66])])[0]]
    got += [runner.step([("d", [t])])[0] for t in p[66:]]
    torch.testing.assert_close(torch.cat(got), ref, atol=ATOL, rtol=0)


def test_mixed_batch_equals_one_at_a_time(pair):
    """Decodes, a chunk and fresh prompts of different lengths in one step: every row reads and
    writes its own state slot only."""
    ours, hf = pair
    prompts = [prompt(n, 10 + n) for n in (3, 33, 12, 70)]
    refs = [hf_logits(hf, p) for p in prompts]
    runner = PagedRunner(ours, block_size=8)
    runner.step([("0", prompts[0][:2]), ("1", prompts[1][:20])])
    out = runner.step([("0", prompts[0][2:]), ("1", prompts[1][20:]), ("2", prompts[2]),
                       ("3", prompts[3])])
    torch.testing.assert_close(out[0], refs[0][2:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], refs[1][20:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], refs[2], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[3], refs[3], atol=ATOL, rtol=0)
