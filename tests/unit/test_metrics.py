"""Progressive-validation metrics: logloss, AUC, calibration and the sliding window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrloop.core.metrics import ProgressiveMetrics, auc, calibration, logloss


def brute_auc(labels: list[int], preds: list[float]) -> float:
    pos = [p for y, p in zip(labels, preds, strict=True) if y == 1]
    neg = [p for y, p in zip(labels, preds, strict=True) if y == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


scored = st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    # few distinct values, so ties are common
    st.lists(st.one_of(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
                       st.floats(0, 1, allow_nan=False)), min_size=n, max_size=n),
))


@settings(max_examples=200)
@given(scored)
def test_auc_matches_pairwise_definition(data: tuple[list[int], list[float]]) -> None:
    labels, preds = data
    expected = brute_auc(labels, preds)
    got = auc(np.array(labels), np.array(preds))
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


@dataclass(frozen=True)
class AucCase:
    name: str
    labels: list[int]
    preds: list[float]
    expected: float


AUC_CASES = [
    AucCase("docstring", [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
    AucCase("perfect", [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], 1.0),
    AucCase("inverted", [1, 0], [0.1, 0.9], 0.0),
    AucCase("all tied", [0, 1, 1, 0], [0.5] * 4, 0.5),
    AucCase("some ties", [0, 1, 1], [0.3, 0.3, 0.7], 0.75),
]


@pytest.mark.parametrize("case", AUC_CASES, ids=lambda c: c.name)
def test_auc_values(case: AucCase) -> None:
    assert auc(np.array(case.labels), np.array(case.preds)) == pytest.approx(case.expected)


@pytest.mark.parametrize("labels", [[], [0, 0], [1, 1, 1]])
def test_auc_is_nan_with_one_class(labels: list[int]) -> None:
    assert math.isnan(auc(np.array(labels), np.array([0.5] * len(labels))))


def test_logloss_values() -> None:
    assert logloss(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx(
        -(math.log(0.8) + math.log(0.7)) / 2)
    assert logloss(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    # Predictions at 0/1 are clipped to 1e-7, so a confident mistake is large but finite.
    worst = logloss(np.array([1, 0]), np.array([0.0, 1.0]))
    assert worst == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert logloss(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(0, abs=1e-6)
    assert math.isnan(logloss(np.array([]), np.array([])))


def test_constant_predictor_at_the_base_rate() -> None:
    labels = np.array([1] * 3 + [0] * 97)
    p = 0.03
    expected = -(0.03 * math.log(p) + 0.97 * math.log(1 - p))
    assert logloss(labels, np.full(100, p)) == pytest.approx(expected)
    assert calibration(labels, np.full(100, p)) == pytest.approx(1.0)


def test_calibration() -> None:
    assert calibration(np.array([1, 0, 0, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 2.0
    assert calibration(np.array([1, 1]), np.array([0.25, 0.25])) == 0.25
    assert math.isnan(calibration(np.array([0, 0]), np.array([0.1, 0.2])))


# --- ProgressiveMetrics ---------------------------------------------------------------------


def chunks(rng: np.random.Generator, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for n in sizes:
        p = rng.random(n).astype(np.float32)
        y = (rng.random(n) < p).astype(np.float32)
        out.append((y, p))
    return out


def test_empty_report_is_nan() -> None:
    r = ProgressiveMetrics(10).report()
    assert r.samples == 0 and r.window == 0
    assert all(math.isnan(v) for v in (r.logloss, r.auc, r.calibration, r.ctr))


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window must be positive"):
        ProgressiveMetrics(0)


@pytest.mark.parametrize("sizes", [[3], [5, 5, 5], [1] * 30, [25, 2], [2, 25], [7, 0, 9, 13]],
                         ids=str)
def test_report_covers_exactly_the_last_window(sizes: list[int]) -> None:
    window = 10
    data = chunks(np.random.default_rng(sum(sizes)), sizes)
    m = ProgressiveMetrics(window)
    for y, p in data:
        m.add(y, p)
    y_all = np.concatenate([y for y, _ in data])[-window:]
    p_all = np.concatenate([p for _, p in data])[-window:]
    r = m.report()
    assert r.samples == sum(sizes)
    assert r.window == min(window, sum(sizes))
    assert r.logloss == pytest.approx(logloss(y_all, p_all))
    assert r.ctr == pytest.approx(float(y_all.mean()))
    assert r.calibration == pytest.approx(calibration(y_all, p_all), nan_ok=True)
    assert r.auc == pytest.approx(auc(y_all, p_all), nan_ok=True)
    assert r.as_dict()["window"] == r.window


def test_old_chunks_are_dropped() -> None:
    m = ProgressiveMetrics(10)
    for _ in range(100):
        m.add(np.ones(4), np.full(4, 0.5))
    assert 10 <= len(m.state()["labels"]) < 14  # bounded memory


def test_window_forgets_old_samples() -> None:
    m = ProgressiveMetrics(4)
    m.add(np.zeros(4), np.full(4, 0.9))  # bad predictions, then good ones
    m.add(np.zeros(4), np.full(4, 0.01))
    assert m.report().logloss == pytest.approx(-math.log(0.99), rel=1e-5)


@pytest.mark.parametrize("window", [1, 10, 1000])
def test_state_roundtrip_reports_and_continues_the_same(window: int) -> None:
    data = chunks(np.random.default_rng(7), [6, 9, 4, 12])
    a = ProgressiveMetrics(window)
    for y, p in data[:3]:
        a.add(y, p)
    b = ProgressiveMetrics.from_state(a.state(), window)
    assert _same(b.report().as_dict(), a.report().as_dict())
    y, p = data[3]
    a.add(y, p)
    b.add(y, p)
    assert _same(a.report().as_dict(), b.report().as_dict())
    assert b.samples == 31


def test_state_of_an_empty_tracker() -> None:
    m = ProgressiveMetrics.from_state(ProgressiveMetrics(5).state(), 5)
    assert m.samples == 0 and m.report().window == 0


def _same(a: dict[str, float | int], b: dict[str, float | int]) -> bool:
    return all((isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
               or a[k] == pytest.approx(b[k]) for k in a)
