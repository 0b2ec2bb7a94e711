"""Plots as hand-written SVG: line charts and calibration (reliability) charts.

No plotting library: matplotlib is a large dependency for a few lines and dots, and an SVG
is text that a browser, a README or a notebook (`IPython.display.SVG`) shows as it is. Pure:
the functions return the SVG text; `write_svg` is the one that touches a file.

Every drawn series is one `<polyline class="series" data-name=...>` (lines) or one
`<g class="series" data-name=...>` of `<circle>`s (points), one vertex or circle per finite
data point, so a test can check a plot against its data. Non-finite values (NaN, None: a
bucket without impressions, an AUC over no pairs) are left out, not drawn as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 40, 72  # room for tick labels, title and the legend
# Colour-blind-safe (Okabe-Ito), in the order series are usually given: ours, best, worst.
PALETTE = ("#0072B2", "#009E73", "#D55E00", "#CC79A7", "#E69F00", "#56B4E9", "#000000")

Fmt = Callable[[float], str]


@dataclass(frozen=True)
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    dashed: bool = False


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def finite_points(s: Series) -> list[tuple[float, float]]:
    """The (x, y) pairs a series draws: both coordinates finite."""
    return [(float(x), float(y)) for x, y in zip(s.xs, s.ys, strict=True)
            if _finite(x) and _finite(y)]  # type: ignore[arg-type]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2 or 5 times a power of ten apart) covering lo..hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    if ticks[-1] < hi:
        ticks.append(round(first + k * step, 12))
    return ticks


def _g(x: float) -> str:
    return f"{x:g}"


def pct(digits: int = 1) -> Fmt:
    return lambda x: f"{100 * x:.{digits}f}%"


@dataclass(frozen=True)
class _Frame:
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _frame(points: list[tuple[float, float]], x_ticks: list[float],
           y_ticks: list[float]) -> _Frame:
    xs = x_ticks or [p[0] for p in points] or [0.0, 1.0]
    ys = y_ticks or [p[1] for p in points] or [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return _Frame(x0, x1 if x1 > x0 else x0 + 1.0, y0, y1 if y1 > y0 else y0 + 1.0)


def _axes(f: _Frame, x_ticks: list[float], y_ticks: list[float], x_label: str, y_label: str,
          x_fmt: Fmt, y_fmt: Fmt) -> list[str]:
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
           f'height="{HEIGHT - TOP - BOTTOM}" fill="none" stroke="#999"/>']
    for t in y_ticks:
        y = f.py(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{escape(y_fmt(t))}</text>')
    for t in x_ticks:
        x = f.px(t)
        out.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">'
                   f'{escape(x_fmt(t))}</text>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - BOTTOM + 34}" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{(TOP + HEIGHT - BOTTOM) / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(TOP + HEIGHT - BOTTOM) / 2:.0f})">'
               f'{escape(y_label)}</text>')
    return out


def _legend(names: Sequence[str], colours: Sequence[str], dashed: Sequence[bool]
            ) -> list[str]:
    out, x = [], float(LEFT)
    y = HEIGHT - 14
    for name, colour, dash in zip(names, colours, dashed, strict=True):
        style = ' stroke-dasharray="6 4"' if dash else ""
        out.append(f'<line x1="{x:.0f}" y1="{y - 4}" x2="{x + 22:.0f}" y2="{y - 4}" '
                   f'stroke="{colour}" stroke-width="2"{style}/>')
        out.append(f'<text x="{x + 28:.0f}" y="{y}">{escape(name)}</text>')
        x += 40 + 7 * len(name)
    return out


def _document(title: str, body: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">')
    return "\n".join([head, f"<title>{escape(title)}</title>",
                      f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
                      f'<text x="{LEFT}" y="24" font-size="14">{escape(title)}</text>',
                      *body, "</svg>\n"])


def _no_data(f: _Frame) -> str:
    return (f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{(f.py(f.y0) + f.py(f.y1)) / 2:.0f}"'
            ' text-anchor="middle" fill="#999">no data</text>')


def line_chart(title: str, series: Sequence[Series], x_label: str, y_label: str,
               x_fmt: Fmt = _g, y_fmt: Fmt = _g, y_min: float | None = None) -> str:
    """Series against a shared x axis, one polyline each (the first is the main one).

    `y_min` pins the bottom of the y axis (0 for rates, so a lift is not exaggerated).
    """
    points = [finite_points(s) for s in series]
    every = [p for ps in points for p in ps]
    ys = [p[1] for p in every] + ([y_min] if y_min is not None else [])
    x_ticks = nice_ticks(min(p[0] for p in every), max(p[0] for p in every)) if every else []
    y_ticks = nice_ticks(min(ys), max(ys)) if every else []
    f = _frame(every, x_ticks, y_ticks)
    body = _axes(f, x_ticks, y_ticks, x_label, y_label, x_fmt, y_fmt)
    for i, (s, ps) in enumerate(zip(series, points, strict=True)):
        coords = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in ps)
        style = ' stroke-dasharray="6 4"' if s.dashed else ""
        body.append(f'<polyline class="series" data-name={quoteattr(s.name)} points="{coords}" '
                    f'fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2"'
                    f'{style}/>')
    if not every:
        body.append(_no_data(f))
    body += _legend([s.name for s in series],
                    [PALETTE[i % len(PALETTE)] for i in range(len(series))],
                    [s.dashed for s in series])
    return _document(title, body)


def calibration_chart(title: str, series: Sequence[Series],
                      x_label: str = "mean predicted pCTR", y_label: str = "true CTR",
                      fmt: Fmt | None = None) -> str:
    """A reliability diagram: per series one dot per bin (mean prediction, mean outcome), and
    the diagonal a calibrated model lies on. Both axes share one scale, so the diagonal is at
    45 degrees."""
    fmt = fmt or pct(1)
    points = [finite_points(s) for s in series]
    every = [p for ps in points for p in ps]
    ticks = nice_ticks(0.0, max(v for p in every for v in p)) if every else []
    f = _frame(every, ticks, ticks)
    body = _axes(f, ticks, ticks, x_label, y_label, fmt, fmt)
    lo, hi = f.x0, min(f.x1, f.y1)
    body.append(f'<line class="diagonal" x1="{f.px(lo):.1f}" y1="{f.py(lo):.1f}" '
                f'x2="{f.px(hi):.1f}" y2="{f.py(hi):.1f}" stroke="#999" '
                'stroke-dasharray="4 4"/>')
    for i, (s, ps) in enumerate(zip(series, points, strict=True)):
        dots = "".join(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="4"/>' for x, y in ps)
        body.append(f'<g class="series" data-name={quoteattr(s.name)} '
                    f'fill="{PALETTE[i % len(PALETTE)]}">{dots}</g>')
    if not every:
        body.append(_no_data(f))
    body += _legend([*(s.name for s in series), "calibrated (y = x)"],
                    [*(PALETTE[i % len(PALETTE)] for i in range(len(series))), "#999"],
                    [*(False for _ in series), True])
    return _document(title, body)


def write_svg(path: Path, svg: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg, encoding="utf-8")
    return path
