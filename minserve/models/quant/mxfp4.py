"""MXFP4 checkpoints (`quant_method: mxfp4`, the gpt-oss releases): only the experts are
quantized, stored as 4-bit blocks and e8m0 scales (kernels/mxfp4.py has the layout); the model
(models/gpt_oss.py) loads them into its expert stacks as they are, and every linear layer
(attention, router, embeddings, LM head: modules_to_not_convert) stays unquantized."""
from __future__ import annotations

from typing import Any

import torch

from minserve.models.quant.base import QuantConfig, config_error


class Mxfp4Config(QuantConfig):
    name = "mxfp4"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Mxfp4Config:
        return cls(skip_modules=list(cfg.get("modules_to_not_convert") or []))

    def describe(self) -> str:
        return "mxfp4 (experts served from the 4-bit blocks)"

    def get_linear_method(self, prefix: str) -> None:
        return None

    def check_device(self, device: torch.device) -> None:
        """A start-up error where no kernel runs MXFP4 weights."""
        from minserve import kernels

        if not kernels.mxfp4_supported(device):
            raise config_error(
                f"MXFP4 experts have no kernel on {device.type} (they run on CUDA with Triton, "
                "or on CPU); serve this checkpoint with --device cuda (Triton installed, "
                "MINSERVE_NO_TRITON unset) or --device cpu, or use a bf16 checkpoint")
