"""The Llama family in plain torch: Llama 2/3/3.1, SmolLM, TinyLlama, Mistral (sliding window),
Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm), SmolLM3 (NoPE layers), Phi-3/Phi-4 (fused
checkpoint projections, LongRoPE, partial rotary). One flat batch of tokens per step, attention
over the paged KV cache. Module names match HF checkpoints, except the fused qkv/gate_up (see
packed_modules_mapping; Phi-3 checkpoints store them fused already); the model never reads a
checkpoint itself (loader.py does)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minserve import kernels
from minserve.config import ModelConfig
from minserve.kernels import AttnMetadata, LoRAMapping
from minserve.models import parallel
from minserve.models.layers import Attention, RMSNorm, RotaryEmbedding, SiluAndMul, apply_rotary
from minserve.models.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def linear_method(config: ModelConfig, prefix: str) -> Any:
    """The layer's quant_method (None: unquantized), by its checkpoint prefix."""
    quant = config.quant_config
    return None if quant is None else quant.get_linear_method(prefix)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str = "", layer: int = 0,
                 input_size: int | None = None) -> None:
        """input_size: what q/k/v project from (default hidden_size; an EAGLE-3 head's first
        layer takes [embedding | hidden state], twice that)."""
        super().__init__()
        h, k, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        tp = parallel.tp_rank(), parallel.tp_size()
        # NOTE: attention_bias and qk_norm are separate flags (Qwen2 has bias and no norm,
        # Qwen3 the reverse), never inferred from the architecture here.
        self.qkv_proj = QKVParallelLinear(
            input_size or config.hidden_size, d, h, k, config.attention_bias,
            linear_method(config, f"{prefix}.qkv_proj"), *tp)
        # this rank's heads: H / tp, and K / tp (or one replicated kv head when K < tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, False,
                                        linear_method(config, f"{prefix}.o_proj"), *tp)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # SmolLM3's NoPE layers attend without positions; a window only on sliding layers
        self.use_rope = config.no_rope_layers is None or bool(config.no_rope_layers[layer])
        self.attn = Attention(self.num_heads, self.num_kv_heads, d,
                              config.sliding_window if config.is_sliding(layer) else None)
        self.register_parameter("sinks", None)   # gpt-oss's attention sinks (models/gpt_oss.py)

    def forward(
        self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttnMetadata,
        lora_mapping: LoRAMapping | None = None,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden, lora_mapping)  # [T, (H + 2K) * D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        qk = qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, H+K, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, D]
        cos, sin = cos_sin
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # PERF: q and k rotate in one call (7 fewer torch ops per layer on the CPU path).
        if self.use_rope:
            qk = apply_rotary(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, attn, self.sinks), lora_mapping)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str = "",
                 intermediate_size: int | None = None) -> None:
        super().__init__()
        i = intermediate_size or config.intermediate_size   # (a MoE's shared expert: its own)
        tp = parallel.tp_rank(), parallel.tp_size()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [i, i], False,
            linear_method(config, f"{prefix}.gate_up_proj"), *tp)
        self.down_proj = RowParallelLinear(
            i, config.hidden_size, False, linear_method(config, f"{prefix}.down_proj"), *tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x, lora_mapping)), lora_mapping)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks. Hooks for the families that differ only in their
    parts: build_attention, build_mlp, norm_class, and post_norm (Gemma's norms on each branch's
    output before its residual add, with pre_mlp_norm the MLP's own pre-norm)."""
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config: ModelConfig, prefix: str = "", layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.build_attention(config, f"{prefix}.self_attn", layer)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.build_mlp(config, f"{prefix}.mlp")

    def build_attention(self, config: ModelConfig, prefix: str, layer: int) -> nn.Module:
        return LlamaAttention(config, prefix, layer)

    def build_mlp(self, config: ModelConfig, prefix: str) -> nn.Module:
        """The feed-forward block, forward(x, lora_mapping) -> [T, hidden] (a mixture of
        experts in models/qwen_moe.py's subclass)."""
        return LlamaMLP(config, prefix)

    @property
    def pre_mlp_norm(self) -> RMSNorm:
        """The norm that adds the attention branch to the residual and feeds the MLP."""
        return self.post_attention_layernorm

    def post_norm(self, branch: str, x: torch.Tensor) -> torch.Tensor:
        """A branch's ("attn" or "mlp") output before its residual add: as it is in Llama."""
        return x

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttnMetadata,
                lora_mapping: LoRAMapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm can fuse the add (vLLM style).
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_norm("attn", self.self_attn(hidden, cos_sin, attn, lora_mapping))
        hidden, residual = self.pre_mlp_norm(hidden, residual)
        return self.post_norm("mlp", self.mlp(hidden, lora_mapping)), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig,
                 decoder_layer: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   parallel.tp_rank(), parallel.tp_size())
        self.layers = nn.ModuleList(
            decoder_layer(config, f"model.layers.{i}", i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One rotary table for all layers: cos/sin are computed once per step and passed down.
        self.rotary_emb = RotaryEmbedding(
            config.rotary_dim, config.rope_theta, config.rope_scaling,
            config.max_position_embeddings, config.max_model_len)
        # EAGLE-3 (engine/spec/): the residual stream entering these layers is returned too
        self.aux_hidden_state_layers: tuple[int, ...] = ()

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, attn: AttnMetadata,
        inputs_embeds: torch.Tensor | None = None, lora_mapping: LoRAMapping | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos_sin = self.rotary_emb(positions, hidden.dtype)
        residual = None
        aux = {}
        for i, layer in enumerate(self.layers):
            if i in self.aux_hidden_state_layers:
                aux[i] = hidden if residual is None else hidden + residual
            hidden, residual = layer(hidden, residual, cos_sin, attn, lora_mapping)
        hidden, _ = self.norm(hidden, residual)
        if not aux:
            return hidden
        return hidden, torch.cat([aux[i] for i in self.aux_hidden_state_layers], dim=-1)


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> (fused module, shard id): the loader's one mapping table.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    decoder_layer = LlamaDecoderLayer    # a family that differs only in its layers swaps it

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        # NOTE: tied embeddings reuse embed_tokens.weight in compute_logits instead of sharing a
        # Parameter, which meta-device builds and .to() would silently untie.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else ParallelLMHead(config.vocab_size, config.hidden_size, parallel.tp_rank(),
                                parallel.tp_size())
        )

    def build_model(self, config: ModelConfig) -> nn.Module:
        """The decoder stack: Llama's with this family's decoder layer (Gemma 3 and 4 build their
        own)."""
        return LlamaModel(config, self.decoder_layer)

    def map_weight_name(self, name: str) -> str | None:
        """Checkpoint name -> parameter name, None to drop. Base-model checkpoints (Qwen3Model,
        for embeddings) name the layers without the "model." prefix."""
        if name.endswith("rotary_emb.inv_freq") or (self.lm_head is None
                                                    and name.startswith("lm_head.")):
            return None
        return name if name.startswith(("model.", "lm_head.")) else "model." + name

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]: the lookup forward() skips when given inputs_embeds
        (a multimodal model writes image features into some rows first)."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, attn: AttnMetadata,
        inputs_embeds: torch.Tensor | None = None, lora_mapping: LoRAMapping | None = None,
    ) -> torch.Tensor:
        """input_ids [T] long (or inputs_embeds [T, hidden]), positions [T] long -> hidden
        [T, hidden] (final-normed). lora_mapping: the step's tokens grouped by LoRA slot (None:
        the base model only), handed to every linear layer. With aux_hidden_state_layers set
        (EAGLE-3): (hidden, those layers' inputs [T, n * hidden])."""
        return self.model(input_ids, positions, attn, inputs_embeds, lora_mapping)

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """EAGLE-3's target: forward() also returns the residual stream entering these
        layers (vLLM's default choice: eagle3_aux_hidden_state_layers)."""
        self.model.aux_hidden_state_layers = tuple(layers)

    @property
    def eagle3_aux_hidden_state_layers(self) -> tuple[int, ...]:
        n = len(self.model.layers)
        return (2, n // 2, n - 3)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, V] float32 (on rank 0; None on the other ranks)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = kernels.logits(hidden, weight, self).float()   # [N, V / tp]
        if self.model.embed_tokens.tp_size == 1:    # (another engine of this process may be TP)
            return logits
        return parallel.gather_vocab(logits, self.config.vocab_size)

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One (k_cache, v_cache) pair, each [NB, BS, K, D], per layer."""
        layers: list[Attention] = [layer.self_attn.attn for layer in self.model.layers]
        if len(kv_caches) != len(layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(layers)} layers")
        for attn, (k_cache, v_cache) in zip(layers, kv_caches, strict=False):
            attn.k_cache, attn.v_cache = k_cache, v_cache
