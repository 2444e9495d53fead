"""HF `architectures` name -> model class. Only maps names; never builds or loads a model."""
from __future__ import annotations

from minserve.config import ConfigError

# All of these are the Llama block with different flags (sliding window, qkv bias, q/k norm),
# which ModelConfig reads from config.json.
_LLAMA_FAMILY = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def get_model_class(architecture: str) -> type:
    if architecture in _LLAMA_FAMILY:
        from minserve.models.llama import LlamaForCausalLM
        return LlamaForCausalLM
    raise ConfigError(f"model architecture {architecture!r} is not supported; "
                      f"supported: {', '.join(_LLAMA_FAMILY)}")


def supported_architectures() -> list[str]:
    return list(_LLAMA_FAMILY)
