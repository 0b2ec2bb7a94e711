"""Simulated conversions: per-advertiser CVR, delays and reporting; clicks unchanged."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from ctrloop.core.metrics import auc
from ctrloop.sim.stream import generate
from ctrloop.sim.world import World, WorldConfig

# Short delays and frequent uploads so a small stream shows every behaviour.
FAST = dict(seed=5, impressions_per_second=20.0, base_ctr=0.2, base_cvr=0.3,
            conversion_delay_median_min_s=60.0, conversion_delay_median_max_s=1800.0,
            burst_gap_min_s=1800.0, burst_gap_max_s=7200.0, bursty_share=0.4)
N = 20_000

Pairs = list[tuple[dict[str, Any], dict[str, Any] | None]]


@pytest.fixture(scope="module")
def stream() -> Pairs:
    return list(generate(WorldConfig(**FAST), N))


def test_conversions_follow_clicks_and_match_the_truth(stream: Pairs) -> None:
    truth = {t["impression_id"]: t for _, t in stream if t is not None}
    clicks = {e["impression_id"]: e["ts"] for e, t in stream
              if t is None and "conversion_type" not in e}
    convs = [e for e, t in stream if t is None and "conversion_type" in e]
    assert len(convs) > 300
    assert len({c["impression_id"] for c in convs}) == len(convs)  # at most one per click
    for c in convs:
        t = truth[c["impression_id"]]
        assert set(c) == {"impression_id", "ts", "conversion_type"}
        assert t["converted"] and t["clicked"]
        assert c["ts"] == t["conversion_reported_ts"] >= t["conversion_ts"] > clicks[
            c["impression_id"]]
    converted = {i for i, t in truth.items() if t["converted"]}
    assert converted == {c["impression_id"] for c in convs}
    for t in truth.values():
        assert 0 < t["cvr"] < 1 and t["reporting"] in ("streaming", "bursty")
        assert t["converted"] <= t["clicked"]


def test_cvr_is_calibrated_and_learnable(stream: Pairs) -> None:
    clicked = [t for _, t in stream if t is not None and t["clicked"]]
    cvr = np.array([t["cvr"] for t in clicked])
    y = np.array([t["converted"] for t in clicked], dtype=np.float64)
    assert y.mean() == pytest.approx(cvr.mean(), abs=0.03)
    assert 0.2 < cvr.mean() < 0.4  # base_cvr 0.3, calibrated over (user, ad) pairs
    assert auc(y, cvr) > 0.65  # features and ids carry the signal


def test_bursty_advertisers_report_in_uploads(stream: Pairs) -> None:
    truth = {t["impression_id"]: t for _, t in stream if t is not None}
    reports: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e, t in stream:
        if t is None and "conversion_type" in e:
            tr = truth[e["impression_id"]]
            reports[(tr["reporting"], tr["advertiser_id"])].append(e["ts"])
    per_upload = {kind: np.mean([len(v) / len(set(v)) for (k, _), v in reports.items()
                                 if k == kind and len(v) >= 5])
                  for kind in ("streaming", "bursty")}
    assert per_upload["streaming"] == pytest.approx(1.0, abs=0.05)  # each at its own time
    assert per_upload["bursty"] > 2.0  # many share an upload time


def test_click_stream_does_not_depend_on_conversions() -> None:
    def clicks(cfg: WorldConfig) -> list[tuple[str, float]]:
        return [(e["impression_id"], e["ts"]) for e, t in generate(cfg, 3000)
                if t is None and "conversion_type" not in e]

    base = dict(FAST)
    with_conv = clicks(WorldConfig(**base))
    base["base_cvr"] = 0.0
    without = clicks(WorldConfig(**base))
    base["base_cvr"], base["bursty_share"] = 0.05, 1.0
    other_mix = clicks(WorldConfig(**base))
    assert with_conv == without == other_mix


def test_profiles_are_per_advertiser_and_the_mix_is_a_knob() -> None:
    w = World(WorldConfig(seed=1, bursty_share=0.3))
    share = np.mean([p.reporting == "bursty" for p in w.conversion_profiles])
    assert 0.2 < share < 0.4
    medians = [p.delay_median_s for p in w.conversion_profiles]
    assert min(medians) >= 300.0 and max(medians) <= 43_200.0
    more = World(WorldConfig(seed=1, bursty_share=0.6))
    bursty = {i for i, p in enumerate(w.conversion_profiles) if p.reporting == "bursty"}
    assert bursty <= {i for i, p in enumerate(more.conversion_profiles)
                      if p.reporting == "bursty"}
    with pytest.raises(ValueError):
        WorldConfig(bursty_share=1.5)
    with pytest.raises(ValueError):
        WorldConfig(burst_gap_min_s=10.0, burst_gap_max_s=5.0)


def test_upload_schedule_is_the_same_in_any_query_order() -> None:
    w1, w2 = World(WorldConfig(seed=2, bursty_share=1.0)), World(WorldConfig(seed=2,
                                                                             bursty_share=1.0))
    rng = np.random.default_rng(0)
    t0 = w1.config.start_ts
    ts = t0 + rng.uniform(0, 10 * 86_400.0, 50)
    a = [w1.report_ts(0, t, rng) for t in ts]
    b = [w2.report_ts(0, t, rng) for t in sorted(ts)]
    assert sorted(a) == b and all(r >= t for r, t in zip(a, ts, strict=True))
