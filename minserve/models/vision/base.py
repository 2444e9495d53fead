"""What every vision-language wrapper shares: a language model (LlamaForCausalLM unless the wrapper
names another; the step's forward, logits and KV caches go straight to it), the vision tower and
projector on tensor-parallel rank 0 only, checkpoint-name prefixes mapped onto our module tree,
and encode_images(), the one call the runner makes per step for the images it needs."""
from __future__ import annotations

import torch
from torch import nn

from minserve.config import ModelConfig
from minserve.kernels import AttnMetadata, LoRAMapping
from minserve.models import parallel
from minserve.models.llama import LlamaForCausalLM


class VisionLanguageModel(nn.Module):
    uses_mrope = False
    # image tokens attend to each other both ways (the runner passes their spans to attention,
    # the scheduler never ends a prefill chunk inside an image)
    bidirectional_images = False
    language_model_class: type[nn.Module] = LlamaForCausalLM
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    # (checkpoint prefix, our prefix), first match wins: transformers has saved each of these
    # models under more than one layout.
    weight_prefixes: tuple[tuple[str, str], ...] = ()
    vision_modules: tuple[str, ...] = ()   # our prefixes of what build_vision makes

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.language_model = self.language_model_class(config)
        # NOTE: the encoder runs on rank 0 alone, which broadcasts the merged embeddings
        # (ModelRunner.share_from_head): the other ranks neither build nor load it.
        self.has_vision = parallel.tp_rank() == 0
        if self.has_vision:
            self.build_vision(config)

    def build_vision(self, config: ModelConfig) -> None:
        """The vision tower and projector, under the names in vision_modules."""
        raise NotImplementedError

    def map_weight_name(self, name: str) -> str | None:
        for src, dst in self.weight_prefixes:
            if name.startswith(src):
                name = dst + name[len(src):]
                break
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name.startswith("language_model.lm_head.") and self.language_model.lm_head is None:
            return None
        if not self.has_vision and name.startswith(self.vision_modules):
            return None
        return self.keep_weight(name)

    def keep_weight(self, name: str) -> str | None:
        """A wrapper drops checkpoint tensors of the parts it does not build (None)."""
        return name

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The processor's tensors of each image -> its embeddings [num_image_tokens, hidden],
        in the order its placeholder tokens appear. One batched tower call for all of them."""
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn: AttnMetadata, inputs_embeds: torch.Tensor | None = None,
                lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, attn, inputs_embeds, lora_mapping)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.language_model.set_kv_caches(kv_caches)
