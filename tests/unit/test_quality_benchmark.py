"""benchmarks/quality.py: scoring by segment, intervals across seeds, a --quick run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality
from benchmarks.quality import Truth, interval, score_pctr, score_pcvr


def test_interval_is_the_t_interval_of_the_mean() -> None:
    iv = interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    assert iv["mean"] == pytest.approx(2.0)
    assert iv["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert iv["n"] == 3
    one = interval([0.5, math.nan])
    assert one["mean"] == 0.5 and math.isnan(one["ci95"]) and one["n"] == 1
    assert interval([])["n"] == 0


def _truth(n: int = 4000) -> Truth:
    rng = np.random.default_rng(0)
    ts = np.arange(n, dtype=np.float64) * 100.0  # ~4.6 days
    clicked = rng.random(n) < 0.5
    cvr = rng.uniform(0.05, 0.3, n)
    adv = np.arange(n) % 4
    return Truth(
        ids=[f"i{k}" for k in range(n)], ts=ts, ctr=rng.uniform(0.01, 0.2, n),
        click_label=(rng.random(n) < 0.1).astype(np.float64), clicked=clicked, cvr=cvr,
        converted=(rng.random(n) < cvr).astype(np.float64),
        age=np.where(adv == 0, 3600.0, 10 * 86_400.0), bursty=adv >= 2, advertiser=adv,
        advertisers=["a0", "a1", "a2", "a3"])


def test_score_pcvr_segments() -> None:
    t = _truth()
    # Streaming advertisers (0, 1) predicted 9% high; bursty 2 at -20%, bursty 3 at -5%.
    factor = np.choose(t.advertiser, [1.09, 1.09, 0.8, 0.95])
    s = score_pcvr(t, t.cvr * factor, min_clicks=10)
    assert s["bias_streaming"] == pytest.approx(0.09)
    assert s["bias_new_ads"] == pytest.approx(0.09)  # advertiser 0's ads are the new ones
    assert -0.2 < s["bias_bursty"] < -0.05
    assert s["advertisers_scored"] == 4
    # Within +-10%: 0, 1 and 3; not 2.
    assert s["share_adv_within_10pct"] == pytest.approx(0.75)
    # Only clicks after the first 20% of the stream's time are scored.
    assert s["clicks"] == int(t.clicked[t.start:].sum()) and t.start == 800
    assert [d["day"] for d in s["per_day"]] == [0, 1, 2, 3, 4]
    assert s["per_day"][0]["bias_streaming"] == pytest.approx(0.09)


def test_score_pctr_gap_to_the_true_rates() -> None:
    t = _truth()
    exact = score_pctr(t, t.ctr)
    assert exact["auc_gap"] == pytest.approx(0.0)
    noisy = score_pctr(t, np.full(t.ctr.size, 0.1))
    assert noisy["auc"] == pytest.approx(0.5)
    assert noisy["impressions"] == t.ctr.size - t.start


def test_quick_run_produces_segments_intervals_plots(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--quick", "--jobs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "quality.json").read_text())
    assert res["config"]["seeds"] == list(quality.HELDOUT_SEEDS[:2])  # held-out by default
    assert set(res["aggregate"]) == {"baseline", "random"}
    for name, agg in res["aggregate"].items():
        assert set(agg["pcvr"]) == {"oracle", "variance", "naive"}
        for key in quality.PCVR_KEYS:
            iv = agg["pcvr"]["variance"][key]
            assert iv["n"] == 2 and math.isfinite(iv["mean"]), (name, key)
        assert agg["pctr"]["auc_gap"]["n"] == 2
        assert set(res["goals"][name]) >= {"bias_new_ads", "bias_bursty", "bias_streaming",
                                           "share_adv_within_10pct", "pcvr_auc_gap_to_oracle",
                                           "pctr_auc_gap"}
        svg = (tmp_path / f"quality_{name}.svg").read_text()
        assert svg.startswith("<svg") and "variance" in svg and "<polyline" in svg
    if quality.vw_available():
        assert res["vw"] and "vw_logloss" in res["aggregate"]["baseline"]["pctr"]
    else:
        assert "VW skipped" in out
    assert "| baseline | variance |" in out and "Goals of issue 11" in out
    # An oracle's AUC gap to itself is zero on every seed.
    assert res["aggregate"]["baseline"]["pcvr"]["oracle"]["pcvr_auc_gap_to_oracle"]["mean"] == 0


def test_goals_met_missed_and_not_applicable() -> None:
    agg = {"s": {"pcvr": {"variance": {"bias_new_ads": {"mean": 0.005},
                                       "bias_bursty": {"mean": math.nan},
                                       "bias_streaming": {"mean": -0.04}}},
                 "pctr": {"auc_gap": {"mean": 0.009}}}}
    g = quality.goals(agg)["s"]
    assert g["bias_new_ads"]["met"] is True
    assert g["bias_streaming"]["met"] is False
    assert g["bias_bursty"]["met"] is None  # a world without bursty advertisers
    assert g["pctr_auc_gap"]["met"] is True
    assert g["pctr_logloss_below_vw"]["met"] is None  # VW not run
    assert "— —" in quality.render_goals({"s": g})
