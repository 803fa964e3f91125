"""Prometheus metrics of a serving or watching process, through the standard client library.

One registry per process (per app in tests), exposed at `serve`'s `/metrics` and by `watch
--metrics-port`. Counters count what this process answered since it started; Prometheus adds up
processes and restarts. The gauges read the store or the model queue when scraped.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from vlm_inspect.errors import ConfigError

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""From a classical detector's milliseconds to a generative 7B model's ~10 s per photo."""
DRIFT_CODES = {"collecting": 0, "ok": 1, "warn": 2, "alarm": 3}
CONTENT_TYPE = CONTENT_TYPE_LATEST


class StationMetrics:
    """Inspections, verdicts, latency, queue depth and drift of this process."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.inspections = Counter(
            "vlm_inspect_inspections",
            "Inspections answered, by line, model and verdict.",
            ["line", "model", "verdict"],
            registry=r,
        )
        self.latency = Histogram(
            "vlm_inspect_inspection_latency_seconds",
            "Seconds from request (or photo) to verdict.",
            ["line", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue = Gauge("vlm_inspect_queue_depth", "Requests waiting for the model.", registry=r)
        self.audit_open = Gauge(
            "vlm_inspect_audit_unreviewed",
            "Inspections of the random audit sample no operator has reviewed.",
            registry=r,
        )
        labels = ["line", "model", "model_hash"]
        self.psi = Gauge(
            "vlm_inspect_drift_psi", "Population stability index of the recent p(NG) window.", labels, registry=r
        )
        self.ng_rate = Gauge("vlm_inspect_drift_ng_rate", "NG-verdict share of the recent window.", labels, registry=r)
        self.drift = Gauge(
            "vlm_inspect_drift_status", "Drift status: 0 collecting, 1 ok, 2 warn, 3 alarm.", labels, registry=r
        )

    def inspected(self, line: str, model: str, verdict: str | None, latency_ms: float | None) -> None:
        self.inspections.labels(line, model, verdict or "none").inc()
        if latency_ms is not None:
            self.latency.labels(line, model).observe(latency_ms / 1000.0)

    def read_audit_from(self, count: Callable[[], float]) -> None:
        self.audit_open.set_function(count)

    def drifted(self, line: str, model: str, model_hash: str, status: str, psi: float | None, ng: float | None) -> None:
        self.drift.labels(line, model, model_hash).set(DRIFT_CODES[status])
        if psi is not None:
            self.psi.labels(line, model, model_hash).set(psi)
        if ng is not None:
            self.ng_rate.labels(line, model, model_hash).set(ng)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def serve_metrics(metrics: StationMetrics, host: str, port: int) -> WSGIServer:
    """Expose the metrics at http://host:port/metrics from a background thread (watch); shut it down when done.

    Raises:
        ConfigError: the address cannot be bound.
    """
    try:
        server, _thread = start_http_server(port, host, metrics.registry)
    except OSError as err:
        raise ConfigError([f"metrics_port: cannot listen on {host}:{port} ({err.strerror or err})"]) from None
    return server


def latency_percentiles(buckets: list[int]) -> dict[str, float | None]:
    """p50, p95, p99 in ms from bucket counts, by linear interpolation inside a bucket (as Prometheus does)."""
    total = sum(buckets)
    bounds = [0.0, *(b * 1000 for b in LATENCY_BUCKETS_S)]
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        out[name] = None
        if not total:
            continue
        rank, seen = q * total, 0
        for i, count in enumerate(buckets):
            if count and seen + count >= rank:
                if i >= len(bounds) - 1:  # the open bucket: report its lower edge
                    out[name] = bounds[-1]
                else:
                    out[name] = round(bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - seen) / count, 1)
                break
            seen += count
    out["n"] = total
    return out
