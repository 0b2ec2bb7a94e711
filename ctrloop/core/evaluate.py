"""Score a predictions file against the simulator's truth file.

Labels are the click-attribution-window labels the trainer learns (clicked within the window), and
the oracle is the simulator's true CTR on the same impressions: the best any model could do.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import orjson

from ctrloop.core.metrics import auc, calibration, logloss


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


def load_scored(predictions: Path, truth: Path, click_window: float = 120.0
                ) -> dict[str, np.ndarray]:
    """The served predictions joined with the truth, in file order: impression time `ts`,
    `pctr`, the true CTR `ctr` and the window `label` (the columns `evaluate` scores)."""
    with open(truth, "rb") as f:
        ts_of = {t["impression_id"]: float(t["ts"]) for t in map(orjson.loads, f)}
    truth_map = load_truth(truth, click_window)
    rows = []
    with open(predictions, "rb") as f:
        for line in f:
            p = orjson.loads(line)
            t = truth_map.get(p["impression_id"])
            if t is not None:
                rows.append((ts_of[p["impression_id"]], float(p["pctr"]), t[0], float(t[1])))
    a = np.asarray(rows, np.float64).reshape(-1, 4)
    return {"ts": a[:, 0], "pctr": a[:, 1], "ctr": a[:, 2], "label": a[:, 3]}


def calibration_bins(pred: np.ndarray, actual: np.ndarray, n_bins: int = 10
                     ) -> list[dict[str, float]]:
    """Reliability bins: the predictions split at their quantiles into up to `n_bins` bins
    of about equal count; per bin the mean prediction, the mean `actual` (labels or true
    rates) and the count. Equal counts, not equal widths: pCTRs crowd near the base rate."""
    pr = np.asarray(pred, np.float64)
    ac = np.asarray(actual, np.float64)
    if pr.size == 0:  # nothing scored yet (a stack stopped before its first trained model)
        return []
    order = np.argsort(pr, kind="mergesort")
    return [{"pred": float(pr[ix].mean()), "actual": float(ac[ix].mean()), "n": int(ix.size)}
            for ix in np.array_split(order, min(n_bins, pr.size)) if ix.size]


def over_time(ts: np.ndarray, pred: np.ndarray, ctr: np.ndarray, label: np.ndarray,
              n_buckets: int = 20) -> list[dict[str, float]]:
    """The served predictions per equal span of event time: AUC against the window labels
    and the oracle's (the true CTR as the score), mean pCTR, mean true CTR and the label
    rate (NaN AUCs where a span has no click or only clicks)."""
    if ts.size == 0:
        return []
    t0, t1 = float(ts.min()), float(ts.max())
    span = (t1 - t0) / n_buckets or 1.0
    k = np.minimum(((ts - t0) // span).astype(np.int64), n_buckets - 1)
    return [{"start_ts": t0 + b * span, "impressions": int(m.sum()),
             "auc": auc(label[m], pred[m]), "oracle_auc": auc(label[m], ctr[m]),
             "mean_pctr": float(pred[m].mean()), "mean_ctr": float(ctr[m].mean()),
             "label_rate": float(label[m].mean())}
            for b in np.unique(k).tolist() for m in [k == b]]


def load_cvr_truth(path: Path, conversion_type: str | None = None
                   ) -> dict[str, tuple[float, int, float, float, bool]]:
    """impression_id -> (true cvr, eventually converted, impression ts, ad created ts, bursty)
    for the clicked impressions: pCVR is P(conversion | click), judged on clicks. With
    `conversion_type`, that type's rate and label (a truth file of several types)."""
    out: dict[str, tuple[float, int, float, float, bool]] = {}
    with open(path, "rb") as f:
        for line in f:
            if b'"clicked":true' not in line:
                continue
            t = orjson.loads(line)
            c = t if conversion_type is None else t["conversions"][conversion_type]
            out[t["impression_id"]] = (float(c["cvr"]), int(bool(c["converted"])),
                                       float(t["ts"]), float(t["ad_created_ts"]),
                                       t.get("reporting") == "bursty")
    return out


def _bias(pred: np.ndarray, actual: np.ndarray) -> float:
    """The paper's bias: sum(pred) / sum(actual) - 1."""
    total = float(actual.sum())
    return float(pred.sum()) / total - 1.0 if total > 0 else float("nan")


