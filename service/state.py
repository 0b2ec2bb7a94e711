"""What one service process holds: settings, registry, sink, metrics, the served model and its
reloader, and the exploration budget. The routes read it; `create_app` builds it."""

from __future__ import annotations

import os
import time
from typing import Any

from ctrloop.core.exploration import ExplorationBudget, generator
from ctrloop.io.registry import ModelRegistry
from ctrloop.service.metrics import Metrics
from ctrloop.service.reloader import ModelHolder, Reloader
from ctrloop.service.settings import ServiceSettings
from ctrloop.service.sink import EventSink


class ServiceState:
    def __init__(self, settings: ServiceSettings, registry: ModelRegistry,
                 sink: EventSink | None, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        expected = None
        if settings.feature_spec is not None:
            from ctrloop.core.features import FeatureSpec

            expected = FeatureSpec.load(settings.feature_spec)
        self.holder = ModelHolder(settings.prior_ctr, expected)
        self.reloader = Reloader(registry, self.holder, settings.reload_poll_s,
                                 on_swap=self._swapped, on_failure=self._failed)
        self.holder.on_nonfinite = self._nonfinite
        self.ready = False
        self.started_at = time.time()
        self.requests = 0
        # Per worker: each process bounds its own exploration cost (no shared state to lock).
        self.budget = ExplorationBudget(cost_cap=settings.explore_cost_cap,
                                        max_share=settings.explore_max_share)
        # Draws of unseeded explored requests: one stream per process, seeded once from the
        # OS's entropy (reseeding per request measured ~15-20 us here). Only the event loop's
        # thread uses it.
        self.rng = generator()
        # Which process answered: with several workers, versions only increase per process.
        self.worker_header = {"x-ctrloop-worker": str(os.getpid())}

    def _swapped(self, served: Any) -> None:
        m = self.metrics
        m.reloads.inc()
        m.reload_seconds.observe(served.load_seconds)
        m.model_version.set(served.number)
        if served.record is not None:
            m.model_published.set(served.record.published_at)
            meta = served.record.meta
            m.model_samples.set(meta.get("samples_seen", 0))
            m.trainer_dead_lettered.set(meta.get("trainer", {}).get("dead_lettered", 0))
        cvr_record = getattr(served, "cvr_record", None)
        meta = cvr_record.meta if cvr_record is not None else {}
        m.delays.update(meta.get("delays"), meta.get("delays_by_type"))
        m.collapse.update({
            "pctr": served.record.meta.get("collapse") if served.record is not None else None,
            "pcvr": meta.get("collapse")})

    def _failed(self, reason: str) -> None:
        self.metrics.reload_failures.labels(reason).inc()

    def _nonfinite(self, output: str, n: int) -> None:
        self.metrics.nonfinite_predictions.labels(output).inc(n)
