"""GGUF (llama.cpp) weights served from their quantized blocks: each linear's rows stay as the
file stores them (kernels/gguf_blocks.py: the types, the layout and the reference decoder);
the dispatch runs them natively on CPU or repacks them for other devices. F16/BF16/F32 rows
load dense; other types fail at start-up naming --gguf-dequantize."""
from __future__ import annotations

from typing import Any

import torch

from minserve.kernels.gguf_blocks import GGML_TYPES, QUANTIZED_TYPES, GgufBlockWeight
from minserve.models.quant.base import IntConfig, config_error

__all__ = ["GGML_TYPES", "QUANTIZED_TYPES", "GgufConfig", "gguf_to_int"]
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def ggml_type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _unsupported(type_id: int) -> Exception:
    return config_error(f"GGUF tensor type {ggml_type_name(type_id)} cannot be served quantized "
                        f"(supported: {', '.join(QUANTIZED_TYPES)}, F16, BF16, F32); pass "
                        "--gguf-dequantize to dequantize it at load")


def gguf_to_int(raw: torch.Tensor, type_id: int, in_features: int
                ) -> GgufBlockWeight | torch.Tensor:
    """One GGUF weight, rows as stored ([N, K / block * block_bytes] uint8), -> its blocks
    (GgufBlockWeight of [N, K]), or a dense tensor for F16/BF16/F32."""
    if type_id not in GGML_TYPES:
        raise _unsupported(type_id)
    name, block, block_bytes = GGML_TYPES[type_id]
    rows = raw.shape[0]
    if name in DENSE_TYPES:
        return raw.contiguous().view(DENSE_TYPES[name]).reshape(rows, in_features).float()
    if in_features % block or raw.shape[1] != in_features // block * block_bytes:
        raise config_error(f"GGUF {name} tensor of {tuple(raw.shape)} bytes does not hold rows "
                           f"of {in_features} values")
    return GgufBlockWeight(raw.contiguous(), name, in_features)


class GgufConfig(IntConfig):
    name = "gguf"
    param_names = ("weight", "weight_type")

    def __init__(self, type_names: list[str] | None = None, **kwargs: object) -> None:
        super().__init__(bits=0, group_size=0, **kwargs)
        self.type_names = sorted(set(type_names or []))

    def describe(self) -> str:
        return f"gguf ({', '.join(self.type_names)}; served from the quantized blocks)"

    def to_int(self, shard: dict[str, torch.Tensor], in_features: int
               ) -> GgufBlockWeight | torch.Tensor:
        return gguf_to_int(shard["weight"], int(shard["weight_type"].item()), in_features)

    def layouts(self, name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        """Rows are output features; along K, a rank takes whole blocks of bytes."""
        if name != "weight":
            return None, None
        type_id = int(shard["weight_type"].item())
        if type_id not in GGML_TYPES:
            raise _unsupported(type_id)
        _, block, block_bytes = GGML_TYPES[type_id]
        return (0, 1, 1), (1, block, block_bytes)
