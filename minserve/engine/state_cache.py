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
import mmap
from collections import OrderedDict
from typing import Any

import torch

from minserve.config import ConfigError
from minserve.pypi import progress

# The state slots may take at most this share of the KV cache budget, the prefix cache's state
# snapshots at most this one (and at most this many per sequence); the rest: K/V blocks.
MAX_STATE_SHARE = 0.5
MAX_SNAPSHOT_SHARE = 0.25
MAX_SNAPSHOTS_PER_SEQ = 4


def state_slot_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """One request's states over every linear-attention layer (0: the model has none)."""
    shapes = getattr(model, "state_cache_shapes", None)
    if shapes is None:
        return 0
    return sum(math.prod(conv) * dtype.itemsize + math.prod(ssm) * 4 for conv, ssm in shapes())


class StateCaches:
    """Per linear-attention layer (conv_states, ssm_states float32), rows:
    [0, S) request slots | S scratch | S+1 ... the prefix cache's snapshots (StateSnapshots)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], num_slots: int) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.num_snapshots = (layers[0][0].shape[0] - num_slots - 1) if layers else 0

    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    def snapshot_row(self, snapshot: int) -> int:
        return self.num_slots + 1 + snapshot

    def reset(self, slots: list[int]) -> None:
        """Zero these slots: fresh rows start from the empty state."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.layers[0][0].device)
        for conv, ssm in self.layers:
            conv.index_fill_(0, idx, 0)
            ssm.index_fill_(0, idx, 0)

    def prepare(self, attn: Any, step: Any) -> None:
        """Before a step runs: the last step's snapshots are taken (step.state_saves: row
        pairs; a slot is saved before anyone reuses it), rows that start a prompt get zeroed
        slots, rows that resume from a prefix-cache hit get their snapshot (state_restores);
        then each row's slot goes into attn (None: the profile run's rows, on the scratch
        slot)."""
        computed = step.num_computed_tokens
        slots = [self.scratch_slot] * len(computed) if step.state_slots is None \
            else step.state_slots
        self.copy(step.state_saves or [])
        self.reset([s for s, c in zip(slots, computed, strict=True) if c == 0])
        self.copy(step.state_restores or [])
        attn.state_slots_host = slots
        attn.state_slots = torch.tensor(slots, dtype=torch.long).to(self.layers[0][0].device,
                                                                     non_blocking=True)

    def copy(self, pairs: list[int]) -> None:
        """pairs: flat (source row, destination row) pairs, copied in every layer."""
        if not pairs:
            return
        device = self.layers[0][0].device
        s, d = (torch.tensor(pairs[i::2], dtype=torch.long, device=device) for i in (0, 1))
        for conv, ssm in self.layers:
            conv.index_copy_(0, d, conv.index_select(0, s))
            ssm.index_copy_(0, d, ssm.index_select(0, s))


