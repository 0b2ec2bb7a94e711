"""The learning loop: event time drives scoring, learning and publication; checkpoints are exact."""

from __future__ import annotations

import io
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Click, Conversion, Event, Impression
from ctrloop.core.features import FeatureSpec
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig
from ctrloop.sim import WorldConfig, parsed_events
from ctrloop.trainer.pipeline import PRIOR_VERSION, CountingPublisher, Pipeline, PipelineConfig

WINDOW = 10.0
CONFIG = PipelineConfig(
    publish_interval=1.0,
    allowed_lateness=3.0,
    joiner=JoinerConfig(click_window=WINDOW),
    learner=LearnerConfig(batch_size=64, hparams={"dim": 4}, metrics_window=10_000),
)


def sim_events(n: int, seed: int = 3) -> list[Event]:
    return list(parsed_events(WorldConfig(impressions_per_second=30, seed=seed, base_ctr=0.1),
                              n))


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return sim_events(1200)


@pytest.fixture(scope="module")
def spec(events: list[Event]) -> FeatureSpec:
    return FeatureSpec.infer([e for e in events if isinstance(e, Impression)])


@dataclass
class Served:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def __call__(self, ids: list[str], preds: np.ndarray, version: str) -> None:
        assert preds.dtype == np.float32 and preds.shape == (len(ids),)
        self.rows.extend(zip(ids, preds.tolist(), [version] * len(ids), strict=True))


class RecordingPublisher(CountingPublisher):
    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.version = start
        self.published: list[tuple[float, str]] = []

    def __call__(self, pipeline: Pipeline, clock: float) -> str | None:
        version = super().__call__(pipeline, clock)
        assert version is not None
        self.published.append((clock, version))
        return version


@dataclass
class Run:
    pipe: Pipeline
    served: Served
    publisher: RecordingPublisher


def run(events: list[Event], spec: FeatureSpec, config: PipelineConfig = CONFIG,
        served: bool = True) -> Run:
    sink = Served()
    pub = RecordingPublisher()
    pipe = Pipeline(spec, config, publisher=pub, served=sink if served else None)
    for e in events:
        pipe.process(e)
    pipe.finish()
    return Run(pipe, sink, pub)


@pytest.fixture(scope="module")
def full(events: list[Event], spec: FeatureSpec) -> Run:
    return run(events, spec)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="publish_interval"):
        PipelineConfig(publish_interval=0)
    with pytest.raises(ConfigError, match="publish_interval"):
        PipelineConfig(publish_interval=math.nan)
    with pytest.raises(ConfigError, match="allowed_lateness"):
        PipelineConfig(allowed_lateness=-1)


def test_one_prediction_per_impression_in_arrival_order(events: list[Event],
                                                        full: Run) -> None:
    imps = [e.impression_id for e in events if isinstance(e, Impression)]
    assert [r[0] for r in full.served.rows] == imps
    preds = np.array([r[1] for r in full.served.rows])
    assert np.all((preds > 0) & (preds < 1))


def test_served_version_is_the_last_published_before_the_impression(events: list[Event],
                                                                     full: Run) -> None:
    published = full.publisher.published
    clocks = [c for c, _ in published]
    assert clocks == sorted(clocks)
    assert [int(v) for _, v in published] == list(range(1, len(published) + 1))
    ts = {e.impression_id: e.ts for e in events if isinstance(e, Impression)}
    versions = []
    for iid, _, version in full.served.rows:
        k = bisect_right(clocks, ts[iid])
        expected = PRIOR_VERSION if k == 0 else published[k - 1][1]
        assert version == expected, iid
        versions.append(int(version))
    assert versions[0] == 0 and versions == sorted(versions)
    assert len(set(versions)) > 10  # many publications during the stream
    assert full.pipe.model_version == published[-1][1]


