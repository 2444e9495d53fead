"""The EAGLE-3 draft head (engine/spec/ drafts with it), as SpecForge and the EAGLE repository
publish it: config.json with architectures ["LlamaForCausalLMEagle3"], draft_vocab_size,
target_hidden_size; safetensors with fc (3 target hidden states -> one), a decoder layer
("midlayer." or "layers.0.") whose attention reads [embedding | hidden state], norm, lm_head
over the draft vocabulary and d2t (draft id -> target id offset; t2d is not needed). Without
embed_tokens in the checkpoint the head shares the target's. Built by the one builder, with its
own paged KV cache; the layers are llama.py's."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minserve.config import ModelConfig
from minserve.kernels import AttnMetadata
from minserve.models import parallel
from minserve.models.layers import RMSNorm, RotaryEmbedding
from minserve.models.linear import ParallelLMHead, ReplicatedLinear, VocabParallelEmbedding
from minserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


@dataclass
class Eagle3Config(ModelConfig):
    draft_vocab_size: int = 0
    target_hidden_size: int = 0
    norm_before_residual: bool = False
    # the target layers whose input states the head reads (None: the target's default)
    aux_hidden_state_layers: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, top: dict) -> Eagle3Config:
        base = ModelConfig.from_dict(top)
        eagle = top.get("eagle_config") or {}
        layers = top.get("eagle_aux_hidden_state_layer_ids",
                         eagle.get("eagle_aux_hidden_state_layer_ids"))
        return cls(**vars(base), draft_vocab_size=int(top.get("draft_vocab_size")
                                                      or base.vocab_size),
                   target_hidden_size=int(top.get("target_hidden_size") or base.hidden_size),
                   norm_before_residual=bool(top.get("norm_before_residual", False)),
                   aux_hidden_state_layers=tuple(layers) if layers else None)


class Eagle3FirstLayer(nn.Module):
    """A Llama decoder layer whose attention projects [norm(embedding) | norm(hidden)]."""

    def __init__(self, config: Eagle3Config, prefix: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, f"{prefix}.self_attn", input_size=2 * h)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, f"{prefix}.mlp")
        self.norm_before_residual = config.norm_before_residual

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttnMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.input_layernorm(embeds)
        normed = self.hidden_norm(hidden)
        # the published heads carry the un-normed state in the residual; some take it normed
        residual = normed if self.norm_before_residual else hidden
        out = self.self_attn(torch.cat([embeds, normed], dim=-1), cos_sin, attn)
        out, residual = self.post_attention_layernorm(out, residual)
        return self.mlp(out), residual


class Eagle3LlamaForCausalLM(nn.Module):
    config_class = Eagle3Config
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        tp = parallel.tp_rank(), parallel.tp_size()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h, *tp)
        self.embed_tokens.weight.is_optional = True   # absent: the target's (share_embeddings)
        self.fc = ReplicatedLinear(3 * config.target_hidden_size, h, bias=False)
        self.layers = nn.ModuleList([Eagle3FirstLayer(config, "layers.0")] + [
            LlamaDecoderLayer(config, f"layers.{i}") for i in range(1, config.num_hidden_layers)])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.draft_vocab_size, h, *tp)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta,
                                          config.rope_scaling, config.max_position_embeddings)
        # target id = draft id + d2t[draft id]; read from the checkpoint by the drafter
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long),
                             persistent=False)

    def map_weight_name(self, name: str) -> str | None:
        """The EAGLE repository's "midlayer." is layer 0; d2t is loaded apart (an int table),
        t2d is not needed."""
        name = name.removeprefix("model.")
        if name in ("d2t", "t2d") or name.endswith("rotary_emb.inv_freq"):
            return None
        return "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") \
            else name

    def share_embeddings(self, target: nn.Module) -> None:
        """A head published without embed_tokens embeds with the target's table."""
        self.embed_tokens = target.model.embed_tokens

    def combine_hidden_states(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The target's [T, 3 * hidden] layer states -> [T, hidden]."""
        return self.fc(aux_hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnMetadata,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [T] (the token after each position), hidden [T, H] -> (normed [T, H] for
        the logits, pre-norm [T, H]: the next draft step's hidden state)."""
        embeds = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb(positions, embeds.dtype)
        out, residual = self.layers[0](embeds, hidden, cos_sin, attn)
        for layer in self.layers[1:]:
            out, residual = layer(out, residual, cos_sin, attn)
        return self.norm(out, residual)

    def draft_token_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """normed [N, H] -> the greedy draft [N] as target token ids."""
        from minserve import kernels

        draft = kernels.logits(hidden, self.lm_head.weight, self).argmax(dim=-1)
        return draft + self.d2t[draft]

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = k_cache, v_cache
