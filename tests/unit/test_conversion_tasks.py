"""Several conversion types as tasks of one pCVR model: per-type policies, labels, restarts."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Conversion, Event, Impression
from ctrloop.core.features import FeatureSpec
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot
from ctrloop.sim import CONVERSION_MIXES, ConversionType, WorldConfig, parsed_events
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig

# A funnel fast enough for a unit test: signups reported live within a minute, purchases
# after minutes and uploaded in bursts by bursty advertisers.
FAST_FUNNEL = (ConversionType("signup", 0.3, 10.0, 60.0, "streaming", 0.7, 0.3),
               ConversionType("purchase", 0.1, 60.0, 300.0, "advertiser", 1.0, 0.3))
TYPES = ("signup", "purchase")


@pytest.fixture(scope="module")
def events() -> list[Event]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CONVERSION_MIXES, "fast_funnel", FAST_FUNNEL)
        world = WorldConfig(seed=5, impressions_per_second=20.0, base_ctr=0.2, base_cvr=0.3,
                            burst_gap_min_s=300.0, burst_gap_max_s=900.0, bursty_share=0.4,
                            conversion_mix="fast_funnel")
        return list(parsed_events(world, 3000))


@pytest.fixture(scope="module")
def spec(events: list[Event]) -> FeatureSpec:
    return FeatureSpec.infer([e for e in events if isinstance(e, Impression)])


def config(policy: str = "fixed:120", types: tuple[str, ...] = TYPES) -> PipelineConfig:
    return PipelineConfig(publish_interval=5.0, allowed_lateness=3.0, delay_policy=policy,
                          joiner=JoinerConfig(click_window=30.0), conversion_types=types,
                          learner=LearnerConfig(batch_size=64, hparams={"dim": 4}))


@dataclass
class Sink:
    rows: list[tuple[str, Any, str]] = field(default_factory=list)

    def __call__(self, ids: list[str], preds: np.ndarray, version: str) -> None:
        self.rows.extend(zip(ids, preds.tolist(), [version] * len(ids), strict=True))


def run(events: list[Event], spec: FeatureSpec, cfg: PipelineConfig,
        **kw: Any) -> tuple[Pipeline, Sink]:
    pcvr = Sink()
    pipe = Pipeline(spec, cfg, served=Sink(), served_cvr=pcvr, **kw)
    for e in events:
        pipe.process(e)
    pipe.finish()
    return pipe, pcvr


def through_torch(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_both_types_occur(events: list[Event]) -> None:
    types = [e.conversion_type for e in events if isinstance(e, Conversion)]
    assert types.count("signup") > 50 and types.count("purchase") > 20


def test_each_type_is_its_own_task(events: list[Event], spec: FeatureSpec) -> None:
    pipe, pcvr = run(events, spec, config())
    assert pipe.cvr_learner.model.name == "stem" and pipe.cvr_learner.model.tasks == TYPES
    # Every impression is served a pCVR per type.
    assert all(len(p) == 2 and all(0 < x < 1 for x in p) for _, p, _ in pcvr.rows)
    # One click sample per click and type, and each type's positives are its own conversions.
    conv = {t: {e.impression_id for e in events
                if isinstance(e, Conversion) and e.conversion_type == t} for t in TYPES}
    clicks = pipe.cvr_policies[0].stats.clicks
    assert clicks > 100
    for task, t in enumerate(TYPES):
        st = pipe.cvr_policies[task].stats
        assert st.clicks == clicks and st.released == clicks  # every attributed click, per type
        assert st.conversions == len(conv[t])  # only its own type's conversions
    # Net labels: every click contributes its eventual label once, per type.
    net: dict[tuple[str, int], float] = {}
    seen: list[Any] = []
    pipe2 = Pipeline(spec, config())
    pipe2.on_cvr_samples = seen.extend
    for e in events:
        pipe2.process(e)
    pipe2.finish()
    for s in seen:
        net[(s.impression_id, s.task)] = net.get((s.impression_id, s.task), 0.0) + \
            s.label * s.weight
    for (iid, task), label in net.items():
        assert label == pytest.approx(1.0 if iid in conv[TYPES[task]] else 0.0)
    assert {task for _, task in net} == {0, 1}
    # With the labels known at once (the oracle: no retraction pairs, whose constant push
    # dominates a world this small), each output learns its own type's rate: on the clicks,
    # signups are three times as frequent as purchases.
    oracle, _ = run(events, spec, config("oracle"), converted=conv)
    rows = np.asarray([s.payload for s in seen if s.kind == "click" and s.task == 0])
    p = oracle.cvr_learner.predict(rows)
    assert p.shape == (len(rows), 2) and p[:, 0].mean() > 1.5 * p[:, 1].mean()
    # Per-type metrics and reports.
    summary = pipe.summary()["cvr"]["by_type"]
    for task, t in enumerate(TYPES):  # samples of positive weight: clicks and late positives
        late = pipe.cvr_policies[task].stats.late_conversions
        assert summary[t]["metrics"]["samples"] == clicks + late
    meta = pipe.head_record_meta("pcvr")
    assert meta["tasks"] == list(TYPES) and set(meta["delays_by_type"]) == set(TYPES)
    assert meta["delays_by_type"]["purchase"]["total"]["clicks"] == \
        pipe.cvr_policies[1].stats.clicks


def test_unlisted_types_are_counted_not_learned(events: list[Event], spec: FeatureSpec) -> None:
    pipe, _ = run(events, spec, config(types=("purchase",)))
    n_signup = sum(1 for e in events
                   if isinstance(e, Conversion) and e.conversion_type == "signup")
    assert pipe.stats.cvr_other_types == n_signup
    assert pipe.cvr_policy.stats.conversions == sum(
        1 for e in events if isinstance(e, Conversion) and e.conversion_type == "purchase")
    # Without types, every conversion counts for the one task (the first one per click).
    legacy, _ = run(events, spec, config(types=()))
    assert legacy.cvr_learner.model.name == "fwfm" and legacy.stats.cvr_other_types == 0
    assert legacy.cvr_policy.stats.conversions == sum(1 for e in events
                                                      if isinstance(e, Conversion))
    assert legacy.cvr_policy.stats.duplicate_conversions > 0  # a click's second type


@pytest.mark.parametrize("policy", ["variance", "fixed:120", "fnw"])
def test_restart_in_the_middle_equals_no_restart(events: list[Event], spec: FeatureSpec,
                                                 policy: str) -> None:
    plain = Pipeline(spec, config(policy))
    for e in events:
        plain.process(e)
    plain.finish()
    pipe = Pipeline(spec, config(policy))
    split = len(events) // 2
    for e in events[:split]:
        pipe.process(e)
    restored = Pipeline(spec, config(policy), seed=999)
    restored.restore(through_torch(pipe.state()))
    assert sum(p.pending + p.remembered for p in restored.cvr_policies) > 0
    for e in events[split:]:
        restored.process(e)
    restored.finish()
    assert restored.stats == plain.stats
    for a, b in zip(plain.cvr_policies, restored.cvr_policies, strict=True):
        assert a.stats == b.stats
    for a, b in zip(plain.cvr_task_metrics, restored.cvr_task_metrics, strict=True):
        assert a.state() == b.state()
    for (k, a), b in zip(plain.cvr_learner.model.state_dict().items(),
                         restored.cvr_learner.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_checkpoint_of_other_types_is_refused(events: list[Event], spec: FeatureSpec) -> None:
    pipe = Pipeline(spec, config(types=("signup",)))
    for e in events[:500]:
        pipe.process(e)
    state = through_torch(pipe.state())
    with pytest.raises(ConfigError, match="CTRLOOP_CONVERSION_TYPES"):
        Pipeline(spec, config()).restore(state)
    with pytest.raises(ConfigError, match="CTRLOOP_CONVERSION_TYPES"):
        Pipeline(spec, config(types=())).restore(state)


def test_head_snapshot_names_its_tasks(events: list[Event], spec: FeatureSpec) -> None:
    pipe, _ = run(events[:1500], spec, config())
    snap = decode_snapshot(pipe.head_snapshots(3, {})["pcvr"])
    assert snap.meta["tasks"] == list(TYPES) and set(snap.meta["metrics_by_type"]) == set(TYPES)
    model = build_from_snapshot(snap)
    assert model.tasks == TYPES
    rows = torch.tensor([[o + 1 for o in spec.offsets]])
    with torch.no_grad():
        assert torch.sigmoid(model(rows)).numpy() == pytest.approx(
            pipe.cvr_learner.predict(rows.numpy()), rel=1e-5)


def test_oracle_reads_the_truth_per_type(spec: FeatureSpec) -> None:
    with pytest.raises(ConfigError, match="per type"):
        Pipeline(spec, config("oracle"), converted={"x"})
    pipe = Pipeline(spec, config("oracle"), converted={"signup": {"a"}, "purchase": set()})
    assert [p.name for p in pipe.cvr_policies] == ["oracle", "oracle"]


def test_bad_type_lists_are_refused() -> None:
    with pytest.raises(ConfigError, match="distinct"):
        PipelineConfig(conversion_types=("a", "a"))
    with pytest.raises(ConfigError, match="pCTR"):
        Pipeline(FeatureSpec.infer([]), PipelineConfig(learner=LearnerConfig(model="stem")))


def test_delay_report_per_type_from_a_checkpoint(events: list[Event], spec: FeatureSpec) -> None:
    from ctrloop.core.delay_report import report_from_pipeline_state

    pipe = Pipeline(spec, config("variance"))
    for e in events:
        pipe.process(e)
    state = through_torch(pipe.state())
    first = report_from_pipeline_state(state)
    purchase = report_from_pipeline_state(state, conversion_type="purchase")
    assert first == report_from_pipeline_state(state, conversion_type="signup")
    assert first == pipe.delay_report()
    assert purchase == pipe.delay_report(task=1)
    assert purchase != first  # its own statistic (reports of purchases only)
    with pytest.raises(ConfigError, match="no conversion type 'lead'"):
        report_from_pipeline_state(state, conversion_type="lead")