def allocate_state_caches(model: torch.nn.Module, num_slots: int, dtype: torch.dtype,
                          device: torch.device, num_snapshots: int = 0) -> StateCaches:
    """num_slots request slots, the scratch one and num_snapshots snapshot rows, for every
    linear layer, handed to the model."""
    rows = num_slots + 1 + num_snapshots

    def zeros(shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        return (lazy_zeros(shape, dt) if device.type == "cpu"
                else torch.zeros(shape, dtype=dt, device=device))
    layers = [(zeros((rows, *conv), dtype), zeros((rows, *ssm), torch.float32))
              for conv, ssm in model.state_cache_shapes()]
    model.set_state_caches(layers)
    return StateCaches(layers, num_slots)


def size_state_caches(model: torch.nn.Module, budget: int, config: Any, dtype: torch.dtype,
                      device: torch.device) -> tuple[StateCaches | None, int]:
    """The state rows a hybrid model needs out of the KV cache budget: a slot per sequence (at
    most MAX_STATE_SHARE of the budget) and, with prefix caching, snapshots (at most
    MAX_SNAPSHOT_SHARE). config None: the scratch slot alone, for the CUDA profile run.
    -> (caches or None, the budget left)."""
    from minserve.models import parallel

    per_slot = state_slot_bytes(model, dtype)
    if per_slot == 0:
        return None, budget
    if config is None:
        return allocate_state_caches(model, 0, dtype, device), budget
    # every rank the same counts: rank 0 hands the row ids out
    num_slots, num_snapshots = (parallel.min_across_ranks(n) for n in (
        min(config.max_num_seqs, int(budget * MAX_STATE_SHARE) // per_slot),
        min(MAX_SNAPSHOTS_PER_SEQ * config.max_num_seqs,
            int(budget * MAX_SNAPSHOT_SHARE) // per_slot) if config.enable_prefix_caching
        else 0))
    if num_slots < 1:
        raise ConfigError(
            f"no room for one request's linear-attention states ({per_slot / 2**20:.1f} MiB) in "
            f"{budget / 2**20:.0f} MiB; raise --kv-cache-memory or --gpu-memory-utilization")
    caches = allocate_state_caches(model, num_slots, dtype, device, num_snapshots)
    progress(f"linear-attention state slots: {num_slots} concurrent requests "
             f"({per_slot / 2**20:.2f} MiB each, {num_slots * per_slot / 2**20:.0f} MiB)"
             + (f"; fewer than --max-num-seqs {config.max_num_seqs}"
                if num_slots < config.max_num_seqs else "")
             + (f"; prefix-cache state snapshots: {num_snapshots} (LRU, "
                f"{num_snapshots * per_slot / 2**20:.0f} MiB)" if config.enable_prefix_caching
                else ""))
    return caches, budget - (num_slots + 1 + num_snapshots) * per_slot


def hybrid_cache_settings(config: Any, runner: Any
                          ) -> tuple[bool, StateSlotPool | None, StateSnapshots | None]:
    """(enable_prefix_caching, state slots, snapshots) for the KVCacheManager. A hybrid model's
    cached K/V blocks are useful only where the linear layers' states were saved too, so its
    prefix cache hits stop at the last snapshot; speculative decoding would need the states
    rolled back past rejected drafts."""
    states = runner.state_caches
    if states is None:
        return config.enable_prefix_caching, None, None
    if getattr(config, "speculative_config", None) is not None:
        raise ConfigError("speculative decoding is not supported yet for hybrid linear-attention "
                          "models (their recurrent states cannot roll back rejected drafts); "
                          "drop --speculative-config")
    snapshots = (StateSnapshots(states.num_snapshots, states.snapshot_row(0))
                 if states.num_snapshots else None)
    return snapshots is not None, StateSlotPool(states.num_slots), snapshots


def plan_states(kv: Any, requests: list[Any], num_scheduled: list[int]
                ) -> tuple[list[int], list[int], list[int]]:
    """A step's (slots, saves, restores) for StepInputs; saves and restores as flat (source
    row, destination row) pairs of StateCaches. A row that resumes from a prefix hit (a fresh
    slot, tokens already computed) restores the snapshot at its first uncomputed token; a row
    whose tokens end on a block boundary is saved there once the step has run: its save goes
    out with the next step (StateCaches.prepare runs it first). Restores are looked up first:
    a save never evicts one of this step's."""
    pool, snaps, bs = kv.state_slots, kv.state_snapshots, kv.block_size
    slots = [pool.slot(r.request_id) for r in requests]
    restores, saves = [], []
    for req, slot in zip(requests, slots, strict=True):
        if pool.take_fresh(req.request_id) and req.num_computed_tokens > 0:
            snap = snaps.lookup(kv.block_key(req, req.num_computed_tokens // bs))
            assert snap is not None, "a hybrid prefix hit ends where a state snapshot is"
            restores += [snaps.row(snap), slot]
    for req, n, slot in zip(requests, num_scheduled, slots, strict=True):
        end = req.num_computed_tokens + n
        if snaps is not None and end % bs == 0:
            saves += [slot, snaps.row(snaps.save(kv.block_key(req, end // bs)))]
    saves, pool.pending_saves = pool.pending_saves, saves
    return slots, saves, restores


class StateSnapshots:
    """The prefix cache's side for linear layers: the states after a block-aligned prefix,
    keyed by that prefix's last block (hash and full key, as the KV blocks), least recently
    used evicted first. Pure Python: ids only; StateCaches holds snapshot i at row(i)."""

    def __init__(self, capacity: int, first_row: int = 0) -> None:
        self.capacity = capacity
        self.first_row = first_row
        self._ids: OrderedDict[Any, int] = OrderedDict()

    def row(self, snapshot: int) -> int:
        return self.first_row + snapshot

    def lookup(self, key: Any) -> int | None:
        snap = self._ids.get(key)
        if snap is not None:
            self._ids.move_to_end(key)
        return snap

    def save(self, key: Any) -> int:
        """The id to save key's state into: its own if present, else a free or the least
        recently used one (whose key is dropped)."""
        snap = self.lookup(key)
        if snap is None:
            snap = len(self._ids) if len(self._ids) < self.capacity \
                else self._ids.popitem(last=False)[1]
            self._ids[key] = snap
        return snap


class StateSlotPool:
    """Which slot each running request holds; pure Python."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))    # pop() hands out slot 0 first
        self._owner: dict[str, int] = {}
        self._fresh: set[str] = set()     # slots handed out and not yet in a step
        self.pending_saves: list[int] = []   # the last step's snapshots (plan_states)

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
            self._fresh.add(request_id)
        return slot

    def take_fresh(self, request_id: str) -> bool:
        """Whether the request's slot is new since its last step (and no longer, after)."""
        if request_id in self._fresh:
            self._fresh.discard(request_id)
            return True
        return False

    def free(self, request_id: str) -> None:
        self._fresh.discard(request_id)
        slot = self._owner.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages are committed on first write: a fresh anonymous mapping
    reads as zeros (POSIX), where torch.zeros would write, and so commit, every page at once.
    Huge pages are declined, so a block's first write commits its own 4 KiB pages, not 2 MiB."""
    nbytes = max(math.prod(shape) * dtype.itemsize, 1)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    # torch.frombuffer keeps the mapping alive as long as the tensor (and its views) live
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
