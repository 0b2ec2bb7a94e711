"""Replay an events file through the same pipeline as the streaming trainer, as fast as possible.

Writes one prediction per impression — the pCTR and pCVR of the last snapshot published before
the impression's ts, i.e. what the served models would have said, and the standard deviation of
that snapshot's posterior over the pCTR logit (`pctr_std`, ctrloop/core/posterior.py) — and a
rejects file for lines that break the contract. Deterministic for a given seed and configuration.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import torch

from ctrloop.core import plots
from ctrloop.core.errors import ConfigError, InvalidEvent
from ctrloop.core.evaluate import calibration_bins, load_scored, over_time
from ctrloop.core.events import Event, Impression, decode_event
from ctrloop.core.features import FeatureSpec
from ctrloop.core.plots import write_svg
from ctrloop.io.jsonl import iter_events
from ctrloop.trainer.gc_tuning import quiet_gc
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig

INFER_FROM = 2000
REJECT_PAYLOAD_BYTES = 4096


@dataclass
class ReplayOutputs:
    predictions: Path
    rejects: Path
    spec: Path


def outputs_for(predictions: Path, rejects: Path | None = None,
                spec: Path | None = None) -> ReplayOutputs:
    return ReplayOutputs(
        predictions=predictions,
        rejects=rejects or predictions.with_name(predictions.name + ".rejects.jsonl"),
        spec=spec or predictions.with_name(predictions.name + ".spec.json"),
    )


def read_events(path: Path, rejects: IO[bytes] | None = None,
                counter: dict[str, int] | None = None) -> Iterator[Event]:
    """Valid events of a JSON Lines file, one line at a time; invalid lines go to `rejects`
    with their reason. The reference the columnar reader (`ctrloop.io.jsonl`, what `replay`
    reads with) is tested against, line for line."""
    counts = counter if counter is not None else {}
    counts.setdefault("lines", 0)
    counts.setdefault("rejected", 0)
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            counts["lines"] = n
            if not line.strip():
                continue
            try:
                yield decode_event(line)
            except InvalidEvent as e:
                counts["rejected"] += 1
                if rejects is not None:
                    rejects.write(orjson.dumps({
                        "line": n,
                        "reason": e.reason,
                        "payload": line[:REJECT_PAYLOAD_BYTES].decode("utf-8", "replace"),
                    }) + b"\n")


def infer_spec(path: Path, limit: int = INFER_FROM) -> FeatureSpec:
    imps = itertools.islice((e for e in read_events(path) if isinstance(e, Impression)), limit)
    sample = list(imps)
    if not sample:
        raise ConfigError(f"{path} has no valid impression to infer a feature spec from; "
                          "pass --feature-spec")
    return FeatureSpec.infer(sample)


class PredictionWriter:
    """One line per impression: the pCTR and (given by `pcvr` / `pctr_var` just before) the
    pCVR and the std of the pCTR logit of the last published snapshot."""

    def __init__(self, f: IO[bytes], conversion_types: tuple[str, ...] = ()) -> None:
        """With `conversion_types`, the pCVR has one column per type: "pcvr" is the first
        type's, "pcvr_by_type" names them all."""
        self.f = f
        self.count = 0
        self.types = conversion_types
        self._pcvr: list[bytes] | None = None
        self._std: list[float] | None = None

    def pcvr(self, ids: list[str], preds: np.ndarray, version: str) -> None:
        dumps = orjson.dumps
        if preds.ndim == 1:
            self._pcvr = [b',"pcvr":' + dumps(c) for c in preds.tolist()]
            return
        self._pcvr = [b',"pcvr":' + dumps(row[0]) + b',"pcvr_by_type":'
                      + dumps(dict(zip(self.types, row, strict=True)))
                      for row in preds.tolist()]

    def pctr_var(self, ids: list[str], row_var: np.ndarray, version: str) -> None:
        # float64 sum: the std written is the one a reader recomputes from the row variances.
        self._std = np.sqrt(row_var.sum(1, dtype=np.float64)).tolist()

    def __call__(self, ids: list[str], preds: np.ndarray, version: str) -> None:
        tail = b',"model_version":' + orjson.dumps(version) + b"}\n"
        dumps = orjson.dumps
        pcvr, self._pcvr = self._pcvr, None
        std, self._std = self._std, None
        pctr = [b',"pctr":' + dumps(p) for p in preds.tolist()]
        if std is not None:
            pctr = [a + b',"pctr_std":' + dumps(x) for a, x in zip(pctr, std, strict=True)]
        if pcvr is None:
            lines = (b'{"impression_id":' + dumps(i) + p + tail
                     for i, p in zip(ids, pctr, strict=True))
        else:
            lines = (b'{"impression_id":' + dumps(i) + p + c + tail
                     for i, p, c in zip(ids, pctr, pcvr, strict=True))
        self.f.write(b"".join(lines))
        self.count += len(ids)


