"""Off-policy evaluation: what a target policy would have earned, from another policy's log.

The log is the events file (docs/events.md): impressions carry `position` and `propensity` —
the probability that the *logging* policy put that ad at that position — and clicks refer to
impressions by id. The value estimated is **clicks per request** (and CTR = that / impressions
per request, since the number of slots is the request's, not the policy's).

Estimator. Under the item-position model (a click on the ad at position k depends on the ad, k
and the context, not on what else is shown — true of the simulator, whose CTR is
sigmoid(logit) × position bias), the value of a target policy pi is

    V(pi) = E_request[ sum_k sum_a pi(a at k | x) ctr(a, k, x) ]

and each logged impression i (ad a at position k) gets the weight w_i = pi(a at k) / mu(a at k),
mu being the logged propensity. Then, over R requests,

- IPS   = (1/R) sum_i w_i c_i, unbiased when mu > 0 wherever pi > 0 (the data cannot show a
  violation: a target that shows ads the logger never shows is not estimable);
- SNIPS = (sum_i w_i c_i / sum_i w_i) · (impressions / R), which trades a bias of order 1/R for
  a lower variance, since E[sum_k w_k] = number of slots for every request.

Confidence intervals are normal approximations **clustered by request** (the impressions of
one request share a context): for IPS the standard error of the per-request sums; for SNIPS
the delta method on the ratio of per-request means. `max_weight` clips weights (biased, lower
variance); how many were clipped is reported.

What must be logged to evaluate a *new* policy: only the shown ads are logged, so pi(a at k)
for the logged (a, k) cannot be computed from the log alone unless the target needs nothing
else — the logging policy itself, or uniform random over the candidates (which needs the
number of candidates: the optional impression field `n_candidates`). For any other target the
probabilities come from whoever holds the candidates and the model (a shadow policy in the
service, or a simulator) as a JSON Lines file of `{"impression_id", "target_propensity"}`;
an impression the file does not list has target probability 0. `rank_propensities` computes
exact per-rank probabilities for greedy, epsilon-greedy and uniform policies from candidate
scores, for simulations and for such a shadow logger.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from numpy.typing import NDArray

from ctrloop.core.errors import CtrloopError, InvalidEvent
from ctrloop.core.events import MAX_LINE_BYTES, parse_click, parse_impression

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Target = Literal["logging", "uniform"]


class OffPolicyInputError(CtrloopError):
    """A log or target file line OPE cannot use; the message names the file and line."""


@dataclass
class LoggedData:
    """Impressions as parallel arrays, grouped by request, with their joined clicks."""

    impression_ids: list[str]
    request: IntArray  # request index per impression, 0..n_requests-1
    position: IntArray
    propensity: FloatArray
    clicked: FloatArray  # 1.0 if a (counted) click refers to it
    n_candidates: FloatArray  # NaN where the impression did not log it
    n_requests: int
    unmatched_clicks: int = 0
    late_clicks: int = 0  # clicks outside the click window, not counted

    def __post_init__(self) -> None:
        n = len(self.impression_ids)
        for name in ("request", "position", "propensity", "clicked", "n_candidates"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one entry per impression")


@dataclass(frozen=True)
class Estimate:
    value: float  # clicks per request
    ci_low: float
    ci_high: float
    std_error: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "std_error": self.std_error}


@dataclass(frozen=True)
class OpeResult:
    target: str
    requests: int
    impressions: int
    impressions_per_request: float
    on_policy: Estimate  # the logged clicks per request (the logging policy's value)
    ips: Estimate
    snips: Estimate
    effective_sample_size: float  # (sum w)^2 / sum w^2 over impressions
    max_weight: float  # the largest weight before clipping
    clipped: int
    weight_sum_per_request: float  # ~ impressions per request when pi is supported by mu
    confidence: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        per = self.impressions_per_request
        ctr = {name: (e.value / per if per else math.nan) for name, e in
               (("on_policy", self.on_policy), ("ips", self.ips), ("snips", self.snips))}
        return {
            "target": self.target, "requests": self.requests, "impressions": self.impressions,
            "impressions_per_request": per, "confidence": self.confidence,
            "clicks_per_request": {"on_policy": self.on_policy.as_dict(),
                                   "ips": self.ips.as_dict(), "snips": self.snips.as_dict()},
            "ctr": ctr,
            "effective_sample_size": self.effective_sample_size,
            "max_weight": self.max_weight, "clipped": self.clipped,
            "weight_sum_per_request": self.weight_sum_per_request,
            "ci_method": "normal, clustered by request; SNIPS by the delta method",
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------- reading logs

def _loads(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_LINE_BYTES:
        raise OffPolicyInputError(f"{where}: line is {len(raw)} bytes, at most "
                                  f"{MAX_LINE_BYTES} allowed")
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise OffPolicyInputError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise OffPolicyInputError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


def read_log(path: Path, click_window: float | None = None) -> LoggedData:
    """Impressions and clicks of an events file; any line OPE cannot use is an error.

    Unlike replay (which sets bad lines aside), an estimate from a log with silently dropped
    impressions would be biased, so the first bad line stops it with its line number. Requests
    are keyed by `request_id` when the impression has it (the scoring service logs it), else by
    (user_id, ts), which is what the impressions of one simulated request share.
    """
    if not Path(path).exists():
        raise OffPolicyInputError(f"events file {path} does not exist")
    ids: list[str] = []
    req: list[int] = []
    pos: list[int] = []
    prop: list[float] = []
    ncand: list[float] = []
    imp_ts: list[float] = []
    index: dict[str, int] = {}
    req_index: dict[Any, int] = {}
    clicks: dict[str, float] = {}  # earliest click ts per impression id
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            d = _loads(line, where)
            kind = d.get("type")
            try:
                if kind == "impression":
                    imp = parse_impression(d)
                elif kind == "click":
                    c = parse_click(d)
                    prev = clicks.get(c.impression_id)
                    clicks[c.impression_id] = c.ts if prev is None else min(prev, c.ts)
                    continue
                elif kind == "conversion":
                    continue
                else:
                    raise InvalidEvent(f"'type' must be impression, click or conversion, "
                                       f"got {kind!r}")
            except InvalidEvent as e:
                raise OffPolicyInputError(f"{where}: {e.reason}") from None
            if imp.propensity is None:
                raise OffPolicyInputError(
                    f"{where}: impression {imp.impression_id!r} has no 'propensity'; OPE needs "
                    "the logging policy's probability of showing that ad at that position")
            if imp.position is None or imp.position < 1:
                raise OffPolicyInputError(
                    f"{where}: impression {imp.impression_id!r} needs a 'position' >= 1")
            if imp.impression_id in index:
                raise OffPolicyInputError(
                    f"{where}: duplicate impression_id {imp.impression_id!r}")
            k = d.get("n_candidates")
            if k is not None and (type(k) is not int or k < imp.position):
                raise OffPolicyInputError(
                    f"{where}: 'n_candidates' must be an integer >= position, got {k!r}")
            rid = d.get("request_id")
            key = ("r", rid) if isinstance(rid, str | int) else ("u", imp.user_id, imp.ts)
            index[imp.impression_id] = len(ids)
            ids.append(imp.impression_id)
            req.append(req_index.setdefault(key, len(req_index)))
            pos.append(imp.position)
            prop.append(imp.propensity)
            ncand.append(math.nan if k is None else float(k))
            imp_ts.append(imp.ts)
    clicked = np.zeros(len(ids), np.float64)
    unmatched = late = 0
    for iid, cts in clicks.items():
        i = index.get(iid)
        if i is None:
            unmatched += 1
        elif click_window is not None and not 0 <= cts - imp_ts[i] <= click_window:
            late += 1
        else:
            clicked[i] = 1.0
    if not ids:
        raise OffPolicyInputError(f"{path} has no impressions")
    return LoggedData(ids, np.asarray(req, np.int64), np.asarray(pos, np.int64),
                      np.asarray(prop, np.float64), clicked, np.asarray(ncand, np.float64),
                      len(req_index), unmatched, late)


def read_target_file(path: Path, data: LoggedData) -> FloatArray:
    """Target probabilities per logged impression from `{"impression_id",
    "target_propensity"}` lines; impressions not listed get 0 (the target never shows them
    there)."""
    if not Path(path).exists():
        raise OffPolicyInputError(f"target file {path} does not exist")
    index = {iid: i for i, iid in enumerate(data.impression_ids)}
    out = np.zeros(len(data.impression_ids), np.float64)
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            d = _loads(line, where)
            iid, p = d.get("impression_id"), d.get("target_propensity")
            if not isinstance(iid, str):
                raise OffPolicyInputError(f"{where}: missing string field 'impression_id'")
            if type(p) not in (int, float) or not 0.0 <= p <= 1.0:
                raise OffPolicyInputError(
                    f"{where}: 'target_propensity' must be a number in [0, 1], got {p!r}")
            i = index.get(iid)
            if i is not None:
                out[i] = float(p)
    return out


def target_probabilities(data: LoggedData, target: Target) -> FloatArray:
    """pi(logged ad at its position) for the targets computable from the log alone."""
    if target == "logging":
        return data.propensity.copy()
    if target == "uniform":
        if np.isnan(data.n_candidates).any():
            i = int(np.flatnonzero(np.isnan(data.n_candidates))[0])
            raise OffPolicyInputError(
                f"target 'uniform' needs 'n_candidates' on every impression; "
                f"{data.impression_ids[i]!r} has none (pass --target-file instead)")
        return 1.0 / data.n_candidates
    raise OffPolicyInputError(f"unknown target {target!r}: logging, uniform or a target file")


# ---------------------------------------------------------------------------- estimators

def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _mean_estimate(per_request: FloatArray, z: float) -> Estimate:
    r = per_request.shape[0]
    mean = float(per_request.mean())
    se = float(per_request.std(ddof=1) / math.sqrt(r)) if r > 1 else math.inf
    return Estimate(mean, mean - z * se, mean + z * se, se)


def estimate(data: LoggedData, target_prob: FloatArray, max_weight: float | None = None,
             confidence: float = 0.95, target: str = "custom") -> OpeResult:
    """IPS and SNIPS of clicks per request, with CIs clustered by request."""
    pi = np.asarray(target_prob, np.float64)
    if pi.shape != data.propensity.shape:
        raise ValueError("one target probability per logged impression")
    if max_weight is not None and not max_weight > 0:
        raise ValueError("max_weight must be > 0")
    z = _z(confidence)
    raw = pi / data.propensity
    w = raw if max_weight is None else np.minimum(raw, max_weight)
    clipped = 0 if max_weight is None else int((raw > max_weight).sum())
    r = data.n_requests
    y = np.bincount(data.request, weights=w * data.clicked, minlength=r)
    wsum = np.bincount(data.request, weights=w, minlength=r)
    nimp = np.bincount(data.request, minlength=r).astype(np.float64)
    c = np.bincount(data.request, weights=data.clicked, minlength=r)
    ips = _mean_estimate(y, z)
    on_policy = _mean_estimate(c, z)
    ybar, wbar, nbar = float(y.mean()), float(wsum.mean()), float(nimp.mean())
    notes: list[str] = []
    if wbar > 0:
        ratio = ybar / wbar
        value = ratio * nbar
        # Influence of each request on n̄·Ȳ/W̄ (delta method).
        psi = (nbar / wbar) * (y - ratio * wsum) + ratio * (nimp - nbar)
        se = float(psi.std(ddof=1) / math.sqrt(r)) if r > 1 else math.inf
        snips = Estimate(value, value - z * se, value + z * se, se)
    else:
        snips = Estimate(math.nan, math.nan, math.nan, math.nan)
        notes.append("every weight is 0: the target never shows what the logger showed")
    sw2 = float(np.sum(w * w))
    ess = float(w.sum() ** 2 / sw2) if sw2 > 0 else 0.0
    ws_per = wbar
    if nbar > 0 and abs(ws_per / nbar - 1) > 3 * _ratio_se(wsum, nimp):
        notes.append(f"mean weight per impression is {ws_per / nbar:.3f}, not ~1: the target's "
                     "probabilities may not be supported by the logging policy (or weights "
                     "are clipped); IPS is then biased")
    return OpeResult(target, r, int(data.propensity.shape[0]), nbar, on_policy, ips, snips,
                     ess, float(raw.max()) if raw.size else math.nan, clipped, ws_per,
                     confidence, notes)


def _ratio_se(num: FloatArray, den: FloatArray) -> float:
    """Standard error of sum(num)/sum(den), clustered by request (the weight check's scale)."""
    r = num.shape[0]
    if r < 2 or den.sum() <= 0:
        return math.inf
    q = num.sum() / den.sum()
    return float((num - q * den).std(ddof=1) / (den.mean() * math.sqrt(r))) + 1e-12


def evaluate_file(events: Path, target: Target | None = "logging", target_file: Path | None = None,
                  max_weight: float | None = None, click_window: float | None = None,
                  confidence: float = 0.95) -> OpeResult:
    data = read_log(events, click_window)
    if target_file is not None:
        pi = read_target_file(target_file, data)
        name = str(target_file)
    else:
        name = target or "logging"
        pi = target_probabilities(data, name)  # type: ignore[arg-type]
    result = estimate(data, pi, max_weight, confidence, name)
    if data.unmatched_clicks:
        result.notes.append(f"{data.unmatched_clicks} clicks refer to impressions not in the "
                            "file (ignored)")
    if data.late_clicks:
        result.notes.append(f"{data.late_clicks} clicks outside the click window (ignored)")
    return result


# ---------------------------------------------------------------------------- policies

def rank_propensities(scores: FloatArray, n_slots: int, policy: str = "greedy",
                      epsilon: float = 0.0) -> FloatArray:
    """P(candidate j is shown at position k), shape (n_candidates, n_slots), exactly.

    - `greedy`: the top `n_slots` by score, in order (ties broken by index, like a stable sort);
    - `uniform`: a uniformly random ordering: every candidate at every position with 1/n;
    - `epsilon`: with probability `epsilon` the request gets the uniform ordering, else the
      greedy one (exploration decided per request, as benchmarks/exploration.py does).
    Each column sums to 1 (one ad per position) when n_slots <= n_candidates.
    """
    s = np.asarray(scores, np.float64)
    n = s.shape[0]
    k = min(n_slots, n)
    greedy = np.zeros((n, n_slots), np.float64)
    order = np.argsort(-s, kind="stable")[:k]
    greedy[order, np.arange(k)] = 1.0
    uniform = np.zeros((n, n_slots), np.float64)
    uniform[:, :k] = 1.0 / n
    if policy == "greedy":
        return greedy
    if policy == "uniform":
        return uniform
    if policy == "epsilon":
        if not 0 <= epsilon <= 1:
            raise ValueError("epsilon must be in [0, 1]")
        return (1 - epsilon) * greedy + epsilon * uniform
    raise ValueError(f"unknown policy {policy!r}: greedy, uniform or epsilon")


def write_target_file(path: Path, rows: Iterable[tuple[str, float]]) -> None:
    with open(path, "wb") as f:
        for iid, p in rows:
            f.write(orjson.dumps({"impression_id": iid, "target_propensity": p}) + b"\n")


def render(result: OpeResult) -> str:
    """A short human-readable summary (the JSON has everything)."""
    pct = f"{result.confidence:.0%}"
    lines = [f"target {result.target}: {result.requests:,} requests, "
             f"{result.impressions:,} impressions ({result.impressions_per_request:.2f}/request)"]
    for name, e in (("logged (on-policy)", result.on_policy), ("IPS", result.ips),
                    ("SNIPS", result.snips)):
        lines.append(f"  {name:<19} {e.value:.5f} clicks/request  {pct} CI "
                     f"[{e.ci_low:.5f}, {e.ci_high:.5f}]")
    lines.append(f"  effective sample size {result.effective_sample_size:,.0f} of "
                 f"{result.impressions:,} impressions; max weight {result.max_weight:.3g}; "
                 f"{result.clipped} clipped")
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)
