"""Replay benchmark: ctrloop (FwFM, LR) against Vowpal Wabbit on one simulated stream, in one run.

Everything is measured side by side in the same process on the same file, and compared by
ratios, because the machines this runs on (2 shared cores) are too noisy for absolute numbers
taken on different days to mean much.

Steps:
1. ``ctrloop simulate``: N impressions (+ their clicks) and the truth file (true CTR per
   impression). Reused from the workdir when present for the same N and seed.
2. ``ctrloop replay`` with the default settings (FwFM) and with ``--model lr``: throughput (JSON
   events in, served predictions out), progressive metrics, and the served predictions scored
   against the click-window labels and against the simulator's true CTR (the oracle).
3. Vowpal Wabbit on the same file and labels (benchmarks/vw_baseline.py): linear ``-l 0.25`` and
   ``-q :: -l 0.1 -b 22`` (the best settings found on this data).
4. A click-window sweep of the FwFM (served calibration / logloss / AUC per window).
5. One markdown table with all rows and the ratios, the sweep table, and a JSON file.

What the numbers mean:
- *events/s* (ctrloop): the replay summary's ``events_per_s`` — every line (impressions and
  clicks) read, parsed, validated, encoded, joined, learned and every impression's served
  prediction written — over the replay's wall time (spec inference excluded). *imps/s* is the
  same wall time per impression.
- *events/s* (VW): the same events over VW's end-to-end time (JSON -> VW text conversion with the
  labels joined up front, plus VW's run). *VW-only ex/s* counts VW's own parse+learn only.
- *progressive* (ctrloop): each learned sample scored just before the step that learns it, in
  learning order: positives at click time, negatives when their window closes (+ allowed
  lateness), warm-up positives skipped. This run keeps the whole stream (``metrics_window`` set
  above N, which changes reporting only) so "all" and "after 20%" cover the same spans as VW's.
- *progressive* (VW): every impression scored before VW learns it, with its label known at once.
  VW never waits for the click window: that is an advantage ctrloop cannot have online.
- *served* (ctrloop): every impression scored by the last snapshot published before it — what a
  scoring service would have returned. For VW the progressive prediction is the served one (no
  join delay), so VW's served columns equal its progressive ones. Served vs served is the fair
  quality comparison; the oracle columns are the simulator's true CTR on the same impressions.

Usage::

    python -m benchmarks.replay_vs_vw --impressions 1000000 [--seed 0]
        [--workdir /tmp/ctrloop-bench] [--json-out F] [--windows 120,300,900] [--skip-vw]
        [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import os
import platform
import pstats
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctrloop.core.evaluate import evaluate
from ctrloop.core.metrics import auc, calibration, logloss
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.replay import outputs_for, replay
from ctrloop.trainer.settings import LearningSettings

# The two VW settings compared (vw_baseline.DEFAULT_SETTINGS sweeps more): the best linear and the
# best overall found on this data.
VW_SETTINGS: tuple[tuple[str, str], ...] = (
    ("VW linear -l 0.25", "-l 0.25"),
    ("VW -q :: -l 0.1 -b 22", "-q :: -l 0.1 -b 22"),
)
VW_Q = "VW -q :: -l 0.1 -b 22"
SKIP_FRACTION = 0.2  # as evaluate() and vw_baseline: the first 20% is the cold start
LAST_WINDOW = 100_000  # what `ctrloop replay` prints: the last 100k learned samples
GOAL_EVENTS_PER_S = 100_000
GOAL_AUC_GAP = 0.01
PROFILE_TOP = 25


# --- helpers ---------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _split_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    start = int(SKIP_FRACTION * y.size)
    tail = slice(max(0, y.size - LAST_WINDOW), None)
    return {
        "samples": int(y.size),
        "logloss": logloss(y, p),
        "auc": auc(y, p),
        "calibration": calibration(y, p),
        "logloss_after20": logloss(y[start:], p[start:]),
        "auc_after20": auc(y[start:], p[start:]),
        "calibration_after20": calibration(y[start:], p[start:]),
        "logloss_last100k": logloss(y[tail], p[tail]),
        "auc_last100k": auc(y[tail], p[tail]),
        "calibration_last100k": calibration(y[tail], p[tail]),
    }


def _settings(model: str, click_window: float, seed: int, n_impressions: int) -> LearningSettings:
    # metrics_window above N: the learner keeps every progressive pair (8 bytes each), so the
    # "all" / "after 20%" numbers span the whole stream like VW's. Reporting only.
    return LearningSettings(model=model, click_window=click_window, seed=seed,
                            metrics_window=max(LAST_WINDOW, 2 * n_impressions + 10))


# --- 1. simulate -----------------------------------------------------------------------------

def simulate(n: int, seed: int, workdir: Path) -> tuple[Path, Path, dict[str, Any]]:
    stem = workdir / f"sim-n{n}-seed{seed}"
    events, truth = stem.with_suffix(".events.jsonl"), stem.with_suffix(".truth.jsonl")
    meta = stem.with_suffix(".summary.json")  # written last: its presence means complete files
    if meta.exists() and events.exists() and truth.exists():
        summary = orjson.loads(meta.read_bytes())
        _log(f"reusing {events} ({summary['impressions']:,} impressions)")
        return events, truth, summary
    _log(f"simulating {n:,} impressions (seed {seed}) -> {events}")
    t0 = time.perf_counter()
    summary = write_files(WorldConfig(seed=seed), n, events, truth)
    summary["simulate_s"] = time.perf_counter() - t0
    meta.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return events, truth, summary


# --- 2. ctrloop replay -----------------------------------------------------------------------

WARMUP_LINES = 20_000


def warm_up(events: Path, workdir: Path, seed: int) -> None:
    """Untimed replays of the file's first lines with each model, so the first timed run does
    not pay for torch's lazy initialisation and cold code paths (measured: ~3x slower on a 30k
    run otherwise)."""
    head = workdir / "warmup.events.jsonl"
    with open(events, "rb") as src, open(head, "wb") as dst:
        for i, line in enumerate(src):
            if i >= WARMUP_LINES:
                break
            dst.write(line)
    for model in ("fwfm", "lr"):
        settings = LearningSettings(model=model, seed=seed)
        replay(head, outputs_for(workdir / f"warmup-{model}.pred.jsonl"), None,
               settings.pipeline_config(), seed)
    gc.collect()


def run_replay(name: str, model: str, click_window: float, events: Path, truth: Path,
               workdir: Path, seed: int, n: int) -> dict[str, Any]:
    settings = _settings(model, click_window, seed, n)
    pred = workdir / f"{model}-w{click_window:g}.pred.jsonl"
    _log(f"replay {name} (click window {click_window:g} s) -> {pred}")
    load_before = _load()
    # The learner's progressive (label, prediction) pairs, read when the stream has ended.
    finished: list[dict[str, Any]] = []
    summary = replay(events, outputs_for(pred), None, settings.pipeline_config(), seed,
                     on_finish=lambda pipe: finished.append(pipe.learner.metrics.state()))
    state = finished.pop()
    prog = _split_metrics(np.asarray(state["labels"], dtype=np.float64),
                          np.asarray(state["preds"], dtype=np.float64))
    del state
    gc.collect()
    load_after = _load()
    _log(f"  {summary['events_per_s']:,.0f} events/s in {summary['seconds']:.1f} s; scoring "
         "served predictions")
    ev = evaluate(pred, truth, click_window, SKIP_FRACTION)
    st = summary["pipeline"]
    return {
        "run": name,
        "kind": "ctrloop",
        "model": model,
        "click_window": click_window,
        "events": st["events"],
        "impressions": st["impressions"],
        "seconds": summary["seconds"],
        "events_per_s": summary["events_per_s"],
        "impressions_per_s": st["impressions"] / summary["seconds"],
        "vw_only_examples_per_s": None,
        "rejected": summary["rejected"],
        "learned": st["learned"],
        "learned_positives": st["learned_positives"],
        "warmup_skipped": st["warmup_skipped"],
        "publications": st["publications"],
        "join": summary["join"],
        "summary_metrics": summary["metrics"],  # == progressive "all" (window above N)
        "progressive": prog,
        "served": ev,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


# --- 3. Vowpal Wabbit ------------------------------------------------------------------------

def _truth_arrays(truth: Path, click_window: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels within the window, true CTR) per impression, in truth-file (= impression) order."""
    ys, ctrs = [], []
    with open(truth, "rb") as f:
        for line in f:
            t = orjson.loads(line)
            c = t.get("click_ts")
            ys.append(c is not None and c - t["ts"] <= click_window)
            ctrs.append(t["ctr"])
    return np.asarray(ys, dtype=np.float64), np.asarray(ctrs, dtype=np.float64)


