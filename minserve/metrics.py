"""Prometheus metrics under vLLM's names (so existing vLLM dashboards work), labelled with
model_name. Request-level numbers are recorded by the server; engine gauges are read at scrape."""
from __future__ import annotations

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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series (vLLM's exposition has none either)


class _EngineCollector:
    """Gauges and cumulative counters taken from Engine.stats() at scrape time."""

    def __init__(self, model_name: str, get_stats: Callable[[], dict[str, Any]]) -> None:
        self.model_name = model_name
        self.get_stats = get_stats

    def collect(self) -> Iterator[Any]:
        s = self.get_stats() or {}
        for family, name, doc, key in (
            (GaugeMetricFamily, "vllm:num_requests_running",
             "Number of requests in model execution batches.", "num_running"),
            (GaugeMetricFamily, "vllm:num_requests_waiting",
             "Number of requests waiting to be processed.", "num_waiting"),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc",
             "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
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


class Metrics:
    def __init__(self, model_name: str, get_stats: Callable[[], dict[str, Any]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        # The families stay reachable (for embedding requests, labelled with their own model);
        # the chat model's series are bound once here.
        self.prompt_tokens_family = Counter("vllm:prompt_tokens",
                                            "Number of prefill tokens processed.", lbl, registry=r)
        self.prompt_tokens = self.prompt_tokens_family.labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", lbl,
                                         registry=r).labels(model_name)
        self.request_success = Counter("vllm:request_success",
                                       "Count of successfully processed requests.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", lbl,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", lbl,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e_family = Histogram("vllm:e2e_request_latency_seconds",
                                    "Histogram of e2e request latency in seconds.", lbl,
                                    buckets=E2E_BUCKETS, registry=r)
        self.e2e = self.e2e_family.labels(model_name)
        self.request_prompt_tokens_family = Histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lbl,
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_prompt_tokens = self.request_prompt_tokens_family.labels(model_name)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lbl,
            buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        # Where a request's time went (vLLM's dashboard panels "Queue Time" and "Requests
        # Prefill and Decode Time"); one observation per engine request, so per sample for n > 1.
        self.phases = {phase: Histogram(
            f"vllm:request_{phase}_time_seconds", doc, lbl, buckets=E2E_BUCKETS,
            registry=r).labels(model_name) for phase, doc in (
                ("queue", "Histogram of time spent in WAITING phase for request."),
                ("prefill", "Histogram of time spent in PREFILL phase for request."),
                ("decode", "Histogram of time spent in DECODE phase for request."),
                ("inference", "Histogram of time spent in RUNNING phase for request."))}
        self.request_tpot = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", lbl, buckets=ITL_BUCKETS,
            registry=r).labels(model_name)
        r.register(_EngineCollector(model_name, get_stats))

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

    def on_engine_timings(self, timings: Any, num_output_tokens: int) -> None:
        """A finished engine request's RequestTimings (engine/request.py); None phases skipped.
        TPOT = decode time over the tokens after the first, for requests with two or more."""
        for phase, histogram in self.m.phases.items():
            seconds = getattr(timings, phase)
            if seconds is not None:
                histogram.observe(seconds)
        if timings.decode is not None and num_output_tokens > 1:
            self.m.request_tpot.observe(timings.decode / (num_output_tokens - 1))

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
