"""Conversion-delay policies: window edges, corrections, the variance statistic, state, the cap."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrloop.core.delays import (
    CvrSample,
    DelayPolicy,
    PolicyConfig,
    VariancePolicy,
    build_policy,
    validate_policy_name,
)
from ctrloop.core.errors import ConfigError

T0 = 1767225600.0
ROW = [1, 2, 3]


def labels(samples: list[CvrSample]) -> list[tuple[str, str, float, float]]:
    return [(s.impression_id, s.kind, s.label, s.weight) for s in samples]


def net_label(samples: list[CvrSample], iid: str) -> float:
    return sum(s.label * s.weight for s in samples if s.impression_id == iid)


# --- window edges, table-driven ------------------------------------------------------------

EDGE_CASES = [
    # (policy, conversion delay after click or None, expected samples by the end)
    ("fixed:60", None, [("a", "click", 0.0, 1.0)]),
    ("fixed:60", 59.999, [("a", "click", 1.0, 1.0)]),
    ("fixed:60", 60.0, [("a", "click", 1.0, 1.0)]),  # the edge is inclusive
    ("fixed:60", 60.001, [("a", "click", 0.0, 1.0), ("a", "late", 1.0, 1.0),
                          ("a", "retract", 0.0, -1.0)]),
    ("fixed:60", 5000.0, [("a", "click", 0.0, 1.0), ("a", "late", 1.0, 1.0),
                          ("a", "retract", 0.0, -1.0)]),
    ("fixed:0", 1.0, [("a", "click", 0.0, 1.0), ("a", "late", 1.0, 1.0),
                      ("a", "retract", 0.0, -1.0)]),
    ("naive", None, [("a", "click", 0.0, 1.0)]),
    ("naive", 1.0, [("a", "click", 0.0, 1.0), ("a", "late", 1.0, 1.0)]),
    ("fnw", 30.0, [("a", "click", 0.0, 1.0), ("a", "late", 1.0, 1.0)]),
]


@pytest.mark.parametrize(("name", "delay", "expected"), EDGE_CASES)
def test_labels_at_window_edges(name: str, delay: float | None,
                                expected: list[tuple[str, str, float, float]]) -> None:
    p = build_policy(name)
    out = p.add_click("a", 7, T0, ROW)
    if delay is not None:
        # The conversion arrives before the watermark reaches the deadline, or after it.
        out += p.advance(T0 + min(delay, 59.0))
        out += p.add_conversion("a", T0 + delay)
    out += p.advance(T0 + 10_000.0)
    out += p.flush()
    assert labels(out) == expected
    assert sum(s.kind == "click" for s in out) == 1


def test_late_conversion_after_release_is_corrected_at_its_ts() -> None:
    p = build_policy("fixed:60")
    p.add_click("a", 7, T0, ROW)
    [neg] = p.advance(T0 + 60.0)
    assert (neg.label, neg.release_ts) == (0.0, T0 + 60.0)
    late = p.add_conversion("a", T0 + 500.0)
    assert labels(late) == [("a", "late", 1.0, 1.0), ("a", "retract", 0.0, -1.0)]
    assert all(s.release_ts == T0 + 500.0 and s.payload == ROW for s in late)
    assert p.add_conversion("a", T0 + 600.0) == [] and p.stats.duplicate_conversions == 1
    assert p.stats.late_conversions == 1


def test_conversion_before_its_click_waits_as_an_orphan() -> None:
    p = build_policy("fixed:60")
    assert p.add_conversion("a", T0 + 5.0) == []
    p.add_click("a", 7, T0, ROW)
    assert labels(p.advance(T0 + 60.0)) == [("a", "click", 1.0, 1.0)]
    q = build_policy("fixed:60", PolicyConfig(orphan_ttl=10.0))
    q.add_conversion("b", T0)
    q.advance(T0 + 10.0)
    assert q.stats.unmatched_conversions == 1


def test_fnw_weights() -> None:
    p = build_policy("fnw")
    s = p.add_click("a", 1, T0, ROW) + p.add_conversion("a", T0 + 1.0)
    w = p.weights(s, np.array([0.2, 0.2], np.float32))
    assert w == pytest.approx([(1 - 0.2) * (1 + 0.2), 1 + 0.2])
    assert p.needs_predictions


def test_oracle_reads_the_truth() -> None:
    p = build_policy("oracle", converted={"a"})
    assert labels(p.add_click("a", 1, T0, ROW)) == [("a", "click", 1.0, 1.0)]
    assert labels(p.add_click("b", 1, T0, ROW)) == [("b", "click", 0.0, 1.0)]
    assert p.add_conversion("a", T0 + 9.0) == []
    with pytest.raises(ConfigError, match="truth"):
        build_policy("oracle")


@pytest.mark.parametrize("name", ["variance", "naive", "fnw", "oracle", "fixed:0",
                                  "fixed:3600", " fixed:1.5 "])
def test_valid_names(name: str) -> None:
    assert validate_policy_name(name) == name


@pytest.mark.parametrize("name", ["", "fixed", "fixed:x", "fixed:-1", "variance2", "FNW"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigError):
        validate_policy_name(name)


# --- the variance statistic and its mapping ---------------------------------------------------

@pytest.mark.parametrize(("dispersion", "wait"), [
    (0.5, 300.0), (1.0, 300.0), (2.0, 300.0), (8.0, 3 * 86_400.0), (100.0, 3 * 86_400.0),
    (4.0, 300.0 * (3 * 86_400.0 / 300.0) ** 0.5),  # geometric midpoint of the log scale
])
def test_wait_mapping(dispersion: float, wait: float) -> None:
    assert VariancePolicy().wait_for(dispersion) == pytest.approx(wait)


def feed(p: VariancePolicy, key: int, report_ts: list[float], clicks_per_hour: int,
         hours: int, prefix: str) -> None:
    """Clicks at a steady rate and conversions reported at `report_ts` (for earlier clicks)."""
    n = converted = 0
    reports = iter(sorted(report_ts))
    nxt = next(reports, math.inf)
    for h in range(hours):
        for c in range(clicks_per_hour):
            t = T0 + h * 3600.0 + c * 3600.0 / clicks_per_hour
            while nxt <= t:
                p.add_conversion(f"{prefix}{converted}", nxt)  # the oldest unconverted click
                converted += 1
                nxt = next(reports, math.inf)
            p.add_click(f"{prefix}{n}", key, t, ROW)
            n += 1
        p.advance(T0 + (h + 1) * 3600.0)


def test_dispersion_separates_streaming_from_bursty_reporting() -> None:
    p = VariancePolicy()
    rng = np.random.default_rng(0)
    hours = 72
    steady = np.sort(T0 + rng.uniform(0, hours * 3600.0, 300))  # Poisson-like, ~4 per hour
    uploads = [T0 + h * 3600.0 + 1.0 for h in (20, 44, 68)]  # 100 reports per upload
    bursty = [t for t in uploads for _ in range(100)]
    feed(p, 1, list(steady), 20, hours, "s")
    q = VariancePolicy()
    feed(q, 2, bursty, 20, hours, "b")
    d_steady = p.shrunk_dispersion(1)
    d_bursty = q.shrunk_dispersion(2)
    assert d_steady < 2.0 < 8.0 < d_bursty
    assert p.wait_for(d_steady) == 300.0 and q.wait_for(d_bursty) == 3 * 86_400.0
    assert [r["advertiser"] for r in p.key_report()] == ["1"]


def test_thin_advertisers_fall_back_to_the_pool() -> None:
    p = VariancePolicy()
    assert p.shrunk_dispersion("never-seen") == p.config.prior_dispersion
    # A fresh policy is conservative: the ceiling until reports say otherwise.
    p.add_click("a", 5, T0, ROW)
    assert p._pending["a"][2] == T0 + p.config.ceiling_s


# --- state and memory -----------------------------------------------------------------------

def through_torch(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_restore_refuses_another_policy() -> None:
    state = build_policy("naive").state()
    with pytest.raises(ConfigError, match="naive"):
        build_policy("fixed:5").restore(state)


def test_cap_forgets_the_oldest_released_then_evicts_pending() -> None:
    p = build_policy("fixed:100", PolicyConfig(max_clicks=3))
    for i in range(3):
        p.add_click(f"r{i}", 1, T0 + i, ROW)
    p.advance(T0 + 100.5)  # r0 released and remembered
    out = p.add_click("r3", 1, T0 + 3, ROW)
    assert out == [] and p.stats.forgotten_at_cap == 1 and p.remembered == 0
    assert p.add_conversion("r0", T0 + 200.0) == []  # forgotten: counted, not corrected
    p.advance(T0 + 200.0 + p.config.orphan_ttl)  # waited as an orphan, then given up
    assert p.stats.unmatched_conversions == 1
    q = build_policy("fixed:100", PolicyConfig(max_clicks=2))
    q.add_click("a", 1, T0, ROW)
    q.add_click("b", 1, T0 + 1, ROW)
    out = q.add_click("c", 1, T0 + 2, ROW)
    assert labels(out) == [("a", "click", 0.0, 1.0)] and q.stats.evicted == 1
    assert q.pending == 2


# --- properties -----------------------------------------------------------------------------

Op = tuple[str, int, float]
POLICIES = ["fixed:0", "fixed:30", "fixed:120", "naive", "fnw", "variance"]
SMALL = PolicyConfig(remember_s=10_000.0, orphan_ttl=50.0, floor_s=10.0, ceiling_s=200.0,
                     bucket_s=20.0, window_buckets=4)


def run_ops(p: DelayPolicy, ops: list[Op], clock: list[float]) -> list[CvrSample]:
    """Apply ops in an event-time order: each op moves time forward by its float."""
    out: list[CvrSample] = []
    for kind, i, dt in ops:
        clock[0] += dt / 10.0
        t = clock[0]
        if kind == "click":
            out += p.add_click(f"i{i}", i % 3, t, [i])
        elif kind == "conv":
            out += p.add_conversion(f"i{i}", t)
        elif kind == "advance":
            out += p.advance(t - 5.0)
    return out


def only_after_click(ops: list[Op]) -> list[Op]:
    """Conversions only for clicked ids (orphans are tested above), so the truth is easy to
    state; the others keep their time step and do nothing."""
    seen: set[int] = set()
    out: list[Op] = []
    for kind, i, dt in ops:
        if kind == "click":
            seen.add(i)
        out.append(("skip", i, dt) if kind == "conv" and i not in seen else (kind, i, dt))
    return out


ops_strategy = st.lists(
    st.tuples(st.sampled_from(["click", "conv", "advance"]), st.integers(0, 11),
              st.floats(0.0, 400.0)),
    max_size=60,
).map(only_after_click)


def truth_of(ops: list[Op]) -> tuple[dict[str, float], set[str]]:
    clicked: dict[str, float] = {}
    converted: set[str] = set()
    clock = T0
    for kind, i, dt in ops:
        clock += dt / 10.0
        if kind == "click":
            clicked.setdefault(f"i{i}", clock)
        elif kind == "conv" and f"i{i}" in clicked:
            converted.add(f"i{i}")
    return clicked, converted


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy, name=st.sampled_from(POLICIES))
def test_one_sample_per_click_and_exact_net_labels(ops: list[Op], name: str) -> None:
    p = build_policy(name, SMALL)
    out = run_ops(p, ops, [T0]) + p.advance(T0 + 1e6) + p.flush()
    clicked, converted = truth_of(ops)
    firsts = [s.impression_id for s in out if s.kind == "click"]
    assert sorted(firsts) == sorted(clicked)  # exactly one first sample per click
    for iid in clicked:
        samples = [s for s in out if s.impression_id == iid]
        counted = iid in converted
        if name in ("naive", "fnw"):
            assert sum(s.label for s in samples) == float(counted)
            assert len(samples) == 1 + counted
        else:
            assert net_label(out, iid) == pytest.approx(float(counted))
            assert len(samples) in (1, 3)


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy, name=st.sampled_from(POLICIES), cut=st.floats(0.0, 1.0))
def test_restart_in_the_middle_equals_no_restart(ops: list[Op], name: str, cut: float) -> None:
    plain = build_policy(name, SMALL)
    clock = [T0]
    expected = run_ops(plain, ops, clock) + plain.flush()
    k = int(cut * len(ops))
    first = build_policy(name, SMALL)
    clock = [T0]
    got = run_ops(first, ops[:k], clock)
    second = build_policy(name, SMALL)
    second.restore(through_torch(first.state()))
    got += run_ops(second, ops[k:], clock) + second.flush()
    assert [(s.impression_id, s.kind, s.label, s.weight, s.release_ts, s.payload) for s in got] \
        == [(s.impression_id, s.kind, s.label, s.weight, s.release_ts, s.payload)
            for s in expected]
    assert second.stats == plain.stats


@settings(max_examples=40, deadline=None)
@given(ops=ops_strategy, cap=st.integers(1, 5))
def test_memory_never_exceeds_the_cap(ops: list[Op], cap: int) -> None:
    p = build_policy("fixed:120", PolicyConfig(max_clicks=cap, max_orphans=2, orphan_ttl=50.0))
    clock = [T0]
    for op in ops:
        run_ops(p, [op], clock)
        assert p.pending + p.remembered <= cap and len(p._orphans) <= 2


# --- the variance policy at its window edges, and edges as a property -------------------------

# A fresh variance policy has no reports: every key waits the ceiling (200 s in SMALL).
VARIANCE_EDGES = [
    (None, [("a", "click", 0.0, 1.0)]),
    (199.999, [("a", "click", 1.0, 1.0)]),
    (200.0, [("a", "click", 1.0, 1.0)]),  # inclusive, as fixed
    (200.001, [("a", "click", 0.0, 1.0), ("a", "late", 1.0, 1.0), ("a", "retract", 0.0, -1.0)]),
]


@pytest.mark.parametrize(("delay", "expected"), VARIANCE_EDGES)
def test_variance_labels_at_its_window_edges(
        delay: float | None, expected: list[tuple[str, str, float, float]]) -> None:
    p = build_policy("variance", SMALL)
    out = p.add_click("a", 7, T0, ROW)
    if delay is not None:
        out += p.advance(T0 + min(delay, 199.0))
        out += p.add_conversion("a", T0 + delay)
    out += p.advance(T0 + 10_000.0) + p.flush()
    assert labels(out) == expected
    assert [s.release_ts for s in out if s.kind == "click"] == [T0 + 200.0]


@pytest.mark.parametrize(("conv_delay", "label"), [(30.0, 1.0), (60.0, 1.0), (61.0, 0.0)])
def test_a_click_that_arrives_after_its_deadline_is_released_at_once(
        conv_delay: float, label: float) -> None:
    """A late click event (the watermark already past click_ts + wait) is not held: it goes
    out at the watermark with the label its deadline decides (an orphan conversion matched)."""
    p = build_policy("fixed:60")
    p.advance(T0 + 100.0)
    p.add_conversion("a", T0 + conv_delay)  # arrived before its click: an orphan
    out = p.add_click("a", 7, T0, ROW)
    assert out[0].kind == "click" and out[0].label == label
    assert out[0].release_ts == T0 + 100.0
    assert net_label(out, "a") == 1.0  # a late conversion is corrected in the same call


edge_delays = st.one_of(st.none(), st.sampled_from([0.0, 59.999, 60.0, 60.001]),
                        st.floats(0.0, 300.0))


@settings(max_examples=60, deadline=None)
@given(clicks=st.lists(st.tuples(st.floats(0.0, 50.0), edge_delays), min_size=1, max_size=30))
def test_first_label_is_conversion_within_the_window(
        clicks: list[tuple[float, float | None]]) -> None:
    """fixed:60 on a stream in event-time order: a click's first sample is positive iff its
    conversion came at or before click_ts + 60, and goes out exactly at that deadline."""
    p = build_policy("fixed:60")
    events: list[tuple[float, int, str, int]] = []  # (ts, order: click first, kind, i)
    t = T0
    for i, (gap, delay) in enumerate(clicks):
        t += gap
        events.append((t, 0, "click", i))
        if delay is not None:
            events.append((t + delay, 1, "conv", i))
    events.sort()
    click_ts = {i: ts for ts, _, kind, i in events if kind == "click"}
    out: list[CvrSample] = []
    for ts, _, kind, i in events:
        out += p.advance(ts - 1e-3)  # the watermark trails the newest event
        if kind == "click":
            out += p.add_click(f"c{i}", 0, ts, [i])
        else:
            out += p.add_conversion(f"c{i}", ts)
    out += p.advance(t + 1e6)
    firsts = {s.impression_id: s for s in out if s.kind == "click"}
    assert len(firsts) == len(clicks)
    for i, (_, delay) in enumerate(clicks):
        s = firsts[f"c{i}"]
        deadline = click_ts[i] + 60.0
        conv_ts = None if delay is None else click_ts[i] + delay
        assert s.label == float(conv_ts is not None and conv_ts <= deadline), (i, delay)
        assert s.release_ts == deadline
        assert net_label(out, f"c{i}") == float(delay is not None)


# --- soft labels, settled ---------------------------------------------------------------------

SOFT = PolicyConfig(remember_s=10_000.0, orphan_ttl=50.0, floor_s=10.0, ceiling_s=200.0,
                    bucket_s=20.0, window_buckets=4, soft_labels=True, settle_s=500.0)


def test_a_soft_label_is_settled_to_zero_then_corrected_by_a_late_conversion() -> None:
    p = VariancePolicy(SOFT)
    # Teach the key a conversion rate first, so the expected label is strictly inside (0, 1).
    # Conversions 1000 s after their clicks: longer than any wait, so F(wait) = 0 and q = h.
    for i in range(10):
        p.add_click(f"w{i}", 1, T0 + i, ROW)
    for i in range(5):
        p.add_conversion(f"w{i}", T0 + i + 1000.0)
    t = T0 + 1100.0
    p.advance(t)
    settled_before = p.stats.settled  # the warm-up clicks that never converted
    [first] = p.add_click("a", 1, t, ROW) + p.advance(t + 200.0)
    q = first.label
    assert 0.0 < q < 1.0 and first.kind == "click"
    assert p.advance(t + 499.0) == []
    settle = p.advance(t + 500.0)  # the settle edge is inclusive
    assert labels(settle) == [("a", "settle", 0.0, 1.0), ("a", "retract", q, -1.0)]
    late = p.add_conversion("a", T0 + 2000.0)
    assert labels(late) == [("a", "late", 1.0, 1.0), ("a", "retract", 0.0, -1.0)]
    assert net_label([first, *settle, *late], "a") == pytest.approx(1.0)
    assert p.stats.settled == settled_before + 1


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy, cut=st.floats(0.0, 1.0))
def test_soft_labels_net_to_the_eventual_label_and_survive_a_restart(
        ops: list[Op], cut: float) -> None:
    plain = build_policy("variance", SOFT)
    clock = [T0]
    expected = run_ops(plain, ops, clock) + plain.advance(clock[0] + 1e6) + plain.flush()
    clicked, converted = truth_of(ops)
    assert sorted(s.impression_id for s in expected if s.kind == "click") == sorted(clicked)
    for iid in clicked:
        assert net_label(expected, iid) == pytest.approx(float(iid in converted), abs=1e-9)
    k = int(cut * len(ops))
    first = build_policy("variance", SOFT)
    clock = [T0]
    got = run_ops(first, ops[:k], clock)
    second = build_policy("variance", SOFT)
    second.restore(through_torch(first.state()))
    got += run_ops(second, ops[k:], clock) + second.advance(clock[0] + 1e6) + second.flush()
    assert [(s.impression_id, s.kind, s.label, s.weight, s.release_ts) for s in got] == \
        [(s.impression_id, s.kind, s.label, s.weight, s.release_ts) for s in expected]


def test_settle_must_come_before_the_click_is_forgotten() -> None:
    with pytest.raises(ConfigError, match="settle_s"):
        PolicyConfig(remember_s=100.0, settle_s=200.0, soft_labels=True)
