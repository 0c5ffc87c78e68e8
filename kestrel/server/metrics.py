"""Prometheus metrics under `kestrel:`, named after vLLM's."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("kestrel:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("kestrel:num_requests_waiting", "Requests waiting for admission", registry=r)
        self.kv_usage = Gauge("kestrel:kv_cache_usage_perc", "Fraction of KV slots held by requests", registry=r)
        self.kv_cached = Gauge("kestrel:kv_cache_cached_tokens", "Tokens held by the radix prefix cache", registry=r)
        self.prompt_tokens = Counter("kestrel:prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("kestrel:generation_tokens", "Tokens generated", registry=r)
        self.prefix_queries = Counter("kestrel:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("kestrel:prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=r)
        self.preemptions = Counter("kestrel:num_preemptions", "Requests retracted for recompute", registry=r)
        self.requests = Counter("kestrel:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram("kestrel:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("kestrel:time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kestrel:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("kestrel:request_queue_time_seconds", "Time from arrival to admission",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self._retractions_seen = 0

    def on_engine_load(self, load: dict) -> None:
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.kv_usage.set(load["kv_used"] / max(1, load["kv_size"]))
        self.kv_cached.set(load.get("kv_cached", 0))
        new = load["retractions"] - self._retractions_seen
        if new > 0:
            self.preemptions.inc(new)
            self._retractions_seen = load["retractions"]

    def on_request_done(self, prompt_tokens: int, cached_tokens: int, output_tokens: int, ttft: float | None,
                        latency: float, reason: str, queue_time: float | None = None) -> None:
        if queue_time is not None:
            self.queue_time.observe(queue_time)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        self.requests.labels(finished_reason=reason or "unknown").inc()
        self.e2e.observe(latency)
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((latency - ttft) / (output_tokens - 1))
