"""SVG plots (ctrloop/core/plots.py) and `ctrloop replay --plot-out`: every plot parses as XML
and draws exactly the finite points of its data, one vertex or dot each."""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from ctrloop.cli import main
from ctrloop.core import plots
from ctrloop.core.evaluate import calibration_bins, evaluate, load_scored, over_time

SVG = "{http://www.w3.org/2000/svg}"


def drawn(svg: str) -> dict[str, list[tuple[float, float]]]:
    """name -> the points a plot draws for that series (polyline vertices or circles)."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    out: dict[str, list[tuple[float, float]]] = {}
    for el in root.iter():
        if el.get("class") != "series":
            continue
        if el.tag == f"{SVG}polyline":
            pts = [tuple(map(float, p.split(","))) for p in el.get("points", "").split()]
        else:
            pts = [(float(c.get("cx", "")), float(c.get("cy", ""))) for c in el
                   if c.tag == f"{SVG}circle"]
        out[el.get("data-name", "")] = pts  # type: ignore[assignment]
    return out


def test_a_line_chart_draws_one_vertex_per_finite_point() -> None:
    xs = [0.0, 10.0, 20.0, 30.0, 40.0]
    svg = plots.line_chart("CTR & co <1>", [
        plots.Series("served", xs, [0.03, 0.035, math.nan, 0.04, 0.045]),
        plots.Series("oracle", xs, [0.07] * 5, dashed=True),
        plots.Series("none yet", xs, [None] * 5)], "s", "CTR", y_fmt=plots.pct(1), y_min=0.0)
    series = drawn(svg)  # the title's & and < are escaped, or this would not parse
    assert [len(series[n]) for n in ("served", "oracle", "none yet")] == [4, 5, 0]
    # Up is higher: the oracle's line lies above every served point, and x grows rightwards.
    served, oracle = series["served"], series["oracle"]
    assert all(y > oracle[0][1] for _, y in served)
    assert [x for x, _ in served] == sorted(x for x, _ in served)
    assert "0.0%" in svg  # y_min=0 puts the zero on the axis


def test_an_empty_chart_says_so_and_still_parses() -> None:
    svg = plots.line_chart("nothing", [plots.Series("a", [], [])], "x", "y")
    assert drawn(svg) == {"a": []} and "no data" in svg
    cal = plots.calibration_chart("nothing", [plots.Series("bins", [], [])])
    assert drawn(cal) == {"bins": []} and "no data" in cal


def test_a_calibration_chart_puts_calibrated_bins_on_its_diagonal() -> None:
    svg = plots.calibration_chart("cal", [plots.Series("bins", [0.01, 0.02, 0.05],
                                                       [0.01, 0.03, 0.05])])
    dots = drawn(svg)["bins"]
    assert len(dots) == 3
    diag = next(e for e in ET.fromstring(svg).iter() if e.get("class") == "diagonal")
    (x1, y1), (x2, y2) = ((float(diag.get(f"x{i}", "")), float(diag.get(f"y{i}", "")))
                          for i in (1, 2))

    def off_diagonal(p: tuple[float, float]) -> float:  # distance from the y = x line
        return abs((x2 - x1) * (y1 - p[1]) - (x1 - p[0]) * (y2 - y1)) / math.hypot(x2 - x1,
                                                                                  y2 - y1)

    assert off_diagonal(dots[0]) < 0.5 and off_diagonal(dots[2]) < 0.5
    assert off_diagonal(dots[1]) > 5  # over-realised: above the line


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 0.073), (3.2, 3.2), (-5.0, 120.0), (0.5, 0.51)])
def test_ticks_are_round_and_cover_the_range(lo: float, hi: float) -> None:
    ticks = plots.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1


def test_calibration_bins_and_spans_over_time() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.1, 5000)
    bins = calibration_bins(p, 2 * p, 10)
    assert len(bins) == 10 and sum(b["n"] for b in bins) == 5000
    assert all(b["actual"] == pytest.approx(2 * b["pred"]) for b in bins)
    assert [b["pred"] for b in bins] == sorted(b["pred"] for b in bins)
    ts = np.arange(5000.0)
    y = (rng.uniform(size=5000) < p).astype(np.float64)
    spans = over_time(ts, p, p, y, n_buckets=5)
    assert [s["impressions"] for s in spans] == [1000] * 5
    assert spans[0]["start_ts"] == 0.0 and spans[1]["start_ts"] == pytest.approx(999.8)
    assert all(s["auc"] == s["oracle_auc"] for s in spans)  # the prediction is the truth
    assert over_time(ts[:0], p[:0], p[:0], y[:0]) == []
    assert calibration_bins(p[:0], p[:0]) == []  # nothing scored yet


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("plots")
    events, truth = d / "events.jsonl", d / "truth.jsonl"
    assert main(["simulate", "--impressions", "3000", "--rate", "20", "--seed", "3",
                 "--events-out", str(events), "--truth-out", str(truth)]) == 0
    return events, truth


def test_replay_plot_out_writes_the_served_predictions_plots(
        simulated: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events, truth = simulated
    pred, out = tmp_path / "pred.jsonl", tmp_path / "plots"
    assert main(["replay", "--events", str(events), "--predictions-out", str(pred),
                 "--click-window", "5", "--allowed-lateness", "1", "--dim", "4",
                 "--batch-size", "64", "--truth", str(truth), "--plot-out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"calibration.svg", "auc-over-time.svg", "calibration-over-time.svg"}
    err = capsys.readouterr().err
    assert all(str(out / n) in err for n in names)
    d = load_scored(pred, truth, 5.0)
    assert d["ts"].size == evaluate(pred, truth, 5.0)["impressions"] == 3000
    cal = drawn((out / "calibration.svg").read_text())
    assert [len(v) for v in cal.values()] == [10, 10]
    spans = over_time(d["ts"], d["pctr"], d["ctr"], d["label"])
    auc_plot = drawn((out / "auc-over-time.svg").read_text())
    assert len(auc_plot["served pCTR"]) == sum(math.isfinite(s["auc"]) for s in spans) > 10
    mean_plot = drawn((out / "calibration-over-time.svg").read_text())
    assert len(mean_plot["mean pCTR"]) == len(spans)


def test_replay_plot_out_needs_the_truth(simulated: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    events, _ = simulated
    assert main(["replay", "--events", str(events), "--predictions-out",
                 str(tmp_path / "p.jsonl"), "--plot-out", str(tmp_path / "plots")]) == 2
    assert "pass --truth" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "plots").exists()
