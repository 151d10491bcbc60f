"""Prometheus metrics of one server: request latencies and token counts, engine gauges.

Each `ServerMetrics` has its own registry, so several apps in one process (tests) never
share or clash over metrics.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jaxinfer.engine.outputs import EngineStats
from jaxinfer.server.async_engine import FinishedRequest

__all__ = ["CONTENT_TYPE", "PREFIX", "ServerMetrics"]

PREFIX = "jaxinfer_"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                    160.0, 320.0, 640.0)
_TOKEN_INTERVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                           0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    """The server's metrics and the registry they live in."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, PREFIX
        self.time_to_first_token = Histogram(
            f"{p}time_to_first_token_seconds",
            "Seconds from a request's arrival to its first output token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            f"{p}time_per_output_token_seconds",
            "Per request: (finish - first token) / (output tokens - 1).",
            buckets=_TOKEN_INTERVAL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            f"{p}e2e_request_latency_seconds",
            "Seconds from a request's arrival to its last output.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            f"{p}prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            f"{p}generation_tokens", "Output tokens of finished requests.", registry=r)
        self.cached_prompt_tokens = Counter(
            f"{p}cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
            registry=r)
        self.requests = Counter(
            f"{p}requests", "Finished engine requests, by finish reason.",
            ["finish_reason"], registry=r)
        self.rejected = Counter(
            f"{p}requests_rejected", "HTTP requests refused before reaching the engine.",
            ["reason"], registry=r)
        self.running = Gauge(f"{p}requests_running", "Requests running in the engine.",
                             registry=r)
        self.waiting = Gauge(f"{p}requests_waiting", "Requests waiting in the engine.",
                             registry=r)
        self.pending = Gauge(f"{p}requests_pending",
                             "Requests the server has submitted and not yet seen finish.",
                             registry=r)
        self.kv_pages_in_use = Gauge(f"{p}kv_pages_in_use", "KV cache pages in use.",
                                     registry=r)
        self.kv_pages_total = Gauge(f"{p}kv_pages_total", "KV cache pages in the pool.",
                                    registry=r)
        self.prefix_cache_hit_rate = Gauge(
            f"{p}prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache.",
            registry=r)
        self.preemptions = Gauge(f"{p}num_preemptions", "Preemptions since the engine started.",
                                 registry=r)
        # Counters are per-process totals; for each finish reason start at 0 so rates work.
        for reason in ("stop", "length", "abort", "error"):
            self.requests.labels(finish_reason=reason)

    def observe_finished(self, request: FinishedRequest) -> None:
        """Record one finished engine request."""
        self.requests.labels(finish_reason=request.finish_reason).inc()
        self.prompt_tokens.inc(request.num_prompt_tokens)
        self.generation_tokens.inc(request.num_output_tokens)
        self.cached_prompt_tokens.inc(request.num_cached_tokens)
        self.e2e_request_latency.observe(request.finish_s - request.arrival_s)
        if request.first_token_s is None:
            return
        self.time_to_first_token.observe(request.first_token_s - request.arrival_s)
        if request.num_output_tokens > 1:
            self.time_per_output_token.observe(
                (request.finish_s - request.first_token_s) / (request.num_output_tokens - 1))

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def render(self, stats: EngineStats | None, num_pending: int) -> bytes:
        """The Prometheus text exposition, gauges refreshed from `stats` (None: unknown)."""
        self.pending.set(num_pending)
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_pages_in_use.set(stats.kv_pages_in_use)
            self.kv_pages_total.set(stats.kv_pages_total)
            self.prefix_cache_hit_rate.set(stats.prefix_cache_hit_rate)
            self.preemptions.set(stats.num_preemptions)
        return generate_latest(self.registry)
