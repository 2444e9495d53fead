"""Our Llama-family models against transformers' implementation of the same tiny random weights:
whole prefill, token-by-token decode and chunked prefill through the paged cache, mixed batches,
the empty-cache profiling path, rope scaling variants, dtypes and config errors."""
from __future__ import annotations

import os
import random

import pytest
import torch

from minserve.config import ConfigError, ModelConfig
from minserve.models.layers import compute_inv_freq
from minserve.models.loader import resolve_model
from minserve.models.registry import get_model_class
from tests.paged_runner import (
    PagedRunner,
    hf_logits,
    load_hf,
    load_ours,
    prefill_without_cache,
)
from tests.tiny import make_tiny_model, write_gguf

ATOL = 2e-4  # float32; logits are O(10) with the scaled-up tiny weights

# (id, architecture, config overrides)
VARIANTS = [
    ("llama", "LlamaForCausalLM", {}),
    ("llama-tied", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("mistral-sliding24", "MistralForCausalLM", {}),  # window 24 < the 40-token prompts
    ("qwen2-bias", "Qwen2ForCausalLM", {}),
    ("qwen3-qknorm", "Qwen3ForCausalLM", {}),
    ("llama3-rope", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    ("yarn-rope", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    ("linear-rope", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # The same tiny weights written as GGUF files (Q/K rows permuted as llama.cpp does) and
    # loaded through resolve_model's conversion: the reference stays transformers on the folder.
    ("llama-gguf", "LlamaForCausalLM", {}),
    ("mistral-gguf", "MistralForCausalLM", {}),
    ("qwen2-gguf", "Qwen2ForCausalLM", {}),
    ("qwen3-gguf", "Qwen3ForCausalLM", {}),
]
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
IDS = [v[0] for v in VARIANTS]


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def pair(request, tmp_path_factory):
    """(our model, transformers' model) on the same tiny folder."""
    variant, arch, overrides = request.param
    folder = make_tiny_model(str(tmp_path_factory.mktemp(variant)), arch, **overrides)
    ours_from = folder
    if variant.endswith("-gguf"):
        gguf_path = os.path.join(tmp_path_factory.mktemp(variant + "-file"), "tiny.gguf")
        write_gguf(folder, gguf_path, GGUF_ARCH[arch])
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MINSERVE_CACHE", str(tmp_path_factory.mktemp(variant + "-cache")))
            ours_from = resolve_model(gguf_path)
        assert ours_from != folder
    return load_ours(ours_from), load_hf(folder)


def test_prefill_matches_hf(pair):
    ours, hf = pair
    prompt = _prompt(40, 1)
    ref = hf_logits(hf, prompt)
    (paged,) = PagedRunner(ours, block_size=16).step([("a", prompt)])
    torch.testing.assert_close(paged, ref, atol=ATOL, rtol=0)
    (no_cache,) = prefill_without_cache(ours, [prompt])
    torch.testing.assert_close(no_cache, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [16, 4])
def test_decode_token_by_token(pair, block_size):
    ours, hf = pair
    prompt = _prompt(37, 2)
    ref = hf_logits(hf, prompt)
    runner = PagedRunner(ours, block_size=block_size)
    got = [runner.step([("a", prompt[:3])])[0]]
    for tok in prompt[3:]:
        got.append(runner.step([("a", [tok])])[0])
    torch.testing.assert_close(torch.cat(got), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [16, 4])
def test_chunked_prefill_across_blocks(pair, block_size):
    ours, hf = pair
    prompt = _prompt(45, 3)
    ref = hf_logits(hf, prompt)
    runner = PagedRunner(ours, block_size=block_size)
    got, start = [], 0
    for size in (5, 16, 11, 1, 12):  # chunks start mid-block and end mid-block
        got.append(runner.step([("a", prompt[start:start + size])])[0])
        start += size
    assert start == len(prompt)
    torch.testing.assert_close(torch.cat(got), ref, atol=ATOL, rtol=0)


def test_mixed_batch_equals_one_at_a_time(pair):
    """Decodes, a mid-prompt chunk and a fresh prompt in one step, as the scheduler packs them."""
    ours, hf = pair
    prompts = {"a": _prompt(30, 4), "b": _prompt(21, 5), "c": _prompt(9, 6), "d": _prompt(33, 7)}
    refs = {k: hf_logits(hf, p) for k, p in prompts.items()}
    runner = PagedRunner(ours, block_size=4, num_blocks=64)
    got: dict[str, list[torch.Tensor]] = {k: [] for k in prompts}
    plan = [
        [("a", 0, 17), ("b", 0, 20)],
        [("a", 17, 18), ("b", 20, 21), ("c", 0, 5)],   # a decodes, b's last token, c starts
        [("c", 5, 9), ("a", 18, 30), ("d", 0, 11)],
        [("d", 11, 12)],
    ]
    for step in plan:
        batch = [(req_id, prompts[req_id][lo:hi]) for req_id, lo, hi in step]
        for (req_id, _), logits in zip(batch, runner.step(batch), strict=True):
            got[req_id].append(logits)
    # "d" finishes alone, one token at a time, while nothing else runs.
    for i in range(12, 33):
        got["d"].append(runner.step([("d", prompts["d"][i:i + 1])])[0])
    for req_id, ref in refs.items():
        torch.testing.assert_close(torch.cat(got[req_id]), ref, atol=ATOL, rtol=0)


def test_profiling_path_batches_requests(pair):
    ours, hf = pair
    prompts = [_prompt(n, 10 + n) for n in (7, 30, 1)]
    for logits, prompt in zip(prefill_without_cache(ours, prompts), prompts, strict=True):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_track_float32(tiny_model_factory, dtype):
    folder = tiny_model_factory("Qwen3ForCausalLM")
    prompt = _prompt(20, 8)
    ref = hf_logits(load_hf(folder), prompt)
    model = load_ours(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    (got,) = PagedRunner(model, block_size=16).step([("a", prompt)])
    assert got.dtype == torch.float32
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_tied_flag_is_independent(tiny_model_factory):
    tied = load_ours(tiny_model_factory("LlamaForCausalLM", tie_word_embeddings=True))
    untied = load_ours(tiny_model_factory("Qwen2ForCausalLM", tie_word_embeddings=False))
    assert tied.lm_head is None and untied.lm_head is not None
    assert untied.model.layers[0].self_attn.qkv_proj.bias is not None  # Qwen2 bias stays on


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    sc = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling=sc, max_position_embeddings=131072)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours, scaling = compute_inv_freq(64, 500000.0, sc, 131072)
    torch.testing.assert_close(ours, ref.float())
    assert scaling == 1.0


def test_unsupported_rope_and_arch_raise_config_error():
    with pytest.raises(ConfigError, match="dynamic"):
        compute_inv_freq(16, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 128)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        get_model_class("GPT2LMHeadModel")
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                 "hidden_size": 8, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "rope_scaling": {"rope_type": "longrope"}})
    with pytest.raises(ConfigError, match="longrope"):
        get_model_class(cfg.architecture)(cfg)
