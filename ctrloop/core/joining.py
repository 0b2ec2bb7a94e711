"""Event-time join of clicks to impressions into labelled samples.

Pure: no clock, no I/O. The caller feeds events and advances a watermark (event time below which
no more events are expected); the joiner answers with samples. The same object runs in replay
and on Kafka, so a replay reproduces what the streaming trainer learned.

Rules (docs/events.md):
- a click within `click_window` seconds of its impression makes a positive sample at once;
- an impression whose window has closed under the watermark (ts + window <= watermark) becomes
  a negative sample;
- a click that arrives before its impression (topics are read independently) waits as an orphan
  for `orphan_ttl` seconds of event time;
- a click after its window is counted in `clicks_outside_window`; a click *within* its window
  that arrives after the impression was already released as a negative is `late_clicks`: a
  positive lost to event time running ahead of it (zero when event time is right);
- duplicates (same impression id twice, a click twice) are dropped and counted; ids stay
  remembered for `dedup_horizon` seconds after their sample is released;
- state is bounded: above `max_pending` impressions the one with the earliest deadline is evicted
  (emitted as a negative, or dropped, per `evict`), and counted.

>>> j = Joiner(JoinerConfig(click_window=10))
>>> j.add_impression("a", 100.0, payload=[1, 2])
[]
>>> [(s.impression_id, s.label) for s in j.add_click("a", 103.0)]
[('a', 1)]
>>> j.add_impression("b", 101.0, payload=[3, 4])
[]
>>> [(s.impression_id, s.label) for s in j.advance(111.0)]
[('b', 0)]
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any, Literal

from ctrloop.core.errors import ConfigError

# Joiner._state's value for an id released as a positive (a negative's is its forget time).
_POSITIVE = float("-inf")


@dataclass(frozen=True)
class JoinerConfig:
    click_window: float = 120.0
    orphan_ttl: float = 120.0
    dedup_horizon: float = 3600.0
    max_pending: int = 2_000_000
    max_remembered: int = 4_000_000
    evict: Literal["emit", "drop"] = "emit"

    def __post_init__(self) -> None:
        if self.click_window <= 0:
            raise ConfigError("click_window must be > 0 seconds")
        if self.orphan_ttl < 0 or self.dedup_horizon < 0:
            raise ConfigError("orphan_ttl and dedup_horizon must be >= 0 seconds")
        if self.max_pending < 1 or self.max_remembered < 1:
            raise ConfigError("max_pending and max_remembered must be >= 1")
        if self.evict not in ("emit", "drop"):
            raise ConfigError("evict must be 'emit' or 'drop'")


@dataclass(slots=True)
class Sample:
    impression_id: str
    ts: float
    label: int
    payload: Any
    label_ts: float


@dataclass
class JoinStats:
    impressions: int = 0
    clicks: int = 0
    positives: int = 0
    negatives: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0
    clicks_outside_window: int = 0
    late_clicks: int = 0
    late_impressions: int = 0
    unmatched_clicks: int = 0
    evicted: int = 0


class Joiner:
    def __init__(self, config: JoinerConfig | None = None) -> None:
        self.config = config or JoinerConfig()
        # The config is frozen: its numbers as plain attributes, read on every event (the
        # attribute chain self.config.x was a measurable share of the per-event cost).
        self._window = self.config.click_window
        self._ttl = self.config.orphan_ttl
        self._horizon = self.config.dedup_horizon
        self._max_pending = self.config.max_pending
        self._max_remembered = self.config.max_remembered
        self.watermark = float("-inf")
        self.stats = JoinStats()
        # impression_id -> (ts, payload); deadlines (deadline, seq, id) with lazy deletion in
        # a deque while they come in order (impressions nearly sorted by ts: O(1), where a
        # heap of tens of thousands costs ~35 tuple comparisons per push and pop), and in a
        # heap for the ones that come out of order; released by merging the two heads, so in
        # (deadline, seq) order exactly as from one heap.
        # One dict for pending and released ids (one lookup per event, and a release replaces
        # the entry in place): a pending impression's value is (ts, payload), a released one's
        # a float, see _POSITIVE.
        self._state: dict[str, tuple[float, Any] | float] = {}
        self._pending_count = 0
        self._in_order: deque[tuple[float, int, str]] = deque()
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0
        self._orphans: dict[str, float] = {}  # click before impression: id -> click ts
        # (click ts, id) of every orphan ever held, with lazy deletion: expiring orphans pops
        # the due ones instead of scanning all of them at every watermark step.
        self._orphan_heap: list[tuple[float, str]] = []
        # A released id's value in _state: _POSITIVE, or for a negative the time it is
        # forgotten (ts + window + dedup_horizon: what tells a late click within its window
        # from one after it, with no float beyond the one the forget queue holds anyway);
        # forgotten in release order (a deque: deleting from the front of a dict makes every
        # later next(iter(d)) skip the holes, O(n) per call). Each released id has exactly one
        # entry in _forget, so popping one only ever removes a released id.
        self._forget: deque[tuple[float, str]] = deque()

    @property
    def pending(self) -> int:
        return self._pending_count

    def add_impression(self, impression_id: str, ts: float, payload: Any) -> list[Sample]:
        if impression_id in self._state:
            self.stats.duplicate_impressions += 1
            return []
        self.stats.impressions += 1
        if self._orphans:  # usually empty: a file, or topics read in step
            click_ts = self._orphans.pop(impression_id, None)
            if click_ts is not None:
                if click_ts - ts <= self._window:
                    return [self._release(impression_id, ts, payload, 1, max(click_ts, ts))]
                self.stats.clicks_outside_window += 1
        deadline = ts + self._window
        if deadline <= self.watermark:
            # Arrived after its own window closed: its label is already final.
            self.stats.late_impressions += 1
            return [self._release(impression_id, ts, payload, 0, self.watermark)]
        self._state[impression_id] = (ts, payload)
        self._pending_count += 1
        self._push_deadline(deadline, impression_id)
        if self._pending_count > self._max_pending:
            return self._evict_one()
        return []

    def add_click(self, impression_id: str, ts: float) -> list[Sample]:
        self.stats.clicks += 1
        done = self._state.get(impression_id)
        if type(done) is tuple:  # pending
            imp_ts, payload = done
            if ts - imp_ts > self._window:
                self.stats.clicks_outside_window += 1
                return []
            self._pending_count -= 1
            return [self._release(impression_id, imp_ts, payload, 1, max(ts, imp_ts))]
        if done is not None:
            if done == _POSITIVE:
                self.stats.duplicate_clicks += 1
            elif ts + self._horizon <= done:  # ts - imp_ts <= click_window
                self.stats.late_clicks += 1
            else:
                self.stats.clicks_outside_window += 1
            return []
        orphan_ts = self._orphans.get(impression_id)
        if orphan_ts is not None:
            self.stats.duplicate_clicks += 1
            if ts < orphan_ts:  # keep the earliest: a later one may fall outside the window
                self._orphans[impression_id] = ts
                heapq.heappush(self._orphan_heap, (ts, impression_id))
            return []
        if ts + self._ttl <= self.watermark:
            self.stats.unmatched_clicks += 1
            return []
        self._orphans[impression_id] = ts
        heapq.heappush(self._orphan_heap, (ts, impression_id))
        return []

    def advance(self, watermark: float) -> list[Sample]:
        """Move event time forward; returns the negatives whose window closed."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        q, heap = self._in_order, self._deadlines
        # Most steps close nothing: two comparisons, not a call.
        due = (q and q[0][0] <= watermark) or (heap and heap[0][0] <= watermark)
        out = self._close(watermark) if due else []
        orphans = self._orphan_heap
        if orphans and orphans[0][0] + self._ttl <= watermark:
            self._expire_orphans(watermark)
        forget = self._forget
        if forget and forget[0][0] <= watermark:
            done = self._state
            # Released ids are roughly in deadline order; stop at the first one still
            # remembered.
            while forget and forget[0][0] <= watermark:
                done.pop(forget.popleft()[1], None)
        return out

    def _push_deadline(self, deadline: float, impression_id: str) -> None:
        q = self._in_order
        if not q or deadline >= q[-1][0]:  # seq grows, so the deque stays sorted
            q.append((deadline, self._seq, impression_id))
        else:
            heapq.heappush(self._deadlines, (deadline, self._seq, impression_id))
        self._seq += 1

    def _pop_deadline(self, watermark: float) -> tuple[float, int, str] | None:
        """The smallest (deadline, seq, id) if its deadline is <= watermark, removed."""
        q, heap = self._in_order, self._deadlines
        if q and (not heap or q[0] < heap[0]):
            return q.popleft() if q[0][0] <= watermark else None
        if heap and heap[0][0] <= watermark:
            return heapq.heappop(heap)
        return None

    def _close(self, watermark: float) -> list[Sample]:
        """The negatives of every pending impression whose deadline is under `watermark`."""
        out: list[Sample] = []
        q, heap, state, window = self._in_order, self._deadlines, self._state, self._window
        release = self._release
        while True:
            if q and (not heap or q[0] < heap[0]):  # the deque's head is the smallest
                if q[0][0] > watermark:
                    break
                impression_id = q.popleft()[2]
            elif heap and heap[0][0] <= watermark:
                impression_id = heapq.heappop(heap)[2]
            else:
                break
            entry = state.get(impression_id)
            if type(entry) is tuple:  # else: already released as a positive
                self._pending_count -= 1
                out.append(release(impression_id, entry[0], entry[1], 0, entry[0] + window))
        return out

    def _expire_orphans(self, watermark: float) -> None:
        """Drop the orphans with ts + orphan_ttl <= watermark (as `expire` does by a scan);
        a heap entry whose orphan was matched, or lowered to an earlier click, is skipped."""
        heap, orphans, ttl = self._orphan_heap, self._orphans, self._ttl
        gone = 0
        while heap and heap[0][0] + ttl <= watermark:
            impression_id = heapq.heappop(heap)[1]
            ts = orphans.get(impression_id)
            if ts is not None and ts + ttl <= watermark:
                del orphans[impression_id]
                gone += 1
        self.stats.unmatched_clicks += gone

    def flush(self) -> list[Sample]:
        """Release everything pending as final (end of a finite replay)."""
        return self.advance(float("inf"))

    def _release(self, impression_id: str, ts: float, payload: Any, label: int,
                 label_ts: float) -> Sample:
        if label:
            self.stats.positives += 1
        else:
            self.stats.negatives += 1
        # _remember, inlined: it runs once per sample.
        forget_at = ts + self._window + self._horizon
        self._state[impression_id] = _POSITIVE if label else forget_at
        forget = self._forget
        forget.append((forget_at, impression_id))
        if len(forget) > self._max_remembered:
            self._state.pop(forget.popleft()[1], None)
        return Sample(impression_id, ts, label, payload, label_ts)

    def _evict_one(self) -> list[Sample]:
        while (head := self._pop_deadline(float("inf"))) is not None:
            deadline, _, impression_id = head
            entry = self._state.get(impression_id)
            if type(entry) is not tuple:
                continue
            del self._state[impression_id]  # _release or _remember puts it back, released
            self._pending_count -= 1
            self.stats.evicted += 1
            if self.config.evict == "emit":
                return [self._release(impression_id, entry[0], entry[1], 0, deadline)]
            self._remember(impression_id, deadline + self._horizon, 0)
            return []
        return []

    def _remember(self, impression_id: str, forget_at: float, label: int) -> None:
        self._state[impression_id] = _POSITIVE if label else forget_at
        self._forget.append((forget_at, impression_id))
        if len(self._forget) > self._max_remembered:
            self._state.pop(self._forget.popleft()[1], None)

    def snapshot(self) -> dict[str, Any]:
        """Plain-data state (JSON-serialisable when payloads are); `restore` inverts it."""
        state = self._state
        pending = sorted((seq, k) for (_, seq, k) in chain(self._in_order, self._deadlines)
                         if type(state.get(k)) is tuple)
        seen: set[str] = set()
        rows = []
        for _, k in pending:
            if k not in seen:
                seen.add(k)
                ts, payload = state[k]  # type: ignore[misc]
                rows.append([k, ts, payload])
        return {
            "config": asdict(self.config),
            "watermark": self.watermark if self.watermark != float("-inf") else None,
            "pending": rows,
            "orphans": list(self._orphans.items()),
            "done": [[k, f, int(state[k] == _POSITIVE)] for f, k in self._forget
                     if k in state and type(state[k]) is not tuple],
            "stats": asdict(self.stats),
        }

    @classmethod
    def restore(cls, state: dict[str, Any], config: JoinerConfig | None = None) -> Joiner:
        j = cls(config or JoinerConfig(**state["config"]))
        wm = state.get("watermark")
        j.watermark = float("-inf") if wm is None else float(wm)
        for k, ts, payload in state["pending"]:
            j._state[k] = (ts, payload)
            j._pending_count += 1
            j._push_deadline(ts + j.config.click_window, k)
        j._orphans = {k: float(ts) for k, ts in state["orphans"]}
        j._orphan_heap = [(ts, k) for k, ts in j._orphans.items()]
        heapq.heapify(j._orphan_heap)
        for k, f, label in state["done"]:
            j._remember(k, float(f), int(label))
        j.stats = JoinStats(**state["stats"])
        return j


