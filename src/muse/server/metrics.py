"""Prometheus metrics of one server (prometheus_client, a registry per app so tests don't collide).

Counters and histograms are updated by the routes; gauges that mirror engine state (queue depth,
running requests, KV-cache use) are read from the engine clients at scrape time, so they are never
stale and cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; TTFT spans a queue wait, inter-token latency one engine step
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_STORE_BUCKETS = (0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineGauges:
    """A custom collector: engine state sampled at scrape time."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        waiting = GaugeMetricFamily("muse_queue_depth", "requests waiting: admission queue + engine queue",
                                    labels=["model"])
        running = GaugeMetricFamily("muse_running_requests", "sequences the engine is generating",
                                    labels=["model"])
        kv = GaugeMetricFamily("muse_kv_cache_usage_ratio", "fraction of KV-cache blocks in use", labels=["model"])
        hit = GaugeMetricFamily("muse_prefix_cache_hit_ratio", "prefix-cache hit tokens / queried tokens",
                                labels=["model"])
        free = GaugeMetricFamily("muse_kv_cache_free_blocks", "KV-cache blocks free (cached prefixes included)",
                                 labels=["model"])
        prompt = CounterMetricFamily("muse_engine_prompt_tokens", "prompt tokens the engine was given (x n)",
                                     labels=["model"])
        gen = CounterMetricFamily("muse_engine_generation_tokens", "tokens the engine generated", labels=["model"])
        blocks = GaugeMetricFamily("muse_kv_cache_blocks", "KV-cache blocks in the pool", labels=["model"])
        steps = CounterMetricFamily("muse_engine_steps", "engine steps run", labels=["model"])
        restarts = CounterMetricFamily("muse_engine_restarts", "times the engine process was restarted after dying",
                                       labels=["model"])
        for model, s in snap.get("models", {}).items():
            waiting.add_metric([model], s["num_waiting"] + snap.get("admission_waiting", 0))
            running.add_metric([model], s["num_running"])
            kv.add_metric([model], s["kv_usage"])
            hit.add_metric([model], s["prefix_cache_hit_rate"])
            free.add_metric([model], s["num_free_blocks"])
            prompt.add_metric([model], s["num_prompt_tokens"])
            gen.add_metric([model], s["num_generation_tokens"])
            blocks.add_metric([model], s["num_blocks"])
            steps.add_metric([model], s["num_steps"])
            restarts.add_metric([model], s.get("restarts", 0))
        yield from (waiting, running, kv, hit, free, prompt, gen, blocks, steps, restarts)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict]):
        # no "<name>_created" timestamp series next to every counter: noise on a dashboard
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("muse_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("muse_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("muse_completion_tokens", "completion tokens generated", ["model"],
                                         registry=r)
        self.ttft = Histogram("muse_time_to_first_token_seconds", "request arrival to first generated token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("muse_inter_token_latency_seconds", "time between streamed token deliveries",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.latency = Histogram("muse_request_latency_seconds", "request arrival to last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        # the serving database's time per HTTP request (keys, quota, ledger hand-off), summed over its
        # calls; 0.002 and 0.01 are bounds, so "p50 <= 2 ms, p99 <= 10 ms" is read off exactly
        self.store_seconds = Histogram("muse_store_seconds_per_request", "time a request spent in the serving "
                                       "database (keys, quota, ledger hand-off)", buckets=_STORE_BUCKETS, registry=r)
        # the same time split by operation (sqlstore.OPS), per request: where the store's time goes
        self.store_op_seconds = Histogram("muse_store_op_seconds", "time a request spent in one kind of store "
                                          "operation (summed over its calls of that kind)", ["op"],
                                          buckets=_STORE_BUCKETS, registry=r)
        self.replica = Gauge("muse_replica_info", "this server's --replica-name and store (always 1)",
                             ["replica", "store"], registry=r)
        r.register(_EngineGauges(snapshot))

    def observe_store(self, spent) -> None:
        """A request's sqlstore.StoreTime, when it is over; a request that never touched the store
        (health checks, /metrics itself) is not observed."""
        if spent.total > 0:
            self.store_seconds.observe(spent.total)
            for op, seconds in spent.ops.items():
                self.store_op_seconds.labels(op).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
