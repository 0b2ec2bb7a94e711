"""The variance policy's wait under the "delay" rule (issue 11, opt-in): the statistic's edges.

A key's wait is the `wait_quantile` of its click-to-report delays (shrunk toward the pool's);
these tests feed it the reporting patterns that broke the dispersion-only rule: an advertiser's
first upload, a backfill of weeks, an advertiser going silent, and a restart in the middle of
an upload.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.core.delays import DELAY_EDGES, CvrSample, PolicyConfig, VariancePolicy
from ctrloop.core.delays.variance import _quantile

T0 = 1767225600.0
HOUR = 3600.0
DAY = 86_400.0
ROW = [1, 2, 3]
DELAY = PolicyConfig(wait_rule="delay")


def net_label(samples: list[CvrSample], iid: str) -> float:
    return sum(s.label * s.weight for s in samples if s.impression_id == iid)


def streams(p: VariancePolicy, delays: dict[int, float], hours: int,
            per_hour: int = 4) -> list[CvrSample]:
    """`per_hour` clicks an hour for each key of `delays`, each converting its key's delay
    later (reported at once), the watermark advanced hour by hour."""
    out: list[CvrSample] = []
    convs: list[tuple[float, str]] = []
    for h in range(hours):
        for c in range(per_hour):
            for key, delay_s in delays.items():
                t = T0 + h * HOUR + c * HOUR / per_hour + key
                convs.sort()
                while convs and convs[0][0] <= t:
                    out += p.add_conversion(convs[0][1], convs[0][0])
                    convs.pop(0)
                iid = f"s{key}-{h}-{c}"
                out += p.add_click(iid, key, t, ROW)
                convs.append((t + delay_s, iid))
        out += p.advance(T0 + (h + 1) * HOUR)
    return out


def streaming_key(p: VariancePolicy, key: int, hours: int, delay_s: float) -> list[CvrSample]:
    return streams(p, {key: delay_s}, hours)


def through_torch(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- the quantile of a log-binned histogram ----------------------------------------------------

def test_quantile_interpolates_inside_log_bins() -> None:
    hist = np.zeros(len(DELAY_EDGES) + 1)
    hist[0] = 1.0  # [0, 60 s]
    assert _quantile(hist, 0.5) == pytest.approx(30.0)
    hist[:] = 0.0
    hist[5] = 2.0  # (EDGES[4], EDGES[5]]
    lo, hi = DELAY_EDGES[4], DELAY_EDGES[5]
    assert _quantile(hist, 0.5) == pytest.approx(lo * (hi / lo) ** 0.5)
    assert _quantile(hist, 1.0) == pytest.approx(hi)
    hist[-1] = 98.0  # beyond 16 days: the last edge
    assert _quantile(hist, 0.9) == DELAY_EDGES[-1]
    rng = np.random.default_rng(1)
    h = rng.random(len(DELAY_EDGES) + 1)
    qs = [_quantile(h, q) for q in np.linspace(0.01, 0.99, 30)]
    assert qs == sorted(qs)


def test_a_fresh_policy_waits_the_ceiling_then_the_delays_decide() -> None:
    p = VariancePolicy(DELAY)
    assert p.wait_of("never-seen") == p.config.ceiling_s  # no report anywhere: volatile
    streaming_key(p, 1, 48, delay_s=600.0)
    # 600 s delays: the 0.9 quantile sits in the bin holding 600 s (log-interpolated).
    i = int(np.searchsorted(DELAY_EDGES, 600.0))
    assert DELAY_EDGES[i - 1] <= p.wait_of(1) <= DELAY_EDGES[i]
    assert p.wait_of("never-seen") == pytest.approx(p.wait_of(1))  # the pool is key 1
    assert p.key_view(1)["wait_s"] == pytest.approx(p.wait_of(1))
    before = p.state()
    assert p.key_view("never-seen")["wait_s"] == p.wait_of("never-seen")
    assert p.pool_view()["wait_s"] == p.wait_of("never-seen")
    assert p.state() == before and "never-seen" not in p.stat_keys()


# --- an advertiser's first upload -------------------------------------------------------------

def test_first_dump_lengthens_the_wait_of_that_advertiser_only() -> None:
    """Before its first upload a bursty advertiser has no delays of its own and waits the
    pool's (streaming, short) wait; its first upload, of conversions 10-30 h after their
    clicks, makes its own wait long, and leaves the streaming advertiser's as it was."""
    p = VariancePolicy(DELAY)
    out = streaming_key(p, 1, 30, delay_s=120.0)
    bursty = [f"b{h}" for h in range(30)]
    for h, iid in enumerate(bursty):
        out += p.add_click(iid, 2, T0 + h * HOUR + 1.0, ROW)
    p.advance(T0 + 30 * HOUR)
    before, streaming_before = p.wait_of(2), p.wait_of(1)
    assert before == pytest.approx(streaming_before) and before < HOUR
    # The first upload at 30 h: the conversions of the first 20 clicks (10 to 30 h old).
    dump_ts = T0 + 30 * HOUR + 5.0
    for iid in bursty[:20]:
        out += p.add_conversion(iid, dump_ts)
    out += p.advance(T0 + 31 * HOUR)
    assert p.wait_of(2) >= 10 * HOUR
    assert p.wait_of(1) < 2 * streaming_before  # the pool moved by its pseudo-reports only
    # Released before the upload: each is corrected by a retraction pair, net label exact.
    for iid in bursty[:20]:
        assert net_label(out, iid) == 1.0
    assert sum(s.kind == "late" and s.impression_id.startswith("b") for s in out) == 20


