"""The LoRA delta on a base linear layer, for a batch that mixes adapters: a forward hook adds
lora_expand(lora_shrink(x)) to the layer's output, one shrink for all of a fused layer's slices
(q|k|v stacked along the rank dim) and one expand per slice into its column range. The model's
own code and parameter names do not change. Slots hold this rank's part: B sharded like the
output of a column-parallel layer, A like the input of a row-parallel one (the delta of a row
layer is then a partial sum, reduced with the base output's)."""
from __future__ import annotations

import torch
from torch import nn

from minserve.kernels import LoRAMapping, lora_expand, lora_shrink
from minserve.models.linear import QKVParallelLinear, RowParallelLinear


class LoRAState:
    """The step's token -> slot grouping, shared by every LoRALayer (set by the runner)."""

    def __init__(self) -> None:
        self.mapping: LoRAMapping | None = None


class LoRALayer:
    def __init__(self, base: nn.Module, full_in: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, state: LoRAState) -> None:
        self.base, self.state, self.max_rank = base, state, max_rank
        self.is_row = isinstance(base, RowParallelLinear)
        self.in_local = full_in // base.tp_size if self.is_row else full_in
        self.slice_sizes = list(base.output_sizes)
        n = len(self.slice_sizes)
        self.lora_a = torch.zeros(num_slots, n * max_rank, self.in_local, dtype=dtype,
                                  device=device)                     # [S, n*R, IN]
        self.lora_b = [torch.zeros(num_slots, size, max_rank, dtype=dtype, device=device)
                       for size in self.slice_sizes]                 # n x [S, N_i, R]
        self.handle = base.register_forward_hook(self._hook)

    def _shard_rank(self, index: int) -> tuple[int, int]:
        base = self.base
        if isinstance(base, QKVParallelLinear) and index > 0:
            replicas = base.num_kv_head_replicas
            return base.tp_rank // replicas, base.tp_size // replicas
        return base.tp_rank, base.tp_size

    @torch.inference_mode()
    def set_slot(self, slot: int,
                 slices: list[tuple[torch.Tensor, torch.Tensor] | None] | None) -> None:
        """Slot <- one adapter's (A [r, in], B [out, r]) per slice (None: no delta there)."""
        R = self.max_rank
        self.lora_a[slot].zero_()
        for b in self.lora_b:
            b[slot].zero_()
        for i, ab in enumerate(slices or []):
            if ab is None:
                continue
            a, b = ab
            r = a.shape[0]
            if self.is_row:
                a = a.narrow(1, self.base.tp_rank * self.in_local, self.in_local)
            else:
                rank, num_ranks = self._shard_rank(i)
                size = self.slice_sizes[i]
                assert b.shape[0] == size * num_ranks
                b = b.narrow(0, rank * size, size)
            self.lora_a[slot, i * R:i * R + r].copy_(a)
            self.lora_b[i][slot, :, :r].copy_(b)

    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        m = self.state.mapping
        if m is None:
            return out
        x = args[0]
        R = self.max_rank
        y = torch.empty(x.shape[0], self.lora_a.shape[1], dtype=x.dtype, device=x.device)
        lora_shrink(x, self.lora_a, m, y)
        offset = 0
        for i, (b, size) in enumerate(zip(self.lora_b, self.slice_sizes, strict=True)):
            lora_expand(y[:, i * R:(i + 1) * R], b, m, out[:, offset:offset + size])
            offset += size
        return out
