"""WatermarkTracker with `max_jump`: one event far ahead of its source cannot move event time
(issue 10 B: a single click stamped 2099 used to close every window for good), while ordinary
streams keep exactly the plain tracker's clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrloop.core.joining import WatermarkTracker

JUMP = 600.0
T0 = 1_767_225_600.0
Y2099 = 4_070_908_800.0


def _clocks(tracker: WatermarkTracker, events: list[tuple[str, float]]) -> list[float]:
    out = []
    for source, ts in events:
        tracker.observe(source, ts)
        out.append(tracker.clock)
    return out


# An ordinary stream: every event at most JUMP after the newest one before it on its source
# (steps may go backwards: out-of-order events within a partition).
_steps = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                            st.floats(min_value=-50.0, max_value=JUMP)), min_size=1, max_size=60)


def _ordinary(steps: list[tuple[str, float]]) -> list[tuple[str, float]]:
    newest: dict[str, float] = {}
    events = []
    for source, step in steps:
        ts = newest.get(source, T0) + step
        newest[source] = max(newest.get(source, -math.inf), ts)
        events.append((source, ts))
    return events


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_ordinary_streams_keep_the_plain_clock(steps: list[tuple[str, float]]) -> None:
    events = _ordinary(steps)
    assert (_clocks(WatermarkTracker(5.0, max_jump=JUMP), events)
            == _clocks(WatermarkTracker(5.0), events))


@settings(max_examples=200, deadline=None)
@given(_steps, st.integers(min_value=0, max_value=59), st.sampled_from(["a", "b", "c"]))
def test_one_outlier_anywhere_never_moves_the_clock(steps: list[tuple[str, float]], at: int,
                                                    source: str) -> None:
    events = _ordinary(steps)
    at = min(at, len(events))
    if not any(s == source for s, _ in events[:at]):
        return  # the first event of a source is taken as it is (nothing to compare it with)
    poisoned = [*events[:at], (source, Y2099), *events[at:]]
    plain = _clocks(WatermarkTracker(5.0), events)
    guarded = _clocks(WatermarkTracker(5.0, max_jump=JUMP), poisoned)
    # The outlier's own step repeats the clock before it; every other step is unchanged.
    del guarded[at]
    assert guarded == plain
    assert max(guarded) < Y2099


@pytest.mark.parametrize("events, frontier", [
    # (events on one source, its frontier afterwards)
    ([T0, T0 + 1, Y2099], T0 + 1),                        # one outlier: held
    ([T0, T0 + 1, Y2099, T0 + 2], T0 + 2),                # ...and ordinary events go on
    ([T0, T0 + 7200, T0 + 7201], T0 + 7201),              # a real gap: the 2nd event confirms
    ([T0, T0 + 7201, T0 + 7200], T0 + 7201),              # in either order
    ([T0, Y2099, T0 + 7200], T0 + 7200),                  # two far events agree on the smaller
    ([T0, T0 + 700, T0 + 500, T0 + 650], T0 + 700),        # ordinary events reach the suspect
    ([T0, T0 + JUMP], T0 + JUMP),                         # exactly max_jump: ordinary
    ([Y2099], Y2099),                                     # a source's first event: as it is
])
def test_frontier_table(events: list[float], frontier: float) -> None:
    t = WatermarkTracker(0.0, max_jump=JUMP)
    for ts in events:
        t.observe("p", ts)
    assert t.max_ts("p") == frontier


def test_suspect_survives_a_checkpoint() -> None:
    t = WatermarkTracker(0.0, max_jump=JUMP)
    for ts in (T0, T0 + 5000):
        t.observe(("clicks", 0), ts)
    state: dict[str, Any] = t.state(lambda k: f"{k[0]}:{k[1]}")
    back = WatermarkTracker(0.0, max_jump=JUMP)
    back.restore(state, lambda s: (s.split(":")[0], int(s.split(":")[1])))
    back.observe(("clicks", 0), T0 + 5001)  # confirms the suspect held across the checkpoint
    assert state["suspect"] == [["clicks:0", T0 + 5000]]
    assert back.max_ts(("clicks", 0)) == T0 + 5001


def test_old_checkpoints_without_suspects_restore() -> None:
    t = WatermarkTracker(0.0, max_jump=JUMP)
    t.restore({"max_ts": [["p", T0]], "clock": T0})
    t.observe("p", Y2099)
    assert t.clock == T0


def test_without_max_jump_an_outlier_counts_at_once() -> None:
    # Replay's tracker: unchanged semantics (a file is trusted input).
    t = WatermarkTracker(0.0)
    for ts in (T0, Y2099):
        t.observe("p", ts)
    assert t.clock == Y2099
