"""Issue 31's text architectures through the whole engine: a tiny random model of each
(SmolLM3, Phi-3 with LongRoPE and a partial rotary, Gemma 2 (attention softcap), 3, 4 and 4's
MoE variant), written by transformers, gives transformers' greedy tokens with whole and chunked prefill and prompts longer than the
sliding window; their config.json spellings parse; what is not supported is a start-up error.
The per-step logits are checked in test_models.py, tensor parallelism in test_tp.py."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from minserve import LLM, SamplingParams
from minserve.config import ConfigError, ModelConfig
from minserve.models.gemma3 import Gemma3Config
from minserve.models.gemma4 import Gemma4Config, kv_sources
from tests.paged_runner import load_hf
from tests.tiny import make_tiny_model

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
            "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]}
# (architecture, overrides); every window (24) is below the prompts' lengths
ARCHS = {
    "smollm3": ("SmolLM3ForCausalLM", {}),
    # the prompts pass original_max_position_embeddings (32): long factors, as max_model_len does
    "phi3": ("Phi3ForCausalLM", {"partial_rotary_factor": 0.75, "rope_scaling": LONGROPE,
                                 "original_max_position_embeddings": 32}),
    "gemma3": ("Gemma3ForCausalLM", {}),
    # attn_logit_softcapping in a Gemma 3 config: accepted, and not applied, as transformers'
    # Gemma 3 does not (Gemma 2 applies it)
    "gemma3-softcap": ("Gemma3ForCausalLM", {"attn_logit_softcapping": 0.5}),
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma4": ("Gemma4ForCausalLM", {}),
    # routed experts beside the dense MLP on every layer (gemma-4-26B-A4B's layout)
    "gemma4-moe": ("Gemma4ForCausalLM", {"enable_moe_block": True, "num_experts": 4,
                                         "top_k_experts": 2, "moe_intermediate_size": 32}),
}
PROMPT_LENS = (41, 57, 33)
NUM_TOKENS = 8


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {name: make_tiny_model(str(root / name), arch, **over)
            for name, (arch, over) in ARCHS.items()}


@torch.inference_mode()
def hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, each step a whole forward of the sequence so far."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_tokens_match_transformers(name, folders):
    hf = load_hf(folders[name])
    prompts = [_prompt(n, i) for i, n in enumerate(PROMPT_LENS)]
    want = [hf_greedy(hf, p, NUM_TOKENS) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    # whole prefill (each prompt in one step), then 16-token chunks beside other rows' decodes
    for budget in (256, 16):
        llm = LLM(folders[name], kv_cache_memory=8 << 20, max_num_batched_tokens=budget,
                  long_prefill_token_threshold=0, enable_prefix_caching=False)
        got = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
        assert got == want, f"{name}, {budget}-token steps"
        del llm


def test_phi3_short_factors_within_the_pretraining_context(folders):
    """max_model_len within original_max_position_embeddings: the short factors, which
    transformers uses for a sequence that stays that short."""
    prompt = _prompt(20, 7)
    want = hf_greedy(load_hf(folders["phi3"]), prompt, NUM_TOKENS)
    llm = LLM(folders["phi3"], kv_cache_memory=8 << 20, max_model_len=32)
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
    assert got[0].outputs[0].token_ids == want
    long_llm = LLM(folders["phi3"], kv_cache_memory=8 << 20)    # max_model_len 1024: long
    other = long_llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != want       # the factor choice does matter


# ---- config.json as the hub ships it ---------------------------------------------------------
GEMMA3_1B = {   # google/gemma-3-1b-it's config.json (transformers 4.50 wrote it)
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "vocab_size": 262144}


def test_gemma3_hub_config_and_multimodal_text_config():
    mc = Gemma3Config.from_dict(GEMMA3_1B)
    assert mc.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (mc.rope_theta, mc.local_rope_theta, mc.rope_scaling) == (1e6, 1e4, None)
    assert mc.sliding_window == 512 and mc.query_pre_attn_scalar == 256
    assert mc.tie_word_embeddings and mc.eos_token_ids == [1, 106]
    # gemma-3-4b-it: a text_config naming what differs from the defaults; linear rope scaling
    # on the global layers only
    mm = Gemma3Config.from_dict({
        "architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {},
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0,
                                                                  "rope_type": "linear"},
                        "sliding_window": 1024}})
    assert (mm.hidden_size, mm.num_attention_heads, mm.head_dim, mm.vocab_size) == (
        2560, 8, 256, 262208)
    assert mm.rope_scaling["factor"] == 8.0 and mm.local_rope_scaling is None
    assert mm.hf_config["architectures"] == ["Gemma3ForConditionalGeneration"]


def test_phi_and_smollm3_hub_spellings():
    phi4_mini = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072,
                 "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
                 "num_key_value_heads": 8, "vocab_size": 200064, "partial_rotary_factor": 0.75,
                 "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                 "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                  "long_factor": [2.0] * 48}}
    mc = ModelConfig.from_dict(phi4_mini)
    assert (mc.head_dim, mc.rotary_dim) == (128, 96)
    assert mc.rope_scaling["original_max_position_embeddings"] == 4096
    smol = ModelConfig.from_dict({"architectures": ["SmolLM3ForCausalLM"], "hidden_size": 2048,
                                  "intermediate_size": 11008, "num_hidden_layers": 8,
                                  "num_attention_heads": 16, "vocab_size": 128256,
                                  "no_rope_layer_interval": 4, "sliding_window": 4096,
                                  "use_sliding_window": False})
    assert smol.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert smol.sliding_window is None and not smol.is_sliding(3)


def test_gemma4_shapes_and_kv_sharing_from_hub_spellings():
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
            "num_kv_shared_layers": 2, "vocab_size": 512}
    default = Gemma4Config.from_dict({**text, "num_kv_shared_layers": 0})
    assert default.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    mc = Gemma4Config.from_dict({"architectures": ["Gemma4ForConditionalGeneration"],
                                 "text_config": {**text, "layer_types": [
                                     "sliding_attention", "full_attention"] * 3},
                                 "vision_config": {}})
    assert [mc.layer_shape(i) for i in (0, 5)] == [(2, 16), (1, 32)]
    assert mc.kv_sources == [0, 1, 2, 3, 2, 3]      # the last two read layers 2 and 3's caches
    assert mc.rope_scaling["rope_type"] == "proportional"
    # transformers 5 writes the global layers' shape as per_layer_config
    saved = Gemma4Config.from_dict({**text, "architectures": ["Gemma4ForCausalLM"],
                                    "layer_types": ["sliding_attention", "full_attention"] * 3,
                                    "per_layer_config": {str(i): {"head_dim": 64,
                                                                  "num_key_value_heads": 2}
                                                         for i in (1, 3, 5)}})
    assert saved.layer_shape(3) == (2, 64)
    assert kv_sources(["sliding_attention", "full_attention", "full_attention"], 1) == [0, 1, 1]
    with pytest.raises(ConfigError, match="no layer to write"):
        kv_sources(["full_attention"], 1)


@pytest.mark.parametrize("arch,extra,match", [
    ("Gemma4ForCausalLM", {"enable_moe_block": True, "num_experts": 4}, "top_k_experts"),
    ("Gemma3ForCausalLM", {"hidden_activation": "relu"}, "hidden_activation"),
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "bidirectional"),
])
def test_unsupported_variants_are_one_line_startup_errors(tmp_path, folders, arch, extra, match):
    name = "gemma4" if arch.startswith("Gemma4") else "gemma3"
    with open(os.path.join(folders[name], "config.json")) as f:
        cfg = {**json.load(f), **extra}
    folder = tmp_path / "model"
    folder.mkdir()
    for file in os.listdir(folders[name]):
        target = folder / file
        if file == "config.json":
            target.write_text(json.dumps(cfg))
        else:
            target.symlink_to(os.path.join(folders[name], file))
    with pytest.raises(ConfigError, match=match) as e:
        LLM(str(folder), kv_cache_memory=1 << 20)
    assert "\n" not in str(e.value)