def test_counts_add_up(events: list[Event], full: Run) -> None:
    st, js = full.pipe.stats, full.pipe.joiner.stats
    n_imps = sum(isinstance(e, Impression) for e in events)
    assert st.events == len(events)
    assert st.impressions == js.impressions == n_imps
    assert st.clicks == sum(isinstance(e, Click) for e in events)
    assert st.conversions == sum(isinstance(e, Conversion) for e in events)
    # Every impression became exactly one sample: learned, or skipped during warm-up.
    assert js.positives + js.negatives == n_imps
    assert st.learned + st.warmup_skipped == n_imps
    assert st.learned_positives == js.positives - st.warmup_skipped
    assert st.warmup_skipped > 0
    assert st.publications == len(full.publisher.published)
    assert full.pipe.learner.samples_seen == st.learned
    assert full.pipe.joiner.pending == 0
    summary = full.pipe.summary()
    assert summary["pipeline"]["learned"] == st.learned
    assert summary["metrics"]["samples"] == st.learned
    assert summary["model_version"] == full.pipe.model_version


def test_deterministic(events: list[Event], spec: FeatureSpec, full: Run) -> None:
    again = run(events, spec)
    assert again.served.rows == full.served.rows
    assert again.pipe.stats == full.pipe.stats
    assert again.publisher.published == full.publisher.published


def test_without_warmup_every_sample_is_learned(events: list[Event], spec: FeatureSpec) -> None:
    cfg = PipelineConfig(publish_interval=5.0, allowed_lateness=3.0, warmup=False,
                         joiner=CONFIG.joiner, learner=CONFIG.learner)
    r = run(events[:400], spec, cfg, served=False)
    assert r.pipe.stats.warmup_skipped == 0
    assert r.pipe.stats.learned == r.pipe.stats.impressions


def _through_torch_save(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the trainer does: never unpickles code


def test_state_restore_midway_equals_an_uninterrupted_run(events: list[Event],
                                                          spec: FeatureSpec,
                                                          full: Run) -> None:
    sink = Served()
    pub = RecordingPublisher()
    pipe = Pipeline(spec, CONFIG, publisher=pub, served=sink)
    state = None
    split = 0
    for split, e in enumerate(events):
        pipe.process(e)
        if split >= len(events) // 2:
            try:  # possible only right after a tick, with no impression left to score
                state = pipe.state()
                break
            except RuntimeError:
                continue
    assert state is not None and split < 0.8 * len(events)
    saved = _through_torch_save(state)
    # The original goes on after the checkpoint and must be unaffected by taking it ...
    for e in events[split + 1:]:
        pipe.process(e)
    pipe.finish()
    assert sink.rows == full.served.rows
    # ... and pipelines restored from the checkpoint (kept in memory, or saved and loaded)
    # continue exactly as the uninterrupted run does.
    for st in (state, saved):
        rest = Served(list(sink.rows[:_served_before(sink, events, split)]))
        pub2 = RecordingPublisher(start=int(st["model_version"]))
        restored = Pipeline(spec, CONFIG, publisher=pub2, served=rest)
        restored.restore(st)
        for e in events[split + 1:]:
            restored.process(e)
        restored.finish()
        assert restored.stats == full.pipe.stats
        assert restored.stats.learned_digest == full.pipe.stats.learned_digest
        assert restored.joiner.stats == full.pipe.joiner.stats
        assert rest.rows == full.served.rows
        assert pub2.published == full.publisher.published[-len(pub2.published):]
        assert _same_report(restored, full.pipe)


def _served_before(sink: Served, events: list[Event], split: int) -> int:
    imps = {e.impression_id for e in events[:split + 1] if isinstance(e, Impression)}
    return sum(1 for r in sink.rows if r[0] in imps)


def _same_report(a: Pipeline, b: Pipeline) -> bool:
    ra, rb = a.learner.metrics.report().as_dict(), b.learner.metrics.report().as_dict()
    return all(ra[k] == pytest.approx(rb[k], nan_ok=True) for k in ra)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.15, 0.6],
                         ids=["before-any-event", "first-window", "warm-up", "warm"])
