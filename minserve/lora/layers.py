"""The LoRA delta on a base linear layer, for a batch that mixes adapters: the layer's forward
(models/linear.py, `layer.lora`) calls add_delta on its output before any all-reduce: one
kernels.lora_add over all of a fused layer's slices (A stacked q|k|v along the rank dim, B^T
per slice, each into its column range). The model's parameter names do not change. Slots hold this rank's part: B sharded like the
output of a column-parallel layer, A like the input of a row-parallel one (the delta of a row
layer is then a partial sum, reduced with the base output's)."""
from __future__ import annotations

import torch
from torch import nn

from minserve.kernels import lora_add
from minserve.kernels.lora import LoRAMapping
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
        self.lora_bt = [torch.zeros(num_slots, max_rank, size, dtype=dtype, device=device)
                        for size in self.slice_sizes]                # n x [S, R, N_i]: B^T
        base.lora = self

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
        for bt in self.lora_bt:
            bt[slot].zero_()
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
            self.lora_bt[i][slot, :r].copy_(b.t())

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base layer's [T, N] output, this rank's part) += the step's LoRA deltas."""
        m: LoRAMapping | None = self.state.mapping
        if m is None:
            return out
        lora_add(x, self.lora_a, self.lora_bt, m, out)
        return out
