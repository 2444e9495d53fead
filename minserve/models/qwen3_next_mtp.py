"""The multi-token-prediction (MTP) head of Qwen3-Next and Qwen3.5, as their checkpoints ship it
under mtp.*: fc over [norm(embedding of the next token) | norm(the target's last hidden state)],
then mtp_num_hidden_layers full-attention decoder layers (the target's kind: gated attention,
dense or MoE feed-forward), then a norm; the target's LM head reads the result.

    head = Qwen3NextMTP(config)            # config: the target's HybridConfig (config_class)
    head.share_embeddings(target)          # embed_tokens (and the LM head) are the target's
    hidden_out, pre_norm = head(input_ids, positions, attn, hidden)

The layers attend over their own paged KV cache (kv_cache_layout / set_kv_caches). The engine's
"mtp" method (engine/spec/mtp.py) is not wired to it yet: speculative decoding is a start-up
error for hybrid models until the linear layers' states can roll back rejected drafts."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from minserve import kernels
from minserve.engine.spec.mtp import num_mtp_layers
from minserve.kernels import AttnMetadata
from minserve.models import parallel
from minserve.models.layers import GemmaRMSNorm, RotaryEmbedding
from minserve.models.linear import ReplicatedLinear, VocabParallelEmbedding
from minserve.models.llama import LlamaForCausalLM
from minserve.models.qwen3_next import FULL, HybridConfig, HybridDecoderLayer


class Qwen3NextMTP(nn.Module):
    config_class = HybridConfig
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        n = max(num_mtp_layers(config.hf_config or {}), 1)
        # every MTP layer is full attention; MoE where the target's layers are
        config = dataclasses.replace(config, layer_types=[FULL] * n, num_hidden_layers=n)
        self.config = config
        h = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h, parallel.tp_rank(),
                                                   parallel.tp_size())
        self.embed_tokens.weight.is_optional = True     # the target's (share_embeddings)
        self.pre_fc_norm_embedding = GemmaRMSNorm(h, config.rms_norm_eps)
        self.pre_fc_norm_hidden = GemmaRMSNorm(h, config.rms_norm_eps)
        self.fc = ReplicatedLinear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, f"mtp.layers.{i}", i)
                                    for i in range(n))
        self.norm = GemmaRMSNorm(h, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta,
                                          config.rope_scaling, config.max_position_embeddings,
                                          config.max_model_len)

    def map_weight_name(self, name: str) -> str | None:
        """Only the checkpoint's mtp.* tensors (a wrapper's too), without the prefix."""
        name = name.replace("model.language_model.", "model.", 1).removeprefix("model.")
        if not name.startswith("mtp."):
            return None
        name = name.removeprefix("mtp.")
        if self.layers[0].mlp.__class__.__name__ == "Qwen2MoeSparseBlock":
            name = name.replace(".mlp.gate.", ".mlp.moe.gate.").replace(".mlp.experts.",
                                                                        ".mlp.moe.experts.")
        return name

    def share_embeddings(self, target: nn.Module) -> None:
        self.embed_tokens = target.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnMetadata,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [T] (the token after each position), hidden [T, H] (the target's final
        hidden state there) -> (normed [T, H] for the target's LM head, pre-norm [T, H]: the
        next draft step's hidden state)."""
        embeds = self.pre_fc_norm_embedding(self.embed_tokens(input_ids))
        x = self.fc(torch.cat((embeds, self.pre_fc_norm_hidden(hidden)), dim=-1))
        cos_sin = self.rotary_emb(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, attn)
        out, pre_norm = self.norm(x, residual)
        return out, pre_norm

    def compute_logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V / tp] with the target's LM head weight."""
        return kernels.logits(hidden, lm_head_weight, self).float()

    def kv_cache_layout(self) -> list[tuple[int, int]]:
        return [(layer.self_attn.num_kv_heads, layer.self_attn.head_dim) for layer in self.layers]

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = k_cache, v_cache
