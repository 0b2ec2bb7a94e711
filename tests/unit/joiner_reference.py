"""A frozen copy of the Joiner before issue 13 (per-event, config read on every call): the
optimised Joiner must release the same samples, in the same order, with the same stats and
snapshots (tests/unit/test_joiner_differential.py)."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import asdict
from typing import Any

from ctrloop.core.joining import JoinerConfig, JoinStats, Sample

_POSITIVE = float("-inf")


class ReferenceJoiner:
    def __init__(self, config: JoinerConfig | None = None) -> None:
        self.config = config or JoinerConfig()
        self.watermark = float("-inf")
        self.stats = JoinStats()
        # impression_id -> (ts, payload); deadlines in a heap with lazy deletion
        self._pending: dict[str, tuple[float, Any]] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0
        self._orphans: dict[str, float] = {}  # click before impression: id -> click ts
        # released ids -> _POSITIVE, or for a negative the time it is forgotten (ts + window +
        # dedup_horizon: what tells a late click within its window from one after it, with no
        # float beyond the one the forget queue holds anyway); forgotten in release order (a
        # deque: deleting from the front of a dict makes every later next(iter(d)) skip the
        # holes, O(n) per call).
        self._done: dict[str, float] = {}
        self._forget: deque[tuple[float, str]] = deque()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add_impression(self, impression_id: str, ts: float, payload: Any) -> list[Sample]:
        if impression_id in self._pending or impression_id in self._done:
            self.stats.duplicate_impressions += 1
            return []
        self.stats.impressions += 1
        click_ts = self._orphans.pop(impression_id, None)
        deadline = ts + self.config.click_window
        if click_ts is not None and click_ts - ts <= self.config.click_window:
            return [self._release(impression_id, ts, payload, 1, max(click_ts, ts))]
        if click_ts is not None:
            self.stats.clicks_outside_window += 1
        if deadline <= self.watermark:
            # Arrived after its own window closed: its label is already final.
            self.stats.late_impressions += 1
            return [self._release(impression_id, ts, payload, 0, self.watermark)]
        self._pending[impression_id] = (ts, payload)
        heapq.heappush(self._deadlines, (deadline, self._seq, impression_id))
        self._seq += 1
        if len(self._pending) > self.config.max_pending:
            return self._evict_one()
        return []

    def add_click(self, impression_id: str, ts: float) -> list[Sample]:
        self.stats.clicks += 1
        entry = self._pending.get(impression_id)
        if entry is not None:
            imp_ts, payload = entry
            if ts - imp_ts > self.config.click_window:
                self.stats.clicks_outside_window += 1
                return []
            del self._pending[impression_id]
            return [self._release(impression_id, imp_ts, payload, 1, max(ts, imp_ts))]
        done = self._done.get(impression_id)
        if done is not None:
            if done == _POSITIVE:
                self.stats.duplicate_clicks += 1
            elif ts + self.config.dedup_horizon <= done:  # ts - imp_ts <= click_window
                self.stats.late_clicks += 1
            else:
                self.stats.clicks_outside_window += 1
            return []
        orphan_ts = self._orphans.get(impression_id)
        if orphan_ts is not None:
            self.stats.duplicate_clicks += 1
            if ts < orphan_ts:  # keep the earliest: a later one may fall outside the window
                self._orphans[impression_id] = ts
            return []
        if ts + self.config.orphan_ttl <= self.watermark:
            self.stats.unmatched_clicks += 1
            return []
        self._orphans[impression_id] = ts
        return []

    def advance(self, watermark: float) -> list[Sample]:
        """Move event time forward; returns the negatives whose window closed."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        out: list[Sample] = []
        heap = self._deadlines
        while heap and heap[0][0] <= watermark:
            _, _, impression_id = heapq.heappop(heap)
            entry = self._pending.pop(impression_id, None)
            if entry is not None:  # else: already released as a positive
                label_ts = entry[0] + self.config.click_window
                out.append(self._release(impression_id, entry[0], entry[1], 0, label_ts))
        self._expire(watermark)
        return out

    def flush(self) -> list[Sample]:
        """Release everything pending as final (end of a finite replay)."""
        return self.advance(float("inf"))

    def _release(self, impression_id: str, ts: float, payload: Any, label: int,
                 label_ts: float) -> Sample:
        if label:
            self.stats.positives += 1
        else:
            self.stats.negatives += 1
        self._remember(impression_id, ts + self.config.click_window + self.config.dedup_horizon,
                       label)
        return Sample(impression_id, ts, label, payload, label_ts)

    def _evict_one(self) -> list[Sample]:
        while self._deadlines:
            deadline, _, impression_id = heapq.heappop(self._deadlines)
            entry = self._pending.pop(impression_id, None)
            if entry is None:
                continue
            self.stats.evicted += 1
            if self.config.evict == "emit":
                return [self._release(impression_id, entry[0], entry[1], 0, deadline)]
            self._remember(impression_id, deadline + self.config.dedup_horizon, 0)
            return []
        return []

    def _expire(self, watermark: float) -> None:
        self.stats.unmatched_clicks += expire(self._orphans, self.config.orphan_ttl,
                                              self._forget, self._done, watermark)

    def _remember(self, impression_id: str, forget_at: float, label: int) -> None:
        self._done[impression_id] = _POSITIVE if label else forget_at
        self._forget.append((forget_at, impression_id))
        if len(self._forget) > self.config.max_remembered:
            self._done.pop(self._forget.popleft()[1], None)

    def snapshot(self) -> dict[str, Any]:
        """Plain-data state (JSON-serialisable when payloads are); `restore` inverts it."""
        pending = sorted((seq, k) for (_, seq, k) in self._deadlines if k in self._pending)
        seen: set[str] = set()
        rows = []
        for _, k in pending:
            if k not in seen:
                seen.add(k)
                ts, payload = self._pending[k]
                rows.append([k, ts, payload])
        return {
            "config": asdict(self.config),
            "watermark": self.watermark if self.watermark != float("-inf") else None,
            "pending": rows,
            "orphans": list(self._orphans.items()),
            "done": [[k, f, int(self._done[k] == _POSITIVE)] for f, k in self._forget
                     if k in self._done],
            "stats": asdict(self.stats),
        }

    @classmethod
    def restore(cls, state: dict[str, Any], config: JoinerConfig | None = None) -> ReferenceJoiner:
        j = cls(config or JoinerConfig(**state["config"]))
        wm = state.get("watermark")
        j.watermark = float("-inf") if wm is None else float(wm)
        for k, ts, payload in state["pending"]:
            j._pending[k] = (ts, payload)
            j._deadlines.append((ts + j.config.click_window, j._seq, k))
            j._seq += 1
        heapq.heapify(j._deadlines)
        j._orphans = {k: float(ts) for k, ts in state["orphans"]}
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
