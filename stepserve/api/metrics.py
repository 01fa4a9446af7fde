"""Prometheus metrics for /metrics: request counts by status, token counts, latency histograms, engine gauges."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:  # the HTTP side imports no torch (the engine package does)
    from stepserve.engine.outputs import RequestTimes

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
# engine.stats() key -> (gauge name, help)
_ENGINE_GAUGES = {
    "running": ("num_running_reqs", "requests being decoded"),
    "waiting": ("num_waiting_reqs", "requests waiting for admission"),
    "kv_usage": ("kv_cache_usage", "fraction of KV cache pages in use"),
    "prefix_cache_hit_rate": ("prefix_cache_hit_rate", "fraction of prompt tokens served from the prefix cache"),
    "image_cache_hit_rate": ("image_cache_hit_rate", "fraction of images served from the encoder cache"),
    "num_kv_pages_free": ("num_kv_pages_free", "free KV cache pages"),
    "num_kv_pages_total": ("num_kv_pages_total", "KV cache pages in the pool"),
    "num_encoded_images": ("num_encoded_images", "images run through the vision tower since start"),
    "num_preemptions": ("num_preemptions", "sequences preempted since start (pages freed, recomputed later)"),
}


class Metrics:
    """One registry per app, so several apps (tests) can live in one process."""

    def __init__(self, engine_stats: Callable[[], dict], prefix: str = "stepserve_"):
        self.registry = CollectorRegistry()
        self._engine_stats = engine_stats
        r, p = self.registry, prefix
        self.requests = Counter(p + "requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens (text + image) of finished requests",
                                     registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "generated tokens", registry=r)
        self.prepare = Histogram(p + "request_prepare_seconds", "arrival to the engine: body parsing, chat "
                                 "template, image decoding and preprocessing, tokenization", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.queue = Histogram(p + "request_queue_seconds", "in the engine, waiting to be scheduled",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.first_step = Histogram(p + "request_first_token_engine_seconds", "first scheduled to the first token on "
                                    "the engine's host side: vision tower, prefill, sampling", buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "arrival to the first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "mean time between output tokens per request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "request arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._gauges = {key: Gauge(p + name, doc, registry=r) for key, (name, doc) in _ENGINE_GAUGES.items()}

    def observe_request(self, prompt_tokens: int, completion_tokens: int, ttft: float | None, e2e: float,
                        times: RequestTimes | None = None) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(e2e)
        if times is not None and times.scheduled is not None:
            self.queue.observe(times.scheduled - times.arrival)
            if times.first_token is not None:
                self.first_step.observe(times.first_token - times.scheduled)
        if ttft is not None:
            self.ttft.observe(ttft)
            if completion_tokens > 1:
                self.tpot.observe((e2e - ttft) / (completion_tokens - 1))

    def render(self) -> bytes:
        stats = self._engine_stats()
        for key, gauge in self._gauges.items():
            if stats.get(key) is not None:
                gauge.set(stats[key])
        return generate_latest(self.registry)
