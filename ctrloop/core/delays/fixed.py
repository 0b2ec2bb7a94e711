"""`fixed:SECONDS`: every click waits SECONDS of event time; late conversions are corrected."""

from __future__ import annotations

from collections.abc import Hashable

from ctrloop.core.delays.base import DelayPolicy, PolicyConfig
from ctrloop.core.errors import ConfigError


class FixedPolicy(DelayPolicy):
    def __init__(self, seconds: float, config: PolicyConfig | None = None) -> None:
        if not seconds >= 0:
            raise ConfigError("fixed:SECONDS needs SECONDS >= 0")
        super().__init__(config)
        self.seconds = float(seconds)
        self.name = f"fixed:{seconds:g}"

    def _wait(self, key: Hashable, click_ts: float) -> float:
        return self.seconds