def _cvr_metrics(pr: np.ndarray, tr: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return {
        "clicks": int(y.size),
        "conversions": int(y.sum()),
        "auc": auc(y, pr),
        "logloss": logloss(y, pr),
        "bias": _bias(pr, y),
        # Against the true CVR: the same bias with the sampling noise of the labels removed.
        "bias_vs_true_cvr": _bias(pr, tr),
        "oracle_auc": auc(y, tr),
        "oracle_logloss": logloss(y, tr),
    }


def evaluate_cvr(predictions: Path, truth: Path, skip_s: float = 3 * 86_400.0,
                 new_ad_s: float = 3 * 86_400.0, period_s: float = 86_400.0,
                 conversion_type: str | None = None) -> dict[str, Any]:
    """Served pCVR on every clicked impression against its eventual conversion.

    Reported for all clicks after the first `skip_s` of event time (the cold start; "all" too),
    for new ads (younger than `new_ad_s` at the impression), for bursty and streaming
    advertisers, and per `period_s` (bias over time). With `conversion_type`, the pCVR of
    that type (`pcvr_by_type`, or `pcvr` in a file of one type) against that type's truth."""
    truth_map = load_cvr_truth(truth, conversion_type)
    rows = []
    with open(predictions, "rb") as f:
        for line in f:
            p = orjson.loads(line)
            t = truth_map.get(p["impression_id"])
            if t is None or "pcvr" not in p:
                continue
            by_type = p.get("pcvr_by_type")
            rows.append((by_type[conversion_type] if conversion_type and by_type
                         else p["pcvr"], *t))
    if not rows:
        return {"clicks": 0}
    a = np.asarray([r[:5] for r in rows], dtype=np.float64)
    pr, tr, y, ts, created = a.T
    bursty = np.asarray([r[5] for r in rows], dtype=bool)
    t0 = float(ts.min())
    late = ts >= t0 + skip_s
    new = (ts - created) < new_ad_s
    out: dict[str, Any] = {"skip_s": skip_s, "new_ad_s": new_ad_s}
    for name, mask in (("all", np.ones_like(late)), ("after_skip", late),
                       ("new_ads", late & new), ("old_ads", late & ~new),
                       ("bursty", late & bursty), ("streaming", late & ~bursty),
                       ("new_ads_bursty", late & new & bursty)):
        out[name] = _cvr_metrics(pr[mask], tr[mask], y[mask])
    period = np.floor((ts - t0) / period_s).astype(np.int64)
    out["per_period"] = [
        {"period": int(k), "clicks": int(m.sum()), "bias": _bias(pr[m], y[m]),
         "bias_new_ads": _bias(pr[m & new], y[m & new]),
         "bias_bursty": _bias(pr[m & bursty], y[m & bursty])}
        for k in np.unique(period).tolist() for m in [period == k]
    ]
    return out


# Ad-age cohorts for interval coverage (issue 5): (name, min age s, max age s).
AGE_COHORTS: tuple[tuple[str, float, float], ...] = (
    ("<1h", 0.0, 3600.0), ("1-6h", 3600.0, 21_600.0), ("6-24h", 21_600.0, 86_400.0),
    (">1d", 86_400.0, math.inf))


def interval_coverage(logit_mean: np.ndarray, logit_std: np.ndarray, true_rate: np.ndarray,
                      age_s: np.ndarray, levels: tuple[float, ...] = (0.5, 0.9),
                      cohorts: tuple[tuple[str, float, float], ...] = AGE_COHORTS
                      ) -> dict[str, Any]:
    """How often the central posterior intervals of sigmoid(f), f ~ N(mean, std^2), hold the
    true rate: overall and per ad-age cohort, with the mean interval width (probability scale)
    and the mean logit std. sigmoid is monotone, so the interval of sigmoid(f) is sigmoid of
    the logit interval and "inside" can be decided on logits."""
    z = np.log(true_rate) - np.log1p(-true_rate)
    err = np.abs(z - logit_mean)
    quantiles = {lv: NormalDist().inv_cdf(0.5 + lv / 2) for lv in levels}

    def report(mask: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"impressions": int(mask.sum())}
        if not mask.any():
            return out
        m, s = logit_mean[mask], logit_std[mask]
        out["mean_logit_std"] = float(s.mean())
        for lv, q in quantiles.items():
            key = f"{round(lv * 100)}"
            out[f"coverage_{key}"] = float(np.mean(err[mask] <= q * s))
            out[f"width_{key}"] = float(np.mean(_sigmoid(m + q * s) - _sigmoid(m - q * s)))
        return out

    result: dict[str, Any] = {"all": report(np.ones(z.shape, dtype=bool))}
    for name, lo, hi in cohorts:
        result[name] = report((age_s >= lo) & (age_s < hi))
    return result


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
