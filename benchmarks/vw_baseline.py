"""Vowpal Wabbit baseline: the same events file, labels and progressive metrics as ctrloop.

Why a VW baseline: it is the standard fast online logistic regression, so it says how much of
ctrloop's quality and throughput comes from the model and how much from the plumbing.

How it runs:
1. A first pass over the JSON Lines events finds each impression's earliest click. Only lines
   containing the bytes ``click`` are parsed, so this pass costs little more than reading the file
   and holds memory for clicked impressions only.
2. A second pass labels each impression (positive iff a click with the same ``impression_id`` has
   ``click.ts - imp.ts <= click_window``, the joiner's rule in docs/events.md; the earliest click
   decides it) and writes one VW text example per impression, in impression ``ts`` order, with
   each feature field in its own single-character namespace, so ``-q ::`` means "every pair of
   fields" (VW keys interactions on the namespace's first character).
3. Each setting is a separate VW run over that file with VW's own C++ parser
   (``Workspace("-d file -p preds")``; the pip package ships no ``vw`` binary, and
   ``Workspace`` runs the parser itself when it sees ``-d``). One pass; ``-p`` gives each
   example's prediction before VW learns from it, i.e. progressive validation.

Usage::

    python -m benchmarks.vw_baseline --events events.jsonl [--click-window 900] [--json-out F]
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
from vowpalwabbit import Workspace

from ctrloop.core.metrics import auc, logloss

NumericEncoding = Literal["log_bin", "raw"]

# Always on: logistic loss to train a CTR model, logistic link so `-p` writes probabilities.
# --quiet because VW's progress table goes to stderr and would cost time and clutter output.
BASE_ARGS: tuple[str, ...] = ("--loss_function", "logistic", "--link", "logistic", "--quiet")

# (name, extra VW args). VW's defaults are -l 0.5 and -b 18 with --adaptive --normalized
# --invariant, so "linear" is the untuned baseline and the others sweep around it.
# Note `-q ::` in VW 9 also adds each namespace crossed with itself (checked with --audit): for
# a one-feature namespace that is a second copy of the linear weight, so it is "all pairs + a
# duplicated linear part". Kept because it is what VW users run; listing each pair (-q ab ...)
# would avoid the copies.
DEFAULT_SETTINGS: tuple[tuple[str, str], ...] = (
    ("linear", ""),
    ("linear -l 0.1", "-l 0.1"),
    ("linear -l 0.25", "-l 0.25"),
    ("linear -l 1.0", "-l 1.0"),
    ("linear -l 0.25 -b 24", "-l 0.25 -b 24"),
    ("-q ::", "-q ::"),
    ("-q :: -l 0.05", "-q :: -l 0.05"),
    ("-q :: -l 0.1", "-q :: -l 0.1"),
    ("-q :: -l 0.25", "-q :: -l 0.25"),
    ("-q :: -l 0.1 -b 22", "-q :: -l 0.1 -b 22"),
    ("-q :: -l 0.1 -b 24", "-q :: -l 0.1 -b 24"),
)

# Fraction of the stream treated as warm-up for the "after 20%" metrics: early progressive
# loss is dominated by the cold start, the tail says how good the learner gets.
WARMUP_FRACTION = 0.2

# Namespace characters: letters and digits first (readable), then printable punctuation VW
# accepts as a namespace start. Excluded: space and '|' (separators), ':' (namespace weight /
# feature value syntax) and "'" (tag marker). Fields beyond this pool share characters, which
# only matters for `-q ::` on events with more than ~90 feature fields.
_NS_POOL = (
    string.ascii_lowercase + string.ascii_uppercase + string.digits + "!#$%&()*+,-./;<=>?@[]^_`{}~"
)

# VW text format reserves these in feature names; replacing them can merge two rare values,
# which is harmless for a baseline and far cheaper than a reversible escape.
_ESCAPE = str.maketrans({" ": "_", "\t": "_", "\n": "_", "\r": "_", "|": "/", ":": ";"})

# Distinct (field, value) tokens remembered per kind: ~100 bytes each, so at most ~0.5 GB.
_TOKEN_CACHE_MAX = 2_000_000

# Top-level ids exposed as categorical features (docs/events.md), unless `features` sets them.
_ID_FIELDS: tuple[tuple[str, str], ...] = (
    ("user_id", "user.id"),
    ("ad_id", "ad.id"),
    ("advertiser_id", "ad.advertiser_id"),
)


@dataclass
class Conversion:
    """The VW input file and what the metrics need from the conversion."""

    vw_path: Path
    labels: np.ndarray  # 0/1 per example, in file order
    seconds: float  # both passes: label join + writing the VW file
    events: int
    skipped_lines: int  # unparsable lines or impressions missing required fields
    namespaces: dict[str, str]  # feature name -> namespace character


def signed_log_bin(x: float) -> int:
    """ctrloop's numeric discretisation: round(4*log2(1+|x|)) with the sign of x."""
    b = round(4.0 * math.log2(1.0 + abs(x)))
    return -b if x < 0 else b


