"""Per-phase step timers for the benchmarks: wraps the engine's step pieces (scheduler, batch
building, matmuls, attention, norms, lm_head, sampler, logits processors, host sync, detokenize)
and adds up each one's *self* time (nested timed calls subtracted), both wall and CPU. CPU time is
this thread's (time.thread_time), so on a machine shared with other jobs it shows what the work
costs, while wall time shows what waiting for a core adds. With more than one torch thread the
intra-op threads' CPU is not in it (the wall column still is).

    timers = PhaseTimers(); timers.install(llm.engine); ...; print(timers.table(num_steps))

A benchmark aid, never imported by minserve itself: install() patches classes in place for the
life of the process.
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Any


class PhaseTimers:
    def __init__(self) -> None:
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._children: list[list[float]] = []   # per open call: [wall, cpu] of timed children

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.calls.clear()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        orig = getattr(owner, attr)
        if getattr(orig, "_phase", None):
            return                       # already wrapped (the same function in two places)
        timers = self

        @functools.wraps(orig)
        def timed(*args: Any, **kwargs: Any) -> Any:
            timers._children.append([0.0, 0.0])
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return orig(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w0, time.thread_time() - c0
                child_w, child_c = timers._children.pop()
                timers.wall[name] += dw - child_w
                timers.cpu[name] += dc - child_c
                timers.calls[name] += 1
                if timers._children:
                    timers._children[-1][0] += dw
                    timers._children[-1][1] += dc

        timed._phase = name
        setattr(owner, attr, timed)

    def install(self, engine: Any) -> None:
        """Patch the step pieces; `engine` names the model class whose lm_head is timed."""
        import torch.nn as nn

        import minserve.engine.engine as engine_mod
        import minserve.engine.runner as runner
        import minserve.engine.sampler as sampler
        import minserve.engine.scheduler as scheduler
        import minserve.kernels as kernels
        import minserve.output as output
        import minserve.models.layers as layers

        self.wrap(engine_mod.Engine, "step", "engine step (rest)")
        self.wrap(scheduler.Scheduler, "schedule", "schedule")
        self.wrap(scheduler.Scheduler, "update", "scheduler update")
        self.wrap(runner.ModelRunner, "execute", "batch build (runner rest)")
        self.wrap(nn.Module, "__call__", "model (other ops)")
        self.wrap(nn.Linear, "forward", "matmuls")
        try:
            from minserve.models import linear
        except ImportError:     # before models/linear.py
            pass
        else:
            for cls in vars(linear).values():
                if isinstance(cls, type) and issubclass(cls, linear.LinearBase) \
                        and "forward" in vars(cls):
                    self.wrap(cls, "forward", "matmuls")
        self.wrap(type(engine.runner.model), "compute_logits", "lm_head")
        self.wrap(kernels, "paged_attention", "attention")
        self.wrap(kernels, "store_kv", "store_kv")
        self.wrap(layers.RMSNorm, "forward", "rmsnorm")
        self.wrap(layers.RotaryEmbedding, "forward", "rotary")
        for mod in _modules_with("apply_rotary"):
            self.wrap(mod, "apply_rotary", "rotary")
        self.wrap(layers.SiluAndMul, "forward", "silu_and_mul")
        self.wrap(sampler.SamplingTensors, "from_requests", "sampling tensors (host)")
        self.wrap(runner, "sample", "sampler")
        for fn in ("apply_penalties", "apply_bitmask", "apply_top_k_top_p"):
            self.wrap(sampler, fn, "logits processors")
        self.wrap(runner, "_to_host", "host sync")
        self.wrap(output.SampleState, "update", "detokenize + stop strings")

    def table(self, num_steps: int) -> str:
        """Per-step self times, largest wall first."""
        lines = [f"{'phase (per step)':<28}{'wall ms':>10}{'cpu ms':>10}{'calls':>8}"]
        for name in sorted(self.wall, key=lambda n: -self.wall[n]):
            lines.append(f"{name:<28}{self.wall[name] / num_steps * 1e3:>10.2f}"
                         f"{self.cpu[name] / num_steps * 1e3:>10.2f}"
                         f"{self.calls[name] / num_steps:>8.1f}")
        lines.append(f"{'total timed':<28}{sum(self.wall.values()) / num_steps * 1e3:>10.2f}"
                     f"{sum(self.cpu.values()) / num_steps * 1e3:>10.2f}")
        return "\n".join(lines)

    def as_dict(self, num_steps: int) -> dict[str, dict[str, float]]:
        return {name: {"wall_ms": round(self.wall[name] / num_steps * 1e3, 3),
                       "cpu_ms": round(self.cpu[name] / num_steps * 1e3, 3)}
                for name in self.wall}


def _modules_with(attr: str) -> list[Any]:
    import sys

    return [m for name, m in list(sys.modules.items())
            if name.startswith("minserve.models") and hasattr(m, attr)]
