"""Sleep mode's weights, as vLLM spells it: level 1 moves a model's weights to host memory (on a
CPU they are host memory already, so they stay), level 2 drops them and wake_up reloads them from
the checkpoint. The KV cache is the runner's (free_kv_cache / restore_kv_cache); the Engine
drives both (Engine.sleep, Engine.wake_up). Tensors are swapped in place (`.data`), so every
module, tied weight and LoRA slot that refers to a weight keeps referring to it."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

LEVELS = (1, 2)


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer once (a tied weight is one tensor under two names)."""
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


class ParkedWeights:
    """A sleeping model's weights: level 1 holds their host copies, level 2 nothing."""

    def __init__(self, model: nn.Module, level: int) -> None:
        if level not in LEVELS:
            raise ValueError(f"sleep level must be 1 or 2, not {level!r}")
        self.level = level
        self.host: dict[str, torch.Tensor] = {}
        for name, t in _tensors(model):
            if level == 1 and t.device.type == "cpu":
                continue      # host memory already: nothing to free, nothing to move
            if level == 1:
                self.host[name] = t.data.to("cpu")
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def restore(self, model: nn.Module, reload: Callable[[], nn.Module]) -> None:
        """The weights back on their device: level 1 from the host copies, level 2 from a fresh
        build of the checkpoint (`reload`), matched by name."""
        fresh = dict(_tensors(reload())) if self.level == 2 else {}
        for name, t in _tensors(model):
            if self.level == 1:
                if name in self.host:
                    t.data = self.host.pop(name).to(t.device)
                continue
            if name not in fresh:
                raise RuntimeError(f"waking up: the reloaded model has no tensor {name!r}")
            t.data = fresh.pop(name).data
