"""Prometheus metrics under vLLM's names (so existing vLLM dashboards work), labelled with
model_name. Request-level numbers are recorded by the server; engine gauges are read at scrape."""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's build_1_2_5_buckets for token counts (vLLM stops at max_model_len; we cannot know it
# before the engine loads, so the tail goes to 1M).
TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (0, 1, 2, 3, 4, 5, 10, 20)
# = engine.ITERATION_TOKEN_BUCKETS (the engine counts steps per bucket; no import of the engine)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
CONTENT_TYPE = CONTENT_TYPE_LATEST
logger = logging.getLogger("minserve.stats")
disable_created_metrics()  # no *_created series (vLLM's exposition has none either)


class StatsWindow:
    """vLLM's periodic stats: throughput over the last interval (tokens since the previous tick
    over the seconds since it), with running/waiting/KV usage/prefix hit rate, as one log line
    (vLLM V1's LoggingStatLogger) and as the avg_*_throughput gauges. App ticks it every
    `interval` seconds; --disable-log-stats keeps the gauges and drops the line."""

    def __init__(self, get_stats: Callable[[], dict[str, Any]], log: bool = True,
                 interval: float = 10.0) -> None:
        self.get_stats, self.log, self.interval = get_stats, log, interval
        self.prompt_throughput = self.generation_throughput = 0.0
        self._last: tuple[float, dict[str, Any]] = (time.monotonic(), {})

    def tick(self, now: float | None = None) -> str | None:
        """Close the interval; -> the log line (also logged) when anything ran in it."""
        now = time.monotonic() if now is None else now
        s = dict(self.get_stats() or {})
        then, prev = self._last
        self._last = (now, s)
        seconds = max(now - then, 1e-9)

        def delta(key: str) -> float:
            return float(s.get(key, 0) or 0) - float(prev.get(key, 0) or 0)
        self.prompt_throughput = max(delta("num_prompt_tokens"), 0.0) / seconds
        self.generation_throughput = max(delta("num_generation_tokens"), 0.0) / seconds
        queries = delta("prefix_cache_queries")
        hit_rate = delta("prefix_cache_hits") / queries if queries > 0 else 0.0
        running, waiting = s.get("num_running", 0) or 0, s.get("num_waiting", 0) or 0
        if not (running or waiting or self.prompt_throughput or self.generation_throughput):
            return None
        line = (f"Avg prompt throughput: {self.prompt_throughput:.1f} tokens/s, "
                f"Avg generation throughput: {self.generation_throughput:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, "
                f"KV cache usage: {100 * float(s.get('kv_cache_usage', 0) or 0):.1f}%, "
                f"Prefix cache hit rate: {100 * hit_rate:.1f}%")
        drafts = delta("spec_num_drafts")
        if drafts > 0:   # speculative decoding, as vLLM's SpecDecoding line says it
            accepted, drafted = delta("spec_num_accepted_tokens"), delta("spec_num_draft_tokens")
            line += (f", Mean acceptance length: {1 + accepted / drafts:.2f}, "
                     f"Avg Draft acceptance rate: {100 * accepted / max(drafted, 1):.1f}%")
        if self.log:
            logger.info(line)
        return line


