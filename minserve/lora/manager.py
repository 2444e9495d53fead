"""Adapter residency: the known adapters (name -> path), an LRU of --max-cpu-loras loaded ones
on the host, and --max-loras device slots that every wrapped linear stacks (LoRASlots). activate()
gives each row of a step its slot, loading what is missing on demand; the scheduler keeps a step
within --max-loras distinct adapters, so a slot is always free or held by an adapter the step
skips. The runner owns the manager and turns the slots into the step's LoRA mapping."""
from __future__ import annotations

import itertools
import re
from collections import OrderedDict

import torch
from torch import nn

from minserve.config import DTYPE_NAMES, LoRAConfig, ModelConfig
from minserve.lora.adapter import FUSED_SLICES, TARGETS, LoRAError, LoRAWeights, load_adapter
from minserve.lora.adapter import slice_shapes as _slice_shapes
from minserve.lora.layers import LoRASlots
from minserve.models.linear import LinearBase

_LAYER = re.compile(r"(?:^|\.)(model\.layers\.\d+\.(?:self_attn|mlp)\.(" +
                    "|".join(FUSED_SLICES) + r"))$")
_FIRST_LEAF = {fused: leaf for leaf, (_, fused, i) in reversed(TARGETS.items()) if i == 0}


class LoRAManager:
    def __init__(self, model: nn.Module, mc: ModelConfig, config: LoRAConfig,
                 device: torch.device, model_dtype: torch.dtype) -> None:
        dtype = (model_dtype if config.lora_dtype == "auto"
                 else getattr(torch, DTYPE_NAMES[config.lora_dtype]))
        self.config, self.model_config, self.dtype = config, mc, dtype
        self.layers: dict[str, LoRASlots] = {}
        for name, module in model.named_modules():
            # the language model's layers only (a vision tower has qkv_proj layers too), keyed
            # as PEFT names them below the base model: model.layers.N.self_attn.qkv_proj
            m = _LAYER.search(name)
            if m is not None and isinstance(module, LinearBase):
                layer = int(m.group(1).split(".")[2])
                full_in = _slice_shapes(mc, _FIRST_LEAF[m.group(2)], layer)[0]
                self.layers[m.group(1)] = LoRASlots(module, full_in, config.max_loras,
                                                    config.max_lora_rank, dtype, device)
        self.paths: dict[str, str] = {}          # served adapters, as named (a hub id, say)
        self.folders: dict[str, str] = {}        # served and retired: where each was read from
        self._loads = itertools.count(1)
        self.load_ids: dict[str, int] = {}       # name -> which add() serves it (prefix root)
        self.retired: dict[str, str] = {}        # unloaded, kept while requests still use them
        self.cpu: OrderedDict[str, LoRAWeights] = OrderedDict()
        self.slots: list[str | None] = [None] * config.max_loras
        # [slot, name, path] per slot (re)filled or emptied (path "") since the last
        # take_slot_loads(): what the other tensor-parallel ranks must load to match this one
        self.slot_loads: list[list] = []
        self._slot_tick = [0] * config.max_loras
        self._tick = 0

    # ---- the served set -------------------------------------------------------------------
    def read(self, name: str, path: str) -> LoRAWeights:
        """Read and check an adapter (LoRAError: refused). Reads only the manager's fixed
        settings, so any thread may call it: the server reads in a worker thread and hands the
        weights to add() on the engine thread."""
        return load_adapter(name, path, self.model_config, self.config.max_lora_rank,
                            self.dtype, self.config.allow_downloads)

    def add(self, name: str, path: str, weights: LoRAWeights | None = None) -> LoRAWeights:
        """Serve an adapter under name: `weights` read already, or read here (LoRAError:
        refused)."""
        if name in self.paths:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        if name in self.retired:
            raise LoRAError(f"The lora adapter '{name}' is being unloaded; requests still use "
                            "it. Try again when they finish.")
        if weights is None:
            weights = self.read(name, path)
        self.paths[name] = path
        self.folders[name] = weights.folder
        self.load_ids[name] = next(self._loads)
        self._cache(weights)
        return weights

    def remove(self, name: str) -> None:
        """Stop serving an adapter; requests already running with it finish (see purge)."""
        if name not in self.paths:
            raise LoRAError(f"The lora adapter '{name}' is not loaded.")
        self.retired[name] = self.paths.pop(name)

    def has(self, name: str) -> bool:
        return name in self.paths

    def load_id(self, name: str) -> int:
        """The identity of the weights served under name now: each add() gets a new one."""
        return self.load_ids[name]

    def purge(self, in_use: set[str | None]) -> None:
        """Drop the retired adapters no request uses any more (slot and host copy)."""
        for name in [n for n in self.retired if n not in in_use]:
            del self.retired[name]
            del self.load_ids[name]
            self.folders.pop(name, None)
            self.cpu.pop(name, None)
            for s, held in enumerate(self.slots):
                if held == name:
                    self.slots[s] = None
                    for layer in self.layers.values():
                        layer.set_slot(s, None)
                    self.slot_loads.append([s, name, ""])

    # ---- residency ------------------------------------------------------------------------
    def _cache(self, weights: LoRAWeights) -> None:
        self.cpu[weights.name] = weights
        self.cpu.move_to_end(weights.name)
        while len(self.cpu) > self.config.max_cpu_loras:
            self.cpu.popitem(last=False)

    def _weights(self, name: str) -> LoRAWeights:
        weights = self.cpu.get(name)
        if weights is None:   # evicted from the host LRU: read it again (a local folder)
            weights = load_adapter(name, self.folders[name], self.model_config,
                                   self.config.max_lora_rank, self.dtype)
        self._cache(weights)
        return weights

    def activate(self, adapter_names: list[str | None]) -> list[int]:
        """Each row's slot (-1: base model), loading into device slots what the step needs."""
        wanted = {n for n in adapter_names if n is not None}
        if len(wanted) > len(self.slots):
            raise RuntimeError(f"a step with {len(wanted)} adapters > --max-loras "
                               f"{len(self.slots)} (the scheduler should prevent it)")
        self._tick += 1
        slot_of: dict[str, int] = {}
        for name in wanted:
            if name in self.slots:
                slot_of[name] = self.slots.index(name)
        for name in sorted(wanted - set(slot_of)):
            free = [s for s in range(len(self.slots)) if self.slots[s] not in wanted]
            s = min(free, key=lambda i: (self.slots[i] is not None, self._slot_tick[i]))
            weights = self._weights(name)
            self._fill(s, weights)
            self.slots[s] = name
            self.slot_loads.append([s, name, self.paths.get(name) or self.retired[name]])
            slot_of[name] = s
        for s in slot_of.values():
            self._slot_tick[s] = self._tick
        return [-1 if n is None else slot_of[n] for n in adapter_names]

    def _fill(self, slot: int, weights: LoRAWeights | None) -> None:
        for layer_name, layer in self.layers.items():
            layer.set_slot(slot, None if weights is None else weights.weights.get(layer_name))

    def take_slot_loads(self) -> list[list]:
        loads, self.slot_loads = self.slot_loads, []
        return loads

    def load_slots(self, loads: list[list]) -> None:
        """A tensor-parallel rank > 0: fill the slots as rank 0 did (its take_slot_loads()),
        reading each adapter from its path (rank 0 checked it when it was added)."""
        for slot, name, path in loads:
            self._fill(slot, None if not path else load_adapter(
                name, path, self.model_config, self.config.max_lora_rank, self.dtype))
            self.slots[slot] = name if path else None
