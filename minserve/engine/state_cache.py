"""The state cache of hybrid models' linear-attention layers (Gated DeltaNet: models/qwen3_next.py).
Such a layer keeps no per-token K/V: each running request owns one fixed-size slot holding, per
linear layer, a conv state [C, K-1] (model dtype) and a recurrent state [Hv, Dk, Dv] (float32).

    slots:     0    1    2   ...  S-1 | S (scratch: the profile run's rows, never a request's)
    request:   r7   --   r2       r9

StateSlotPool (pure Python) hands slots to requests beside their KV blocks (KVCacheManager asks
it in allocate_slots and gives the slot back in free: finish, abort and preemption alike, so a
preempted request recomputes from a fresh slot). StateCaches owns the tensors: a fresh row's slot
is zeroed before its first chunk (ModelRunner.prepare_inputs). Slots are sized with the KV cache
(ModelRunner._allocate_kv_cache): the start-up log says how many concurrent requests they allow."""
from __future__ import annotations

import math

import torch

# The state slots may take at most this share of the KV cache budget (the rest: K/V blocks).
MAX_STATE_SHARE = 0.5


def state_slot_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """One request's states over every linear-attention layer (0: the model has none)."""
    shapes = getattr(model, "state_cache_shapes", None)
    if shapes is None:
        return 0
    return sum(math.prod(conv) * dtype.itemsize + math.prod(ssm) * 4 for conv, ssm in shapes())


class StateCaches:
    """Per linear-attention layer (conv_states [S+1, ...], ssm_states [S+1, ...] float32); the
    last slot is scratch."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers
        self.num_slots = layers[0][0].shape[0] - 1 if layers else 0

    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    def reset(self, slots: list[int]) -> None:
        """Zero these slots: fresh rows start from the empty state."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.layers[0][0].device)
        for conv, ssm in self.layers:
            conv.index_fill_(0, idx, 0)
            ssm.index_fill_(0, idx, 0)

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Copy slot src[i] into dst[i] in every layer (a fork's states)."""
        if not src:
            return
        device = self.layers[0][0].device
        s, d = (torch.tensor(x, dtype=torch.long, device=device) for x in (src, dst))
        for conv, ssm in self.layers:
            conv.index_copy_(0, d, conv.index_select(0, s))
            ssm.index_copy_(0, d, ssm.index_select(0, s))


def allocate_state_caches(model: torch.nn.Module, num_slots: int, dtype: torch.dtype,
                          device: torch.device) -> StateCaches:
    """num_slots request slots plus the scratch one, for every linear layer, handed to the model."""
    layers = [(torch.zeros((num_slots + 1, *conv), dtype=dtype, device=device),
               torch.zeros((num_slots + 1, *ssm), dtype=torch.float32, device=device))
              for conv, ssm in model.state_cache_shapes()]
    model.set_state_caches(layers)
    return StateCaches(layers)


class StateSlotPool:
    """Which slot each running request holds; pure Python."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))    # pop() hands out slot 0 first
        self._owner: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def slot(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def allocate(self, request_id: str) -> int | None:
        """The request's slot, a fresh one if it has none; None when none is free."""
        slot = self._owner.get(request_id)
        if slot is None and self._free:
            slot = self._owner[request_id] = self._free.pop()
        return slot

    def free(self, request_id: str) -> None:
        slot = self._owner.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
