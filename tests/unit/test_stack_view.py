"""The terminal view of `ctrloop stack` (issue 15): at most 100 columns, plain lines without
escape codes where stdout is not a terminal, a rich live table where it is, only numbers a
user can act on (no progressive trainer AUC), and SVG plots at the end of a run."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ctrloop.dev import stack
from ctrloop.sim.live import DriverStats, LiveDriver, Served, ctr_lift, expected_logloss

ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SVG = "{http://www.w3.org/2000/svg}"
TRAINED = {"serving": {"version": "123456", "status": "trained", "published_at": 1_058.0,
                       "samples_seen": 12_345_678, "metrics": {"auc": 0.93, "logloss": 0.1},
                       "trainer": {"dead_lettered": 2}}}


def _stats(n: int = 600) -> DriverStats:
    """0.2 s apart: the prior for 40 s, then model versions 1, 2, ...; every third request
    explored at a cost of 1%."""
    st = DriverStats(started_at=1_000.0)
    for k in range(n):
        ts = 1_000.0 + 0.2 * k
        trained = k >= 200
        version = str(1 + (k - 200) // 50) if trained else "prior"
        pctr = 0.02 + 0.002 * (k % 20)
        st.record_request(ts, [Served(ts, pctr, 0.8 * pctr, pctr, k % 9 == 0,
                                      "trained" if trained else "prior", version)],
                          oracle_sum=0.07, random_sum=0.03, latency_s=0.01,
                          explore_cost=0.01 if k % 3 == 0 else None)
    return st


def _row(models: dict[str, Any] | None, st: DriverStats, rate: float = 40.0) -> list[str]:
    snap = st.snapshot(now=1_120.0)
    rates = {"requests_per_s": rate, "impressions_per_s": 2 * rate, "events_per_s": 3.5}
    bucket = stack._latest_full(st.timeline(), snap["elapsed_s"], st.bucket_s)
    row = stack.view_row(snap, rates, models, st.served_auc_last(30.0), bucket, now=1_120.0)
    return stack.plain_lines(row)


@pytest.mark.parametrize("models", [TRAINED, {"serving": {"status": "prior"}}, None])
def test_plain_lines_fit_100_columns_without_escape_codes(models: dict[str, Any] | None
                                                          ) -> None:
    for st in (_stats(), DriverStats(started_at=1_000.0)):  # and one with nothing yet
        lines = _row(models, st, rate=9999.9)
        assert len(lines) == 2
        for line in lines:
            assert len(line) <= stack.VIEW_WIDTH and "\x1b" not in line, line
            assert "nan" not in line and "None" not in line, line


def test_the_view_shows_what_a_user_can_act_on_not_the_trainers_auc() -> None:
    st = _stats()
    first, second = _row(TRAINED, st)
    assert "req/s  40.0" in first and "events/s   3.5" in first
    assert "model v123456 62 s old, 12.3M samples" in first
    assert "lost 2" in first  # the trainer's dead letters
    assert "AUC" not in first and "0.930" not in first + second  # the trainer's own AUC
    last_full = [b for b in st.timeline() if b["start_s"] + 10 <= 120][-1]
    assert f"CTR {100 * last_full['expected_ctr']:.2f}%" in second
    assert "oracle 7.00%, random 3.00%" in second
    fresh = st.served_auc_last(30.0)
    assert f"AUC {fresh['auc_true_ctr']:.3f}" in second
    assert f"logloss {fresh['logloss_true_ctr']:.4f}" in second
    assert f"explored {100 * last_full['explored_share']:.0f}%" in second
    assert 0.3 < last_full["explored_share"] < 0.36  # every third request


def test_fresh_logloss_is_floored_by_the_truth() -> None:
    import numpy as np

    p = np.array([0.01, 0.05, 0.2])
    assert expected_logloss(p, p) < expected_logloss(1.5 * p, p)
    assert expected_logloss(p, p) < expected_logloss(0.5 * p, p)
    fresh = _stats().served_auc_last(30.0)
    assert fresh["oracle_logloss_true_ctr"] < fresh["logloss_true_ctr"]  # pCTR is 1.25x


def test_buckets_count_exploration_and_its_cost() -> None:
    b = _stats().timeline()[0]  # 50 requests, k = 0..49: 17 explored
    assert b["explored_share"] == pytest.approx(17 / 50)
    assert b["explore_cost"] == pytest.approx(0.01)


def test_a_pipe_gets_plain_lines_a_terminal_a_table_of_at_most_100_columns() -> None:
    st = _stats()
    snap = st.snapshot(now=1_120.0)
    rates = {"requests_per_s": 40.0, "impressions_per_s": 80.0, "events_per_s": 3.5}
    bucket = stack._latest_full(st.timeline(), snap["elapsed_s"], st.bucket_s)
    row = stack.view_row(snap, rates, TRAINED, st.served_auc_last(30.0), bucket, now=1_120.0)
    pipe = io.StringIO()
    view = stack.LiveView(pipe)  # a StringIO is not a terminal
    assert not view.interactive
    view.say("hello")
    view.add(row)
    view.close()
    assert pipe.getvalue().splitlines() == ["hello", *stack.plain_lines(row)]

    tty = io.StringIO()
    live = stack.LiveView(tty, interactive=True)
    live.say("up")
    for _ in range(20):
        live.add(row)
    live.close()
    raw = tty.getvalue()
    assert "\x1b[" in raw  # redrawn in place
    text = ESC.sub("", raw)
    assert all(len(line) <= stack.VIEW_WIDTH for line in text.splitlines())
    header = next(line for line in text.splitlines() if line.split()[:2] == ["time", "req/s"])
    assert header.split()[-3:] == ["explored", "errors", "lost"]
    assert "v123456" in text and "7.00%" in text and "…" not in text  # nothing cut short


def test_summary_lines_fit_100_columns(tmp_path: Path) -> None:
    summary = _summary(_stats())
    text = stack.summary_text(summary, tmp_path / "stack-summary.json")
    lines = text.splitlines()
    assert all(len(line) <= stack.VIEW_WIDTH for line in lines[1:]), text
    assert "CTR rose" in text and "AUC" in text and "logloss" in text
    # A run too short for a trained model (`--duration 15`) once printed a 108-column line.
    text = stack.summary_text(_summary(_stats(200)), tmp_path / "stack-summary.json")
    assert all(len(line) <= stack.VIEW_WIDTH for line in text.splitlines()[1:]), text
    assert "run longer" in text


def _summary(st: DriverStats) -> dict[str, Any]:
    timeline = st.timeline()
    fresh = [{"t": 1_000.0 + t, "t_s": t, **st.served_auc()} for t in (45.0, 50.0, 55.0)]
    fresh.append({"t": 1_060.0, "t_s": 60.0, **st.served_auc(statuses=("pinned",))})  # NaN
    models = [{"t_s": 5.0 * i, "version": "prior" if i < 8 else str(i - 7),
               "status": "prior" if i < 8 else "trained"} for i in range(24)]
    return {"final": st.snapshot(now=1_120.0), "timeline": timeline, "ctr": ctr_lift(timeline),
            "served_auc": st.served_auc(), "served_auc_last": st.served_auc_last(30.0),
            "fresh_auc": fresh, "calibration": st.calibration(), "models": models}


def _drawn(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    out = {}
    for el in root.iter():
        if el.get("class") == "series":
            n = (len(el.get("points", "").split()) if el.tag == f"{SVG}polyline"
                 else sum(1 for c in el if c.tag == f"{SVG}circle"))
            out[el.get("data-name", "")] = n
    return out


def test_the_end_of_a_run_plots_ctr_auc_calibration_and_versions(tmp_path: Path) -> None:
    summary = json.loads(json.dumps(stack._finite(_summary(_stats()))))  # as saved
    paths = stack.write_stack_plots(summary, tmp_path / "plots")
    assert [p.name for p in paths] == ["ctr.svg", "fresh-auc.svg", "calibration.svg",
                                       "versions.svg"]
    n = len(summary["timeline"])
    assert _drawn(paths[0]) == {"served": n, "oracle (best ranking)": n, "random ranking": n}
    assert _drawn(paths[1])["served model"] == 3  # the 4th report had no AUC
    assert _drawn(paths[2]) == {"pCTR deciles": 10}
    assert _drawn(paths[3]) == {"version": 16}  # the prior's reports are left out


def test_the_stack_prints_the_plot_paths_at_the_end(tmp_path: Path) -> None:
    """`_run_locked`'s end, without the servers: the summary, then the plots' paths."""
    out = io.StringIO()
    cfg = stack.StackConfig(workdir=tmp_path, port=0)
    run = stack._Run(stack.Stack(cfg, out), LiveDriver("http://127.0.0.1:1"))
    run.driver.stats = _stats()  # type: ignore[union-attr]
    stack._finish(run, cfg, t0=0.0, interrupted=False)
    text = out.getvalue()
    for name in ("ctr.svg", "fresh-auc.svg", "calibration.svg", "versions.svg"):
        assert (tmp_path / "plots" / name).exists() and str(tmp_path / "plots" / name) in text
    assert json.loads((tmp_path / "stack-summary.json").read_text())["calibration"]["n"] == 400


def test_a_run_stopped_before_its_first_trained_model_still_ends_cleanly(
        tmp_path: Path) -> None:
    """`ctrloop stack --duration 15` stops before any trained model serves: the summary has no
    calibration bins and the plots say so (the end of such a run once exited 2 with numpy's
    "number sections must be larger than 0")."""
    out = io.StringIO()
    cfg = stack.StackConfig(workdir=tmp_path, port=0)
    run = stack._Run(stack.Stack(cfg, out), LiveDriver("http://127.0.0.1:1"))
    run.driver.stats = _stats(200)  # type: ignore[union-attr]  # 40 s of the prior only
    stack._finish(run, cfg, t0=0.0, interrupted=False)
    saved = json.loads((tmp_path / "stack-summary.json").read_text())
    assert saved["calibration"] == {"n": 0, "bins": []} and saved["timeline"]
    for name in ("ctr.svg", "fresh-auc.svg", "calibration.svg", "versions.svg"):
        ET.parse(tmp_path / "plots" / name)


# ---------------------------------------------------------------------------- replay's bar

@pytest.mark.parametrize(("data", "lines"), [(b"", 0), (b"a\n" * 3, 3), (b"a\nb", 2),
                                             (b"\n" * 5, 5)])
def test_count_lines_counts_a_last_line_without_newline(tmp_path: Path, data: bytes,
                                                        lines: int) -> None:
    from ctrloop.trainer.replay import count_lines

    (tmp_path / "f").write_bytes(data)
    assert count_lines(tmp_path / "f", chunk=2) == lines


def test_replays_progress_bar_counts_the_files_lines_and_fits_100_columns(
        tmp_path: Path) -> None:
    from ctrloop.trainer.replay import ProgressBar

    events = tmp_path / "events.jsonl"
    events.write_bytes(b"{}\n" * 4000)
    out = io.StringIO()
    with ProgressBar(events, out) as bar:
        assert bar.total == 4000 and bar.every == 20  # ~200 updates over the file
        bar({"events": 1000, "events_per_s": 12_345.6})
        assert bar.progress.tasks[0].completed == 1000
    text = ESC.sub("", out.getvalue())
    assert "4000/4000" in text and "12,346/s" in text  # full at the end
    assert all(len(line) <= 100 for line in text.splitlines())