def _iter_events(path: Path) -> Iterator[dict | None]:
    """Yield parsed events; None for a line that is not a JSON object (counted, not fatal)."""
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield None
                continue
            yield ev if isinstance(ev, dict) else None


def _first_clicks(events_path: Path) -> dict[str, float]:
    """First pass: impression_id -> ts of its earliest click.

    The earliest click is enough: if any click is within the window after the impression, the
    earliest one is. Keeping clicks rather than impression timestamps makes the pass cheap (only
    click lines are parsed) and order-free (a click may precede its impression in the file).
    """
    first: dict[str, float] = {}
    with events_path.open("rb") as f:
        for line in f:
            # Byte prefilter: a click line must contain "click"; impressions that merely
            # mention it are parsed and dropped by the type check below.
            if b"click" not in line:
                continue
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(ev, dict) or ev.get("type") != "click":
                continue
            iid = ev.get("impression_id")
            ts = ev.get("ts")
            if isinstance(iid, str) and isinstance(ts, int | float) and not isinstance(ts, bool):
                prev = first.get(iid)
                if prev is None or ts < prev:
                    first[iid] = ts
    return first


def convert(
    events_path: Path,
    vw_path: Path,
    click_window: float = 900.0,
    numeric: NumericEncoding = "log_bin",
) -> Conversion:
    """JSON Lines events -> VW text file, one labelled example per impression in ts order."""
    t0 = time.perf_counter()
    first_click = _first_clicks(events_path)

    namespaces: dict[str, str] = {}
    # name -> "|c escaped_name" prefix; built once per field so the hot loop only formats values.
    prefixes: dict[str, str] = {}

    def token(name: str, v: object) -> str:
        """The VW text for one feature: `|c name=value` (categorical) or `|c name:value`."""
        p = prefixes.get(name)
        if p is None:
            ns = _NS_POOL[len(namespaces) % len(_NS_POOL)]
            namespaces[name] = ns
            p = prefixes[name] = f"|{ns} {name.translate(_ESCAPE)}"
        # bool before int: bool is an int subclass, and the contract encodes it as text.
        if v is None:
            return f"{p}=null"
        if isinstance(v, bool):
            return f"{p}={'true' if v else 'false'}"
        if isinstance(v, int | float):
            return f"{p}={signed_log_bin(v)}" if numeric == "log_bin" else f"{p}:{v}"
        return f"{p}={str(v).translate(_ESCAPE)}"

    # (name, value) -> token. Categorical values repeat a lot, so formatting and escaping each
    # once makes the per-feature cost one dict lookup. Keyed by exact type (str / number) so
    # True and 1 (equal as dict keys) never share an entry; capped to bound memory.
    str_tokens: dict[tuple[str, str], str] = {}
    num_tokens: dict[tuple[str, float], str] = {}

    labels: list[bool] = []
    stamps: list[float] = []  # impression ts per example, to restore ts order if needed
    in_order = True
    skipped = 0
    events = 0
    out = vw_path.open("w", encoding="utf-8", newline="\n")
    try:
        for ev in _iter_events(events_path):
            events += 1
            if ev is None:
                skipped += 1
                continue
            if ev.get("type") != "impression":
                continue
            iid = ev.get("impression_id")
            ts = ev.get("ts")
            feats = ev.get("features")
            if not isinstance(iid, str) or not isinstance(ts, int | float) or type(ts) is bool:
                skipped += 1
                continue
            if not isinstance(feats, dict):
                feats = {}
            c = first_click.get(iid)
            y = c is not None and c - ts <= click_window
            if stamps and ts < stamps[-1]:
                in_order = False
            stamps.append(ts)
            parts = ["1" if y else "-1"]
            for name, v in feats.items():
                t = type(v)
                if t is str:
                    tok = str_tokens.get((name, v))
                    if tok is None:
                        tok = token(name, v)
                        if len(str_tokens) < _TOKEN_CACHE_MAX:
                            str_tokens[(name, v)] = tok
                elif t is float or t is int:
                    tok = num_tokens.get((name, v))
                    if tok is None:
                        tok = token(name, v)
                        if len(num_tokens) < _TOKEN_CACHE_MAX:
                            num_tokens[(name, v)] = tok
                else:
                    tok = token(name, v)
                parts.append(tok)
            for key, name in _ID_FIELDS:
                v = ev.get(key)
                if type(v) is str and name not in feats:
                    tok = str_tokens.get((name, v))
                    if tok is None:
                        tok = token(name, v)
                        if len(str_tokens) < _TOKEN_CACHE_MAX:
                            str_tokens[(name, v)] = tok
                    parts.append(tok)
            line = " ".join(parts) + "\n"
            labels.append(y)
            out.write(line)
    finally:
        out.close()
    if not in_order:
        # The contract allows slightly out-of-order files; VW must see impressions in ts order,
        # so rewrite the file sorted (stable: file order among equal ts). Rare, so the simple
        # in-memory way is fine.
        order = np.argsort(np.asarray(stamps), kind="stable")
        lines = vw_path.read_text(encoding="utf-8").splitlines(keepends=True)
        vw_path.write_text("".join(lines[i] for i in order), encoding="utf-8")
        labels = [labels[i] for i in order]
    return Conversion(
        vw_path=vw_path,
        labels=np.asarray(labels, dtype=np.float64),
        seconds=time.perf_counter() - t0,
        events=events,
        skipped_lines=skipped,
        namespaces=namespaces,
    )


