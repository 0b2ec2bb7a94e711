"""Score a predictions file against the simulator's truth file.

Labels are the click-attribution-window labels the trainer learns (clicked within the window), and
the oracle is the simulator's true CTR on the same impressions: the best any model could do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctrloop.metrics import auc, calibration, logloss


def load_truth(path: Path, click_window: float = 120.0) -> dict[str, tuple[float, int]]:
    """impression_id -> (true ctr, label within the window)."""
    out: dict[str, tuple[float, int]] = {}
    with open(path, "rb") as f:
        for line in f:
            t = orjson.loads(line)
            click_ts = t.get("click_ts")
            label = int(click_ts is not None and click_ts - t["ts"] <= click_window)
            out[t["impression_id"]] = (float(t["ctr"]), label)
    return out


def evaluate(predictions: Path, truth: Path, click_window: float = 120.0,
             skip_fraction: float = 0.2) -> dict[str, Any]:
    """Metrics of the predictions and of the oracle over the impressions after the first
    `skip_fraction` of the stream (file order), and over all of them."""
    truth_map = load_truth(truth, click_window)
    preds, ctr, labels = [], [], []
    with open(predictions, "rb") as f:
        for line in f:
            p = orjson.loads(line)
            t = truth_map.get(p["impression_id"])
            if t is None:
                continue
            preds.append(p["pctr"])
            ctr.append(t[0])
            labels.append(t[1])
    pr, tr, y = np.array(preds), np.array(ctr), np.array(labels, dtype=np.float64)
    start = int(len(y) * skip_fraction)
    out: dict[str, Any] = {"impressions": len(y), "skipped": start}
    for name, sl in (("all", slice(None)), ("after_skip", slice(start, None))):
        out[name] = {
            "auc": auc(y[sl], pr[sl]),
            "logloss": logloss(y[sl], pr[sl]),
            "calibration": calibration(y[sl], pr[sl]),
            "oracle_auc": auc(y[sl], tr[sl]),
            "oracle_logloss": logloss(y[sl], tr[sl]),
        }
        out[name]["auc_gap"] = out[name]["oracle_auc"] - out[name]["auc"]
    return out