def expire(orphans: dict[str, float], ttl: float, forget: deque[tuple[float, str]],
           done: dict[str, Any], watermark: float) -> int:
    """Drop orphans (events whose partner never came) older than `ttl` and forget released
    ids whose time is up; returns how many orphans were dropped. Shared by the click joiner and
    the conversion-delay policies, which keep the same two structures."""
    gone = 0
    if orphans:
        stale = [k for k, ts in orphans.items() if ts + ttl <= watermark]
        for k in stale:
            del orphans[k]
        gone = len(stale)
    # Released ids are roughly in deadline order; stop at the first one still remembered.
    while forget and forget[0][0] <= watermark:
        done.pop(forget.popleft()[1], None)
    return gone


@dataclass
class WatermarkTracker:
    """Event-time clock over several sources (Kafka partitions, or one file).

    The clock is the minimum over active sources of the maximum ts each has delivered, so a
    source that lags (a partition read later) holds event time back instead of having its events
    judged late. Sources marked idle (the caller knows they have nothing to read) do not hold it
    back. When every source is idle the clock stays where it is: it never jumps to the most
    advanced source, because sources need not agree on event time (a topic whose events run
    hours ahead, a producer with a fast clock) and every other source's next events would be
    judged late against it. A quiet stream moves on with `force` (the caller's wall clock).
    Marking a source idle is the caller's promise that it has read everything there is; the
    streaming trainer `wake`s every source whenever new records arrive and confirms again.

    With `max_jump` set, one event cannot move a source's frontier (its "maximum ts") more than
    `max_jump` seconds ahead: such an event is held as a *suspect* and the frontier moves only
    when a second event also lands beyond `max_jump` (two events agree that time jumped: the
    frontier goes to the smaller of the two; a suspect that ordinary events later come within
    `max_jump` of is confirmed by them). One forged or mis-clocked event (a 2099 ts) thus never
    moves event time, while a real gap in traffic costs one event of delay. The first event of
    a source has nothing to be compared with and is taken as it is (the trainer refuses events
    ahead of the receiving clock before they get here). None (the default, and replay's):
    every event counts at once.

    >>> t = WatermarkTracker(allowed_lateness=0, max_jump=600)
    >>> for ts in (1000.0, 1001.0, 4_070_908_800.0, 1002.0):
    ...     t.observe("clicks", ts)
    >>> t.clock
    1002.0
    """

    allowed_lateness: float = 30.0
    max_jump: float | None = None
    _max_ts: dict[Any, float] = field(default_factory=dict)
    _idle: set[Any] = field(default_factory=set)
    _clock: float = float("-inf")
    _suspect: dict[Any, float] = field(default_factory=dict)

    def observe(self, source: Any, ts: float) -> None:
        current = self._max_ts.get(source, float("-inf"))
        if ts > current:
            jump = self.max_jump
            if jump is None or ts - current <= jump or current == float("-inf"):
                self._max_ts[source] = ts
                if self._suspect:
                    self._settle(source)
            else:
                self._hold(source, ts)
        if self._idle:
            self._idle.discard(source)

    def _hold(self, source: Any, ts: float) -> None:
        """`ts` is more than max_jump ahead of the frontier: the first such event waits as a
        suspect; a second one confirms that time jumped, as far as the smaller of the two."""
        assert self.max_jump is not None
        suspect = self._suspect.pop(source, None)
        if suspect is None:
            self._suspect[source] = ts
            return
        self._max_ts[source] = min(suspect, ts)
        self._suspect[source] = max(suspect, ts)
        self._settle(source)

    def _settle(self, source: Any) -> None:
        """Drop a suspect the frontier has passed; confirm one it has come within max_jump of."""
        suspect = self._suspect.get(source)
        if suspect is None or self.max_jump is None:
            return
        frontier = self._max_ts[source]
        if suspect <= frontier:
            del self._suspect[source]
        elif suspect - frontier <= self.max_jump:
            self._max_ts[source] = suspect
            del self._suspect[source]

    def register(self, source: Any) -> None:
        """Declare a source before its first event, so it holds event time back until it
        delivers (or is marked idle): a partition read later must not find its events late."""
        self._max_ts.setdefault(source, float("-inf"))

    def set_idle(self, source: Any, idle: bool) -> None:
        if idle:
            self._idle.add(source)
        else:
            self._idle.discard(source)

    def wake(self) -> None:
        """Every source holds event time back again until the caller marks it idle anew."""
        self._idle.clear()

    def max_ts(self, source: Any) -> float:
        return self._max_ts.get(source, float("-inf"))

    @property
    def clock(self) -> float:
        if len(self._max_ts) == 1 and not self._idle:  # one source (a file): its max ts
            (candidate,) = self._max_ts.values()
            if candidate > self._clock:
                self._clock = candidate
            return self._clock
        active = [t for s, t in self._max_ts.items() if s not in self._idle]
        if active:  # all idle: stay (see the class docstring), never the max
            candidate = min(active)
            if candidate > self._clock:  # event time never goes backwards
                self._clock = candidate
        return self._clock

    def force(self, clock: float) -> None:
        """Advance the clock with no events (an idle live stream); never moves it back."""
        self._clock = max(self._clock, clock)

    @property
    def watermark(self) -> float:
        return self.clock - self.allowed_lateness

    def state(self, source_name: Callable[[Any], str] = str) -> dict[str, Any]:
        return {"max_ts": [[source_name(k), v] for k, v in self._max_ts.items()],
                "clock": self._clock,
                "suspect": [[source_name(k), v] for k, v in self._suspect.items()]}

    def restore(self, state: dict[str, Any], source_key: Callable[[str], Any] = str) -> None:
        self._max_ts = {source_key(k): float(v) for k, v in state["max_ts"]}
        self._clock = float(state["clock"])
        # Checkpoints from before the outlier guard have no suspects.
        self._suspect = {source_key(k): float(v) for k, v in state.get("suspect", [])}
