"""Prometheus metrics of one app, in a registry of its own (several apps in one process, as in
the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "kiln_requests", "Requests answered, by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens in", registry=r)
        self.cached_tokens = Counter(
            "kiln_cached_prompt_tokens", "Prompt tokens found in the prefix cache", registry=r
        )
        self.generated_tokens = Counter("kiln_generated_tokens", "Generated tokens out", registry=r)
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds", "Time from arrival to the first token",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.token_latency = Histogram(
            "kiln_inter_token_latency_seconds", "Time between consecutive tokens of a request",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        g = Gauge("kiln_queue_length", "Requests waiting for a slot", registry=r)
        g.set_function(lambda: scheduler.n_waiting)
        g = Gauge("kiln_running_requests", "Requests in the running batch", registry=r)
        g.set_function(lambda: scheduler.n_running)
        g = Gauge("kiln_kv_blocks_used", "KV cache blocks in use", registry=r)
        g.set_function(lambda: scheduler.kv_blocks_used)
        g = Gauge("kiln_kv_blocks_total", "KV cache blocks the pool can hold", registry=r)
        g.set_function(lambda: scheduler.engine.pool.max_blocks - 1)
