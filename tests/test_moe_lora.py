"""LoRA on a mixture-of-experts model (a dense layer 0, a sparse layer 1): an adapter on the
attention and the dense layer's MLP gives the greedy tokens and logprobs of transformers' model
with the deltas merged in; one that adapts the experts (peft's target_parameters, per-expert
tensors, or the MLP of a sparse layer) is refused at load with a message that says so."""
from __future__ import annotations

import os

import pytest

from minserve.config import ConfigError, EngineConfig, LoRAConfig, LoRAModule
from minserve.engine.engine import Engine
from minserve.lora.adapter import LoRAError
from tests.lora_adapters import edit_config, make_adapter
from tests.test_lora import PROMPT, assert_matches, peft_greedy, run
from tests.tiny import make_tiny_model

pytest.importorskip("peft")
# attention everywhere, the MLP of dense layer 0 only
DENSE_TARGETS = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj|model\.layers\.0\.mlp\.\w+_proj"


def merged_reference(base: str, path: str):
    """transformers' model with the adapter's deltas added to its weights (peft would wrap
    the experts again on load)."""
    import json

    import torch
    import transformers
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / cfg["r"]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                model.get_submodule(module).weight += (b @ a) * scale
    return model


def dense_adapter(base: str, path: str, seed: int) -> str:
    """peft adds the experts' fused weights (target_parameters) whenever a target is named
    gate/up/down_proj: taken out again, the adapter holds the attention and layer 0's MLP."""
    from safetensors.torch import load_file, save_file

    make_adapter(base, path, r=8, targets=DENSE_TARGETS, seed=seed)
    edit_config(path, target_parameters=None, rank_pattern={}, alpha_pattern={})
    st = os.path.join(path, "adapter_model.safetensors")
    tensors = {k: v for k, v in load_file(st).items() if ".experts." not in k}
    assert any(".layers.0.mlp.down_proj." in k for k in tensors)
    save_file(tensors, st)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3moe")), "Qwen3MoeForCausalLM",
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           norm_topk_prob=True, mlp_only_layers=[0])


def _engine(base: str, path: str) -> Engine:
    return Engine(EngineConfig(model=base, kv_cache_memory=4 << 20,
                               lora=LoRAConfig([LoRAModule("ad", path)])))


def test_adapter_on_attention_and_dense_layers_matches_peft(base, tmp_path):
    path = dense_adapter(base, str(tmp_path / "dense"), seed=5)
    got = run(_engine(base, path), [("r", PROMPT, "ad"), ("b", PROMPT, None)])
    assert_matches(got["r"], peft_greedy(merged_reference(base, path), PROMPT))
    assert got["r"][0] != got["b"][0]


def test_adapter_on_experts_is_refused_at_load(base, tmp_path):
    path = make_adapter(base, str(tmp_path / "all"), r=8, seed=6)     # peft adds the experts
    with pytest.raises(ConfigError, match=r"target_parameters=.*mixture-of-experts"):
        _engine(base, path)


@pytest.mark.parametrize("rename", [
    ("layers.0.mlp.up_proj", "layers.1.mlp.up_proj"),            # layer 1's MLP is the experts
    ("layers.0.mlp.up_proj", "layers.1.mlp.experts.2.up_proj"),  # a per-expert module
])
def test_tensors_on_a_sparse_layer_are_refused(base, tmp_path, rename):
    from safetensors.torch import load_file, save_file

    path = dense_adapter(base, str(tmp_path / "dense"), seed=7)
    st = os.path.join(path, "adapter_model.safetensors")
    tensors = {k.replace(*rename): v for k, v in load_file(st).items()}
    save_file(tensors, st)
    engine = Engine(EngineConfig(model=base, kv_cache_memory=4 << 20,
                                 lora=LoRAConfig([], max_loras=1)))
    with pytest.raises(LoRAError, match=r"adapts a mixture-of-experts layer"):
        engine.add_lora("bad", path)
