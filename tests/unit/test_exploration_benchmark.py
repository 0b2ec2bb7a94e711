"""benchmarks/exploration.py's seed summary: per-seed ratios with a t-interval, and runs with
and without the cohort prior merged per seed (issue 11 part 5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.exploration import LoopConfig, ratio_ci, summarize


def test_ratio_ci_is_a_t_interval_over_per_seed_ratios() -> None:
    m, lo, hi = ratio_ci([8.0, 9.0, 10.0], [10.0, 10.0, 10.0])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert m == pytest.approx(0.9)
    assert (lo, hi) == pytest.approx((0.9 - half, 0.9 + half))
    one = ratio_ci([1.0], [2.0])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])


def _run(d: Path, seed: int, cohort: bool, regrets: dict[str, float]) -> None:
    out = d / f"seed-{seed}"
    out.mkdir(parents=True)
    cfg = {"seed": seed, "cohort_prior": cohort}
    res = [{"policy": p, "regret": r, "regret_per_1k": r / 10} for p, r in regrets.items()]
    (out / "exploration.json").write_text(json.dumps({"config": cfg, "results": res}))


def test_summarize_merges_seeds_and_tags_runs_with_the_cohort_prior(tmp_path: Path) -> None:
    for seed, (g, t) in {1: (100.0, 80.0), 2: (100.0, 100.0)}.items():
        _run(tmp_path / "before", seed, False, {"greedy": g, "ts": t})
        _run(tmp_path / "after", seed, True, {"ts": 95.0})
    text = summarize([tmp_path / "before", tmp_path / "after"])
    assert "| seed | greedy | ts | ts (cohort prior) |" in text
    assert "| mean | 10.00 | 9.00 | 9.50 |" in text
    assert "- ts / greedy: 0.900 (95% CI" in text
    assert "- ts (cohort prior) / greedy: 0.950" in text


def test_the_cohort_prior_is_off_by_default() -> None:
    assert not LoopConfig().cohort_prior and LoopConfig().world().ad_quality_sd == 0.5


def test_ts_policy_names_give_temperature_and_sampled_rows() -> None:
    from benchmarks.exploration import make_policy

    cfg = LoopConfig()
    ts, ts_t, ad, ad_t = (make_policy(n, cfg)() for n in ("ts", "ts-0.1", "tsad", "tsad-0.1"))
    assert (ts.temperature, ts.only_field) == (None, None)
    assert (ts_t.temperature, ts_t.only_field) == (0.1, None)
    assert (ad.temperature, ad.only_field) == (None, "ad.id")
    assert (ad_t.temperature, ad_t.only_field, ad_t.name) == (0.1, "ad.id", "tsad-0.1")