def _read_preds(path: Path) -> np.ndarray:
    # One float per line (no tags are written), so a whitespace split is all the parsing needed.
    return np.asarray(path.read_bytes().split(), dtype=np.float64)


def run_setting(conv: Conversion, args: str, preds_path: Path) -> tuple[float, np.ndarray]:
    """One VW run over the converted file; returns (wall seconds, progressive predictions).

    The time includes VW's setup (allocating 2^b weights) and writing predictions: that is
    what running VW on a file costs.
    """
    argv = [*BASE_ARGS, *shlex.split(args), "-d", str(conv.vw_path), "-p", str(preds_path)]
    t0 = time.perf_counter()
    ws = Workspace(arg_list=argv)  # runs VW's C++ parser + learner over the whole file
    ws.finish()  # flushes the predictions file
    seconds = time.perf_counter() - t0
    preds = _read_preds(preds_path)
    if preds.size != conv.labels.size:
        raise RuntimeError(f"VW wrote {preds.size} predictions for {conv.labels.size} examples")
    return seconds, preds


def _metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    start = int(WARMUP_FRACTION * labels.size)
    return {
        "logloss": logloss(labels, preds),
        "auc": auc(labels, preds),
        "logloss_after20": logloss(labels[start:], preds[start:]),
        "auc_after20": auc(labels[start:], preds[start:]),
        "calibration": float(preds.sum() / labels.sum()) if labels.sum() else float("nan"),
    }


def _parse_settings(settings: list[str] | None) -> list[tuple[str, str]]:
    if settings is None:
        return list(DEFAULT_SETTINGS)
    # A user-given setting is named by its args; the empty string is plain linear VW.
    return [(s.strip() or "linear", s) for s in settings]