def _served_block(y: np.ndarray, p: np.ndarray, ctr: np.ndarray) -> dict[str, Any]:
    """evaluate()'s output shape, for predictions already aligned with the truth."""
    start = int(len(y) * SKIP_FRACTION)
    out: dict[str, Any] = {"impressions": len(y), "skipped": start}
    for key, sl in (("all", slice(None)), ("after_skip", slice(start, None))):
        d = {"auc": auc(y[sl], p[sl]), "logloss": logloss(y[sl], p[sl]),
             "calibration": calibration(y[sl], p[sl]),
             "oracle_auc": auc(y[sl], ctr[sl]), "oracle_logloss": logloss(y[sl], ctr[sl])}
        d["auc_gap"] = d["oracle_auc"] - d["auc"]
        out[key] = d
    return out


def run_vw_rows(events: Path, truth: Path, click_window: float, workdir: Path,
                total_events: int, repeats: int) -> list[dict[str, Any]]:
    from benchmarks.vw_baseline import run_vw  # imports vowpalwabbit: only when VW runs

    vw_dir = workdir / "vw"
    _log(f"VW: converting {events.name} and running {len(VW_SETTINGS)} settings "
         f"(click window {click_window:g} s, labels known instantly)")
    load_before = _load()
    results = run_vw(events, click_window, [a for _, a in VW_SETTINGS], vw_dir, repeats=repeats)
    load_after = _load()
    (vw_dir / "events.vw").unlink(missing_ok=True)  # ~0.4 KB per impression; preds are kept
    y, ctr = _truth_arrays(truth, click_window)
    rows = []
    for i, ((name, _), r) in enumerate(zip(VW_SETTINGS, results, strict=True)):
        preds = np.asarray((vw_dir / f"preds_{i}.txt").read_bytes().split(), dtype=np.float64)
        served = None
        # VW's file is in impression ts order, as is the truth file; check the alignment by
        # recomputing VW's own logloss before using the truth's true CTR.
        if preds.size == y.size and abs(logloss(y, preds) - r["logloss"]) < 1e-9:
            served = _served_block(y, preds, ctr)
        else:
            _log(f"  warning: {name}: predictions do not line up with the truth file; "
                 "no oracle columns")
        total_s = r["convert_s"] + r["vw_s"]
        rows.append({
            "run": name,
            "kind": "vw",
            "model": r["vw_args"],
            "click_window": click_window,
            "events": total_events,
            "impressions": r["examples"],
            "seconds": total_s,
            "convert_s": r["convert_s"],
            "vw_s": r["vw_s"],
            "events_per_s": total_events / total_s,
            "impressions_per_s": r["e2e_examples_per_s"],
            "vw_only_examples_per_s": r["vw_examples_per_s"],
            "repeats": r["repeats"],
            "progressive": {
                "samples": r["examples"],
                "logloss": r["logloss"], "auc": r["auc"], "calibration": r["calibration"],
                "logloss_after20": r["logloss_after20"], "auc_after20": r["auc_after20"],
                "calibration_after20": (calibration(y[int(SKIP_FRACTION * y.size):],
                                                    preds[int(SKIP_FRACTION * y.size):])
                                        if served else float("nan")),
            },
            "served": served,
            "vw_result": r,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        })
    return rows


