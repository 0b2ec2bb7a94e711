"""The optimised Joiner against a frozen copy of the one before issue 13: the same samples in the
same order, the same stats and the same snapshots, on hostile random streams (duplicates,
orphans, late clicks, evictions, a forget bound, snapshot/restore midway)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ctrloop.core.joining import Joiner, JoinerConfig, Sample
from tests.unit.joiner_reference import ReferenceJoiner

# ("imp" | "click" | "adv" | "snap", id, ts)
Op = tuple[str, str, float]

ops = st.lists(st.tuples(
    st.sampled_from(["imp", "imp", "click", "click", "adv", "snap"]),
    st.sampled_from(["a", "b", "c", "d", "e", "f"]),
    # Some integer timestamps: a caller may pass them, and ints flow into the forget times.
    st.integers(0, 80).map(lambda t: 1000 + t // 2 if t % 3 == 0 else 1000.0 + t / 2)),
    max_size=60)
configs = st.builds(
    JoinerConfig,
    click_window=st.sampled_from([1.0, 5.0, 10]),
    orphan_ttl=st.sampled_from([0.0, 2.0, 5.0]),
    dedup_horizon=st.sampled_from([0.0, 3.0, 100.0]),
    max_pending=st.integers(1, 6),
    max_remembered=st.integers(1, 8),
    evict=st.sampled_from(["emit", "drop"]),
)


def key(s: Sample) -> tuple[Any, ...]:
    return (s.impression_id, s.ts, s.label, s.payload, s.label_ts)


def run(cls: Any, config: JoinerConfig, steps: list[Op]) -> tuple[list[Any], list[Any]]:
    j = cls(config)
    out: list[Any] = []
    snaps: list[Any] = []
    for op, k, t in steps:
        if op == "imp":
            out.append(("imp", [key(s) for s in j.add_impression(k, t, [k, t])]))
        elif op == "click":
            out.append(("click", [key(s) for s in j.add_click(k, t)]))
        elif op == "adv":
            out.append(("adv", [key(s) for s in j.advance(t - 3)]))
        else:
            state = json.loads(json.dumps(j.snapshot()))
            snaps.append(state)
            j = cls.restore(state)
    out.append(("flush", [key(s) for s in j.flush()]))
    snaps.append(j.snapshot())
    out.append(("stats", dict(j.stats.__dict__), j.pending))
    return out, snaps


@settings(max_examples=600, deadline=None)
@given(configs, ops)
def test_same_samples_order_stats_and_snapshots(config: JoinerConfig, steps: list[Op]) -> None:
    assert run(Joiner, config, steps) == run(ReferenceJoiner, config, steps)


def test_a_long_realistic_stream() -> None:
    config = JoinerConfig(click_window=10, orphan_ttl=5, dedup_horizon=50, max_pending=500,
                          max_remembered=2000)
    steps: list[Op] = []
    for i in range(5000):
        t = 1000.0 + i * 0.1
        steps.append(("imp", f"i{i}", t))
        if i % 7 == 0:
            steps.append(("click", f"i{i - 30}", t))  # some within the window, some after
        if i % 11 == 0:
            steps.append(("click", f"o{i}", t))  # orphans that never match
        if i % 13 == 0:
            steps.append(("click", f"i{i + 2}", t))  # before its impression
        steps.append(("adv", "", t))
        if i % 1000 == 999:
            steps.append(("snap", "", t))
    assert run(Joiner, config, steps) == run(ReferenceJoiner, config, steps)
