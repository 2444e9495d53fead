"""LoRA on hybrid linear-attention models: an adapter on the gated full-attention projections
(q_proj's rows hold each head's query and its output gate) and the dense MLPs gives the greedy
tokens and logprobs of transformers' model with the deltas merged in. The Gated DeltaNet
projections (linear_attn.*) are no LoRA target: an adapter naming them is refused at load."""
from __future__ import annotations

import os

import pytest

from minserve.config import ConfigError, EngineConfig, LoRAConfig, LoRAModule
from minserve.engine.engine import Engine
from tests.lora_adapters import edit_config, make_adapter
from tests.test_lora import PROMPT, assert_matches, peft_greedy, run
from tests.test_moe_lora import merged_reference
from tests.test_qwen3_next import VARIANTS
from tests.tiny import make_tiny_model

pytest.importorskip("peft")
ATTN = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
# qwen3.5-dense: every MLP; qwen3next-moe: the MLP of its dense layer 1 (mlp_only_layers)
TARGETS = {"qwen3.5-dense": ATTN + r"|model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
           "qwen3next-moe": ATTN + r"|model\.layers\.1\.mlp\.(gate|up|down)_proj"}


@pytest.fixture(scope="module", params=list(TARGETS))
def case(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    base = make_tiny_model(str(tmp_path_factory.mktemp(request.param)), arch, **overrides)
    path = str(tmp_path_factory.mktemp("adapter") / "ad")
    make_adapter(base, path, r=8, targets=TARGETS[request.param], seed=5, scale=0.2)
    # on an MoE model peft (0.22) turns the regex into leaf names and adds target_parameters:
    # the experts and the sparse layers' shared_expert.*_proj get tensors too, taken out again
    edit_config(path, target_parameters=None, rank_pattern={}, alpha_pattern={})
    from safetensors.torch import load_file, save_file

    st = os.path.join(path, "adapter_model.safetensors")
    tensors = {k: v for k, v in load_file(st).items()
               if ".experts." not in k and ".shared_expert." not in k}
    assert any(".self_attn.q_proj." in k for k in tensors)
    assert any(".mlp.down_proj." in k for k in tensors)
    save_file(tensors, st)
    return base, path


def _engine(base: str, path: str, **kw) -> Engine:
    return Engine(EngineConfig(model=base, kv_cache_memory=4 << 20, max_model_len=128,
                               lora=LoRAConfig([LoRAModule("ad", path)]), **kw))


def test_adapter_matches_merged_transformers(case):
    base, path = case
    engine = _engine(base, path, max_num_batched_tokens=16)     # chunked prefill too
    got = run(engine, [("r", PROMPT, "ad"), ("b", PROMPT, None)])
    assert_matches(got["r"], peft_greedy(merged_reference(base, path), PROMPT))
    assert got["r"][0] != got["b"][0]
    # again, one after the other: each hits its own prefix cache (blocks and state snapshots
    # rooted in the adapter), never the other's
    for rid, adapter in (("r2", "ad"), ("b2", None)):
        again = run(engine, [(rid, PROMPT, adapter)])
        assert again[rid][0] == got[rid[0]][0] and run.cached[rid] == 32


def test_adapter_on_linear_attention_is_refused(case, tmp_path):
    base, _ = case
    path = make_adapter(base, str(tmp_path / "gdn"), r=4, targets=["out_proj"], seed=1)
    with pytest.raises(ConfigError, match="out_proj"):
        _engine(base, path)
