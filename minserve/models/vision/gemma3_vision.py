"""Gemma 3 with images (Gemma3ForConditionalGeneration): the SigLIP tower (siglip.py) over one
896x896 image, the pooled projector (the patch grid average-pooled to mm_tokens_per_image tokens,
Gemma's RMSNorm, one projection matrix) and Gemma 3's language model (models/gemma3.py). The
image's tokens attend to each other both ways, as transformers' mask does (AttnMetadata's
image spans; the scheduler runs each image's tokens in one step)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minserve.config import ModelConfig
from minserve.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from minserve.models.layers import GemmaRMSNorm
from minserve.models.vision.base import VisionLanguageModel
from minserve.models.vision.siglip import SiglipVisionTower

# transformers' SiglipVisionConfig as Gemma3Config fills it in
GEMMA3_VISION_DEFAULTS = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 896, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, patches_per_side: int,
                 tokens_per_image: int, eps: float) -> None:
        super().__init__()
        self.patches_per_side = patches_per_side
        self.kernel = patches_per_side // int(tokens_per_image ** 0.5)
        self.mm_soft_emb_norm = GemmaRMSNorm(vision_dim, eps)
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision_dim, text_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, patches, E] -> [B, tokens_per_image, text_dim]."""
        b, _, e = x.shape
        grid = x.transpose(1, 2).reshape(b, e, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel).flatten(2).transpose(1, 2)
        return self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight


class Gemma3VisionConfig(Gemma3Config):
    @classmethod
    def from_dict(cls, top: dict) -> Gemma3VisionConfig:
        config = super().from_dict(top)
        # NOTE: transformers ties the wrapper's lm_head by the top-level flag, whatever
        # text_config says (and then saves no lm_head.weight)
        if "tie_word_embeddings" in top:
            config.tie_word_embeddings = bool(top["tie_word_embeddings"])
        return config


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    config_class = Gemma3VisionConfig
    language_model_class = Gemma3ForCausalLM
    bidirectional_images = True
    # transformers 5 saves the first three; checkpoints saved before it the last three
    weight_prefixes = (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
        ("language_model.model.", "language_model.model."),
        ("vision_tower.vision_model.", "vision_tower."),
    )
    vision_modules = ("vision_tower.", "multi_modal_projector.")

    def build_vision(self, config: ModelConfig) -> None:
        hf = config.hf_config
        vision = {**GEMMA3_VISION_DEFAULTS, **hf.get("vision_config", {})}
        self.vision_tower = SiglipVisionTower(vision)
        self.multi_modal_projector = Gemma3MultiModalProjector(
            self.vision_tower.hidden_size, config.hidden_size,
            self.vision_tower.image_size // self.vision_tower.patch_size,
            int(hf.get("mm_tokens_per_image", 256)), float(vision["layer_norm_eps"]))

    def keep_weight(self, name: str) -> str | None:
        if name.startswith("vision_tower.vision_model."):    # model.vision_tower.vision_model.
            name = "vision_tower." + name[len("vision_tower.vision_model."):]
        return None if name.startswith("vision_tower.head.") else name   # SigLIP's pooling head

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        pixel_values = torch.stack([image["pixel_values"] for image in images])  # [B, C, H, W]
        return list(self.multi_modal_projector(self.vision_tower(pixel_values)))

    @staticmethod
    def whole_image_tokens(config: ModelConfig) -> int:
        """Tokens of the largest image, which must run in one step."""
        return int(config.hf_config.get("mm_tokens_per_image", 256))
