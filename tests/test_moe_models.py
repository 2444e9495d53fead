"""Mixture-of-experts models against transformers on tiny random weights: Qwen3-MoE (renormalized
top-k, a dense layer from mlp_only_layers), Qwen2-MoE (shared expert, decoder_sparse_step 2,
qkv bias), Mixtral (a sliding window shorter than the prompts). Logits through the paged cache
(whole prefill, chunks across blocks, token-by-token decode, mixed batches), then the engine's
greedy tokens against transformers' generate."""
from __future__ import annotations

import pytest
import torch

from minserve import LLM, SamplingParams
from minserve.config import ConfigError, ModelConfig
from minserve.models.moe import FusedMoE
from tests.paged_runner import (
    PagedRunner,
    check_chunks,
    check_decode,
    check_prefill,
    hf_logits,
    load_hf,
    load_ours,
    random_prompt,
)
from tests.tiny import make_tiny_model

ATOL = 2e-4
VARIANTS = {
    "qwen3moe-norm-dense0": ("Qwen3MoeForCausalLM", {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "norm_topk_prob": True, "head_dim": 32, "mlp_only_layers": [0]}),
    "qwen3moe-top1-16": ("Qwen3MoeForCausalLM", {
        "num_experts": 16, "num_experts_per_tok": 1, "moe_intermediate_size": 32}),
    "qwen2moe-shared-step2": ("Qwen2MoeForCausalLM", {
        "num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2,
        "tie_word_embeddings": True}),
    "mixtral-sliding24": ("MixtralForCausalLM", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    return make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch, **overrides)


@pytest.fixture(scope="module")
def pair(folder):
    return load_ours(folder), load_hf(folder)


def test_layers_are_sparse_where_the_config_says(pair):
    ours, hf = pair
    for ours_layer, hf_layer in zip(ours.model.layers, hf.model.layers, strict=True):
        hf_sparse = hasattr(hf_layer, "block_sparse_moe") or hasattr(hf_layer.mlp, "experts")
        ours_sparse = any(isinstance(m, FusedMoE) for m in ours_layer.mlp.modules())
        assert ours_sparse == hf_sparse
    moe = next(m for m in ours.modules() if isinstance(m, FusedMoE))
    assert moe.experts is None and moe.weights is not None   # stacked, per-expert copies gone


def test_prefill_chunks_and_decode_match_hf(pair):
    prompt = random_prompt(45, 1)
    check_prefill(*pair, prompt, ATOL)
    check_chunks(*pair, prompt, 4, ATOL)           # chunks start and end mid-block
    check_decode(*pair, prompt, 16, ATOL, first=30)


def test_mixed_batch_equals_one_at_a_time(pair):
    """Decodes, a chunk and a fresh prompt in one step: their tokens share the experts' groups."""
    ours, hf = pair
    prompts = [random_prompt(n, 10 + n) for n in (33, 20, 7)]
    refs = [hf_logits(hf, p) for p in prompts]
    runner = PagedRunner(ours, block_size=16)
    runner.step([("a", prompts[0][:32]), ("b", prompts[1][:12])])
    out = runner.step([("a", prompts[0][32:]), ("b", prompts[1][12:]), ("c", prompts[2])])
    torch.testing.assert_close(out[0], refs[0][32:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], refs[1][12:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], refs[2], atol=ATOL, rtol=0)


def test_engine_greedy_tokens_equal_transformers_generate(folder, pair):
    """Prompts longer than Mixtral's 24-token window, through chunked prefill (16-token steps)
    and prefix-cache hits (the second prompt repeats the first's first block)."""
    _, hf = pair
    first = random_prompt(40, 5)
    prompts = [first, first[:16] + random_prompt(12, 6), random_prompt(3, 7)]
    llm = LLM(folder, max_num_batched_tokens=16, max_model_len=128, kv_cache_memory=1 << 22)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    assert outs[1].num_cached_tokens == 16


def hf_greedy(hf, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' argmax tokens, eos not treated specially (as ignore_eos)."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_moe_config_from_config_json():
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 6,
                "num_attention_heads": 4}
    mc = ModelConfig.from_dict({**base, "architectures": ["Qwen3MoeForCausalLM"],
                                "num_experts": 8, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 16, "decoder_sparse_step": 2,
                                "mlp_only_layers": [3], "norm_topk_prob": True,
                                "sliding_window": 4096, "use_sliding_window": False})
    assert (mc.moe.num_experts, mc.moe.top_k, mc.moe.intermediate_size) == (8, 2, 16)
    assert [i for i in range(6) if mc.moe.is_sparse(i)] == [1, 5]
    assert mc.moe.router == "softmax_topk_norm" and mc.sliding_window is None and mc.qk_norm
    mc = ModelConfig.from_dict({**base, "architectures": ["MixtralForCausalLM"],
                                "num_local_experts": 4, "num_experts_per_tok": 2,
                                "sliding_window": 128})
    assert (mc.moe.intermediate_size, mc.moe.router, mc.sliding_window) == (
        96, "softmax_topk_norm", 128)
    assert all(mc.moe.is_sparse(i) for i in range(6))
    assert ModelConfig.from_dict({**base, "architectures": ["LlamaForCausalLM"]}).moe is None
    with pytest.raises(ConfigError, match="scoring_func 'sigmoid' is not supported"):
        ModelConfig.from_dict({**base, "architectures": ["Qwen3MoeForCausalLM"],
                               "num_experts": 8, "num_experts_per_tok": 2,
                               "scoring_func": "sigmoid"})


def test_unknown_router_variant_is_a_startup_error():
    with pytest.raises(ConfigError, match=r"unknown MoE router variant 'sigmoid_topk' \(known: "
                                          r"softmax_topk, softmax_topk_norm, topk_softmax\)"):
        FusedMoE(4, 2, 32, 16, router="sigmoid_topk")
    with pytest.raises(ConfigError, match="num_experts_per_tok 5 must be in 1..num_experts"):
        FusedMoE(4, 5, 32, 16)
