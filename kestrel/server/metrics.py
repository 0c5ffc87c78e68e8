"""Prometheus metrics under `kestrel:`, named after vLLM's."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
STEP_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)  # a migration's pause in decode steps (the goal: under 2)


OTHER = "other"
OTHER_CLIENTS = OTHER


class CappedLabels:
    """Label values for an open-ended set of names (clients, adapters): the first `cap` names seen get their
    own, the rest share "other", so a stream of new names cannot grow /metrics without bound."""

    def __init__(self, cap: int):
        self.cap = cap
        self.named: set[str] = set()

    def __call__(self, name: str) -> str:
        if name not in self.named and len(self.named) < self.cap:
            self.named.add(name)
        return name if name in self.named else OTHER


class Metrics:
    def __init__(self, max_client_labels: int = 32) -> None:
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
        # per client, labelled by name for the first `max_client_labels` clients seen; the rest as "other"
        self.max_client_labels = max_client_labels
        self.client_service = Counter("kestrel:client_service", "Weighted tokens of service a client received "
                                      "(vtc weights: prompt tokens processed and output tokens)", ["client"], registry=r)
        self.client_prompt_tokens = Counter("kestrel:client_prompt_tokens", "Prompt tokens processed for a client",
                                            ["client"], registry=r)
        self.client_generation_tokens = Counter("kestrel:client_generation_tokens", "Tokens generated for a client",
                                                ["client"], registry=r)
        self.client_waiting = Gauge("kestrel:client_requests_waiting", "A client's sequences waiting for admission",
                                    ["client"], registry=r)
        self._client_label = CappedLabels(max_client_labels)
        self._other_waiting: dict[str, int] = {}  # unlabelled clients with sequences waiting
        self.kv_size = Gauge("kestrel:kv_cache_size_tokens", "KV pool size in tokens", registry=r)
        self.kv_free = Gauge("kestrel:kv_cache_free_tokens", "KV slots free", registry=r)
        self.kv_evictable = Gauge("kestrel:kv_cache_evictable_tokens",
                                  "KV slots held only by the prefix cache (free to evict)", registry=r)
        self.clients_tracked = Gauge("kestrel:clients_tracked", "Clients the engine keeps per-client state for",
                                     registry=r)
        # per LoRA adapter, with the same cap on labels as clients
        self._adapter_label = CappedLabels(max_client_labels)
        self.lora_requests = Counter("kestrel:lora_requests", "Finished requests per LoRA adapter", ["adapter"],
                                     registry=r)
        self.lora_prompt_tokens = Counter("kestrel:lora_prompt_tokens", "Prompt tokens per LoRA adapter",
                                          ["adapter"], registry=r)
        self.lora_generation_tokens = Counter("kestrel:lora_generation_tokens", "Tokens generated per LoRA adapter",
                                              ["adapter"], registry=r)
        self.lora_loads = Counter("kestrel:lora_loads", "Times a LoRA adapter was paged into the KV pool",
                                  ["adapter"], registry=r)
        self.lora_evictions = Counter("kestrel:lora_evictions", "Times an idle LoRA adapter was paged out of the "
                                      "KV pool to make room", ["adapter"], registry=r)
        self.paused = Gauge("kestrel:paused_conversations", "Conversations waiting on their tool calls", registry=r)
        self.paused_tokens = Gauge("kestrel:paused_kv_tokens", "KV slots pinned by paused conversations (released "
                                   "when memory is needed)", registry=r)
        self.swap_bytes = Gauge("kestrel:swap_used_bytes", "Bytes of paused conversations' KV in the swap tier",
                                registry=r)
        self.pause_events = Counter("kestrel:pause_events", "Paused conversations: paused, resumed, released (for "
                                    "memory), swapped_out, expired; restored_tokens: KV tokens read back from the "
                                    "swap tier instead of recomputed", ["event"], registry=r)
        self._pause_seen: dict[str, int] = {}
        self.spec_tokens_per_step = Histogram(
            "kestrel:spec_decode_tokens_per_step", "Lookahead decoding: output tokens one sequence's step gave "
            "(1 + accepted draft tokens)", buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16), registry=r)
        # several instances (kestrel/cluster): each one's load, and the live migrations between them
        self.instance_running = Gauge("kestrel:instance_requests_running", "Requests in an instance's running batch",
                                      ["instance"], registry=r)
        self.instance_waiting = Gauge("kestrel:instance_requests_waiting", "Requests waiting on an instance",
                                      ["instance"], registry=r)
        self.instance_kv_usage = Gauge("kestrel:instance_kv_cache_usage_perc", "Fraction of an instance's KV "
                                       "slots held by requests", ["instance"], registry=r)
        self.migrations = Counter("kestrel:migrations", "Live migrations of running requests between instances, "
                                  "by outcome (done, gone, refused, failed)", ["outcome"], registry=r)
        self.queued_migrations = Counter("kestrel:queued_migrations", "Queued requests moved to another "
                                         "instance's queue, by outcome (done, gone, refused, failed)", ["outcome"],
                                         registry=r)
        self.migration_downtime = Histogram("kestrel:migration_downtime_seconds", "Time a migrated request was "
                                            "stopped (stop-and-copy of its last K/V)", buckets=LATENCY_BUCKETS,
                                            registry=r)
        self.migration_downtime_steps = Histogram("kestrel:migration_downtime_steps", "A migrated request's stop "
                                                  "in its own decode steps (downtime over its time per token)",
                                                  buckets=STEP_BUCKETS, registry=r)
        self.engine_restarts = Gauge("kestrel:engine_restarts", "Times the engine process was restarted after a "
                                     "failure", registry=r)

    def on_engine_load(self, load: dict) -> None:
        for name, report in load.get("instances", {}).items():
            self.instance_running.labels(instance=name).set(report.get("running", 0))
            self.instance_waiting.labels(instance=name).set(report.get("waiting", 0))
            self.instance_kv_usage.labels(instance=name).set(report.get("kv_used", 0) / max(1, report.get("kv_size", 1)))
        for m in load.get("migrations", ()):
            if m.queued:  # nothing stopped: no downtime to report
                self.queued_migrations.labels(outcome=m.outcome).inc()
                continue
            self.migrations.labels(outcome=m.outcome).inc()
            if m.outcome == "done":
                self.migration_downtime.observe(m.downtime)
                if m.downtime_steps is not None:
                    self.migration_downtime_steps.observe(m.downtime_steps)
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.kv_usage.set(load["kv_used"] / max(1, load["kv_size"]))
        self.kv_cached.set(load.get("kv_cached", 0))
        self.kv_size.set(load["kv_size"])
        self.kv_free.set(load.get("kv_free", load["kv_size"]))
        self.kv_evictable.set(load.get("kv_evictable", 0))
        self.clients_tracked.set(load.get("clients_tracked", 0))
        new = load["retractions"] - self._retractions_seen
        if new > 0:
            self.preemptions.inc(new)
            self._retractions_seen = load["retractions"]
        for client, change in load.get("clients", {}).items():
            self.on_client(client, change)
        self.paused.set(load.get("paused", 0))
        self.paused_tokens.set(load.get("paused_tokens", 0))
        self.swap_bytes.set(load.get("swap_bytes", 0))
        for event, total in load.get("pause_events", {}).items():
            new = total - self._pause_seen.get(event, 0)
            if new > 0:
                self.pause_events.labels(event=event).inc(new)
                self._pause_seen[event] = total
        for tokens, count in load.get("spec_steps", {}).items():
            for _ in range(count):  # prometheus_client observes one value at a time
                self.spec_tokens_per_step.observe(tokens)
        for adapter, (loads, evictions) in load.get("loras", {}).items():
            label = self._adapter_label(adapter)
            if loads > 0:
                self.lora_loads.labels(adapter=label).inc(loads)
            if evictions > 0:
                self.lora_evictions.labels(adapter=label).inc(evictions)

    def on_client(self, client: str, change: tuple[float, int, int, int]) -> None:
        """Add what a client received since the engine's last report (service, prompt tokens, output
        tokens) and set its waiting sequences. Only the first `max_client_labels` clients get a label of
        their own; what is kept per unlabelled client lasts only while it has sequences waiting."""
        label = self._client_label(client)
        service, prompt, output, waiting = change
        if service > 0:
            self.client_service.labels(client=label).inc(service)
        if prompt > 0:
            self.client_prompt_tokens.labels(client=label).inc(prompt)
        if output > 0:
            self.client_generation_tokens.labels(client=label).inc(output)
        if label == OTHER_CLIENTS:
            if waiting:
                self._other_waiting[client] = waiting
            else:
                self._other_waiting.pop(client, None)
            self.client_waiting.labels(client=label).set(sum(self._other_waiting.values()))
        else:
            self.client_waiting.labels(client=label).set(waiting)

    def on_request_done(self, prompt_tokens: int, cached_tokens: int, output_tokens: int, ttft: float | None,
                        latency: float, reason: str, queue_time: float | None = None,
                        adapter: str | None = None) -> None:
        if adapter is not None:
            label = self._adapter_label(adapter)
            self.lora_requests.labels(adapter=label).inc()
            self.lora_prompt_tokens.labels(adapter=label).inc(prompt_tokens)
            self.lora_generation_tokens.labels(adapter=label).inc(output_tokens)
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