# --- 5. tables -------------------------------------------------------------------------------

def _f(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    return format(x, fmt)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


MAIN_HEADERS = ("run", "events/s", "imps/s", "VW-only ex/s", "prog LL", "prog LL >20%",
                "prog AUC >20%", "prog calib", "served LL >20%", "served AUC >20%",
                "oracle AUC >20%", "AUC gap >20%", "served calib >20%", "served calib all")


def main_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        pr, sv = r["progressive"], r["served"]
        a = sv["after_skip"] if sv else {}
        out.append([
            r["run"], _f(r["events_per_s"], ",.0f"), _f(r["impressions_per_s"], ",.0f"),
            _f(r["vw_only_examples_per_s"], ",.0f"),
            _f(pr["logloss"], ".4f"), _f(pr["logloss_after20"], ".4f"),
            _f(pr["auc_after20"], ".4f"), _f(pr["calibration"], ".3f"),
            _f(a.get("logloss"), ".4f"), _f(a.get("auc"), ".4f"), _f(a.get("oracle_auc"), ".4f"),
            _f(a.get("auc_gap"), ".4f"), _f(a.get("calibration"), ".3f"),
            _f(sv["all"]["calibration"] if sv else None, ".3f"),
        ])
    return out


SWEEP_HEADERS = ("click window s", "events/s", "positives learned", "warm-up skipped",
                 "prog calib", "served calib all", "served calib >20%", "served LL >20%",
                 "oracle LL >20%", "served AUC >20%", "oracle AUC >20%", "AUC gap >20%")


def sweep_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        a = r["served"]["after_skip"]
        out.append([
            _f(r["click_window"], "g"), _f(r["events_per_s"], ",.0f"),
            _f(r["learned_positives"], ",d"), _f(r["warmup_skipped"], ",d"),
            _f(r["progressive"]["calibration"], ".3f"),
            _f(r["served"]["all"]["calibration"], ".3f"), _f(a["calibration"], ".3f"),
            _f(a["logloss"], ".4f"), _f(a["oracle_logloss"], ".4f"),
            _f(a["auc"], ".4f"), _f(a["oracle_auc"], ".4f"), _f(a["auc_gap"], ".4f"),
        ])
    return out


def ratios_and_goals(main: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    by = {r["run"]: r for r in main}
    fw, lr = by.get("ctrloop FwFM"), by.get("ctrloop LR")
    vws = [r for r in main if r["kind"] == "vw"]
    ratios: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    if fw is None:
        return ratios, goals
    a_fw = fw["served"]["after_skip"]
    goals["served_auc_within_0.01_of_oracle_after20"] = {
        "auc_gap": a_fw["auc_gap"], "met": bool(a_fw["auc_gap"] <= GOAL_AUC_GAP)}
    goals["aim_100k_events_per_s"] = {"events_per_s": fw["events_per_s"],
                                      "met": bool(fw["events_per_s"] >= GOAL_EVENTS_PER_S)}
    if lr is not None:
        ratios["fwfm_events_per_s / lr_events_per_s"] = fw["events_per_s"] / lr["events_per_s"]
        ratios["fwfm_served_LL>20% - lr_served_LL>20%"] = (
            a_fw["logloss"] - lr["served"]["after_skip"]["logloss"])
    if not vws:
        return ratios, goals
    best = min(vws, key=lambda r: r["progressive"]["logloss"])
    q = by.get(VW_Q)
    if q is not None:
        ratios["fwfm_events_per_s / vw_q_e2e_events_per_s"] = (
            fw["events_per_s"] / q["events_per_s"])
        ratios["fwfm_imps_per_s / vw_q_e2e_examples_per_s"] = (
            fw["impressions_per_s"] / q["impressions_per_s"])
        ratios["fwfm_imps_per_s / vw_q_vw_only_examples_per_s"] = (
            fw["impressions_per_s"] / q["vw_only_examples_per_s"])
        if lr is not None:
            ratios["lr_events_per_s / vw_q_e2e_events_per_s"] = (
                lr["events_per_s"] / q["events_per_s"])
        goals["throughput_at_least_vw_q"] = {
            "ratio_events_per_s": ratios["fwfm_events_per_s / vw_q_e2e_events_per_s"],
            "met": bool(fw["events_per_s"] >= q["events_per_s"])}
    bp = best["progressive"]
    ratios["vw_best"] = best["run"]
    ratios["fwfm_prog_LL - vw_best_prog_LL"] = fw["progressive"]["logloss"] - bp["logloss"]
    ratios["fwfm_prog_LL>20% - vw_best_prog_LL>20%"] = (
        fw["progressive"]["logloss_after20"] - bp["logloss_after20"])
    ratios["fwfm_served_LL>20% - vw_best_LL>20%"] = a_fw["logloss"] - bp["logloss_after20"]
    ratios["fwfm_served_AUC>20% - vw_best_AUC>20%"] = a_fw["auc"] - bp["auc_after20"]
    goals["progressive_logloss_below_vw_best"] = {
        "diff_all": ratios["fwfm_prog_LL - vw_best_prog_LL"],
        "diff_after20": ratios["fwfm_prog_LL>20% - vw_best_prog_LL>20%"],
        "met": bool(ratios["fwfm_prog_LL - vw_best_prog_LL"] < 0),
        "served_diff_after20": ratios["fwfm_served_LL>20% - vw_best_LL>20%"],
    }
    return ratios, goals


def format_report(result: dict[str, Any]) -> str:
    main, sweep = result["main"], result["sweep"]
    sim = result["simulation"]
    lines = [
        f"## Replay: ctrloop vs Vowpal Wabbit — {sim['impressions']:,} impressions, "
        f"{result['total_events']:,} events, seed {result['seed']}",
        "",
        markdown_table(MAIN_HEADERS, main_rows(main)),
        "",
        "LL = logloss, AUC/LL/calib >20% = after the first 20% of the stream; labels = click "
        f"within {result['click_window']:g} s. ctrloop events/s: JSON events in -> served "
        "predictions out (replay summary). VW events/s and imps/s: end to end (JSON -> VW text "
        "with labels joined up front, + VW); VW-only ex/s: VW's own parse+learn.",
        "VW sees every label instantly (no join delay, no click window to wait for) — an "
        "advantage ctrloop cannot have online — so VW's progressive predictions are also its "
        "served ones. ctrloop's progressive metrics are over learned samples in learning order "
        "(negatives only after window + lateness, warm-up positives skipped); served vs served "
        "is the like-for-like quality comparison.",
    ]
    if result["ratios"]:
        lines += ["", "Ratios and differences:", ""]
        for k, v in result["ratios"].items():
            if isinstance(v, str):
                text = v
            elif "LL" in k or "AUC" in k:  # differences
                text = format(v, "+.4f")
            else:  # throughput ratios
                text = f"{v:.3f}x"
            lines.append(f"- {k}: {text}")
    if result["goals"]:
        lines += ["", "Goals:", ""]
        for k, v in result["goals"].items():
            detail = ", ".join(f"{kk}={vv:.4f}" if isinstance(vv, float) else f"{kk}={vv}"
                               for kk, vv in v.items() if kk != "met")
            lines.append(f"- {k}: {'MET' if v['met'] else 'NOT MET'} ({detail})")
    if sweep:
        lines += ["", "### Click-window sweep (FwFM; labels and served metrics at each window)",
                  "", markdown_table(SWEEP_HEADERS, sweep_rows(sweep))]
    lines += ["", f"Load average during the runs (1/5/15 min): "
                  f"{result['loadavg_start']} at start, {result['loadavg_end']} at end; "
                  f"{result['cpus']} CPUs. Total wall time {result['wall_s']:.0f} s."]
    return "\n".join(lines)


# --- profile ---------------------------------------------------------------------------------

def profile_fwfm(events: Path, workdir: Path, seed: int, n: int,
                 click_window: float) -> dict[str, Any]:
    settings = _settings("fwfm", click_window, seed, n)
    pred = workdir / "profile-fwfm.pred.jsonl"
    _log("profiling the FwFM replay under cProfile (throughput is lower under the profiler)")
    prof = cProfile.Profile()
    prof.enable()
    summary = replay(events, outputs_for(pred), None, settings.pipeline_config(), seed)
    prof.disable()
    prof_path = workdir / "profile-fwfm.prof"
    prof.dump_stats(prof_path)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(PROFILE_TOP)
    return {"events_per_s_under_profiler": summary["events_per_s"],
            "prof_path": str(prof_path), "top_tottime": buf.getvalue()}


# --- main ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impressions", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0, help="simulator and model seed (default 0)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ctrloop-bench"))
    ap.add_argument("--json-out", type=Path, help="write every number as JSON here")
    ap.add_argument("--windows", default="120,300,900",
                    help="click windows (s) of the FwFM sweep; '' for none (default 120,300,900)")
    ap.add_argument("--skip-vw", action="store_true", help="ctrloop rows only")
    ap.add_argument("--vw-repeats", type=int, default=1,
                    help="median VW times over N conversions/runs (default 1)")
    ap.add_argument("--profile", action="store_true",
                    help=f"also run the FwFM replay under cProfile; print top {PROFILE_TOP} by "
                         "tottime")
    ns = ap.parse_args(argv)
    if ns.impressions < 1000:
        ap.error("--impressions must be >= 1000")
    windows = [float(w) for w in ns.windows.split(",") if w.strip()]

    env = {k: v for k, v in os.environ.items() if k.startswith("CTRLOOP_")}
    if env:
        _log(f"warning: CTRLOOP_* environment variables change the 'default' settings: {env}")
    t_start = time.perf_counter()
    load_start = _load()
    ns.workdir.mkdir(parents=True, exist_ok=True)
    defaults = LearningSettings()
    window = defaults.click_window

    events, truth, sim = simulate(ns.impressions, ns.seed, ns.workdir)
    total_events = sim["impressions"] + sim["clicks"] + sim["conversions"]

    _log(f"warm-up: untimed replays of the first {WARMUP_LINES:,} lines")
    warm_up(events, ns.workdir, ns.seed)
    main_results = [
        run_replay("ctrloop FwFM", "fwfm", window, events, truth, ns.workdir, ns.seed,
                   ns.impressions),
        run_replay("ctrloop LR", "lr", window, events, truth, ns.workdir, ns.seed,
                   ns.impressions),
    ]
    if not ns.skip_vw:
        main_results += run_vw_rows(events, truth, window, ns.workdir, total_events,
                                    ns.vw_repeats)

    sweep = []
    for w in windows:
        if w == window:
            sweep.append(main_results[0])
        else:
            sweep.append(run_replay(f"ctrloop FwFM w{w:g}", "fwfm", w, events, truth,
                                    ns.workdir, ns.seed, ns.impressions))

    ratios, goals = ratios_and_goals(main_results)
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "benchmarks.replay_vs_vw",
                             *(sys.argv[1:] if argv is None else argv)]),
        "seed": ns.seed,
        "click_window": window,
        "machine": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "ctrloop_env": env,
        "simulation": sim,
        "total_events": total_events,
        "main": main_results,
        "sweep": sweep,
        "ratios": ratios,
        "goals": goals,
        "loadavg_start": load_start,
        "loadavg_end": _load(),
        "wall_s": time.perf_counter() - t_start,
    }
    try:
        import torch
        result["torch"] = torch.__version__
        if not ns.skip_vw:
            import vowpalwabbit
            result["vowpalwabbit"] = getattr(vowpalwabbit, "__version__", "?")
    except ImportError:
        pass
    print(format_report(result), flush=True)

    if ns.profile:
        prof = profile_fwfm(events, ns.workdir, ns.seed, ns.impressions, window)
        result["profile"] = prof
        print(f"\n### cProfile of the FwFM replay (top {PROFILE_TOP} by tottime; "
              f"{prof['events_per_s_under_profiler']:,.0f} events/s under the profiler; "
              f"stats in {prof['prof_path']})\n")
        print(prof["top_tottime"], flush=True)
        result["wall_s_with_profile"] = time.perf_counter() - t_start

    if ns.json_out:
        ns.json_out.parent.mkdir(parents=True, exist_ok=True)
        ns.json_out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2
                                             | orjson.OPT_SERIALIZE_NUMPY))
        _log(f"wrote {ns.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