def test_checkpoint_anywhere_learns_exactly_once(events: list[Event], spec: FeatureSpec,
                                                fraction: float) -> None:
    """Without a served sink a checkpoint can be taken after any event (as the trainer does);
    restored, the pipeline learns exactly what an uninterrupted one learns, warm-up included."""
    evs = events[:700]
    plain = run(evs, spec, served=False).pipe
    split = int(fraction * len(evs))
    pipe = Pipeline(spec, CONFIG)
    for e in evs[:split]:
        pipe.process(e)
    restored = Pipeline(spec, CONFIG, seed=12345)
    restored.restore(_through_torch_save(pipe.state()))
    for e in evs[split:]:
        restored.process(e)
    restored.finish()
    assert restored.stats == plain.stats
    for (k, a), b in zip(plain.learner.model.state_dict().items(),
                         restored.learner.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_state_refuses_unscored_impressions(events: list[Event], spec: FeatureSpec) -> None:
    pipe = Pipeline(spec, CONFIG, served=Served())
    first = next(e for e in events if isinstance(e, Impression))
    pipe.process(first)
    with pytest.raises(RuntimeError, match="unscored impressions"):
        pipe.state()


def test_process_rejects_non_events(spec: FeatureSpec) -> None:
    pipe = Pipeline(spec, CONFIG)
    pipe.process(Click("x", 1767225600.0))
    with pytest.raises(TypeError, match="not an event"):
        pipe.process(SimpleNamespace(ts=1767225601.0))  # type: ignore[arg-type]


def test_conversions_are_counted_and_not_learned(spec: FeatureSpec) -> None:
    pipe = Pipeline(spec, CONFIG)
    pipe.process(Conversion("x", 1767225600.0))
    pipe.finish()
    assert pipe.stats.conversions == 1 and pipe.stats.learned == 0


def test_advance_idle_closes_windows_without_events(spec: FeatureSpec) -> None:
    cfg = PipelineConfig(publish_interval=1.0, allowed_lateness=3.0, warmup=False,
                         joiner=CONFIG.joiner, learner=CONFIG.learner)
    sink = Served()
    pipe = Pipeline(spec, cfg, served=sink)
    t0 = 1767225600.0
    pipe.process(Impression("a", t0, "u1", "a1", "adv1", {}))
    pipe.advance_idle(t0 + WINDOW + 2.0)  # watermark still before the deadline
    assert pipe.stats.learned == 0
    assert [r[0] for r in sink.rows] == ["a"] and sink.rows[0][2] == PRIOR_VERSION
    pipe.advance_idle(t0 + WINDOW + 3.0)
    assert pipe.stats.learned == 1 and pipe.stats.learned_positives == 0
    assert pipe.model_version == "1" and pipe.stats.publications == 1
    pipe.advance_idle(t0)  # never backwards
    assert pipe.tracker.clock == t0 + WINDOW + 3.0


def test_impressions_are_scored_by_the_model_of_their_time(spec: FeatureSpec) -> None:
    """A tick scores the impressions that came before it, then learns, then publishes."""
    cfg = PipelineConfig(publish_interval=1.0, allowed_lateness=0.0, warmup=False,
                         joiner=JoinerConfig(click_window=1.0), learner=CONFIG.learner)
    sink = Served()
    pipe = Pipeline(spec, cfg, served=sink)
    t0 = 1767225600.0
    imp = Impression("a", t0, "u1", "a1", "adv1", {})
    pipe.process(imp)
    pipe.process(Click("a", t0 + 0.5))
    pipe.process(Impression("b", t0 + 1.0, "u1", "a1", "adv1", {}))  # tick: learn a, publish 1
    pipe.process(Impression("c", t0 + 1.5, "u1", "a1", "adv1", {}))
    pipe.process(Click("zz", t0 + 2.0))  # tick: score b and c with version 1
    assert sink.rows[0][0] == "a" and sink.rows[0][2] == "0"
    assert [(r[0], r[2]) for r in sink.rows[1:]] == [("b", "1"), ("c", "1")]
    # The same features after learning a positive: the served pCTR went up.
    assert sink.rows[1][1] > sink.rows[0][1]
