"""GGUF (llama.cpp) weights kept in their quantized blocks, rows as stored in the file, and
the plain-torch reference for them: decode_blocks gives each block's values as q * s + b, which
is also the lossless repack into the int GEMM layout (to_int_weight) for devices without the
native block kernel (kernels/cpu_gguf.c; the dispatch picks).

    type   block  layout per block (bytes)                      -> bits  group  w = q*s + b
    Q4_0   32     d f16 | 16 nibble-pairs (j, j+16)                 4     32    s=d, b=-8d
    Q4_1   32     d f16 | m f16 | 16 nibble-pairs                   4     32    s=d, b=m
    Q5_0   32     d f16 | 4 B high bits | 16 nibble-pairs           8     32    s=d, b=-16d
    Q5_1   32     d f16 | m f16 | 4 B high bits | 16 nibble-pairs   8     32    s=d, b=m
    Q8_0   32     d f16 | 32 int8                                   8     32    s=d, b=-128d
    Q4_K   256    d, dmin f16 | 12 B 6-bit (sc, m) x 8 | 128 B      4     32    s=d*sc, b=-dmin*m
    Q5_K   256    as Q4_K + 32 B high bits                          8     32    s=d*sc, b=-dmin*m
    Q6_K   256    128 B low nibbles | 64 B 2-bit highs | 16 int8 sc | d f16
                                                                    8     16    s=d*sc, b=-32s

The bit order follows gguf-py's dequantize_blocks (gguf/quants.py, the llama.cpp reference);
tests check every type against it. Scales and offsets are fp32 for the K-quants, where d*sc
needs more mantissa than fp16 has, and fp16 (exact) for the 32-blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minserve.kernels.quant_gemm import IntWeight, pack_int

# ggml type ids (gguf.GGMLQuantizationType) -> (name, values per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}


@dataclass(slots=True)
class GgufBlockWeight:
    """A GGUF weight [N, K] as its file's rows of blocks: blocks uint8 [N, K / block * bytes]."""
    blocks: torch.Tensor
    type_name: str
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def type_id(self) -> int:
        return TYPE_IDS[self.type_name]

    def nbytes(self) -> int:
        return self.blocks.numel()


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


def _small_blocks(blocks: torch.Tensor, type_name: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)."""
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    if type_name == "Q8_0":
        q = blocks[:, 2:].view(torch.int8).to(torch.int16) + 128
        return q, d[:, None], (-128 * d)[:, None], 8, 32
    has_min = type_name in ("Q4_1", "Q5_1")
    b = _f16(blocks[:, 2:4]) if has_min else (-16 if type_name == "Q5_0" else -8) * d
    at = 4 if has_min else 2
    if type_name in ("Q4_0", "Q4_1"):
        return _nibbles(blocks[:, at:]).reshape(n, 32), d[:, None], b[:, None], 4, 32
    qh = blocks[:, at:at + 4].to(torch.int64)
    qh = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24               # [n]
    high = (qh[:, None] >> torch.arange(32, device=qh.device)) & 1               # value i: bit i
    q = _nibbles(blocks[:, at + 4:]).reshape(n, 32).to(torch.int64) | (high << 4)
    return q, d[:, None], b[:, None], 8, 32


def decode_blocks(blocks: torch.Tensor, type_name: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """[num_blocks, block_bytes] uint8 -> (q [num_blocks, values] int, s, b [num_blocks,
    groups] float32, bits, group_size) with value = q * s[group] + b[group]. Raises ValueError
    for a type it does not know."""
    n = blocks.shape[0]
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return _small_blocks(blocks, type_name)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if type_name == "Q4_K":
            q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 256)
        else:
            qh = blocks[:, 16:48]                                            # [n, 32]
            ql = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
            shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 8, 1)
            high = (qh[:, None, :] >> shifts) & 1                            # [n, 8, 32]
            q = (ql | (high << 4)).reshape(n, 256)
        return q, d[:, None] * sc, -(dmin[:, None] * mn), 4 if type_name == "Q4_K" else 8, 32
    if type_name == "Q6_K":
        ql = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qh.device)
        shifts = shifts.view(1, 1, 4, 1)
        qh = ((qh >> shifts) & 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).reshape(n, 256)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()       # [n, 16]
        s = _f16(blocks[:, 208:210])[:, None] * sc
        return q, s, -32 * s, 8, 16
    raise ValueError(f"no block decoder for GGUF type {type_name}")


def to_int_weight(w: GgufBlockWeight) -> IntWeight:
    """The lossless repack into the int GEMM layout ([K / P, N] words, scales [K / G, N])."""
    name, rows, k = w.type_name, w.out_features, w.in_features
    _, _, block_bytes = GGML_TYPES[w.type_id]
    q, s, b, bits, group = decode_blocks(w.blocks.reshape(-1, block_bytes), name)
    q = q.reshape(rows, k).t()
    s = s.reshape(rows, k // group).t().contiguous()
    b = b.reshape(rows, k // group).t().contiguous()
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        s, b = s.half(), b.half()          # exact: d and m are fp16, -8d, -16d and -128d too
    return IntWeight(pack_int(q, bits), s, b, bits, group)


def dequantize_ref(w: GgufBlockWeight) -> torch.Tensor:
    """[N, K] float32, the plain-torch reference of the native block kernel."""
    _, _, block_bytes = GGML_TYPES[w.type_id]
    q, s, b, _, group = decode_blocks(w.blocks.reshape(-1, block_bytes), w.type_name)
    n = q.shape[0]
    q = q.view(n, -1, group).float()
    return torch.addcmul(b[:, :, None], q, s[:, :, None]).reshape(w.out_features, w.in_features)


def block_gemm_ref(x: torch.Tensor, w: GgufBlockWeight,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.nn.functional.linear(x.float(), dequantize_ref(w)).to(x.dtype)
    return out if bias is None else out + bias
