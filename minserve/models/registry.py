"""HF `architectures` name -> model class, imported only when asked for. Only maps names; never
builds or loads a model."""
from __future__ import annotations

import importlib

from minserve.config import ConfigError

# architecture -> (module in minserve.models, class). The Llama-family names are one class with
# config flags (sliding window, qkv bias, q/k norm) that ModelConfig reads from config.json. A
# wrapper architecture (a vision tower around a Llama) maps to its own class the same way.
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "LlavaForConditionalGeneration": ("vision.llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("vision.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("vision.qwen2_vl",
                                           "Qwen2_5_VLForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("vision.idefics3", "Idefics3ForConditionalGeneration"),
}


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ConfigError(f"model architecture {architecture!r} is not supported; "
                          f"supported: {', '.join(_MODELS)}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(f"minserve.models.{module}"), name)
