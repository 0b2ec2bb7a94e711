"""`naive` (release at once, a duplicate positive on conversion) and `fnw` (the same samples
with the fake-negative weights of Ktena et al. 2019)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from ctrloop.core.delays.base import CvrSample, DelayPolicy


class NaivePolicy(DelayPolicy):
    name = "naive"

    def _wait(self, key: Hashable, click_ts: float) -> float:
        return 0.0

    def _late(self, iid: str, rec: list[Any], ts: float) -> list[CvrSample]:
        key, click_ts, _, payload, _ = rec
        return [CvrSample(iid, click_ts, 1.0, 1.0, payload, ts, "late", key)]


class FNWPolicy(NaivePolicy):
    """Naive's samples, learned with the fake-negative weights (Ktena et al. 2019)."""

    name = "fnw"
    needs_predictions = True

    def weights(self, samples: list[CvrSample], preds: np.ndarray | None) -> np.ndarray:
        assert preds is not None
        p = np.asarray(preds, np.float32)
        y = np.fromiter((s.label for s in samples), np.float32, len(samples))
        return np.where(y >= 1.0, 1.0 + p, (1.0 - p) * (1.0 + p)).astype(np.float32)
