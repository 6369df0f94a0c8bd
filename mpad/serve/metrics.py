"""GET /metrics: the service's counters in Prometheus' text format (prometheus-client), one registry per app.

mpad_requests_total{endpoint, status}    requests answered (endpoint: the route, "other" for unknown paths;
                                         status 499: the client went away before its answer)
mpad_request_seconds{endpoint}           latency histogram, from the request's headers to its answer
mpad_batch_size                          images per model call (histogram)
mpad_model_seconds                       seconds per model call (histogram)
mpad_queue_depth                         images waiting for the model now
mpad_requests_admitted                   requests holding a place of --max-queue now
mpad_aborted_uploads_total               bodies cut short by the client closing its connection
mpad_connections_refused_total{reason}   connections closed before a request was read: max_connections,
                                         header_timeout, header_too_large
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latency buckets (seconds): a batch of a small model takes milliseconds, a large image's decode seconds.
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's metrics; `queue_depth` and `admitted` are read when /metrics is asked (callables)."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], float], admitted: Callable[[], float]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mpad_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.latency = Histogram(
            "mpad_request_seconds", "Request latency in seconds", ["endpoint"], buckets=LATENCY, registry=registry
        )
        sizes = sorted({1, *(2**i for i in range(max_batch.bit_length())), max_batch})
        self.batch_size = Histogram("mpad_batch_size", "Images per model call", buckets=sizes, registry=registry)
        self.model_seconds = Histogram(
            "mpad_model_seconds", "Seconds per model call", buckets=LATENCY, registry=registry
        )
        Gauge("mpad_queue_depth", "Images waiting for the model", registry=registry).set_function(queue_depth)
        Gauge("mpad_requests_admitted", "Requests holding a --max-queue place", registry=registry).set_function(
            admitted
        )
        self.aborted = Counter("mpad_aborted_uploads", "Uploads cut short by the client", registry=registry)
        self.refused = Counter(
            "mpad_connections_refused", "Connections closed before a request", ["reason"], registry=registry
        )

    def batch(self, size: int, seconds: float) -> None:
        """One model call of `size` images that took `seconds` (mpad.serve.batcher.Batcher's `observe`)."""
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