class _EngineCollector:
    """Gauges and cumulative counters taken from Engine.stats() at scrape time."""

    def __init__(self, model_name: str, get_stats: Callable[[], dict[str, Any]],
                 get_cache_info: Callable[[], dict[str, Any] | None],
                 window: StatsWindow) -> None:
        self.model_name = model_name
        self.get_stats = get_stats
        self.get_cache_info = get_cache_info
        self.window = window

    def collect(self) -> Iterator[Any]:
        s = dict(self.get_stats() or {})
        s["prompt_throughput"] = self.window.prompt_throughput
        s["generation_throughput"] = self.window.generation_throughput
        yield from self._engine_families(s)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting_by_reason",
                                    "Number of requests waiting, by reason (capacity: for room "
                                    "in the batch or KV cache; deferred: other constraints).",
                                    labels=["model_name", "reason"])
        deferred = int(s.get("num_waiting_deferred", 0) or 0)
        waiting.add_metric([self.model_name, "capacity"],
                           float(int(s.get("num_waiting", 0) or 0) - deferred))
        waiting.add_metric([self.model_name, "deferred"], float(deferred))
        yield waiting
        buckets, total = s.get("iteration_tokens") or ((0,) * (len(ITERATION_TOKEN_BUCKETS) + 1), 0)
        cumulative, acc = [], 0
        for bound, count in zip((*ITERATION_TOKEN_BUCKETS, "+Inf"), buckets, strict=True):
            acc += count
            cumulative.append((str(float(bound)) if bound != "+Inf" else bound, acc))
        hist = HistogramMetricFamily("vllm:iteration_tokens_total",
                                     "Histogram of number of tokens per engine_step.",
                                     labels=["model_name"])
        hist.add_metric([self.model_name], cumulative, sum_value=float(total))
        yield hist
        info = self.get_cache_info()
        if info is not None:
            cache = GaugeMetricFamily("vllm:cache_config_info",
                                      "Information of the LLMEngine CacheConfig",
                                      labels=["model_name", *info])
            cache.add_metric([self.model_name, *map(str, info.values())], 1.0)
            yield cache

    def _engine_families(self, s: dict[str, Any]) -> Iterator[Any]:
        for family, name, doc, key in (
            (GaugeMetricFamily, "vllm:num_requests_running",
             "Number of requests in model execution batches.", "num_running"),
            (GaugeMetricFamily, "vllm:num_requests_waiting",
             "Number of requests waiting to be processed.", "num_waiting"),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc",
             "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
            # the older name, still read by the guides and many Grafana dashboards
            (GaugeMetricFamily, "vllm:gpu_cache_usage_perc",
             "GPU KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
            (GaugeMetricFamily, "vllm:avg_prompt_throughput_toks_per_s",
             "Average prefill throughput in tokens/s over the last interval.",
             "prompt_throughput"),
            (GaugeMetricFamily, "vllm:avg_generation_throughput_toks_per_s",
             "Average generation throughput in tokens/s over the last interval.",
             "generation_throughput"),
            (CounterMetricFamily, "vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", "prefix_cache_queries"),
            (CounterMetricFamily, "vllm:prefix_cache_hits",
             "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
            (CounterMetricFamily, "vllm:num_preemptions",
             "Cumulative number of preemption from the engine.", "num_preemptions"),
        ):
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric([self.model_name], float(s.get(key, 0) or 0))
            yield metric
        if "spec_num_drafts" in s:   # speculative decoding (engine/spec/stats.py)
            yield from _spec_families(self.model_name, s)
        if "max_lora" in s:   # --enable-lora: vLLM's info gauge, its value the scrape time
            metric = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                       labels=["running_lora_adapters", "waiting_lora_adapters",
                                               "max_lora"])
            metric.add_metric([",".join(s["lora_running"]), ",".join(s["lora_waiting"]),
                               str(s["max_lora"])], time.time())
            yield metric


def _spec_families(model_name: str, s: dict[str, Any]) -> Iterator[Any]:
    for name, doc, key in (
        ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", "spec_num_drafts"),
        ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
         "spec_num_draft_tokens"),
        ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
         "spec_num_accepted_tokens"),
    ):
        metric = CounterMetricFamily(name, doc, labels=["model_name"])
        metric.add_metric([model_name], float(s[key]))
        yield metric
    per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted tokens per draft position.",
                                  labels=["model_name", "position"])
    for position, count in enumerate(s["spec_accepted_per_pos"]):
        per_pos.add_metric([model_name, str(position)], float(count))
    yield per_pos


