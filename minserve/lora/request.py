"""LoRARequest, vLLM's name for "this prompt runs with that adapter" in the LLM API. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
