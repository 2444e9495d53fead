"""AWQ checkpoints (AutoAWQ's GEMM version, what `quant_method: awq` means on the hub): 4-bit
weights packed eight to an int32 along the OUTPUT dim in AWQ's interleaved order, zero points
packed the same way, fp16 scales per group. Repacked at load into the int GEMM layout.

    qweight int32 [K, N // 8]     nibble i of word c holds column 8c + AWQ_ORDER[i]
    qzeros  int32 [K // G, N // 8] same packing
    scales  fp16  [K // G, N]     w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]
"""
from __future__ import annotations

from typing import Any

import torch

from minserve.kernels.quant_gemm import IntWeight, pack_int
from minserve.models.quant.base import IntConfig, check_group_size, config_error

# AutoAWQ's WQLinear_GEMM.from_linear packs column order_map[i] into nibble i.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))   # column j -> its nibble


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[R, C // 8] int32 -> [R, C] int32 in natural column order."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed[:, :, None] >> shifts) & 0xF                   # [R, C // 8, 8] by nibble
    order = torch.tensor(AWQ_REVERSE_ORDER, device=packed.device)
    return nibbles.index_select(2, order).reshape(packed.shape[0], -1)


def awq_to_int(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> IntWeight:
    q = unpack_awq(qweight)                                          # [K, N]
    zeros = unpack_awq(qzeros).float()                               # [K // G, N]
    k, n = q.shape
    if scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise config_error(f"AWQ shapes qweight {tuple(qweight.shape)}, qzeros "
                           f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not match "
                           f"group_size {group_size}")
    s = scales.float()
    return IntWeight(pack_int(q, 4), s, -zeros * s, 4, group_size)


class AwqConfig(IntConfig):
    name = "awq"
    param_names = ("qweight", "qzeros", "scales")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> AwqConfig:
        bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise config_error(f"AWQ version {version!r} is not supported (only 'gemm')")
        if bits != 4:
            raise config_error(f"AWQ with {bits} bits is not supported (only 4)")
        if cfg.get("zero_point", True) is False:
            raise config_error("AWQ without zero points (zero_point: false) is not supported")
        group_size = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        check_group_size("AWQ", group_size)
        return cls(bits=bits, group_size=group_size,
                   skip_modules=list(cfg.get("modules_to_not_convert") or []))

    def to_int(self, shard: dict[str, torch.Tensor], in_features: int) -> IntWeight:
        group = in_features if self.group_size == -1 else self.group_size
        return awq_to_int(shard["qweight"], shard["qzeros"], shard["scales"], group)

    def layouts(self, name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        groups = None if self.group_size == -1 else (0, self.group_size, 1)
        return {"qweight": ((1, 8, 1), (0, 1, 1)), "qzeros": ((1, 8, 1), groups),
                "scales": ((1, 1, 1), groups)}.get(name, (None, None))
