"""The event-time joiner (clicks to impressions) and the watermark clock."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrloop.core.errors import ConfigError
from ctrloop.core.joining import Joiner, JoinerConfig, Sample, WatermarkTracker

# --- table-driven cases ---------------------------------------------------------------------

# ("imp" | "click", id, ts), ("adv", "", watermark) or ("flush", "", 0)
Step = tuple[str, str, float]

CONFIG = JoinerConfig(click_window=10, orphan_ttl=5, dedup_horizon=100)


def fmt(s: Sample) -> str:
    return f"{s.impression_id}{'+' if s.label else '-'}@{s.label_ts:g}"


def run_step(j: Joiner, step: Step) -> list[Sample]:
    op, key, t = step
    if op == "imp":
        return j.add_impression(key, t, payload=[key])
    if op == "click":
        return j.add_click(key, t)
    if op == "adv":
        return j.advance(t)
    assert op == "flush"
    return j.flush()


@dataclass(frozen=True)
class Case:
    name: str
    # (step, samples it releases as "id+@label_ts" / "id-@label_ts")
    steps: list[tuple[Step, list[str]]]
    stats: dict[str, int] = field(default_factory=dict)
    config: JoinerConfig = CONFIG


CASES = [
    Case("click within window is a positive at once",
         [(("imp", "a", 100), []), (("click", "a", 103), ["a+@103"])],
         {"impressions": 1, "clicks": 1, "positives": 1, "negatives": 0}),
    Case("click at the window's end still counts",
         [(("imp", "a", 100), []), (("click", "a", 110), ["a+@110"])], {"positives": 1}),
    Case("no click: negative exactly when the watermark reaches ts + window",
         [(("imp", "a", 100), []), (("adv", "", 109.999), []), (("adv", "", 110), ["a-@110"]),
          (("adv", "", 500), [])],
         {"negatives": 1, "positives": 0}),
    Case("negatives come out in deadline order",
         [(("imp", "b", 102), []), (("imp", "a", 100), []), (("imp", "c", 101), []),
          (("adv", "", 200), ["a-@110", "c-@111", "b-@112"])], {"negatives": 3}),
    Case("click after the window, impression still pending: not positive, counted",
         [(("imp", "a", 100), []), (("click", "a", 110.5), []), (("adv", "", 110), ["a-@110"])],
         {"clicks_outside_window": 1, "positives": 0, "negatives": 1}),
    Case("click outside the window after the window has closed: counted outside, not late",
         [(("imp", "a", 100), []), (("adv", "", 110), ["a-@110"]), (("click", "a", 115), [])],
         {"clicks_outside_window": 1, "late_clicks": 0, "positives": 0, "negatives": 1,
          "unmatched_clicks": 0}),
    Case("click within the window after the window has closed: a positive lost, counted late",
         [(("imp", "a", 100), []), (("adv", "", 110), ["a-@110"]), (("click", "a", 110), [])],
         {"late_clicks": 1, "clicks_outside_window": 0, "positives": 0, "negatives": 1}),
    Case("a late impression's click within its window is late, after it outside",
         [(("adv", "", 200), []), (("imp", "a", 100), ["a-@200"]), (("click", "a", 109), []),
          (("click", "a", 111), [])],
         {"late_impressions": 1, "late_clicks": 1, "clicks_outside_window": 1}),
    Case("click before its impression (orphan) is joined",
         [(("click", "a", 103), []), (("imp", "a", 100), ["a+@103"]), (("adv", "", 200), [])],
         {"positives": 1, "unmatched_clicks": 0, "negatives": 0}),
    Case("orphan at ts equal to the impression's",
         [(("click", "a", 100), []), (("imp", "a", 100), ["a+@100"])], {"positives": 1}),
    Case("orphan outside the window: counted, impression becomes a negative",
         [(("click", "a", 120), []), (("imp", "a", 100), []), (("adv", "", 110), ["a-@110"])],
         {"clicks_outside_window": 1, "negatives": 1, "positives": 0}),
    Case("orphan whose ttl passes is unmatched and forgotten",
         [(("click", "a", 100), []), (("adv", "", 104.9), []), (("adv", "", 105), []),
          (("imp", "a", 99), []), (("adv", "", 109), ["a-@109"])],
         {"unmatched_clicks": 1, "positives": 0, "negatives": 1}),
    Case("click for an unknown id behind the watermark is unmatched at once",
         [(("adv", "", 200), []), (("click", "z", 150), [])], {"unmatched_clicks": 1}),
    Case("orphan that never finds its impression: unmatched at flush",
         [(("click", "z", 150), []), (("flush", "", 0), [])], {"unmatched_clicks": 1}),
    Case("duplicate impression while pending",
         [(("imp", "a", 100), []), (("imp", "a", 101), []), (("adv", "", 111), ["a-@110"])],
         {"duplicate_impressions": 1, "impressions": 1, "negatives": 1}),
    Case("duplicate impression after its sample",
         [(("imp", "a", 100), []), (("click", "a", 101), ["a+@101"]), (("imp", "a", 100), []),
          (("adv", "", 300), [])],
         {"duplicate_impressions": 1, "impressions": 1, "positives": 1, "negatives": 0}),
    Case("ids are forgotten after the dedup horizon",
         [(("imp", "a", 100), []), (("adv", "", 110), ["a-@110"]), (("adv", "", 209), []),
          (("imp", "a", 205), []), (("adv", "", 210), []), (("imp", "a", 212), []),
          (("adv", "", 222), ["a-@222"])],
         {"duplicate_impressions": 1, "impressions": 2, "negatives": 2}),
    Case("duplicate click",
         [(("imp", "a", 100), []), (("click", "a", 101), ["a+@101"]), (("click", "a", 102), [])],
         {"duplicate_clicks": 1, "clicks": 2, "positives": 1}),
    Case("duplicate orphan click",
         [(("click", "a", 101), []), (("click", "a", 101), []), (("imp", "a", 100), ["a+@101"])],
         {"duplicate_clicks": 1, "positives": 1, "unmatched_clicks": 0}),
    Case("of two orphan clicks, one in the window makes a positive (whatever their order)",
         [(("click", "a", 115), []), (("click", "a", 104), []), (("imp", "a", 100), ["a+@104"])],
         {"duplicate_clicks": 1, "positives": 1, "clicks_outside_window": 0}),
    Case("late impression: its window closed already, negative at once",
         [(("adv", "", 200), []), (("imp", "a", 100), ["a-@200"])],
         {"late_impressions": 1, "negatives": 1}),
    Case("impression whose window is still open under the watermark is not late",
         [(("adv", "", 105), []), (("imp", "a", 100), []), (("click", "a", 106), ["a+@106"])],
         {"late_impressions": 0, "positives": 1}),
    Case("eviction at max_pending emits the earliest deadline as a negative",
         [(("imp", "b", 101), []), (("imp", "a", 100), []), (("imp", "c", 102), ["a-@110"]),
          (("click", "a", 103), []), (("flush", "", 0), ["b-@111", "c-@112"])],
         {"evicted": 1, "negatives": 3, "late_clicks": 1, "positives": 0},
         JoinerConfig(click_window=10, max_pending=2, evict="emit")),
    Case("eviction at max_pending with drop releases nothing for the evicted",
         [(("imp", "b", 101), []), (("imp", "a", 100), []), (("imp", "c", 102), []),
          (("click", "a", 103), []), (("imp", "a", 100), []),
          (("flush", "", 0), ["b-@111", "c-@112"])],
         {"evicted": 1, "negatives": 2, "duplicate_impressions": 1},
         JoinerConfig(click_window=10, max_pending=2, evict="drop")),
    Case("an evicted positive's slot is skipped",
         [(("imp", "a", 100), []), (("imp", "b", 101), []), (("click", "a", 102), ["a+@102"]),
          (("imp", "c", 102), []), (("imp", "d", 103), ["b-@111"])],
         {"evicted": 1, "positives": 1, "negatives": 1},
         JoinerConfig(click_window=10, max_pending=2)),
    Case("the watermark never goes back",
         [(("imp", "a", 100), []), (("adv", "", 105), []), (("adv", "", 90), []),
          (("imp", "b", 96), []), (("adv", "", 104), []), (("adv", "", 106), ["b-@106"])],
         {"negatives": 1, "late_impressions": 0}),
    Case("an impression behind a watermark that went back would not be late",
         [(("adv", "", 105), []), (("adv", "", 90), []), (("imp", "b", 94), ["b-@105"])],
         {"late_impressions": 1}),
    Case("flush releases everything pending",
         [(("imp", "a", 100), []), (("imp", "b", 105), []), (("click", "b", 106), ["b+@106"]),
          (("imp", "c", 107), []), (("flush", "", 0), ["a-@110", "c-@117"])],
         {"positives": 1, "negatives": 2}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_joiner_cases(case: Case) -> None:
    j = Joiner(case.config)
    for step, expected in case.steps:
        got = run_step(j, step)
        assert [fmt(s) for s in got] == expected, step
        for s in got:
            assert s.payload == [s.impression_id]
    stats = j.stats.__dict__
    for key, value in case.stats.items():
        assert stats[key] == value, key


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_joiner_cases_survive_snapshot_after_every_step(case: Case) -> None:
    """Snapshot → JSON → restore between any two steps changes nothing."""
    j = Joiner(case.config)
    for step, expected in case.steps:
        j = Joiner.restore(json.loads(json.dumps(j.snapshot())))
        assert [fmt(s) for s in run_step(j, step)] == expected, step
    for key, value in case.stats.items():
        assert j.stats.__dict__[key] == value, key


def test_pending_count() -> None:
    j = Joiner(CONFIG)
    j.add_impression("a", 100, None)
    j.add_impression("b", 100, None)
    assert j.pending == 2
    j.add_click("a", 101)
    assert j.pending == 1
    j.flush()
    assert j.pending == 0


@pytest.mark.parametrize("kwargs", [
    {"click_window": 0}, {"click_window": -1}, {"orphan_ttl": -1}, {"dedup_horizon": -0.5},
    {"max_pending": 0}, {"max_remembered": 0}, {"evict": "keep"},
], ids=str)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        JoinerConfig(**kwargs)


def test_remembered_ids_are_bounded() -> None:
    j = Joiner(JoinerConfig(click_window=10, max_remembered=3))
    for i in range(10):
        j.add_impression(f"i{i}", 100.0 + i, None)
    released = j.advance(200.0)  # all released, none past its dedup horizon yet
    assert len(released) == 10
    assert len(j.snapshot()["done"]) == 3  # only the bound trims
    assert j.add_impression("i9", 109.0, None) == []  # still remembered: a duplicate
    assert len(j.add_impression("i0", 100.0, None)) == 1  # forgotten: accepted again (late)
    assert j.stats.duplicate_impressions == 1 and j.stats.late_impressions == 1


# --- properties -----------------------------------------------------------------------------

WINDOW = 10.0


@dataclass(frozen=True)
class Ev:
    kind: str
    key: str
    ts: float


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Ev], float, float, dict[str, float]]:
    """Impressions with 0-3 clicks each (delays across the window's edge), shuffled within a
    bounded disorder; returns (arrival order, lateness, window, impression ts)."""
    n = draw(st.integers(1, 25))
    window = draw(st.sampled_from([WINDOW, 3.0, 40.0]))
    disorder = draw(st.sampled_from([0.0, 1.0, 4.0, 12.0]))
    events: list[Ev] = []
    imp_ts: dict[str, float] = {}
    for i in range(n):
        key = f"i{i}"
        ts = 1000.0 + draw(st.integers(0, 60)) + draw(st.sampled_from([0.0, 0.25, 0.5]))
        imp_ts[key] = ts
        events.append(Ev("imp", key, ts))
        if draw(st.booleans()):
            events.append(Ev("imp", key, ts))  # a duplicate delivery
        for _ in range(draw(st.integers(0, 3))):
            delay = draw(st.sampled_from([0.0, window / 2, window, window + 0.25, 2 * window,
                                          draw(st.floats(0, 2 * window))]))
            events.append(Ev("click", key, ts + delay))
    # Arrival order: ts plus a jitter of at most `disorder`; ties keep generation order.
    jitter = [draw(st.floats(0, disorder)) if disorder else 0.0 for _ in events]
    order = sorted(range(len(events)), key=lambda k: events[k].ts + jitter[k])
    arrivals = [events[k] for k in order]
    lateness = disorder + draw(st.sampled_from([0.5, 3.0]))  # strictly covers the disorder
    return arrivals, lateness, window, imp_ts


def feed(j: Joiner, ev: Ev, max_ts: float, lateness: float) -> list[Sample]:
    """Like the pipeline: the event moves the clock first, then it is added."""
    out = j.advance(max_ts - lateness)
    if ev.kind == "imp":
        out += j.add_impression(ev.key, ev.ts, payload={"id": ev.key})
    else:
        out += j.add_click(ev.key, ev.ts)
    return out


def run_all(arrivals: list[Ev], lateness: float, config: JoinerConfig,
            snapshot_at: int | None = None) -> tuple[list[Sample], dict[str, int]]:
    j = Joiner(config)
    out: list[Sample] = []
    max_ts = -math.inf
    for k, ev in enumerate(arrivals):
        if k == snapshot_at:
            j = Joiner.restore(json.loads(json.dumps(j.snapshot())))
        max_ts = max(max_ts, ev.ts)
        out += feed(j, ev, max_ts, lateness)
    if snapshot_at == len(arrivals):
        j = Joiner.restore(json.loads(json.dumps(j.snapshot())))
    out += j.flush()
    return out, dict(j.stats.__dict__)


def expected_label(key: str, imp_ts: dict[str, float], arrivals: list[Ev], window: float) -> int:
    return int(any(e.kind == "click" and e.key == key and 0 <= e.ts - imp_ts[key] <= window
                   for e in arrivals))


@settings(max_examples=150, deadline=None)
@given(streams())
def test_every_impression_gets_one_sample_with_the_right_label(
        stream: tuple[list[Ev], float, float, dict[str, float]]) -> None:
    arrivals, lateness, window, imp_ts = stream
    config = JoinerConfig(click_window=window, orphan_ttl=lateness, dedup_horizon=3600)
    samples, stats = run_all(arrivals, lateness, config)
    by_id: dict[str, list[Sample]] = {}
    for s in samples:
        by_id.setdefault(s.impression_id, []).append(s)
    assert set(by_id) == set(imp_ts)
    for key, got in by_id.items():
        assert len(got) == 1, key
        s = got[0]
        assert s.label == expected_label(key, imp_ts, arrivals, window), key
        assert s.ts == imp_ts[key] and s.payload == {"id": key}
        if s.label == 0:
            assert s.label_ts == imp_ts[key] + window
        else:
            assert imp_ts[key] <= s.label_ts <= imp_ts[key] + window
    assert stats["positives"] + stats["negatives"] == len(imp_ts)
    assert stats["impressions"] == len(imp_ts)
    assert stats["late_impressions"] == 0 and stats["evicted"] == 0
    assert stats["clicks"] == sum(e.kind == "click" for e in arrivals)


@settings(max_examples=100, deadline=None)
@given(streams(), st.data())
def test_snapshot_midway_changes_nothing(
        stream: tuple[list[Ev], float, float, dict[str, float]], data: st.DataObject) -> None:
    arrivals, lateness, window, _ = stream
    config = JoinerConfig(click_window=window, orphan_ttl=lateness, dedup_horizon=3600)
    at = data.draw(st.integers(0, len(arrivals)))
    plain = run_all(arrivals, lateness, config)
    restored = run_all(arrivals, lateness, config, snapshot_at=at)
    assert [(s.impression_id, s.ts, s.label, s.payload, s.label_ts) for s in restored[0]] == [
        (s.impression_id, s.ts, s.label, s.payload, s.label_ts) for s in plain[0]]
    assert restored[1] == plain[1]


@settings(max_examples=60, deadline=None)
@given(streams(), st.integers(1, 5), st.sampled_from(["emit", "drop"]))
def test_bounded_state_never_duplicates(
        stream: tuple[list[Ev], float, float, dict[str, float]], max_pending: int,
        evict: str) -> None:
    arrivals, lateness, window, imp_ts = stream
    config = JoinerConfig(click_window=window, orphan_ttl=lateness, max_pending=max_pending,
                          evict=evict)  # type: ignore[arg-type]
    samples, stats = run_all(arrivals, lateness, config)
    ids = [s.impression_id for s in samples]
    assert len(ids) == len(set(ids))
    assert stats["positives"] + stats["negatives"] == len(samples)
    if evict == "emit":
        assert set(ids) == set(imp_ts)
    else:
        assert len(samples) + stats["evicted"] == len(imp_ts)
    for s in samples:  # eviction may turn positives into negatives, never the reverse
        if s.label:
            assert expected_label(s.impression_id, imp_ts, arrivals, window) == 1


# --- watermark tracker ----------------------------------------------------------------------


def test_tracker_one_source() -> None:
    t = WatermarkTracker(allowed_lateness=30)
    assert t.clock == -math.inf
    t.observe("f", 100.0)
    t.observe("f", 90.0)  # out of order: does not pull the clock back
    assert t.clock == 100.0 and t.watermark == 70.0
    assert t.max_ts("f") == 100.0 and t.max_ts("other") == -math.inf


def test_tracker_is_the_min_over_sources() -> None:
    t = WatermarkTracker(allowed_lateness=5)
    t.observe("p0", 100.0)
    t.observe("p1", 80.0)
    assert t.clock == 80.0 and t.watermark == 75.0
    t.observe("p1", 120.0)
    assert t.clock == 100.0
    t.observe("p0", 130.0)
    assert t.clock == 120.0


def test_tracker_idle_sources_do_not_hold_back() -> None:
    t = WatermarkTracker(allowed_lateness=0)
    t.observe("p0", 100.0)
    t.observe("p1", 50.0)
    assert t.clock == 50.0
    t.set_idle("p1", True)
    assert t.clock == 100.0
    t.observe("p1", 60.0)  # delivering again makes it active, but the clock stays put
    assert t.clock == 100.0
    t.observe("p0", 200.0)
    assert t.clock == 100.0  # p1 (at 60) is active again and lags
    t.set_idle("p1", True)
    assert t.clock == 200.0
    t.set_idle("p1", False)
    t.observe("p1", 150.0)
    assert t.clock == 200.0
    t.observe("p1", 250.0)
    t.observe("p0", 300.0)
    assert t.clock == 250.0


def test_tracker_all_idle_stays_put_never_the_max() -> None:
    # Issue 10 F: with every partition idle the clock went to the most advanced one (trailing
    # clicks, conversions hours ahead) and the next impressions of the others were late.
    t = WatermarkTracker(allowed_lateness=0)
    t.observe("p0", 100.0)
    t.observe("p1", 50.0)
    assert t.clock == 50.0
    t.set_idle("p0", True)
    t.set_idle("p1", True)
    assert t.clock == 50.0
    t.force(60.0)  # a quiet stream moves on with the caller's wall clock
    assert t.clock == 60.0
    t.set_idle("p0", False)
    assert t.clock == 100.0


def test_tracker_wake_makes_every_source_hold_again() -> None:
    t = WatermarkTracker(allowed_lateness=0)
    t.observe("p0", 100.0)
    t.observe("p1", 50.0)
    t.set_idle("p1", True)
    assert t.clock == 100.0
    t.wake()
    t.observe("p0", 200.0)
    assert t.clock == 100.0  # p1 holds it (at 50, behind the clock: it stays at 100)
    t.observe("p1", 150.0)
    assert t.clock == 150.0


def test_tracker_force_only_moves_forward() -> None:
    t = WatermarkTracker(allowed_lateness=10)
    t.observe("p0", 100.0)
    t.force(150.0)
    assert t.clock == 150.0 and t.watermark == 140.0
    t.force(120.0)
    assert t.clock == 150.0
    t.observe("p0", 140.0)
    assert t.clock == 150.0


ops = st.lists(st.one_of(
    st.tuples(st.just("observe"), st.integers(0, 3), st.floats(0, 1000)),
    st.tuples(st.just("idle"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("force"), st.just(0), st.floats(0, 1000)),
), max_size=40)


@given(ops)
def test_tracker_never_goes_backwards(seq: list[tuple[str, int, Any]]) -> None:
    t = WatermarkTracker(allowed_lateness=3)
    max_ts: dict[int, float] = {}
    idle: set[int] = set()
    last = t.clock
    for op, src, value in seq:
        if op == "observe":
            t.observe(src, value)
            max_ts[src] = max(max_ts.get(src, -math.inf), value)
            idle.discard(src)
        elif op == "idle":
            t.set_idle(src, value)
            if value:
                idle.add(src)
            else:
                idle.discard(src)
        else:
            t.force(value)
        clock = t.clock
        assert clock >= last
        assert t.watermark == clock - 3
        active = [v for s, v in max_ts.items() if s not in idle]
        if active:
            # never ahead of an active source unless it was already there before
            assert clock == last or clock == min(active) or op == "force"
        elif op != "force":
            assert clock == last  # every source idle: only the caller's force moves it
        last = clock