def load_converted(truth: Path) -> set[str]:
    """Impression ids that eventually convert, from a simulator truth file (the oracle)."""
    out: set[str] = set()
    with open(truth, "rb") as f:
        for line in f:
            if b'"converted":true' in line:
                out.add(orjson.loads(line)["impression_id"])
    return out


def load_converted_by_type(truth: Path) -> dict[str, set[str]]:
    """Per conversion type, the impression ids that eventually convert (a truth file of a
    simulation with several types: its "conversions" map)."""
    out: dict[str, set[str]] = {}
    with open(truth, "rb") as f:
        for line in f:
            if b'"conversions"' not in line:
                continue
            rec = orjson.loads(line)
            for t, c in rec["conversions"].items():
                ids = out.setdefault(t, set())
                if c.get("converted"):
                    ids.add(rec["impression_id"])
    return out


def replay(events: Path, outputs: ReplayOutputs, spec: FeatureSpec | None = None,
           config: PipelineConfig | None = None, seed: int = 0,
           progress: Callable[[dict[str, Any]], None] | None = None,
           progress_every: int = 200_000, truth: Path | None = None,
           on_finish: Callable[[Pipeline], None] | None = None) -> dict[str, Any]:
    """`truth` (a simulator truth file) is read only by the `oracle` delay policy.
    `on_finish` is given the pipeline after the stream ends (benchmarks read its learners'
    progressive metrics there)."""
    if not events.exists():
        raise ConfigError(f"events file {events} does not exist")
    converted: set[str] | dict[str, set[str]] | None = None
    if config is not None and config.delay_policy == "oracle":
        if truth is None:
            raise ConfigError("delay policy 'oracle' reads the truth: pass --truth")
        converted = (load_converted_by_type(truth) if config.conversion_types
                     else load_converted(truth))
    torch.set_num_threads(1)  # small minibatches: threads cost more than they give; determinism
    inferred = spec is None
    if spec is None:
        spec = infer_spec(events)
        spec.save(outputs.spec)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    with open(outputs.predictions, "wb") as pf, open(outputs.rejects, "wb") as rf:
        writer = PredictionWriter(pf, config.conversion_types if config is not None else ())
        pipe = Pipeline(spec, config, served=writer, seed=seed, served_cvr=writer.pcvr,
                        converted=converted, served_var=writer.pctr_var)
        with quiet_gc():
            # Decoded, validated and encoded 128 lines at a time, column by column; each
            # impression's row comes from the pipeline's own encoder (its stats count there).
            for i, (event, row) in enumerate(iter_events(events, pipe.encoder, rf, counts),
                                             start=1):
                pipe.process(event, row=row)
                if progress is not None and i % progress_every == 0:
                    progress(_progress(pipe, i, time.perf_counter() - start))
            pipe.finish()
    if on_finish is not None:
        on_finish(pipe)
    elapsed = time.perf_counter() - start
    summary = pipe.summary()
    summary.update({
        "events_file": str(events),
        "lines": counts.get("lines", 0),
        "rejected": counts.get("rejected", 0),
        "predictions": writer.count,
        "seconds": elapsed,
        "events_per_s": pipe.stats.events / elapsed if elapsed > 0 else float("nan"),
        "learning_cadence": {"min_learn_samples": pipe.config.min_learn_samples,
                             "max_learn_wait": pipe.config.max_learn_wait},
        "spec_inferred": inferred,
        "spec_path": str(outputs.spec) if inferred else None,
        "spec_hash": spec.hash,
    })
    return summary