# --- a backfill of weeks ----------------------------------------------------------------------

def test_backfill_of_weeks_arriving_at_once() -> None:
    """Three weeks of conversions uploaded at once: those for clicks older than remember_s are
    counted as unmatched and dropped, the rest corrected; the statistic stays finite and the
    advertiser's next clicks wait the ceiling."""
    p = VariancePolicy(DELAY)
    streaming_key(p, 1, 24, delay_s=300.0)
    clicks = [(f"w{h}", T0 + h * HOUR) for h in range(21 * 24)]
    out: list[CvrSample] = []
    for i, (iid, t) in enumerate(clicks):
        out += p.add_click(iid, 2, t, ROW)
        if i % 24 == 23:
            out += p.advance(t)
    backfill_ts = clicks[-1][1] + HOUR
    out += p.advance(backfill_ts)
    converted = [iid for i, (iid, _) in enumerate(clicks) if i % 5 == 0]
    for iid in converted:
        out += p.add_conversion(iid, backfill_ts)
    out += p.advance(backfill_ts + p.config.orphan_ttl + HOUR)
    remembered = [iid for iid, t in clicks if backfill_ts - t < p.config.remember_s
                  and iid in converted]
    forgotten = len(converted) - len(remembered)
    assert forgotten > 0 and p.stats.unmatched_conversions == forgotten
    assert sum(s.kind == "late" and s.impression_id.startswith("w") for s in out) \
        == len(remembered)
    assert all(net_label(out, iid) == 1.0 for iid in remembered)
    view = p.key_view(2)
    assert np.isfinite(view["dispersion_shrunk"]) and view["wait_s"] == p.config.ceiling_s
    assert p.wait_of(2) == p.config.ceiling_s


# --- an advertiser going silent (the diagnosed bug) -------------------------------------------

