"""What the served model said of every impression, scored lazily (issue 13 A).

An impression is served by the last snapshot published before it, i.e. by the weights of the
tick that follows it. The weights change only when a head learns, so the impressions of every
tick since the last change are scored together, just before the next change, in one forward
pass, each group with the version that was current at its tick. Byte-identical to scoring at
every tick: `OnlineLearner.predict_parts` runs the sigmoid per tick, as a per-tick forward did.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ctrloop.core.learner import OnlineLearner

ServedSink = Callable[[list[str], np.ndarray, str], None]


class ServedScores:
    def __init__(self, served: ServedSink, served_cvr: ServedSink | None = None,
                 served_var: ServedSink | None = None) -> None:
        self.served, self.served_cvr, self.served_var = served, served_cvr, served_var
        # Impressions not yet scored, oldest first. The first `_grouped` of them arrived before
        # a tick that has passed: `_groups` holds (count, model version) per such tick.
        self._ids: list[str] = []
        self._rows: list[list[int]] = []
        self._groups: list[tuple[int, str]] = []
        self._grouped = 0

    @property
    def between_ticks(self) -> int:
        """Impressions that arrived since the last tick (no version known yet)."""
        return len(self._ids) - self._grouped

    def add(self, impression_id: str, row: list[int]) -> None:
        self._ids.append(impression_id)
        self._rows.append(row)

    def close_tick(self, version: str) -> None:
        """A tick: the impressions since the previous one are served by `version`."""
        n = self.between_ticks
        if n:
            self._groups.append((n, version))
            self._grouped += n

    def flush(self, ctr: OnlineLearner, cvr: OnlineLearner) -> None:
        """Score every grouped impression with the current weights (called before they
        change, so they are those of every group's tick) and hand them to the sinks."""
        groups = self._groups
        if not groups:
            return
        n = self._grouped
        ids, rows = self._ids[:n], np.asarray(self._rows[:n], dtype=np.int64)
        del self._ids[:n], self._rows[:n]
        self._groups, self._grouped = [], 0
        sizes = [c for c, _ in groups]
        preds = ctr.predict_parts(rows, sizes)
        pcvr = cvr.predict_parts(rows, sizes) if self.served_cvr is not None else None
        posterior = ctr.posterior
        var = (posterior.row_variance(torch.from_numpy(rows)).numpy()
               if self.served_var is not None and posterior is not None else None)
        start = 0
        for i, (count, version) in enumerate(groups):
            part = ids[start:start + count]
            # The order of the sinks is the contract: pCVR, then variances, then pCTR.
            if pcvr is not None and self.served_cvr is not None:
                self.served_cvr(part, pcvr[i], version)
            if var is not None and self.served_var is not None:
                self.served_var(part, var[start:start + count], version)
            self.served(part, preds[i], version)
            start += count
