"""The service's Prometheus metrics (``GET /metrics``): one registry per app, so several apps in one
process (tests, notebooks) never share or collide on a metric.

Exposed, in Prometheus' text format:

- ``distilqa_requests_total{route, method, status}``: requests answered, by route template
  (``"other"`` for paths that match no route, so unknown paths cannot grow the label set);
- ``distilqa_request_seconds{route}``: latency histogram, from the request's arrival to its last byte;
- ``distilqa_batch_pairs``: histogram of the pairs in each batched model call;
- ``distilqa_queue_pairs``: pairs received and not yet answered (read when scraped);
- ``distilqa_pairs_answered_total``: pairs answered by the model;
- ``distilqa_model_info{model, dtype, device, version}``: always 1, the labels say what is served.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        Info,
        generate_latest,
    )
except ImportError as error:  # part of the serve extra
    raise ImportError(
        f"distilqa serve needs prometheus-client ({error.name} is missing): pip install 'distilqa[serve]'"
    ) from None

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The metrics of one app, in their own registry. ``pending_pairs`` is read at every scrape."""

    def __init__(self, model: str, dtype: str, device: str, version: str, pending_pairs: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "distilqa_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "distilqa_request_seconds",
            "Time from a request's arrival to its response, in seconds",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_pairs = Histogram(
            "distilqa_batch_pairs",
            "Pairs answered per batched model call",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.pairs_answered = Counter("distilqa_pairs_answered", "Pairs answered by the model", registry=self.registry)
        self.queue_pairs = Gauge("distilqa_queue_pairs", "Pairs received and not yet answered", registry=self.registry)
        self.queue_pairs.set_function(pending_pairs)
        Info("distilqa_model", "The model being served", registry=self.registry).info(
            {"model": model, "dtype": dtype, "device": device, "version": version}
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, pairs: int) -> None:
        self.batch_pairs.observe(pairs)
        self.pairs_answered.inc(pairs)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
