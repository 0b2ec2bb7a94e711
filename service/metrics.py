"""Prometheus metrics of the scoring service.

With several uvicorn workers each process counts on its own; `ctrloop serve --workers N` sets
PROMETHEUS_MULTIPROC_DIR before the workers start, and /metrics then aggregates every worker's
files (prometheus_client's multiprocess mode), so a scrape sees the whole service whichever
worker answers it.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["CONTENT_TYPE", "Metrics", "render"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Metrics:
    """One set per app instance, in its own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        self.request_seconds = Histogram(
            "ctrloop_request_seconds",
            "Handler latency by route (excludes queueing in uvicorn)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.requests = Counter(
            "ctrloop_requests",
            "Requests by route and status class",
            ["route", "status"],
            registry=reg,
        )
        self.candidates_scored = Counter(
            "ctrloop_candidates_scored", "Candidates scored by /v1/score", registry=reg
        )
        self.scores_by_model = Counter(
            "ctrloop_score_requests_by_status",
            "Score requests by model status (prior/trained/pinned)",
            ["model_status"],
            registry=reg,
        )
        self.model_version = Gauge(
            "ctrloop_model_version",
            "Registry version being served (0 = prior)",
            multiprocess_mode="max",
            registry=reg,
        )
        self.model_published = Gauge(
            "ctrloop_model_published_timestamp_seconds",
            "When the served version was published",
            multiprocess_mode="max",
            registry=reg,
        )
        self.model_samples = Gauge(
            "ctrloop_model_samples_seen",
            "Samples the served model learned from",
            multiprocess_mode="max",
            registry=reg,
        )
        self.trainer_dead_lettered = Gauge(
            "ctrloop_trainer_dead_lettered",
            "Messages the trainer sent to the dead-letter topic, as of the served model",
            multiprocess_mode="max",
            registry=reg,
        )
        self.reloads = Counter("ctrloop_model_reloads", "Models swapped in", registry=reg)
        self.reload_failures = Counter(
            "ctrloop_model_reload_failures",
            "Snapshots refused or not fetched",
            ["reason"],
            registry=reg,
        )
        self.reload_seconds = Histogram(
            "ctrloop_model_reload_seconds",
            "Fetch-verify-build time of a model",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=reg,
        )
        self.events_produced = Counter(
            "ctrloop_events_produced",
            "Events acknowledged by Kafka via /v1/events",
            ["type"],
            registry=reg,
        )
        self.events_rejected = Counter(
            "ctrloop_events_rejected", "Events refused by /v1/events (4xx)", registry=reg
        )
        self.events_unavailable = Counter(
            "ctrloop_events_unavailable", "Event batches answered 503 (Kafka down)", registry=reg
        )
        self.impressions_logged = Counter(
            "ctrloop_impressions_logged",
            "Impressions from /v1/score acknowledged by Kafka",
            registry=reg,
        )
        self.impressions_log_failed = Counter(
            "ctrloop_impressions_log_failed",
            "Impressions from /v1/score lost (queue full or delivery failed)",
            registry=reg,
        )


def render(metrics: Metrics) -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return generate_latest(reg)
    return generate_latest(metrics.registry)
