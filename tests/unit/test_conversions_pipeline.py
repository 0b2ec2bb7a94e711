"""pCVR in the pipeline: served pCVR per impression, learning from the policy, exact restarts."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.core.events import Event, Impression
from ctrloop.core.features import FeatureSpec
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig
from ctrloop.sim import WorldConfig, parsed_events
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig

FAST = WorldConfig(seed=4, impressions_per_second=20.0, base_ctr=0.2, base_cvr=0.3,
                   conversion_delay_median_min_s=20.0, conversion_delay_median_max_s=300.0,
                   burst_gap_min_s=300.0, burst_gap_max_s=900.0, bursty_share=0.4)


def config(policy: str) -> PipelineConfig:
    return PipelineConfig(publish_interval=5.0, allowed_lateness=3.0, delay_policy=policy,
                          joiner=JoinerConfig(click_window=30.0),
                          learner=LearnerConfig(batch_size=64, hparams={"dim": 4}))


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return list(parsed_events(FAST, 2500))


@pytest.fixture(scope="module")
def spec(events: list[Event]) -> FeatureSpec:
    return FeatureSpec.infer([e for e in events if isinstance(e, Impression)])


@dataclass
class Sink:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def __call__(self, ids: list[str], preds: np.ndarray, version: str) -> None:
        self.rows.extend(zip(ids, preds.tolist(), [version] * len(ids), strict=True))


def through_torch(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run(events: list[Event], spec: FeatureSpec, policy: str) -> tuple[Pipeline, Sink, Sink]:
    pctr, pcvr = Sink(), Sink()
    pipe = Pipeline(spec, config(policy), served=pctr, served_cvr=pcvr)
    for e in events:
        pipe.process(e)
    pipe.finish()
    return pipe, pctr, pcvr


def test_every_impression_gets_a_pcvr_and_the_pctr_path_is_unchanged(
        events: list[Event], spec: FeatureSpec) -> None:
    pipe, pctr, pcvr = run(events, spec, "fixed:60")
    assert [r[0] for r in pcvr.rows] == [r[0] for r in pctr.rows]
    assert [r[2] for r in pcvr.rows] == [r[2] for r in pctr.rows]  # one snapshot, both models
    assert all(0 < r[1] < 1 for r in pcvr.rows)
    assert pipe.stats.cvr_learned > 100 and pipe.cvr_policy.stats.released > 100
    # pCTR learning does not depend on the delay policy.
    other, pctr2, _ = run(events, spec, "naive")
    assert other.stats.learned_digest == pipe.stats.learned_digest
    for a, b in zip(pipe.learner.model.state_dict().values(),
                    other.learner.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r[1] for r in pctr.rows] == [r[1] for r in pctr2.rows]


@pytest.mark.parametrize("policy", ["variance", "fixed:60", "fnw"])
def test_restart_in_the_middle_equals_no_restart(events: list[Event], spec: FeatureSpec,
                                                 policy: str) -> None:
    plain, _, _ = run(events, spec, policy)
    assert plain.cvr_policy.stats.late_conversions + plain.cvr_policy.stats.released_positive > 0
    pipe = Pipeline(spec, config(policy))
    split = len(events) // 2
    for e in events[:split]:
        pipe.process(e)
    restored = Pipeline(spec, config(policy), seed=999)
    restored.restore(through_torch(pipe.state()))
    assert restored.cvr_policy.pending + restored.cvr_policy.remembered > 0
    for e in events[split:]:
        restored.process(e)
    restored.finish()
    assert restored.stats == plain.stats
    assert restored.cvr_policy.stats == plain.cvr_policy.stats
    for (k, a), b in zip(plain.cvr_learner.model.state_dict().items(),
                         restored.cvr_learner.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_oracle_needs_the_truth(spec: FeatureSpec) -> None:
    with pytest.raises(Exception, match="truth"):
        Pipeline(spec, config("oracle"))
    pipe = Pipeline(spec, config("oracle"), converted={"x"})
    assert pipe.cvr_policy.name == "oracle"


def test_head_snapshot_loads_as_a_standard_snapshot(events: list[Event],
                                                    spec: FeatureSpec) -> None:
    from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot

    pipe, _, _ = run(events[:800], spec, "fixed:60")
    blob = pipe.head_snapshots(7, {"event_time": 1.0})["pcvr"]
    snap = decode_snapshot(blob)
    assert snap.version == 7 and snap.meta["head"] == "pcvr"
    assert snap.meta["delay_policy"] == "fixed:60"
    model = build_from_snapshot(snap)
    rows = torch.tensor([[o + 1 for o in spec.offsets]])
    with torch.no_grad():
        expected = pipe.cvr_learner.predict(rows.numpy())
        assert torch.sigmoid(model(rows)).numpy() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("model", ["fwfm", "lr", "gwpfm", "hmoe", "dcnv2"])
def test_every_architecture_starts_pcvr_at_the_conversion_prior(spec: FeatureSpec,
                                                                 model: str) -> None:
    """Before it learns anything, the pCVR head predicts conversions per click (0.05), not the
    pCTR prior (0.03), whatever the architecture."""
    learner = LearnerConfig(model=model, batch_size=64)
    pipe = Pipeline(spec, PipelineConfig(learner=learner))
    # Every field missing: one row per field; random init moves the logit by ~1e-3 at most.
    rows = np.array([pipe.encoder.encode_features({})] * 3, dtype=np.int64)
    assert pipe.cvr_learner.predict(rows) == pytest.approx([0.05] * 3, rel=0.01)
    assert pipe.learner.predict(rows) == pytest.approx([0.03] * 3, rel=0.01)
