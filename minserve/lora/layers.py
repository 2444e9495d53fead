"""The LoRA slots of one base linear layer: every device slot's A (q|k|v stacked along the rank
dim) and B^T per slice, as kernels.lora_add reads them. The layer's forward (models/linear.py)
adds the delta for the step's LoRA mapping, which the runner passes down with the model inputs;
the model's parameter names do not change. Slots hold this rank's part: B sharded like the
output of a column-parallel layer, A like the input of a row-parallel one (the delta of a row
layer is then a partial sum, reduced with the base output's)."""
from __future__ import annotations

import torch
from torch import nn

from minserve.models.linear import QKVParallelLinear, RowParallelLinear


class LoRASlots:
    def __init__(self, base: nn.Module, full_in: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.base, self.max_rank = base, max_rank
        self.is_row = isinstance(base, RowParallelLinear)
        self.in_local = full_in // base.tp_size if self.is_row else full_in
        self.slice_sizes = list(base.output_sizes)
        n = len(self.slice_sizes)
        self.lora_a = torch.zeros(num_slots, n * max_rank, self.in_local, dtype=dtype,
                                  device=device)                     # [S, n*R, IN]
        self.lora_bt = [torch.zeros(num_slots, max_rank, size, dtype=dtype, device=device)
                        for size in self.slice_sizes]                # n x [S, R, N_i]: B^T
        base.lora_slots = self

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
