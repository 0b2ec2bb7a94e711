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
