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
from typing import Any

import torch

from minserve.config import ConfigError
from minserve.pypi import progress

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

    def prepare(self, attn: Any, slots: list[int] | None, computed: list[int]) -> None:
        """Hand a step's rows their slots (None: the profile run's rows, all on the scratch slot)
        and zero the slots of rows that start a prompt."""
        slots = [self.scratch_slot] * len(computed) if slots is None else slots
        self.reset([s for s, c in zip(slots, computed, strict=True) if c == 0])
        attn.state_slots_host = slots
        attn.state_slots = torch.tensor(slots, dtype=torch.long).to(self.layers[0][0].device,
                                                                     non_blocking=True)

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


def size_state_caches(model: torch.nn.Module, budget: int, max_num_seqs: int,
                      dtype: torch.dtype, device: torch.device) -> tuple[StateCaches | None, int]:
    """The state slots a hybrid model's requests need out of the KV cache budget: one per
    sequence, at most MAX_STATE_SHARE of the budget (max_num_seqs 0: the scratch slot alone,
    for the CUDA profile run). -> (caches or None, the budget left)."""
    from minserve.models import parallel

    per_slot = state_slot_bytes(model, dtype)
    if per_slot == 0:
        return None, budget
    if max_num_seqs == 0:
        return allocate_state_caches(model, 0, dtype, device), budget
    # every rank the same count: rank 0 hands the slot ids out
    num_slots = parallel.min_across_ranks(min(max_num_seqs,
                                              int(budget * MAX_STATE_SHARE) // per_slot))
    if num_slots < 1:
        raise ConfigError(
            f"no room for one request's linear-attention states ({per_slot / 2**20:.1f} MiB) in "
            f"{budget / 2**20:.0f} MiB; raise --kv-cache-memory or --gpu-memory-utilization")
    caches = allocate_state_caches(model, num_slots, dtype, device)
    progress(f"linear-attention state slots: {num_slots} concurrent requests "
         f"({per_slot / 2**20:.2f} MiB each, {num_slots * per_slot / 2**20:.0f} MiB)"
         + (f"; fewer than --max-num-seqs {max_num_seqs}" if num_slots < max_num_seqs else ""))
    return caches, budget - (num_slots + 1) * per_slot


def hybrid_cache_settings(config: Any, runner: Any) -> tuple[bool, StateSlotPool | None]:
    """(enable_prefix_caching, state slots) for the KVCacheManager. A hybrid model's cached K/V
    blocks are useless without the linear layers' states at that point, so prefix caching is
    off for it; speculative decoding would need the states rolled back past rejected drafts."""
    states = runner.state_caches
    if states is None:
        return config.enable_prefix_caching, None
    if getattr(config, "speculative_config", None) is not None:
        raise ConfigError("speculative decoding is not supported yet for hybrid linear-attention "
                          "models (their recurrent states cannot roll back rejected drafts); "
                          "drop --speculative-config")
    if config.enable_prefix_caching:
        progress("prefix caching is off: hybrid linear-attention model (no state snapshots yet)")
    return False, StateSlotPool(states.num_slots)


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
