"""The model pool: many chat models behind one endpoint, loaded on demand (Ollama's and
llama-server's router mode). Each model is its own AsyncEngine (its own engine thread, built by
the one builder) and Serving; lease(name) hands a request the model's Serving once it is loaded,
loading it first (in its engine thread: models already loaded keep serving) and making room by
evicting the least recently used idle model: parked with sleep mode (level 1, weights to host
memory) on a GPU when --enable-sleep-mode is on and host memory allows, unloaded otherwise. A
model with requests in flight is never evicted; a request whose model is not serving within
--model-wait-timeout (no room, or its load or wake-up still under way) gets a 503 with
Retry-After, and the load goes on. No torch here: the engines own it."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from minserve.engine import heap
from minserve.engine.async_engine import AsyncEngine, EngineError
from minserve.http import OpenAIError, model_not_found
from minserve.models_dir import PoolSpec, host_available_bytes
from minserve.serving import Serving

logger = logging.getLogger("minserve.pool")
RETRY_AFTER_S = 5   # what a 503 for "no room" or "still loading" tells the client to wait


@dataclass
class PooledModel:
    """One servable model of the pool and its state: unloaded -> loading -> loaded (-> sleeping,
    parked) -> unloading -> unloaded; failed when it did not load (kept, with its error)."""
    name: str
    config: Any                      # its EngineConfig
    size_bytes: int                  # what it is counted as against --models-memory
    task: str = "generate"           # "embed": an EmbeddingService (embeddings, score, rerank)
    status: str = "unloaded"
    error: str | None = None
    engine: Any = None               # its AsyncEngine, or EmbeddingService ("embed")
    serving: Serving | None = None
    users: int = 0                   # requests holding a lease
    last_used: float = 0.0
    loads: int = 0
    unloads: int = 0
    load_seconds: list[float] = field(default_factory=list)

    @property
    def resident(self) -> bool:
        """Holds (or is about to hold) device memory."""
        return self.status in ("loading", "loaded", "unloading")

    def card(self) -> dict[str, Any]:
        """Extra fields of its /v1/models card."""
        card: dict[str, Any] = {"status": self.status, "in_flight": self.users}
        if self.error:
            card["error"] = self.error
        return card


class ModelPool:
    def __init__(self, spec: PoolSpec, server_cfg: Any, metrics: Any,
                 engine_factory: Callable[[Any], Any] | None = None) -> None:
        self.spec, self.server_cfg, self.metrics = spec, server_cfg, metrics
        self.models = {m.name: PooledModel(m.name, m.config, m.size_bytes, m.task)
                       for m in spec.models}
        self._factory = engine_factory
        self._changed = asyncio.Event()    # some model changed state or was released
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        # LoRA adapters stay per base model: an adapter's name leases its base model
        self.adapters = {module.name: m.name for m in spec.models
                         if m.config.lora is not None for module in m.config.lora.lora_modules}
        metrics.registry.register(_PoolCollector(self))

    # ---- lifecycle (App's lifespan) ----
    def start(self) -> None:
        if self.spec.keep_alive_s is not None:
            self._reaper = asyncio.create_task(self._reap_idle())

    async def shutdown(self, grace_s: float) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        for m in self.models.values():
            if m.engine is not None:
                await m.engine.shutdown(grace_s)
                self._drop(m)

    # ---- what the routes see ----
    def names(self, task: str) -> list[str]:
        return [m.name for m in self.models.values() if m.task == task]

    def has(self, name: Any) -> bool:
        return isinstance(name, str) and (name in self.models or name in self.adapters)

    @property
    def is_healthy(self) -> bool:
        """Serving: at least one model has not failed (/health)."""
        return not self.models or any(m.status != "failed" for m in self.models.values())

    @contextlib.asynccontextmanager
    async def lease(self, name: str, task: str = "generate") -> AsyncIterator[Any]:
        """The model, loaded and held against eviction for the block: its Serving (task
        "generate"), or its EmbeddingService ("embed": embeddings, score, rerank)."""
        if not self.has(name):     # a server of pooled models alone
            if not isinstance(name, str):
                raise OpenAIError(400, "`model` is required: name one of "
                                  f"{', '.join(self.names(task))}", param="model")
            raise model_not_found(name, [*self.models, *self.adapters])
        m = self.models[self.adapters.get(name, name)]
        if m.task != task:
            what = "an embedding" if m.task == "embed" else "a chat"
            raise OpenAIError(400, f"`{name}` is {what} model and does not answer this route: "
                              f"use one of {', '.join(self.names(task)) or 'none'}",
                              param="model")
        m = await self._acquire(m)
        try:
            yield m.serving if task == "generate" else m.engine
        finally:
            m.users -= 1
            m.last_used = time.monotonic()
            self._notify()

    async def load(self, name: str) -> PooledModel:
        """POST /v1/models/{id}/load: load it now (making room as a request would)."""
        m = self.models[name]
        if m.status == "failed":
            m.status, m.error = "unloaded", None     # an operator's retry
        m = await self._acquire(m)
        m.users -= 1
        m.last_used = time.monotonic()
        self._notify()
        return m

    async def unload(self, name: str) -> PooledModel:
        """POST /v1/models/{id}/unload: a 409 while requests hold it."""
        m = self.models[name]
        while m.status in ("loading", "unloading"):
            await self._wait_change(None)
        if m.users:
            raise OpenAIError(409, f"model `{name}` has {m.users} request(s) in flight; "
                              "retry when they finish", param="model")
        if m.engine is not None:
            await self._unload(m)
        return m

    # ---- acquiring: load on demand, evict LRU idle models ----
    async def _acquire(self, m: PooledModel) -> PooledModel:
        deadline = time.monotonic() + self.spec.wait_timeout_s
        while True:
            if m.status == "failed":
                raise OpenAIError(503, f"model `{m.name}` failed to load: {m.error} (fix it and "
                                  f"POST /v1/models/{m.name}/load to retry)", param="model")
            if m.status == "loaded":
                m.users += 1
                m.last_used = time.monotonic()
                return m
            if m.status in ("unloaded", "sleeping") and self._make_room(m):
                wake = m.status == "sleeping"
                m.status = "loading"    # now: a second waiter does not start it again
                self._spawn(self._wake(m) if wake else self._load(m))
            elif time.monotonic() >= deadline:
                raise _busy(m)
            await self._wait_change(deadline)

    def _make_room(self, m: PooledModel) -> bool:
        """True when m fits now; else start evicting the LRU idle model (False: wait)."""
        resident = [x for x in self.models.values() if x.resident and x is not m]
        # tensor parallel state is process-wide (models/parallel.py): such a model loads alone
        alone = any(x.config.tensor_parallel_size > 1 for x in [m, *resident])
        fits = len(resident) < (1 if alone else self.spec.max_loaded) and (
            self.spec.memory_bytes is None or
            sum(x.size_bytes for x in resident) + m.size_bytes <= self.spec.memory_bytes)
        if fits:
            return True
        idle = [x for x in resident if x.status == "loaded" and x.users == 0]
        if idle:
            victim = min(idle, key=lambda x: x.last_used)
            victim.status = "unloading"     # now: a second waiter picks another one
            self._spawn(self._evict(victim))
        return False

    async def _wait_change(self, deadline: float | None) -> None:
        self._changed.clear()
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _notify(self) -> None:
        self._changed.set()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- state changes (tasks on the event loop; the work runs in engine threads) ----
    async def _load(self, m: PooledModel) -> None:
        m.error = None
        logger.info("loading model %s", m.name)
        m.engine = _embedding_service(m) if m.task == "embed" else \
            AsyncEngine(m.config, self._factory)
        m.engine.start()
        await self._bring_up(m, m.engine.wait_ready(), "load")

    async def _wake(self, m: PooledModel) -> None:
        await self._bring_up(m, m.engine.wake_up(), "wake up")

    async def _bring_up(self, m: PooledModel, work: Any, what: str) -> None:
        """Await a load or wake-up: the model then serves, or is failed with the reason."""
        t0 = time.monotonic()
        try:
            await work
        except EngineError as e:
            logger.error("model %s failed to %s: %s", m.name, what, e.message)
            await m.engine.shutdown(0)
            self._drop(m)
            m.status, m.error = "failed", e.message
        else:
            if m.serving is None and m.task == "generate":
                lora = m.config.lora.lora_modules if m.config.lora is not None else []
                cfg = dataclasses.replace(self.server_cfg, served_model_names=[m.name],
                                          lora_modules=lora)
                m.serving = Serving(cfg, m.engine, self.metrics.for_model(m.name),
                                    {module.name: module for module in lora})
            m.status = "loaded"
            m.loads += 1
            m.load_seconds.append(time.monotonic() - t0)
            logger.info("model %s: %s took %.1f s", m.name, what, m.load_seconds[-1])
        self._notify()

    async def _evict(self, m: PooledModel) -> None:
        if self.spec.park and m.task == "generate" and self._can_park(m):
            try:
                await m.engine.sleep(1)
            except EngineError as e:    # e.g. tensor parallel: unload instead
                logger.info("model %s cannot be parked (%s); unloading it", m.name, e.message)
            else:
                m.status = "sleeping"
                logger.info("model %s parked (sleep level 1)", m.name)
                self._notify()
                return
        await self._unload(m)

    def _can_park(self, m: PooledModel) -> bool:
        """Parking frees device memory only on a GPU; the weights then need host memory."""
        return _on_gpu(m.config.device) and host_available_bytes() > 2 * m.size_bytes

    async def _unload(self, m: PooledModel) -> None:
        m.status = "unloading"
        logger.info("unloading model %s", m.name)
        await m.engine.shutdown(0)       # idle: nothing in flight to wait for
        self._drop(m)
        # the engine's tensors are freed with its reference cycles; then the heap goes back
        await asyncio.to_thread(_release_memory)
        m.status = "unloaded"
        m.unloads += 1
        self._notify()

    def _drop(self, m: PooledModel) -> None:
        if m.serving is not None:
            m.serving.close()
        m.engine = m.serving = None

    async def _reap_idle(self) -> None:
        """--keep-alive: unload a model idle that long."""
        keep = self.spec.keep_alive_s
        while True:
            await asyncio.sleep(min(max(keep / 4, 0.05), 5.0))
            now = time.monotonic()
            for m in list(self.models.values()):
                if m.status == "loaded" and m.users == 0 and now - m.last_used >= keep:
                    m.status = "unloading"
                    self._spawn(self._unload(m))


def _busy(m: PooledModel) -> OpenAIError:
    """--model-wait-timeout passed: a 503 the client may retry (the load goes on meanwhile)."""
    why = {"loading": f"model `{m.name}` is still loading",
           "unloading": f"model `{m.name}` is still being unloaded"}.get(
        m.status, f"no room to load model `{m.name}`: every loaded model has requests in flight")
    return OpenAIError(503, f"{why}; retry shortly", param="model",
                       headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])


def _embedding_service(m: PooledModel) -> Any:
    from minserve.embeddings.service import EmbeddingService
    cfg = m.config
    return EmbeddingService.lazy(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                 max_model_len=cfg.max_model_len, served_model_name=m.name)


def _on_gpu(device: str) -> bool:
    torch = sys.modules.get("torch")
    if device == "auto":
        return torch is not None and torch.cuda.is_available()
    return device.startswith("cuda")


LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _PoolCollector:
    """/metrics: each pooled model's loads, unloads, load seconds and status."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Any:
        lbl = ["model_name"]
        loads = CounterMetricFamily("minserve:model_loads", "Model loads (and wake-ups) by the "
                                    "model pool.", labels=lbl)
        unloads = CounterMetricFamily("minserve:model_unloads", "Model unloads by the model "
                                      "pool.", labels=lbl)
        seconds = HistogramMetricFamily("minserve:model_load_seconds", "Seconds from the start "
                                        "of a load (or wake-up) to the model serving.",
                                        labels=lbl)
        status = GaugeMetricFamily("minserve:model_status", "1 for the pooled model's status.",
                                   labels=["model_name", "status"])
        for m in self.pool.models.values():
            loads.add_metric([m.name], m.loads)
            unloads.add_metric([m.name], m.unloads)
            buckets = [(str(b), sum(s <= b for s in m.load_seconds)) for b in LOAD_BUCKETS]
            seconds.add_metric([m.name], [*buckets, ("+Inf", len(m.load_seconds))],
                               sum_value=sum(m.load_seconds))
            status.add_metric([m.name, m.status], 1.0)
        yield from (loads, unloads, seconds, status)


def _release_memory() -> None:
    gc.collect()
    heap.trim()
    torch = sys.modules.get("torch")   # the engines imported it; never imported here first
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