def _progress(pipe: Pipeline, n: int, elapsed: float) -> dict[str, Any]:
    m = pipe.learner.metrics.report()
    return {"events": n, "events_per_s": n / elapsed, "learned": pipe.stats.learned,
            "logloss": m.logloss, "auc": m.auc, "calibration": m.calibration,
            "model_version": pipe.model_version}


def print_progress(p: dict[str, Any], out: IO[str] = sys.stderr) -> None:
    print(f"  {p['events']:>10,} events  {p['events_per_s']:>9,.0f}/s  learned "
          f"{p['learned']:>10,}  logloss {p['logloss']:.4f}  AUC {p['auc']:.4f}  "
          f"calib {p['calibration']:.3f}  v{p['model_version']}", file=out, flush=True)


def count_lines(path: Path, chunk: int = 1 << 20) -> int:
    """Lines in a file (a last line without a newline counts), for a progress bar's total:
    a byte count per chunk, about a second per GB."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(chunk):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


class ProgressBar:
    """Replay's progress on a terminal: a rich bar over the events file's lines with the
    rate and the time left (`print_progress`'s lines are for logs and pipes).

        with ProgressBar(events, sys.stderr) as bar:
            replay(events, outputs, progress=bar, progress_every=bar.every)
    """

    def __init__(self, events: Path, out: IO[str], width: int = 100) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.total = count_lines(events)
        # About 200 updates over the file, and at least every 10,000 events.
        self.every = max(1, min(10_000, self.total // 200))
        console = Console(file=out, width=min(shutil.get_terminal_size((width, 24)).columns,
                                              width))
        self.progress = Progress(
            TextColumn("replay"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("left"),
            TimeRemainingColumn(), console=console, transient=False)
        self.task = self.progress.add_task("replay", total=self.total, rate="")

    def __call__(self, p: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=p["events"],
                             rate=f"{p['events_per_s']:,.0f}/s")

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:  # rejected lines are not events: the bar ends full anyway
            self.progress.update(self.task, completed=self.total)
        self.progress.stop()


def write_replay_plots(predictions: Path, truth: Path, out_dir: Path,
                       click_window: float = 120.0, n_buckets: int = 20) -> list[Path]:
    """SVG plots of the served predictions against the simulator's truth: a reliability
    diagram (pCTR deciles against the window labels and the true CTR), the AUC over event
    time beside the oracle's, and the mean pCTR over event time beside the label rate and the
    true CTR. The same join and labels as `ctrloop.core.evaluate.evaluate`."""
    d = load_scored(predictions, truth, click_window)
    ts, pctr, ctr, label = d["ts"], d["pctr"], d["ctr"], d["label"]
    by_label = calibration_bins(pctr, label)
    by_ctr = calibration_bins(pctr, ctr)
    out = [write_svg(out_dir / "calibration.svg", plots.calibration_chart(
        f"Calibration of the served pCTR ({ts.size:,} impressions)",
        [plots.Series("vs the true CTR", [b["pred"] for b in by_ctr],
                      [b["actual"] for b in by_ctr]),
         plots.Series(f"vs clicked within {click_window:g} s", [b["pred"] for b in by_label],
                      [b["actual"] for b in by_label])],
        y_label="mean outcome per pCTR decile"))]
    spans = over_time(ts, pctr, ctr, label, n_buckets)
    t0 = float(ts.min()) if ts.size else 0.0
    hours = [(b["start_ts"] - t0) / 3600.0 for b in spans]
    out.append(write_svg(out_dir / "auc-over-time.svg", plots.line_chart(
        "AUC of the served pCTR over event time (window labels)",
        [plots.Series("served pCTR", hours, [b["auc"] for b in spans]),
         plots.Series("oracle (true CTR as the score)", hours,
                      [b["oracle_auc"] for b in spans], True)],
        "hours of event time", "AUC")))
    out.append(write_svg(out_dir / "calibration-over-time.svg", plots.line_chart(
        "Mean served pCTR over event time",
        [plots.Series("mean pCTR", hours, [b["mean_pctr"] for b in spans]),
         plots.Series("mean true CTR", hours, [b["mean_ctr"] for b in spans], True),
         plots.Series(f"clicked within {click_window:g} s", hours,
                      [b["label_rate"] for b in spans], True)],
        "hours of event time", "CTR", y_fmt=plots.pct(1), y_min=0.0)))
    return out
