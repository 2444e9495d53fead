"""Mixtral: Mistral's attention (a sliding window when config.json sets one) with a mixture of
experts in every layer, the top-k router weights renormalized to sum 1. Its checkpoint names
the block `block_sparse_moe` and the experts' projections w1 (gate), w3 (up), w2 (down); they
are renamed to the Qwen-MoE names models/moe.py loads."""
from __future__ import annotations

from minserve.models.qwen_moe import Qwen3MoeForCausalLM

_RENAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
            (".w2.", ".down_proj."))


class MixtralForCausalLM(Qwen3MoeForCausalLM):
    def map_weight_name(self, name: str) -> str | None:
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return super().map_weight_name(name)
