"""GGUF (llama.cpp) weights served from their quantized blocks: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and
Q6_K rows repack losslessly into the int GEMM layout (values, per-group scale and offset):

    type   block  layout per block (bytes)                      -> bits  group  w = q*s + b
    Q4_0   32     d f16 | 16 nibbles-pairs (j, j+16)                4     32    s=d, b=-8d
    Q4_1   32     d f16 | m f16 | 16 nibble-pairs                   4     32    s=d, b=m
    Q8_0   32     d f16 | 32 int8                                   8     32    s=d, b=-128d
    Q4_K   256    d, dmin f16 | 12 B 6-bit (sc, m) x 8 | 128 B      4     32    s=d*sc, b=-dmin*m
    Q5_K   256    as Q4_K + 32 B high bits                          8     32    s=d*sc, b=-dmin*m
    Q6_K   256    128 B low nibbles | 64 B 2-bit highs | 16 int8 sc | d f16
                                                                    8     16    s=d*sc, b=-32s

The bit order follows gguf-py's dequantize_blocks (gguf/quants.py, the llama.cpp reference);
tests check every type against it. Scales and offsets are kept in fp32 for the K-quants, where
d*sc needs more mantissa than fp16 has, and in fp16 (exact) for the 32-blocks."""
from __future__ import annotations

from typing import Any

import torch

from minserve.kernels.quant_gemm import IntWeight, pack_int
from minserve.models.quant.base import IntConfig, config_error

# ggml type ids (gguf.GGMLQuantizationType) -> (name, values per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def ggml_type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32 (little-endian fp16)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., B] uint8 -> [..., 2, B]: low nibbles, then high nibbles."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> (sc, m) [blocks, 8], 6 bits each (gguf Q4_K.get_scale_min)."""
    d, m, m_d = scales.view(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def decode_blocks(blocks: torch.Tensor, type_name: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """[num_blocks, block_bytes] uint8 -> (q [num_blocks, values] int, s, b [num_blocks,
    groups] float32, bits, group_size) with value = q * s[group] + b[group]."""
    n = blocks.shape[0]
    if type_name in ("Q4_0", "Q4_1"):
        d = _f16(blocks[:, 0:2])
        if type_name == "Q4_0":
            qs, b = blocks[:, 2:], -8 * d
        else:
            qs, b = blocks[:, 4:], _f16(blocks[:, 2:4])
        q = _nibbles(qs).reshape(n, 32)
        return q, d[:, None], b[:, None], 4, 32
    if type_name == "Q8_0":
        d = _f16(blocks[:, 0:2])
        q = blocks[:, 2:].view(torch.int8).to(torch.int16) + 128
        return q, d[:, None], (-128 * d)[:, None], 8, 32
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if type_name == "Q4_K":
            q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 256)
        else:
            qh = blocks[:, 16:48]                                            # [n, 32]
            ql = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
            shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
            high = (qh[:, None, :] >> shifts) & 1                            # [n, 8, 32]
            q = (ql | (high << 4)).reshape(n, 256)
        return q, d[:, None] * sc, -(dmin[:, None] * mn), 4 if type_name == "Q4_K" else 8, 32
    if type_name == "Q6_K":
        ql = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        qh = ((qh >> shifts) & 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).reshape(n, 256)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()       # [n, 16]
        s = _f16(blocks[:, 208:210])[:, None] * sc
        return q, s, -32 * s, 8, 16
    raise config_error(f"GGUF tensor type {type_name} cannot be served quantized (supported: "
                       f"{', '.join(QUANTIZED_TYPES)}, F16, BF16, F32); pass --gguf-dequantize "
                       "to dequantize it at load")


def gguf_to_int(raw: torch.Tensor, type_id: int, in_features: int) -> IntWeight | torch.Tensor:
    """One GGUF weight, rows as stored ([N, K / block * block_bytes] uint8), -> an IntWeight
    of [N, K], or a dense tensor for F16/BF16/F32."""
    name = ggml_type_name(type_id)
    if type_id not in GGML_TYPES:
        decode_blocks(raw[:0], name)   # raises the unsupported-type error
    name, block, block_bytes = GGML_TYPES[type_id]
    rows = raw.shape[0]
    if name in DENSE_TYPES:
        return raw.contiguous().view(DENSE_TYPES[name]).reshape(rows, in_features).float()
    if in_features % block or raw.shape[1] != in_features // block * block_bytes:
        raise config_error(f"GGUF {name} tensor of {tuple(raw.shape)} bytes does not hold rows "
                           f"of {in_features} values")
    q, s, b, bits, group = decode_blocks(raw.reshape(-1, block_bytes), name)
    # [rows * K/block, values] -> [K, N] (values along K), scales [K / group, N]
    q = q.reshape(rows, in_features).t()
    s = s.reshape(rows, in_features // group).t().contiguous()
    b = b.reshape(rows, in_features // group).t().contiguous()
    if name in ("Q4_0", "Q4_1", "Q8_0"):
        s, b = s.half(), b.half()          # exact: d and m are fp16, -8d and -128d too
    return IntWeight(pack_int(q, bits), s, b, bits, group)


class GgufConfig(IntConfig):
    name = "gguf"
    param_names = ("weight", "weight_type")

    def __init__(self, type_names: list[str] | None = None, **kwargs: object) -> None:
        super().__init__(bits=0, group_size=0, **kwargs)
        self.type_names = sorted(set(type_names or []))

    def describe(self) -> str:
        return f"gguf ({', '.join(self.type_names)}; served from the quantized blocks)"

    def to_int(self, shard: dict[str, torch.Tensor], in_features: int) -> IntWeight | torch.Tensor:
        return gguf_to_int(shard["weight"], int(shard["weight_type"].item()), in_features)

    def layouts(self, name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        """Rows are output features; along K, a rank takes whole blocks of bytes."""
        if name != "weight":
            return None, None
        type_id = int(shard["weight_type"].item())
        if type_id not in GGML_TYPES:
            decode_blocks(tensor[:0], ggml_type_name(type_id))   # the unsupported-type error
        _, block, block_bytes = GGML_TYPES[type_id]
        return (0, 1, 1), (1, block, block_bytes)
