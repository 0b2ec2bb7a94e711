"""Prometheus metrics of the scoring service.

With several uvicorn workers each process counts on its own; `ctrloop serve --workers N` sets
PROMETHEUS_MULTIPROC_DIR before the workers start, and /metrics then aggregates every worker's
files (prometheus_client's multiprocess mode), so a scrape sees the whole service whichever
worker answers it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
            "Snapshots refused (invalid) or not fetched (fetch), a damaged registry entry "
            "(registry, once per distinct problem), an unexpected reload error (error)",
            ["reason"],
            registry=reg,
        )
        self.nonfinite_predictions = Counter(
            "ctrloop_nonfinite_predictions",
            "Candidates whose prediction was NaN or infinite and was answered with the prior, "
            "by output (pctr, pcvr, logit_std)",
            ["output"],
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
            "Impressions from /v1/score lost (Kafka unavailable, queue full or delivery "
            "failed)",
            registry=reg,
        )
        self.kafka_available = Gauge(
            "ctrloop_kafka_available",
            "1 while Kafka takes this process's impressions, 0 during an outage (the lowest "
            "worker's)",
            multiprocess_mode="min",
            registry=reg,
        )
        # Exploration (docs/exploration.md): the share is explored / all decisions.
        self.explore_decisions = Counter(
            "ctrloop_explore_decisions",
            "Score requests by ranking used: explored, or why not (not_requested, disabled, "
            "no_posterior, cost_cap, share_cap)",
            ["decision"],
            registry=reg,
        )
        self._explore_decision: dict[str, Any] = {}
        self.explore_cost = Histogram(
            "ctrloop_explore_cost",
            "Per explored request: 1 - mean-model value of the explored top k / of the greedy "
            "top k",
            buckets=(0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=reg,
        )
        self.explore_cost_avg = Gauge(
            "ctrloop_explore_cost_running_avg",
            "Running average exploration cost over requests asking to explore (what "
            "CTRLOOP_EXPLORE_COST_CAP bounds); the highest worker's",
            multiprocess_mode="max",
            registry=reg,
        )
        self.delays = DelayGauges()
        reg.register(self.delays)
        self.collapse = CollapseGauges()
        reg.register(self.collapse)

    def explore_decision(self, decision: str) -> Any:
        """The decision's counter child, looked up once: `labels()` costs ~10 us a call."""
        child = self._explore_decision.get(decision)
        if child is None:
            child = self._explore_decision[decision] = self.explore_decisions.labels(decision)
        return child


# (metric name, help, report field): one gauge per field, labelled by advertiser.
_DELAY_GAUGES = (
    ("ctrloop_delay_wait_seconds", "Current conversion-delay wait of the advertiser's clicks",
     "wait_s"),
    ("ctrloop_delay_dispersion", "Index of dispersion of conversion reports (raw)",
     "dispersion"),
    ("ctrloop_delay_dispersion_shrunk", "Index of dispersion shrunk toward the pool",
     "dispersion_shrunk"),
    ("ctrloop_delay_window_reports", "Conversion reports in the statistic's window",
     "window_reports"),
    ("ctrloop_delay_clicks_recent", "Clicks, decayed (the ranking of the top N)",
     "clicks_recent"),
    ("ctrloop_cvr_observed", "Conversions per click over recent matured clicks",
     "observed_cvr"),
    ("ctrloop_cvr_history", "Conversions per click over every matured click", "history_cvr"),
    ("ctrloop_pcvr_calibration", "Sum pCVR / sum conversions over recent matured clicks",
     "calibration"),
)


class DelayGauges(Collector):
    """Per-advertiser gauges of the delay policy, from the served pCVR head's record.

    Built at scrape time from the last report (`update`), not kept as labelled Gauge children:
    the label set is exactly the report's top N advertisers plus `_other` and `_total`, and an
    advertiser that left the top N disappears instead of lingering (labelled children would
    stay forever, and in multiprocess mode their files too). Fields that are null (no matured
    click yet, a policy without a statistic) are left out rather than exported as NaN.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, Any]] = {}

    def update(self, report: dict[str, Any] | None,
               by_type: dict[str, dict[str, Any]] | None = None) -> None:
        """`by_type`: a pCVR head learned per conversion type has a report per type (labelled
        `conversion_type`); a one-task head's single report is labelled "default"."""
        with self._lock:
            self._reports = dict(by_type) if by_type else {"default": report} if report else {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            reports = self._reports
        if not reports:
            return
        rows = []
        for ctype, report in reports.items():
            for r in [*report.get("advertisers", []),
                      *(report[k] for k in ("other", "total") if report.get(k))]:
                rows.append((ctype, r))
        for name, help_, field_ in _DELAY_GAUGES:
            g = GaugeMetricFamily(name, help_, labels=["advertiser", "conversion_type"])
            for ctype, r in rows:
                v = r.get(field_)
                if v is not None:
                    g.add_metric([str(r["advertiser"]), ctype], float(v))
            yield g


class CollapseGauges(Collector):
    """Information Abundance per field and embedding table of the served models (paper §7,
    ctrloop/core/analysis.py), from the "collapse" entry the trainer puts in each head's
    record: dimensional collapse watched like latency. A field whose IA falls toward 1 spans
    fewer and fewer directions.

    Built at scrape time from the served records (`update`), like DelayGauges: a field or table
    of an older model disappears with it. `rows` is how many trained rows the IA is over (a
    field with 2 values has IA <= 2 however healthy).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heads: dict[str, dict[str, Any]] = {}

    def update(self, heads: dict[str, dict[str, Any] | None]) -> None:
        """`heads`: head name ("pctr", "pcvr") -> its record's "collapse" entry (or None)."""
        with self._lock:
            self._heads = {h: c for h, c in heads.items() if isinstance(c, dict)}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            heads = self._heads
        if not heads:
            return
        ia = GaugeMetricFamily("ctrloop_model_information_abundance",
                               "Information Abundance (sum sigma / max sigma) of a field's "
                               "trained embedding rows, L2-normalised, per table, in the served "
                               "model", labels=["head", "table", "field"])
        rows = GaugeMetricFamily("ctrloop_model_embedding_rows_trained",
                                 "Trained embedding rows of a field the IA is computed over",
                                 labels=["head", "table", "field"])
        for head, entry in heads.items():
            tables = entry.get("tables")
            for table, fields in (tables.items() if isinstance(tables, dict) else ()):
                for name, v in (fields.items() if isinstance(fields, dict) else ()):
                    try:
                        value, count = float(v["ia"]), float(v["rows"])
                    except (KeyError, TypeError, ValueError):
                        continue  # a record from another writer must not break the scrape
                    labels = [head, str(table), str(name)]
                    ia.add_metric(labels, value)
                    rows.add_metric(labels, count)
        yield ia
        yield rows


def render(metrics: Metrics) -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        # Per process by design: the reports travel with the model this worker serves.
        reg.register(metrics.delays)
        reg.register(metrics.collapse)
        return generate_latest(reg)
    return generate_latest(metrics.registry)
