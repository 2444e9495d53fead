"""Qwen3-MoE and Qwen2-MoE: the Llama-family attention (Qwen3: per-head q/k RMSNorm; Qwen2:
qkv bias) with a mixture of experts (models/moe.py) in place of the MLP on the sparse layers;
decoder_sparse_step and mlp_only_layers keep the others dense. Qwen2-MoE adds a shared expert
that every token runs, scaled by sigmoid(shared_expert_gate(x)). Mixtral is models/mixtral.py."""
from __future__ import annotations

import re

import torch
from torch import nn

from minserve.config import ModelConfig
from minserve.kernels import LoRAMapping
from minserve.models.linear import ReplicatedLinear
from minserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from minserve.models.moe import FusedMoE, expert_index, local_experts

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def moe_block(config: ModelConfig, prefix: str) -> FusedMoE:
    """The routed experts as config.json's MoE settings describe them."""
    moe = config.moe
    return FusedMoE(moe.num_experts, moe.top_k, config.hidden_size, moe.intermediate_size,
                    prefix, router=moe.router, quant_config=config.quant_config,
                    expert_parallel=moe.expert_parallel)


class Qwen2MoeSparseBlock(nn.Module):
    """Qwen2-MoE's block: the routed experts plus a shared expert (a dense MLP, tensor-parallel
    as one). Its checkpoint names sit beside the experts' (mlp.gate, mlp.experts.N,
    mlp.shared_expert, mlp.shared_expert_gate), so the router and experts are this module's."""

    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        self.moe = moe_block(config, prefix)
        self.shared_expert = LlamaMLP(config, f"{prefix}.shared_expert",
                                      config.moe.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, False)

    def forward(self, x: torch.Tensor, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
        return self.moe(x) + shared


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: ModelConfig, prefix: str) -> nn.Module:
        if not config.moe.is_sparse(int(_LAYER_INDEX.search(prefix).group(1))):
            return super().build_mlp(config, prefix)
        if config.moe.shared_expert_intermediate_size:
            return Qwen2MoeSparseBlock(config, prefix)
        return moe_block(config, prefix)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    decoder_layer = Qwen3MoeDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.local_experts = local_experts(config.moe.num_experts, config.moe.expert_parallel)
        self.nests_experts = bool(config.moe.shared_expert_intermediate_size)

    def map_weight_name(self, name: str) -> str | None:
        """Another rank's experts (expert parallelism) are dropped; Qwen2-MoE's router and
        experts live one module down (mlp.moe.*) beside its shared expert."""
        e = expert_index(name)
        if e is not None and e not in self.local_experts:
            return None
        if self.nests_experts:
            name = re.sub(r"\.mlp\.(gate|experts)\.", r".mlp.moe.\1.", name)
        return super().map_weight_name(name)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """The same layers: qkv bias, the shared expert and no q/k norm come from config.json."""
