"""`oracle`: the eventual label known at the click (the simulator's truth); replay only."""

from __future__ import annotations

from collections.abc import Collection, Hashable
from typing import Any

from ctrloop.core.delays.base import CvrSample, DelayPolicy, PolicyConfig


class OraclePolicy(DelayPolicy):
    """The prophet: every click released at once with its eventual label (from the truth)."""

    name = "oracle"

    def __init__(self, converted: Collection[str], config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._converted = converted

    def _wait(self, key: Hashable, click_ts: float) -> float:
        return 0.0

    def add_click(self, iid: str, key: Hashable, click_ts: float,
                  payload: Any) -> list[CvrSample]:
        self.stats.clicks += 1
        self.stats.released += 1
        label = 1.0 if iid in self._converted else 0.0
        self.stats.released_positive += int(label)
        return [CvrSample(iid, click_ts, label, 1.0, payload, click_ts, "click", key)]

    def add_conversion(self, iid: str, ts: float) -> list[CvrSample]:
        self.stats.conversions += 1  # already in the labels
        return []
