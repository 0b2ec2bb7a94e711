"""Logged event streams from the simulated world, with the truth behind every impression.

An offline logging policy serves each request: it shows a uniformly random ordering of the
eligible candidates in the request's slots, so every shown (ad, position) had probability
1 / n_candidates — the `propensity` in the impression, which off-policy evaluation needs.

Events come out in event-time order: impressions as requests arrive, and each click (drawn
when its impression is shown, with its delay) and each conversion (drawn when its click is,
with its conversion delay and its advertiser's reporting delay; the event's ts is when it is
*reported*) from a heap of pending events once event time passes it. Work is vectorised per
batch of requests; only building the dicts is per event.

Conversion events carry their `conversion_type`. With several types (`WorldConfig.
conversion_mix`, e.g. "funnel"), a click may lead to one conversion of each type, and the truth
of an impression gains a "conversions" key: type name -> {"cvr", "converted", "conversion_ts",
"conversion_reported_ts"}; the top-level fields of those names describe the first type. In a
"single" world the truth has no "conversions" key, so its files are as before types existed.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import orjson

from ctrloop.core.events import Event as ParsedEvent
from ctrloop.core.events import parse_event
from ctrloop.sim.world import (
    IntArray,
    RequestBatch,
    World,
    WorldConfig,
    seed_sequence,
)

Event = dict[str, Any]
Truth = dict[str, Any]
Kind = Literal["impression", "click", "conversion"]

# Stream seed streams, disjoint from the World's (0..5).
SEED_ARRIVALS = 100
SEED_POLICY = 101
SEED_CLICKS = 102
SEED_CONVERSIONS = 103

REQUEST_BATCH = 2048
WRITE_CHUNK = 8192
CLICK_WINDOW_S = 120.0  # the joiner's default attribution window, for the summary only


def uniform_policy(
    rng: np.random.Generator, batch: RequestBatch
) -> tuple[IntArray, IntArray, IntArray]:
    """Show a uniformly random ordering of each request's candidates in its slots.

    Returns (row, position, ad index) per shown impression, by request then position.
    P(ad at position p) = 1 / n_candidates for every candidate and position.
    """
    n, kmax = batch.candidates.shape
    keys = rng.random((n, kmax))
    keys[np.arange(kmax)[None, :] >= batch.n_candidates[:, None]] = np.inf
    max_slots = int(batch.n_slots.max())
    order = np.argsort(keys, axis=1)[:, :max_slots]
    shown = np.arange(max_slots)[None, :] < batch.n_slots[:, None]
    rows, slot = np.nonzero(shown)
    return rows, slot + 1, batch.candidates[rows, order[rows, slot]]


def _stream(world: World, n_impressions: int) -> Iterator[tuple[Kind, Event, Truth | None]]:
    if n_impressions < 0:
        raise ValueError("n_impressions must be >= 0")
    cfg = world.config
    seed = cfg.seed
    arrivals = np.random.default_rng(seed_sequence(seed, SEED_ARRIVALS))
    policy = np.random.default_rng(seed_sequence(seed, SEED_POLICY))
    clicks = np.random.default_rng(seed_sequence(seed, SEED_CLICKS))
    conversions = np.random.default_rng(seed_sequence(seed, SEED_CONVERSIONS))
    mean_gap = 1.0 / world.request_rate
    reporting = [p.reporting for p in world.conversion_profiles]
    # Only worlds that split bursty advertisers into kinds say which (default files unchanged).
    kinds = world.reporting_kinds if cfg.bursty_kinds else None
    drift = cfg.drift_share > 0
    types = world.conversion_types
    multi = len(types) > 1  # only then the truth has "conversions" (single stays as it was)
    ads = world.ads
    # (ts, seq, kind, event): seq breaks ts ties in push order, so output is deterministic.
    pending: list[tuple[float, int, Kind, Event]] = []
    seq = 0
    t = cfg.start_ts
    emitted = 0
    while emitted < n_impressions:
        arrival = t + np.cumsum(arrivals.exponential(mean_gap, REQUEST_BATCH))
        t = float(arrival[-1])
        if cfg.diurnal_amplitude > 0:
            # t runs on the homogeneous clock; the requests arrive at its diurnal image.
            arrival = diurnal_time(arrival, cfg.start_ts, cfg.diurnal_amplitude)
        batch = world.sample_batch(np.round(arrival, 3))
        rows, pos, ad_idx = uniform_policy(policy, batch)
        imp_ts = batch.ts[rows]
        ctr = world.true_ctr_batch(batch, rows, ad_idx, pos)
        click_ts = world.sample_clicks(clicks, ctr, imp_ts)
        imp_at = imp_ts if drift else None  # the rates at the impression (drift)
        if multi:
            by_type = {name: np.round(v, 8).tolist() for name, v in
                       world.true_cvr_by_type_batch(batch.user[rows], ad_idx, imp_at).items()}
            cvr = by_type[types[0]]
        else:
            cvr = np.round(world.true_cvr_batch(batch.user[rows], ad_idx, imp_at), 8).tolist()
        req_feats = world.request_features(batch)
        req_ids = batch.request_ids.tolist()
        users = batch.user.tolist()
        propensity = (1.0 / batch.n_candidates[rows]).tolist()
        for j, (r, p, a, ts, prop, c, cts, cv) in enumerate(zip(
            rows.tolist(), pos.tolist(), ad_idx.tolist(), imp_ts.tolist(), propensity,
            np.round(ctr, 8).tolist(), click_ts.tolist(), cvr, strict=True,
        )):
            while pending and pending[0][0] <= ts:
                _, _, kind, ev = heapq.heappop(pending)
                yield kind, ev, None
            ad = ads[a]
            iid = f"r{req_ids[r]}-{p}"
            event: Event = {
                "impression_id": iid,
                "ts": ts,
                "user_id": f"u{users[r]}",
                "ad_id": ad.id,
                "advertiser_id": ad.advertiser_id,
                "features": {**req_feats[r], **ad.features},
                "position": p,
                "propensity": prop,
            }
            clicked = not math.isnan(cts)
            truth: Truth = {
                "impression_id": iid,
                "ts": ts,
                "ad_id": ad.id,
                "advertiser_id": ad.advertiser_id,
                "ad_created_ts": ad.created_ts,
                "ctr": c,
                "clicked": clicked,
                "click_ts": cts if clicked else None,
                # P(conversion | click) of this impression, and what became of it if clicked
                "cvr": cv,
                "converted": False,
                "conversion_ts": None,
                "conversion_reported_ts": None,
                "reporting": reporting[ad.advertiser_index],
            }
            if kinds is not None:
                truth["reporting_kind"] = kinds[ad.advertiser_index]
            if multi:
                truth["conversions"] = {
                    name: {"cvr": by_type[name][j], "converted": False, "conversion_ts": None,
                           "conversion_reported_ts": None}
                    for name in types
                }
            if clicked:
                heapq.heappush(pending, (cts, seq, "click", {"impression_id": iid, "ts": cts}))
                seq += 1
                for conv in world.sample_conversions(conversions, users[r], ad, cts,
                                                     ts if drift else None):
                    ev = {"impression_id": iid, "ts": conv.ts,
                          "conversion_type": conv.conversion_type}
                    heapq.heappush(pending, (conv.ts, seq, "conversion", ev))
                    seq += 1
                    if conv.conversion_type == types[0]:
                        truth["converted"] = True
                        truth["conversion_ts"] = conv.occurred_ts
                        truth["conversion_reported_ts"] = conv.ts
                    if multi:
                        truth["conversions"][conv.conversion_type].update(
                            converted=True, conversion_ts=conv.occurred_ts,
                            conversion_reported_ts=conv.ts)
            yield "impression", event, truth
            emitted += 1
            if emitted == n_impressions:
                break
    # Every impression's eventual click is in the stream, however late it comes.
    while pending:
        _, _, kind, ev = heapq.heappop(pending)
        yield kind, ev, None


DAY_S = 86_400.0
DIURNAL_PEAK_S = 18 * 3600.0  # the busiest moment of the day, seconds after 00:00 UTC


def diurnal_time(u: np.ndarray, start_ts: float, amplitude: float) -> np.ndarray:
    """Map times `u` of a constant-rate process to those of one whose rate is
    (1 + a cos(2 pi (t - peak) / day)) times the mean: t with Lambda(t) = u - start, Lambda the
    integrated rate from `start_ts` (time change; Lambda' >= 1 - a > 0, so Newton converges)."""
    w = 2 * np.pi / DAY_S
    phase0 = math.sin(w * (start_ts - DIURNAL_PEAK_S))
    target = np.asarray(u, np.float64) - start_ts
    t = target.copy()
    for _ in range(50):
        ang = w * (start_ts + t - DIURNAL_PEAK_S)
        f = t + amplitude / w * (np.sin(ang) - phase0) - target
        step = f / (1 + amplitude * np.cos(ang))
        t -= step
        if float(np.max(np.abs(step))) < 1e-6:
            break
    return start_ts + t


def generate(config: WorldConfig, n_impressions: int) -> Iterator[tuple[Event, Truth | None]]:
    """Yield (event, truth) in event-time order: truth for impressions, None for clicks and
    conversions.

    Events carry no "type" key (that is for files, see `write_files`). After the last
    impression, the still-pending clicks and conversions follow, so every eventual one is in
    the stream.
    """
    for _, event, truth in _stream(World(config), n_impressions):
        yield event, truth


def parsed_events(config: WorldConfig, n_impressions: int) -> Iterator[ParsedEvent]:
    """The same stream as `generate`, as the trainer's typed events (each parsed by the kind
    the simulator knows, not guessed from its keys)."""
    for kind, event, _ in _stream(World(config), n_impressions):
        yield parse_event(event, kind)


_PREFIX: dict[Kind, bytes] = {
    "impression": b'{"type":"impression",',
    "click": b'{"type":"click",',
    "conversion": b'{"type":"conversion",',
}


def write_files(
    config: WorldConfig,
    n_impressions: int,
    events_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
) -> dict[str, Any]:
    """Write the events (JSONL with "type", ordered by ts) and the truth; return a summary.

    The summary's "conversions" counts conversion events of every type, and
    "conversion_rate_of_clicks" is that count per click; "mean_true_cvr_of_clicks" is the first
    type's (the truth's "cvr"). With several conversion types it also has "conversion_types":
    type name -> {"conversions", "conversion_rate_of_clicks", "mean_true_cvr_of_clicks",
    "median_delay_s" (click to conversion), "median_report_delay_s" (click to report)}.
    """
    world = World(config)
    types = world.conversion_types
    multi = len(types) > 1
    # Per type: ([true-rate sum over clicks, conversions], delays, report delays).
    by_type: dict[str, tuple[list[float], list[float], list[float]]] = {
        name: ([0.0, 0.0], [], []) for name in types}
    dumps = orjson.dumps
    nl = orjson.OPT_APPEND_NEWLINE
    counts = {"impression": 0, "click": 0, "conversion": 0}
    requests = 0
    ctr_sum = 0.0
    clicked = 0
    clicked_in_window = 0
    cvr_sum = 0.0
    new_ad_impressions = 0
    ads_shown: set[str] = set()
    first_ts = last_ts = last_imp_ts = math.nan
    ev_buf: list[bytes] = []
    tr_buf: list[bytes] = []
    with open(events_path, "wb") as ev_f, open(truth_path, "wb") as tr_f:
        for kind, event, truth in _stream(world, n_impressions):
            counts[kind] += 1
            # Objects always have a first key, so dropping "{" leaves a valid tail.
            ev_buf.append(_PREFIX[kind] + dumps(event, option=nl)[1:])
            last_ts = event["ts"]
            if math.isnan(first_ts):
                first_ts = last_ts
            if truth is not None:
                tr_buf.append(dumps(truth, option=nl))
                last_imp_ts = truth["ts"]
                # Every request fills position 1, so this counts requests served.
                requests += event["position"] == 1
                ctr_sum += truth["ctr"]
                ads_shown.add(truth["ad_id"])
                if truth["ad_created_ts"] > config.start_ts:
                    new_ad_impressions += 1
                if truth["clicked"]:
                    clicked += 1
                    cvr_sum += truth["cvr"]
                    if multi:
                        for name, tc in truth["conversions"].items():
                            sums, delays, report_delays = by_type[name]
                            sums[0] += tc["cvr"]
                            if tc["converted"]:
                                sums[1] += 1
                                delays.append(tc["conversion_ts"] - truth["click_ts"])
                                report_delays.append(
                                    tc["conversion_reported_ts"] - truth["click_ts"])
                    if truth["click_ts"] - truth["ts"] <= CLICK_WINDOW_S:
                        clicked_in_window += 1
                if len(tr_buf) >= WRITE_CHUNK:
                    tr_f.write(b"".join(tr_buf))
                    tr_buf.clear()
            if len(ev_buf) >= WRITE_CHUNK:
                ev_f.write(b"".join(ev_buf))
                ev_buf.clear()
        ev_f.write(b"".join(ev_buf))
        tr_f.write(b"".join(tr_buf))
    n = counts["impression"]
    summary: dict[str, Any] = {
        "seed": config.seed,
        "impressions": n,
        "clicks": counts["click"],
        "conversions": counts["conversion"],
        "requests": requests,
        "mean_true_ctr": ctr_sum / n if n else math.nan,
        "click_rate": clicked / n if n else math.nan,
        "click_rate_within_window": clicked_in_window / n if n else math.nan,
        "click_window_s": CLICK_WINDOW_S,
        "mean_true_cvr_of_clicks": cvr_sum / clicked if clicked else math.nan,
        "conversion_rate_of_clicks": counts["conversion"] / clicked if clicked else math.nan,
        "bursty_advertisers": sum(p.reporting == "bursty" for p in world.conversion_profiles),
        "ts_start": first_ts,
        "ts_end": last_ts,
        "span_s": last_ts - first_ts,
        "impression_span_s": last_imp_ts - first_ts,
        "ads_shown": len(ads_shown),
        # The world may have advanced past the last impression while sampling its batch.
        "new_ads": sum(config.start_ts < a.created_ts <= last_imp_ts for a in world.ads),
        "impressions_on_new_ads": new_ad_impressions,
    }
    if multi:
        summary["conversion_types"] = {
            name: {
                "conversions": int(sums[1]),
                "conversion_rate_of_clicks": sums[1] / clicked if clicked else math.nan,
                "mean_true_cvr_of_clicks": sums[0] / clicked if clicked else math.nan,
                "median_delay_s": float(np.median(delays)) if delays else math.nan,
                "median_report_delay_s": (float(np.median(report_delays)) if report_delays
                                          else math.nan),
            }
            for name, (sums, delays, report_delays) in by_type.items()
        }
    return summary