def run_vw(
    events_path: Path,
    click_window: float = 900.0,
    settings: list[str] | None = None,
    workdir: Path | None = None,
    *,
    numeric: NumericEncoding = "log_bin",
    repeats: int = 1,
) -> list[dict]:
    """Run each VW setting over the events file; one result dict per setting.

    ``settings`` are extra VW argument strings (e.g. ``"-q :: -l 0.1"``); None runs
    DEFAULT_SETTINGS. ``workdir`` keeps the VW file and predictions (a temp dir otherwise).
    ``numeric`` picks how numeric features reach VW: ``log_bin`` (ctrloop's signed-log bins as
    categoricals) or ``raw`` (``name:value``). ``repeats`` > 1 converts and runs each setting
    that many times and reports median times (VW is deterministic, so metrics do not change).
    The row with the lowest progressive logloss has ``best=True``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    with tempfile.TemporaryDirectory(prefix="vw_baseline_") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        # Medians over repeats: a 2-core machine shared with other jobs is noisy run to run.
        convs = [
            convert(Path(events_path), wd / "events.vw", click_window, numeric)
            for _ in range(repeats)
        ]
        conv = convs[-1]
        conv.seconds = statistics.median(c.seconds for c in convs)
        n = int(conv.labels.size)
        results: list[dict] = []
        for i, (name, args) in enumerate(_parse_settings(settings)):
            times = []
            for _ in range(repeats):
                seconds, preds = run_setting(conv, args, wd / f"preds_{i}.txt")
                times.append(seconds)
            vw_s = statistics.median(times)
            results.append(
                {
                    "setting": name,
                    "vw_args": " ".join([*BASE_ARGS, args]).strip(),
                    "numeric": numeric,
                    "examples": n,
                    "ctr": float(conv.labels.mean()) if n else float("nan"),
                    "skipped_lines": conv.skipped_lines,
                    "repeats": repeats,
                    "convert_s": conv.seconds,
                    "vw_s": vw_s,
                    "vw_examples_per_s": n / vw_s,
                    # The file is converted once and shared, but every setting would pay for it
                    # alone in production, so end-to-end charges the full conversion to each.
                    "e2e_examples_per_s": n / (conv.seconds + vw_s),
                    **_metrics(conv.labels, preds),
                    "best": False,
                }
            )
    if results:
        best = min(results, key=lambda r: r["logloss"])
        best["best"] = True
    return results


def format_table(results: list[dict]) -> str:
    w = max([len("setting"), *(len(r["setting"]) for r in results)])
    head = (
        f"{'setting':<{w}} {'vw s':>6} {'vw ex/s':>9} {'conv s':>7} {'e2e ex/s':>9} "
        f"{'logloss':>8} {'AUC':>7} {'LL>20%':>8} {'AUC>20%':>8} {'calib':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        mark = " *" if r["best"] else ""
        lines.append(
            f"{r['setting']:<{w}} {r['vw_s']:>6.2f} {r['vw_examples_per_s']:>9,.0f} "
            f"{r['convert_s']:>7.2f} {r['e2e_examples_per_s']:>9,.0f} {r['logloss']:>8.4f} "
            f"{r['auc']:>7.4f} {r['logloss_after20']:>8.4f} {r['auc_after20']:>8.4f} "
            f"{r['calibration']:>6.3f}{mark}"
        )
    if results:
        r0 = results[0]
        lines.append(
            f"{r0['examples']:,} examples, CTR {r0['ctr']:.4f}, numeric={r0['numeric']}, "
            f"skipped lines {r0['skipped_lines']}; * = lowest progressive logloss"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=Path, required=True, help="JSON Lines events file")
    ap.add_argument("--click-window", type=float, default=900.0, help="seconds (default 900)")
    ap.add_argument("--json-out", type=Path, help="write the result rows as JSON here")
    ap.add_argument("--workdir", type=Path, help="keep the VW file and predictions here")
    ap.add_argument("--numeric", choices=["log_bin", "raw"], default="log_bin")
    ap.add_argument(
        "--setting",
        action="append",
        help="extra VW args for one run, repeatable (default: the built-in sweep)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="median time over N runs")
    ns = ap.parse_args(argv)
    results = run_vw(
        ns.events,
        ns.click_window,
        ns.setting,
        ns.workdir,
        numeric=ns.numeric,
        repeats=ns.repeats,
    )
    print(format_table(results))
    if ns.json_out:
        ns.json_out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
