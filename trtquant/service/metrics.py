"""Prometheus metrics of scale-out mode (``GET /metrics`` on every API node).

Everything is read from the job store at scrape time, so every API node reports the same
fleet-wide values (aggregate with ``max``, not ``sum``) and nothing is lost when a node or
worker restarts. Exposed (``kind`` label on each):

* ``trtquant_queue_depth`` — queued builds not yet claimed;
* ``trtquant_builds_running``, ``trtquant_workers_online``;
* ``trtquant_build_duration_seconds`` — histogram of finished builds (claim to publish);
* ``trtquant_build_failures_total``, ``trtquant_cache_hits_total``, ``trtquant_builds_total``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["BUCKETS", "StoreCollector", "render"]

BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class StoreCollector:
    """A prometheus_client collector over a :class:`~trtquant.service.pg_store.PgJobStore`."""

    def __init__(self, store: Any, worker_ttl_s: float) -> None:
        self.store = store
        self.worker_ttl_s = worker_ttl_s

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        per_kind = self.store.kind_counts()
        online = self.store.kinds_online(self.worker_ttl_s)
        kinds = sorted(set(per_kind) | set(online))
        depth = GaugeMetricFamily("trtquant_queue_depth", "Queued builds not yet claimed, per GPU kind", labels=["kind"])
        running = GaugeMetricFamily("trtquant_builds_running", "Builds running, per GPU kind", labels=["kind"])
        workers = GaugeMetricFamily("trtquant_workers_online", "Build workers with a live heartbeat", labels=["kind"])
        failures = CounterMetricFamily("trtquant_build_failures", "Jobs that ended failed", labels=["kind"])
        hits = CounterMetricFamily("trtquant_cache_hits", "Jobs answered from the cache or by an identical build",
                                   labels=["kind"])
        builds = CounterMetricFamily("trtquant_builds", "Builds that ran and published an artifact", labels=["kind"])
        for kind in kinds:
            counts = per_kind.get(kind, {})
            depth.add_metric([kind], counts.get("queued", 0))
            running.add_metric([kind], counts.get("running", 0))
            workers.add_metric([kind], online.get(kind, {}).get("workers", 0))
            failures.add_metric([kind], counts.get("failed", 0))
            hits.add_metric([kind], counts.get("cache_hits", 0))
            builds.add_metric([kind], counts.get("builds", 0))
        durations = HistogramMetricFamily("trtquant_build_duration_seconds",
                                          "Build time from claim to publish, per GPU kind", labels=["kind"])
        for kind, (buckets, total) in self.store.build_durations(BUCKETS).items():
            durations.add_metric([kind], buckets=[("+Inf" if le == float("inf") else str(le), n) for le, n in buckets], sum_value=total)
        yield from (depth, running, workers, failures, hits, builds, durations)


def render(collector: StoreCollector) -> tuple[bytes, str]:
    """The text exposition of one scrape: (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
