"""The MTP head of the hybrid models (models/qwen3_next_mtp.py): a checkpoint with mtp.* tensors
loads into the target with them skipped and into the head with every one of its parameters
filled from them (the loader raises on any left out); the head runs over its own paged cache and
gives [T, hidden] states for the target's LM head."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from minserve.config import ConfigError
from minserve.engine.spec.mtp import mtp_source
from minserve.models.loader import load_weights
from minserve.models.qwen3_next_mtp import Qwen3NextMTP
from tests.paged_runner import attn_metadata, load_ours
from tests.test_qwen3_next import VARIANTS
from tests.tiny import make_tiny_model


def mtp_tensors(h: int, heads: int, kv: int, d: int, inter: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    layer = {"input_layernorm.weight": w(h), "post_attention_layernorm.weight": w(h),
             "self_attn.q_proj.weight": w(2 * heads * d, h),
             "self_attn.k_proj.weight": w(kv * d, h),
             "self_attn.v_proj.weight": w(kv * d, h), "self_attn.o_proj.weight": w(h, heads * d),
             "self_attn.q_norm.weight": w(d), "self_attn.k_norm.weight": w(d),
             "mlp.gate_proj.weight": w(inter, h), "mlp.up_proj.weight": w(inter, h),
             "mlp.down_proj.weight": w(h, inter)}
    out = {f"mtp.layers.0.{k}": v for k, v in layer.items()}
    out.update({"mtp.fc.weight": w(h, 2 * h), "mtp.norm.weight": w(h),
                "mtp.pre_fc_norm_embedding.weight": w(h), "mtp.pre_fc_norm_hidden.weight": w(h)})
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    arch, overrides = VARIANTS["qwen3.5-dense"]
    path = make_tiny_model(str(tmp_path_factory.mktemp("qwen35-mtp")), arch, **overrides)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["mtp_num_hidden_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(mtp_tensors(64, 4, 2, 16, 128), os.path.join(path, "mtp.safetensors"))
    return path


def test_target_skips_the_mtp_layers_and_the_head_loads_them(folder, capfd):
    from safetensors import safe_open

    target = load_ours(folder)
    assert "has no place" not in capfd.readouterr().err
    head = Qwen3NextMTP(target.config)
    with safe_open(os.path.join(folder, "mtp.safetensors"), "pt") as f:
        load_weights(head, ((k, f.get_tensor(k)) for k in f.keys()))
    head.share_embeddings(target)
    assert len(head.layers) == 1 and not head.layers[0].is_linear
    (k, d), = head.kv_cache_layout()
    head.set_kv_caches([(torch.zeros(4, 16, k, d), torch.zeros(4, 16, k, d))])
    attn, positions = attn_metadata([5], [0], [[2]], 16)
    hidden = torch.randn(5, 64)
    out, pre_norm = head(torch.tensor([5, 6, 7, 8, 9]), positions, attn, hidden)
    assert out.shape == pre_norm.shape == (5, 64) and torch.isfinite(out).all()
    logits = head.compute_logits(out, target.model.embed_tokens.weight)   # tied: Qwen3.5 tiny
    assert logits.shape == (5, 512)


def test_the_mtp_method_names_what_is_missing(folder):
    from minserve.config import EngineConfig
    from minserve.engine.builder import find_model

    config = EngineConfig(model=folder, device="cpu", dtype="float32")
    source = find_model(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not run them for this architecture yet"):
        mtp_source(source)
