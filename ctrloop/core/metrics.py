"""Progressive-validation metrics: logloss, AUC and calibration over a sliding window.

Every sample is scored before the model learns from it (progressive validation), so these
numbers estimate how the model does on data it has not seen, at no extra cost.

>>> import numpy as np
>>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

EPS = 1e-7


def logloss(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean binary cross-entropy; predictions are clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(preds, dtype=np.float64), EPS, 1 - EPS)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def auc(labels: np.ndarray, preds: np.ndarray) -> float:
    """ROC AUC by the rank statistic, with ties given half credit; NaN if one class is absent."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(preds, dtype=np.float64)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    p_sorted = p[order]
    ranks = np.empty(p.size, dtype=np.float64)
    # Average ranks over ties so equal scores count half.
    _, first, counts = np.unique(p_sorted, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibration(labels: np.ndarray, preds: np.ndarray) -> float:
    """sum(pred) / sum(label): 1.0 is calibrated; the paper's bias is this minus 1."""
    positives = float(np.sum(labels))
    return float(np.sum(preds)) / positives if positives > 0 else float("nan")


@dataclass(frozen=True)
class MetricsReport:
    samples: int
    window: int
    logloss: float
    auc: float
    calibration: float
    ctr: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "samples": self.samples,
            "window": self.window,
            "logloss": self.logloss,
            "auc": self.auc,
            "calibration": self.calibration,
            "ctr": self.ctr,
        }


class ProgressiveMetrics:
    """Keeps the last `window` (label, prediction) pairs in chunks and reports on demand.

    Chunks are the minibatches as learned, so adding is O(1) in Python calls per batch.
    """

    def __init__(self, window: int = 100_000) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.samples = 0
        self._chunks: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._held = 0

    def add(self, labels: np.ndarray, preds: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.float32)
        preds = np.asarray(preds, dtype=np.float32)
        self._chunks.append((labels, preds))
        self._held += labels.size
        self.samples += labels.size
        while self._chunks and self._held - self._chunks[0][0].size >= self.window:
            self._held -= self._chunks.popleft()[0].size

    def report(self) -> MetricsReport:
        if not self._chunks:
            nan = float("nan")
            return MetricsReport(self.samples, 0, nan, nan, nan, nan)
        y = np.concatenate([c[0] for c in self._chunks])[-self.window :]
        p = np.concatenate([c[1] for c in self._chunks])[-self.window :]
        return MetricsReport(
            samples=self.samples,
            window=int(y.size),
            logloss=logloss(y, p),
            auc=auc(y, p),
            calibration=calibration(y, p),
            ctr=float(y.mean()),
        )

    def state(self) -> dict[str, object]:
        y = np.concatenate([c[0] for c in self._chunks]) if self._chunks else np.zeros(0)
        p = np.concatenate([c[1] for c in self._chunks]) if self._chunks else np.zeros(0)
        return {"samples": self.samples, "labels": y.tolist(), "preds": p.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, object], window: int) -> ProgressiveMetrics:
        m = cls(window)
        labels = np.asarray(state.get("labels", []), dtype=np.float32)
        if labels.size:
            m.add(labels, np.asarray(state["preds"], dtype=np.float32))
        m.samples = int(state.get("samples", labels.size))  # type: ignore[arg-type]
        return m
