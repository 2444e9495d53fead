"""Qwen3-VL: its vision transformer (qwen3_vit.py), a Qwen3 language model with interleaved M-RoPE,
and DeepStack. Each image becomes (h / 32) * (w / 32) embeddings at its <|image_pad|> tokens, and
the tower's DeepStack features are added to the hidden states of those tokens after each of the
first K language-model layers.

An image's embeddings are one row per token, [hidden | deepstack 0 | ... | deepstack K-1]
(vLLM's layout), so the encoder cache, the merge into the step's rows and the tensor-parallel
broadcast carry the DeepStack features along unchanged; text rows hold zeros there:

    inputs_embeds [T, (1 + K) * hidden]     forward(): x = [:, :hidden] enters layer 0, and
    text  | e  0  0 |                       after layer i < K, x += [:, (1 + i) * hidden:...]
    image | v  d0 d1|
"""
from __future__ import annotations

import torch

from minserve.config import ModelConfig
from minserve.kernels import AttnMetadata, LoRAMapping
from minserve.models.layers import MRotaryEmbedding
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.qwen2_vl import Qwen2VLForConditionalGeneration
from minserve.models.vision.qwen3_vit import QWEN3_VL_VISION_DEFAULTS, Qwen3VisionTower


class Qwen3VLForConditionalGeneration(VisionLanguageModel):
    uses_mrope = True
    weight_prefixes = Qwen2VLForConditionalGeneration.weight_prefixes
    vision_modules = ("visual.",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        vision = config.hf_config.get("vision_config", {})
        self.num_deepstack = len(vision.get("deepstack_visual_indexes",
                                            QWEN3_VL_VISION_DEFAULTS["deepstack_visual_indexes"]))
        # NOTE: transformers' Qwen3-VL text rotary always interleaves the sections (the config's
        # mrope_interleaved flag is not read there either).
        self.language_model.model.rotary_emb = MRotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings,
            config.mrope_section or [24, 20, 20], interleaved=True)

    def build_vision(self, config: ModelConfig) -> None:
        self.visual = Qwen3VisionTower(config.hf_config.get("vision_config", {}))

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        pixel_values = torch.cat([image["pixel_values"] for image in images])   # [N, C*T*P*P]
        grids = [tuple(int(x) for x in image["image_grid_thw"].reshape(3).tolist())
                 for image in images]
        merged, deepstack = self.visual(pixel_values, grids)
        rows = torch.cat([merged, *deepstack], dim=-1)        # [N / 4, (1 + K) * hidden]
        unit = self.visual.merge_size ** 2
        return list(rows.split([t * h * w // unit for t, h, w in grids]))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, (1 + K) * hidden]: the token embeddings, zeros where DeepStack adds."""
        embeds = self.language_model.embed_input_ids(input_ids)
        return torch.cat([embeds, embeds.new_zeros(embeds.shape[0],
                                                   self.num_deepstack * embeds.shape[1])], dim=1)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn: AttnMetadata, inputs_embeds: torch.Tensor | None = None,
                lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            return self.language_model(input_ids, positions, attn, None, lora_mapping)
        model = self.language_model.model
        hidden_size = self.config.hidden_size
        hidden = inputs_embeds[:, :hidden_size]
        deepstack = inputs_embeds[:, hidden_size:].view(hidden.shape[0], -1, hidden_size)
        cos_sin = model.rotary_emb(positions, hidden.dtype)
        residual = None
        for i, layer in enumerate(model.layers):
            hidden, residual = layer(hidden, residual, cos_sin, attn, lora_mapping)
            if i < deepstack.shape[1]:
                # hidden + residual is the layer's output; adding to either adds to it
                hidden = hidden + deepstack[:, i]
        hidden, _ = model.norm(hidden, residual)
        return hidden
