"""Prometheus text-format metrics, kept by hand (a handful of series needs no client library)."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.requests = 0
        self._finished: deque[float] = deque()  # finish times of the last minute's images

    def observe_request(self, seconds: float, images: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.latency.observe(seconds)
            self._finished.extend([now] * images)

    def images_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._finished and self._finished[0] < now - window:
                self._finished.popleft()
            return len(self._finished) / window

    def render(self, queue_length: int, stats) -> str:
        batches = Histogram(BATCH_BUCKETS)
        for size, calls in list(stats.batch_sizes.items()):
            batches.observe(size, calls)
        batch_lines = batches.lines("diffbatch_denoiser_batch_size")
        with self._lock:
            latency_lines = self.latency.lines("diffbatch_request_latency_seconds")
            requests = self.requests
        return "\n".join([
            "# TYPE diffbatch_queue_length gauge", f"diffbatch_queue_length {queue_length}",
            "# TYPE diffbatch_running_batch_size gauge", f"diffbatch_running_batch_size {stats.last_batch_size}",
            "# TYPE diffbatch_images_per_second gauge",
            f"diffbatch_images_per_second {self.images_per_second():.4f}",
            "# TYPE diffbatch_images_total counter", f"diffbatch_images_total {stats.images_finished}",
            "# TYPE diffbatch_requests_total counter", f"diffbatch_requests_total {requests}",
            "# TYPE diffbatch_denoiser_calls_total counter", f"diffbatch_denoiser_calls_total {stats.denoiser_calls}",
            "# TYPE diffbatch_denoised_images_total counter",
            f"diffbatch_denoised_images_total {stats.denoised_images}",
            "# TYPE diffbatch_denoiser_batch_size histogram", *batch_lines,
            "# TYPE diffbatch_request_latency_seconds histogram", *latency_lines, "",
        ])
