"""Prometheus metrics through ``prometheus_client`` (as LitServe and vLLM do): engine counters read at
scrape time, the request latency histogram, and the process's own metrics (CPU, memory, open files)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """One registry per server (tests run several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._finished: deque[float] = deque()  # finish times of the last minute's images
        self.latency = Histogram("diffbatch_request_latency_seconds", "Time from request to response",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("diffbatch_requests", "Image requests answered", registry=self.registry)
        self.cancelled = Counter("diffbatch_images_cancelled", "Images dropped before they finished: the client "
                                 "disconnected or cancelled", ["reason"], registry=self.registry)
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        ProcessCollector(registry=self.registry)

    def observe_request(self, seconds: float, images: int) -> None:
        self.latency.observe(seconds)
        self.requests.inc()
        now = time.monotonic()
        with self._lock:
            self._finished.extend([now] * images)

    def images_per_second(self, window: float = 60.0) -> float:
        """Images finished per second over the last ``window`` seconds."""
        now = time.monotonic()
        with self._lock:
            while self._finished and self._finished[0] < now - window:
                self._finished.popleft()
            return len(self._finished) / window

    def render(self, queue_length: int, stats: Any, replicas: Any = None) -> str:
        """The exposition text, with the engine's ``EngineStats`` and queue length as of now; ``replicas``: what
        the ingress knows of each engine replica under ``serve --ray`` (executors/serve.py ``ReplicaFacts``)."""
        snapshot = (queue_length, stats, self.images_per_second(), replicas)
        with self._lock:  # one scrape at a time: the collector reads the snapshot set here
            self._engine.snapshot = snapshot
            return generate_latest(self.registry).decode()


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's stats at each scrape."""

    def __init__(self) -> None:
        self.snapshot: tuple[int, Any, float, Any] | None = None  # queue length, EngineStats, images/s, replicas

    def collect(self) -> Iterator[Any]:
        if self.snapshot is None:
            return
        queue_length, stats, rate, replicas = self.snapshot
        yield GaugeMetricFamily("diffbatch_queue_length", "Images waiting to be admitted", value=queue_length)
        yield GaugeMetricFamily("diffbatch_running_batch_size", "Images in the latest denoiser call",
                                value=stats.last_batch_size)
        yield GaugeMetricFamily("diffbatch_images_per_second", "Images finished per second, last minute",
                                value=rate)
        yield CounterMetricFamily("diffbatch_images", "Images finished", value=stats.images_finished)
        yield CounterMetricFamily("diffbatch_denoiser_calls", "Denoiser calls", value=stats.denoiser_calls)
        yield CounterMetricFamily("diffbatch_denoised_images", "Sum of denoiser batch sizes, in images",
                                  value=stats.denoised_images)
        yield _batch_histogram(dict(stats.batch_sizes))
        if replicas is not None:
            yield from _replica_metrics(replicas)


def _replica_metrics(replicas: Any) -> Iterator[Any]:
    """Per engine replica (``serve --ray``): its queue length at its latest answer, and the images it made."""
    yield GaugeMetricFamily("diffbatch_replicas", "Engine replicas alive now", value=len(replicas.queues))
    queue = GaugeMetricFamily("diffbatch_replica_queue_length", "A replica's images waiting or running, at its "
                              "latest answer", labels=["replica"])
    made = CounterMetricFamily("diffbatch_replica_images", "Images a replica made", labels=["replica"])
    for name in sorted(replicas.queues):
        queue.add_metric([name], replicas.queues[name])
        made.add_metric([name], replicas.images.get(name, 0))
    yield queue
    yield made
    yield CounterMetricFamily("diffbatch_replica_retries", "Images sent again after a replica died under them",
                              value=replicas.retried)


def _batch_histogram(calls_by_size: dict[int, int]) -> HistogramMetricFamily:
    buckets, cumulative = [], 0
    for bound in BATCH_BUCKETS:
        cumulative = sum(n for size, n in calls_by_size.items() if size <= bound)
        buckets.append((str(bound), cumulative))
    buckets.append(("+Inf", sum(calls_by_size.values())))
    total = sum(size * n for size, n in calls_by_size.items())
    return HistogramMetricFamily("diffbatch_denoiser_batch_size", "Images per denoiser call", buckets=buckets,
                                 sum_value=total)