class Metrics:
    def __init__(self, model_name: str, get_stats: Callable[[], dict[str, Any]],
                 get_cache_info: Callable[[], dict[str, Any] | None] = lambda: None,
                 log_stats: bool = True) -> None:
        self.model_name = model_name
        self.window = StatsWindow(get_stats, log=log_stats)
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        # The families stay reachable (embedding requests and pooled models are labelled with
        # their own model: for_model); the chat model's series are bound once here.
        self.prompt_tokens_family = Counter("vllm:prompt_tokens",
                                            "Number of prefill tokens processed.", lbl, registry=r)
        self.request_success = Counter("vllm:request_success",
                                       "Count of successfully processed requests.",
                                       ["model_name", "finished_reason"], registry=r)
        self.e2e_family = Histogram("vllm:e2e_request_latency_seconds",
                                    "Histogram of e2e request latency in seconds.", lbl,
                                    buckets=E2E_BUCKETS, registry=r)
        self.request_prompt_tokens_family = Histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lbl,
            buckets=TOKEN_BUCKETS, registry=r)
        self._families: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens_family,
            "generation_tokens": Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", lbl,
                                         registry=r),
            "ttft": Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", lbl,
                              buckets=TTFT_BUCKETS, registry=r),
            "itl": Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", lbl,
                             buckets=ITL_BUCKETS, registry=r),
            "e2e": self.e2e_family,
            "request_prompt_tokens": self.request_prompt_tokens_family,
            "request_generation_tokens": Histogram(
                "vllm:request_generation_tokens", "Number of generation tokens processed.", lbl,
                buckets=TOKEN_BUCKETS, registry=r),
            "request_tpot": Histogram(
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.", lbl,
                buckets=ITL_BUCKETS, registry=r),
            "request_params_n": Histogram(
                "vllm:request_params_n", "Histogram of the n request parameter.", lbl,
                buckets=N_BUCKETS, registry=r),
            "request_params_max_tokens": Histogram(
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.", lbl, buckets=TOKEN_BUCKETS,
                registry=r),
            "request_num_preemptions": Histogram(
                "vllm:request_num_preemptions", "Number of preemptions per finished request.",
                lbl, buckets=PREEMPTION_BUCKETS, registry=r)}
        # Where a request's time went (vLLM's dashboard panels "Queue Time" and "Requests
        # Prefill and Decode Time"); one observation per engine request, so per sample for n > 1.
        self._phase_families = {phase: Histogram(
            f"vllm:request_{phase}_time_seconds", doc, lbl, buckets=E2E_BUCKETS,
            registry=r) for phase, doc in (
                ("queue", "Histogram of time spent in WAITING phase for request."),
                ("prefill", "Histogram of time spent in PREFILL phase for request."),
                ("decode", "Histogram of time spent in DECODE phase for request."),
                ("inference", "Histogram of time spent in RUNNING phase for request."))}
        self._bind(model_name)
        r.register(_EngineCollector(model_name, get_stats, get_cache_info, self.window))

    def _bind(self, model_name: str) -> None:
        self.model_name = model_name
        for attr, family in self._families.items():
            setattr(self, attr, family.labels(model_name))
        self.phases = {k: f.labels(model_name) for k, f in self._phase_families.items()}

    def for_model(self, model_name: str) -> Metrics:
        """The request metrics of another model served beside this one (the model pool): the
        same families and /metrics page, series labelled with its model_name."""
        view = copy.copy(self)
        view._bind(model_name)
        return view

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def on_pooling_request(self, model_name: str, num_prompt_tokens: int, seconds: float) -> None:
        """One successful /v1/embeddings request, counted as vLLM counts pooling requests:
        prompt tokens, E2E latency, success with finished_reason "stop"."""
        self.prompt_tokens_family.labels(model_name).inc(num_prompt_tokens)
        self.request_prompt_tokens_family.labels(model_name).observe(num_prompt_tokens)
        self.e2e_family.labels(model_name).observe(seconds)
        self.request_success.labels(model_name, "stop").inc()


class RequestTracker:
    """Timing of one API request: TTFT and inter-token gaps per choice (each choice is its own
    engine request, as in vLLM V1, so n > 1 samples do not interleave into one gap series), E2E
    for the whole request."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self.arrival = time.monotonic()
        self.last: dict[int, float] = {}   # choice index -> when its last tokens came

    def on_tokens(self, num_new_tokens: int, choice: int = 0) -> None:
        if num_new_tokens <= 0:
            return
        now = time.monotonic()
        last = self.last.get(choice)
        if last is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe(now - last)
        self.last[choice] = now
        self.m.generation_tokens.inc(num_new_tokens)

    def on_engine_timings(self, timings: Any, num_output_tokens: int,
                          num_preemptions: int = 0) -> None:
        """A finished engine request's RequestTimings (engine/request.py); None phases skipped.
        TPOT = decode time over the tokens after the first, for requests with two or more."""
        self.m.request_num_preemptions.observe(num_preemptions)
        for phase, histogram in self.m.phases.items():
            seconds = getattr(timings, phase)
            if seconds is not None:
                histogram.observe(seconds)
        if timings.decode is not None and num_output_tokens > 1:
            self.m.request_tpot.observe(timings.decode / (num_output_tokens - 1))

    def on_params(self, n: int, max_tokens: list[int]) -> None:
        """One observation per prompt, as vLLM counts its requests."""
        for num in max_tokens:
            self.m.request_params_n.observe(n)
            self.m.request_params_max_tokens.observe(num)

    def on_finish(self, num_prompt_tokens: int, finish_reasons: list[str | None],
                  num_output_tokens: list[int] = ()) -> None:
        """finish_reasons/num_output_tokens: one per choice (an aborted one as "abort")."""
        self.m.prompt_tokens.inc(num_prompt_tokens)
        self.m.request_prompt_tokens.observe(num_prompt_tokens)
        self.m.e2e.observe(time.monotonic() - self.arrival)
        for reason in finish_reasons:
            if reason is not None:
                self.m.request_success.labels(self.m.model_name, reason).inc()
        for num in num_output_tokens:
            self.m.request_generation_tokens.observe(num)