def bursty_with_long_gaps(config: PolicyConfig) -> VariancePolicy:
    """Five streaming advertisers (2-minute delays) and one that uploads every 60 h, longer
    than the dispersion's 48 h window. Returns the policy 55 h after the last upload."""
    p = VariancePolicy(config)
    pending: list[str] = []
    uploads = {60, 120, 180}
    convs: list[tuple[float, str]] = []
    for h in range(235):
        for key in range(1, 6):
            for c in range(2):
                t = T0 + h * HOUR + c * 1800.0 + key
                iid = f"s{key}-{h}-{c}"
                p.add_click(iid, key, t, ROW)
                convs.append((t + 120.0, iid))
        t = T0 + h * HOUR + 7.0
        p.add_click(f"b{h}", 9, t, ROW)
        pending.append(f"b{h}")
        if h in uploads:  # every third click since the last upload converted
            for iid in pending[::3]:
                p.add_conversion(iid, t + 1.0)
            pending = []
        convs.sort()
        while convs and convs[0][0] <= T0 + (h + 1) * HOUR:
            ts, iid = convs.pop(0)
            p.add_conversion(iid, ts)
        p.advance(T0 + (h + 1) * HOUR)
    return p


def test_a_bursty_advertiser_keeps_its_long_wait_through_a_gap_longer_than_the_window() -> None:
    """The bug behind the bursty advertisers' -25% (issue 11): between uploads further apart
    than the 48 h window, the dispersion rule sees no report, falls back to the pool (here the
    streaming advertisers, D ~ 1) and releases the bursty advertiser's clicks after the floor,
    as fake negatives. Its click-to-report delays (up to the 60 h gap) keep it waiting."""
    p = bursty_with_long_gaps(DELAY)
    assert p.wait_of(9) >= 24 * HOUR
    assert p.wait_of(1) <= HOUR  # streaming advertisers are still released fast
    old = bursty_with_long_gaps(PolicyConfig(wait_rule="dispersion"))
    assert old.wait_of(9) == old.config.floor_s  # what the dispersion rule did


def test_an_advertiser_going_silent_keeps_its_wait() -> None:
    """An advertiser that stops reporting while its clicks go on: silence says nothing about
    its delays (a bursty advertiser between uploads is silent too), so its wait stays its own,
    drifting toward the pool's only as its own delays decay (half-life 7 days); never to the
    floor."""
    p = VariancePolicy(DELAY)
    streams(p, {1: 60.0, 2: 12 * HOUR}, 96)
    own = p.wait_of(2)
    assert own > 6 * HOUR and p.wait_of(1) == p.config.floor_s
    waits = []
    for day in range(14):  # clicks go on, no reports
        for h in range(24):
            t = T0 + (96 + day * 24 + h) * HOUR
            p.add_click(f"q{day}-{h}", 2, t, ROW)
            p.advance(t + 1.0)
        waits.append(p.wait_of(2))
    assert waits == sorted(waits, reverse=True)  # monotone toward the (shorter) pool
    assert 0.9 * own <= waits[-1] <= own


# --- a restart in the middle of an upload -----------------------------------------------------

def test_restart_mid_dump_gives_the_same_output_as_no_restart() -> None:
    def run(cut: int | None) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
        p = VariancePolicy(DELAY)
        out = streaming_key(p, 1, 30, delay_s=900.0)
        clicks = [f"b{h}" for h in range(40)]
        for h, iid in enumerate(clicks):
            out += p.add_click(iid, 2, T0 + h * HOUR + 3.0, ROW)
            if h % 6 == 5:
                out += p.advance(T0 + h * HOUR + 4.0)
        dump = clicks[::2]
        for i, iid in enumerate(dump):
            if i == cut:
                q = VariancePolicy(DELAY)
                q.restore(through_torch(p.state()))
                p = q
            out += p.add_conversion(iid, T0 + 40 * HOUR)
        out += p.advance(T0 + 41 * HOUR)
        out += p.add_click("after", 2, T0 + 41 * HOUR + 1.0, ROW)
        out += p.advance(T0 + 50 * DAY) + p.flush()
        rows = [(s.impression_id, s.kind, s.label, s.weight, s.release_ts) for s in out]
        return rows, p.state()

    expected, end_state = run(None)
    for cut in (0, 7, 19):
        got, state = run(cut)
        assert got == expected
        assert state == end_state
