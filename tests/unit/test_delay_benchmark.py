"""The delay-policy benchmark's own logic: policy labels with overrides, the confusion table."""

from __future__ import annotations

import pytest

from benchmarks.delay_policies import dispersion_check, parse_policy, render_confusion
from ctrloop.core.delays import PolicyConfig


@pytest.mark.parametrize(("label", "name", "overrides"), [
    ("variance", "variance", {}),
    ("fixed:3600", "fixed:3600", {}),
    ("variance{soft_labels=1}", "variance", {"soft_labels": True}),
    ("variance{shrink_reports=3|d_hi=6}", "variance", {"shrink_reports": 3.0, "d_hi": 6.0}),
    ("variance{window_buckets=24}", "variance", {"window_buckets": 24}),
])
def test_parse_policy(label: str, name: str, overrides: dict[str, object]) -> None:
    got_name, config = parse_policy(label)
    assert got_name == name and config == PolicyConfig(**overrides)  # type: ignore[arg-type]


def test_confusion_counts_waits_by_reporting_kind() -> None:
    rows = [
        {"advertiser": "s1", "wait_s": 300.0, "dispersion": 1.0, "window_reports": 30},
        {"advertiser": "s2", "wait_s": 900.0, "dispersion": 2.5, "window_reports": 5},
        {"advertiser": "b1", "wait_s": 300.0, "dispersion": 1.2, "window_reports": 2},
        {"advertiser": "b2", "wait_s": 3 * 86_400.0, "dispersion": 12.0, "window_reports": 25},
        {"advertiser": "b3", "wait_s": 6 * 3600.0, "dispersion": 6.0, "window_reports": 9},
    ]
    check = dispersion_check(rows, bursty={"b1", "b2", "b3"})
    s, b = check["streaming"], check["bursty"]
    assert (s["advertisers"], s["at_floor"], s["between"], s["long_6h_plus"]) == (2, 1, 1, 0)
    assert (b["advertisers"], b["at_floor"], b["between"], b["long_6h_plus"]) == (3, 1, 0, 2)
    assert b["median_dispersion_of_those"] == 12.0  # only advertisers with >= 20 reports
    table = render_confusion([{"ts": 0.0, **check}, {"ts": 1.0, **check}])
    assert "| streaming | 4 | 2 | 2 | 0 |" in table and "| bursty | 6 | 2 | 0 | 4 |" in table


def test_mean_interval_across_seeds() -> None:
    from benchmarks.delay_policies import mean_interval

    m, lo, hi = mean_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / 3 ** 0.5  # t(0.975, 2 df) * sd / sqrt(n)
    assert m == pytest.approx(0.2) and (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)
    assert mean_interval([None, float("nan"), 1.0, 3.0])[0] == pytest.approx(2.0)


def test_aggregate_takes_each_policy_across_seed_tables() -> None:
    from benchmarks.delay_policies import AGG_COLUMNS, aggregate, render_aggregate

    def row(policy: str, x: float) -> dict[str, object]:
        return {"policy": policy, **{c: x for c in AGG_COLUMNS}}

    rows = aggregate([[row("oracle", 0.0), row("naive", -0.2)],
                      [row("oracle", 0.0), row("naive", -0.4)]])
    assert [r["policy"] for r in rows] == ["oracle", "naive"]
    assert rows[1]["bias_bursty"][0] == pytest.approx(-0.3) and rows[1]["seeds"] == 2
    assert "| naive | -0.3000" in render_aggregate(rows)


def test_label_flow_counts_late_corrections_per_reporting_kind() -> None:
    from benchmarks.delay_policies import label_flow_summary

    result = {"label_flow": [["s1", "click", 10, 1.0], ["s1", "late", 3, 3.0],
                             ["s1", "retract", 3, 0.0], ["b1", "click", 5, 0.0],
                             ["b1", "late", 2, 2.0], ["b1", "retract", 2, 0.0]]}
    out = label_flow_summary(result, bursty={"b1"})
    assert "label_flow" not in result
    s, b = out["streaming"], out["bursty"]
    assert (s["clicks"], s["net_label_mass"]) == (10, 4.0)
    assert s["late_share_of_positives"] == pytest.approx(3 / 4)
    assert b["by_kind"]["late"] == {"samples": 2, "label_mass": 2.0}
    assert b["late_share_of_positives"] == 1.0
