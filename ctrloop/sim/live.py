"""Live simulated traffic through a running scoring service, in wall-clock time.

`LiveDriver` plays the simulator's users against `/v1/score` at a steady rate: each request's
eligible ads go to the service, the service ranks them and logs the top `n_slots` as
impressions, and the driver decides — with the world's true CTR of each shown ad at its
position — whether and when the user clicks. Clicks (and whatever conversions the world draws
for them) are posted to `/v1/events` when their time comes, so the trainer sees the same
stream a production service would, delays included. A click may lead to several conversions,
one per conversion type of the world's `conversion_mix` (`DriverConfig.conversion_mix`); each
is posted with its `conversion_type`.

Because the truth behind every impression is known, the driver can say how good the served
ranking is, not just how many clicks it got: per time bucket it tracks the *expected* CTR of
what was served (mean true CTR of the shown ads at their positions: the realised CTR without
its Bernoulli noise), the oracle's (the best ads by true CTR in the best order) and a random
ordering's. The served pCTR of the last impressions is kept with the truth for AUCs.

Events are never dropped: a 503 or a connection error puts the batch back for a retry after
`Retry-After`; only a 4xx (a bug: the service says the event is invalid) is counted and given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import orjson

from ctrloop.core.evaluate import calibration_bins
from ctrloop.core.metrics import auc
from ctrloop.sim.world import (
    CONVERSION_MIXES,
    Ad,
    Request,
    RequestBatch,
    World,
    WorldConfig,
    seed_sequence,
)

log = logging.getLogger(__name__)

# Disjoint from the World's and the offline stream's seed streams; conversions have their own,
# so that a change in the conversion model does not move any click.
SEED_LIVE_CLICKS = 200
SEED_LIVE_CONVERSIONS = 201
MAX_EVENTS_PER_POST = 500  # under the service's default CTRLOOP_MAX_EVENTS of 1000
LATENCY_WINDOW = 5000


# ---------------------------------------------------------------------------- CTR math (pure)

def oracle_ctr_sum(base_ctr: np.ndarray, position_bias: Sequence[float], n: int) -> float:
    """Expected clicks if the `n` ads with the highest true CTR fill positions 1..n in order.

    `base_ctr` is each candidate's true CTR at position 1. The world's CTR is base × a position
    factor that falls with the position, so sorting by base CTR is the best assignment
    (rearrangement inequality).
    """
    top = np.sort(np.asarray(base_ctr, np.float64))[::-1][:n]
    return float(np.dot(top, np.asarray(position_bias[: top.shape[0]], np.float64)))


def random_ctr_sum(base_ctr: np.ndarray, position_bias: Sequence[float], n: int) -> float:
    """Expected clicks of a uniformly random ordering shown in positions 1..n.

    Every candidate is equally likely at every position, so each position gets the mean.
    """
    base = np.asarray(base_ctr, np.float64)
    n = min(n, base.shape[0])
    return float(base.mean() * np.sum(np.asarray(position_bias[:n], np.float64)))


def expected_auc(scores: np.ndarray, probs: np.ndarray) -> float:
    """AUC of `scores` against labels drawn as Bernoulli(`probs`), without the draw's noise.

    Every ordered pair (i, j), i != j, counts with weight probs[i] * (1 - probs[j]) (i the
    positive, j the negative); ties count half. With 0/1 `probs` it is the ordinary AUC.
    NaN when no pair has weight.
    """
    s = np.asarray(scores, np.float64)
    p = np.asarray(probs, np.float64)
    if s.shape != p.shape:
        raise ValueError("scores and probs must have the same shape")
    q = 1.0 - p
    _, group = np.unique(s, return_inverse=True)
    neg_in_group = np.bincount(group, weights=q)
    # Negative weight strictly below each tie group, by cumulative sum over sorted groups.
    below = np.concatenate(([0.0], np.cumsum(neg_in_group)[:-1]))
    # Pairs inside a tie group exclude the item itself (i != j).
    wins = p * (below[group] + 0.5 * (neg_in_group[group] - q))
    total = p * (q.sum() - q)
    denom = float(total.sum())
    return float(wins.sum() / denom) if denom > 0 else float("nan")


def expected_logloss(pred: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean log loss of `pred` against labels drawn as Bernoulli(`probs`), without the
    draw's noise: -mean(p log q + (1 - p) log(1 - q)). NaN when empty."""
    q = np.clip(np.asarray(pred, np.float64), eps, 1.0 - eps)
    p = np.asarray(probs, np.float64)
    if q.size == 0:
        return float("nan")
    return float(-np.mean(p * np.log(q) + (1.0 - p) * np.log1p(-q)))


def percentile_ms(values: Sequence[float], q: float) -> float:
    """The q-th percentile of seconds, in milliseconds; NaN when empty."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, np.float64), q) * 1000.0)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


# ---------------------------------------------------------------------------- stats

@dataclass
class Bucket:
    """What was served in one time bucket, by impression time."""

    start_s: float  # seconds since the driver started
    requests: int = 0
    impressions: int = 0
    clicks_drawn: int = 0  # clicks the world decided on (some still in the future)
    clicks_arrived: int = 0  # clicks accepted by /v1/events so far
    expected_sum: float = 0.0
    oracle_sum: float = 0.0
    random_sum: float = 0.0
    pctr_sum: float = 0.0
    explored: int = 0  # requests the service ranked by a posterior sample
    explore_cost_sum: float = 0.0  # their `exploration.cost` (value given up vs greedy)
    versions: Counter[str] = field(default_factory=Counter)  # impressions per model version
    statuses: Counter[str] = field(default_factory=Counter)  # impressions per model status

    def as_dict(self) -> dict[str, Any]:
        n = self.impressions
        return {
            "start_s": self.start_s, "requests": self.requests, "impressions": n,
            "clicks_drawn": self.clicks_drawn, "clicks_arrived": self.clicks_arrived,
            "realised_ctr": _ratio(self.clicks_arrived, n),
            "eventual_ctr": _ratio(self.clicks_drawn, n),
            "expected_ctr": _ratio(self.expected_sum, n),
            "oracle_ctr": _ratio(self.oracle_sum, n),
            "random_ctr": _ratio(self.random_sum, n),
            "mean_pctr": _ratio(self.pctr_sum, n),
            "explored_share": _ratio(self.explored, self.requests),
            "explore_cost": _ratio(self.explore_cost_sum, self.explored),
            "versions": dict(self.versions), "statuses": dict(self.statuses),
        }


@dataclass(frozen=True, slots=True)
class Served:
    """One shown impression with its truth, for AUCs of the served model."""

    ts: float  # impression time
    pctr: float
    true_ctr: float  # at the position it was shown in
    base_ctr: float  # at position 1: the ad's appeal without the position's
    clicked: bool
    status: str
    version: str


@dataclass
class DriverStats:
    """Counters of a LiveDriver; `snapshot()` is what callers print or save."""

    started_at: float  # wall clock
    bucket_s: float = 10.0
    keep_last: int = 20_000
    requests: int = 0
    impressions: int = 0
    clicks_drawn: int = 0
    clicks_sent: int = 0
    conversions_drawn: int = 0
    conversions_sent: int = 0
    conversions_drawn_by_type: Counter[str] = field(default_factory=Counter)
    event_posts: int = 0
    event_retries: int = 0
    events_rejected: int = 0
    impressions_unlogged: int = 0  # shown but not logged (Kafka down): their clicks are lost
    in_flight: int = 0
    score_errors: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    buckets: dict[int, Bucket] = field(default_factory=dict)
    recent: deque[Served] = field(init=False)
    first_trained_at: float | None = None  # impression time of the first non-prior score

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.keep_last)

    def bucket(self, ts: float) -> Bucket:
        k = max(0, int((ts - self.started_at) // self.bucket_s))
        b = self.buckets.get(k)
        if b is None:
            b = self.buckets[k] = Bucket(start_s=k * self.bucket_s)
        return b

    def record_request(self, ts: float, served: Sequence[Served], oracle_sum: float,
                       random_sum: float, latency_s: float, explore_cost: float | None = None
                       ) -> None:
        """One scored request: its shown impressions, and what oracle/random would get;
        `explore_cost` is given when the service explored (its reported cost, 0 if none)."""
        b = self.bucket(ts)
        b.requests += 1
        if explore_cost is not None:
            b.explored += 1
            b.explore_cost_sum += explore_cost
        self.requests += 1
        self.latencies.append(latency_s)
        b.oracle_sum += oracle_sum
        b.random_sum += random_sum
        if self.first_trained_at is None and served and served[0].status != "prior":
            self.first_trained_at = ts
        for s in served:
            self.impressions += 1
            b.impressions += 1
            b.expected_sum += s.true_ctr
            b.pctr_sum += s.pctr
            b.versions[s.version] += 1
            b.statuses[s.status] += 1
            if s.clicked:
                self.clicks_drawn += 1
                b.clicks_drawn += 1
            self.recent.append(s)

    def record_click_arrived(self, impression_ts: float) -> None:
        self.clicks_sent += 1
        self.bucket(impression_ts).clicks_arrived += 1

    def timeline(self) -> list[dict[str, Any]]:
        return [self.buckets[k].as_dict() for k in sorted(self.buckets)]

    def totals(self) -> dict[str, float]:
        """CTR figures over every impression so far."""
        bs = self.buckets.values()
        n = sum(b.impressions for b in bs)
        return {
            "realised_ctr": _ratio(sum(b.clicks_arrived for b in bs), n),
            "expected_ctr": _ratio(sum(b.expected_sum for b in bs), n),
            "oracle_ctr": _ratio(sum(b.oracle_sum for b in bs), n),
            "random_ctr": _ratio(sum(b.random_sum for b in bs), n),
        }

    def calibration(self, n_bins: int = 10,
                    statuses: Sequence[str] = ("trained", "pinned")) -> dict[str, Any]:
        """Reliability of the served pCTR over the kept impressions of a trained model:
        per pCTR quantile bin, the mean pCTR and the mean true CTR at the shown position
        (what the clicks will average to, without their noise)."""
        rows = [s for s in self.recent if s.status in statuses]
        pctr = np.fromiter((s.pctr for s in rows), np.float64, len(rows))
        true_ctr = np.fromiter((s.true_ctr for s in rows), np.float64, len(rows))
        return {"n": len(rows), "bins": calibration_bins(pctr, true_ctr, n_bins)}

    def served_auc(self, statuses: Sequence[str] = ("trained", "pinned"),
                   since: float | None = None) -> dict[str, Any]:
        """AUC of the served pCTR over the kept impressions scored by a model in `statuses`
        (and shown at `since` or later, wall clock, when given).

        `auc_clicks`: against the drawn clicks (noisy, and position helps: top ranks have
        higher pCTR and a higher examination rate). `auc_true_ctr`: the expected AUC against
        the true CTR at the shown position. `auc_ad_appeal`: against the CTR at position 1,
        the cleanest measure of the model's ranking, since pCTR does not know the position.
        """
        start = -math.inf if since is None else since
        rows = [s for s in self.recent if s.status in statuses and s.ts >= start]
        if not rows:
            return {"n": 0, "clicks": 0, "auc_clicks": math.nan, "auc_true_ctr": math.nan,
                    "auc_ad_appeal": math.nan, "oracle_auc_true_ctr": math.nan,
                    "logloss_true_ctr": math.nan, "oracle_logloss_true_ctr": math.nan,
                    "mean_pctr": math.nan, "mean_true_ctr": math.nan}
        pctr = np.fromiter((s.pctr for s in rows), np.float64, len(rows))
        clicked = np.fromiter((s.clicked for s in rows), np.float64, len(rows))
        true_ctr = np.fromiter((s.true_ctr for s in rows), np.float64, len(rows))
        base = np.fromiter((s.base_ctr for s in rows), np.float64, len(rows))
        return {"n": len(rows), "clicks": int(clicked.sum()), "auc_clicks": auc(clicked, pctr),
                "auc_true_ctr": expected_auc(pctr, true_ctr),
                "auc_ad_appeal": expected_auc(pctr, base),
                # The ceiling: the truth's own AUC (its position-1 CTR as the score).
                "oracle_auc_true_ctr": expected_auc(base, true_ctr),
                # Log loss against the true CTR (expected over the click draw); the truth's
                # own is the floor. Unlike the AUC it sees calibration.
                "logloss_true_ctr": expected_logloss(pctr, true_ctr),
                "oracle_logloss_true_ctr": expected_logloss(true_ctr, true_ctr),
                "mean_pctr": float(pctr.mean()), "mean_true_ctr": float(true_ctr.mean())}

    def served_auc_last(self, seconds: float) -> dict[str, Any]:
        """`served_auc` over the impressions of the last `seconds` of traffic."""
        if not self.recent:
            return self.served_auc()
        return self.served_auc(since=max(s.ts for s in self.recent) - seconds)

    def snapshot(self, now: float | None = None, pending_events: int = 0) -> dict[str, Any]:
        now = time.time() if now is None else now
        elapsed = max(now - self.started_at, 1e-9)
        lat = list(self.latencies)
        return {
            "elapsed_s": round(elapsed, 3),
            "requests": self.requests, "impressions": self.impressions,
            "clicks_drawn": self.clicks_drawn, "clicks_sent": self.clicks_sent,
            "conversions_drawn": self.conversions_drawn,
            "conversions_sent": self.conversions_sent,
            "conversions_drawn_by_type": dict(self.conversions_drawn_by_type),
            "events_sent": self.clicks_sent + self.conversions_sent,
            "pending_events": pending_events,
            "requests_per_s": self.requests / elapsed,
            "events_per_s": (self.clicks_sent + self.conversions_sent) / elapsed,
            "event_posts": self.event_posts, "event_retries": self.event_retries,
            "events_rejected": self.events_rejected,
            "impressions_unlogged": self.impressions_unlogged,
            "score_errors": dict(self.score_errors), "in_flight": self.in_flight,
            "latency_p50_ms": percentile_ms(lat, 50), "latency_p99_ms": percentile_ms(lat, 99),
            "first_trained_s": (None if self.first_trained_at is None
                                else round(self.first_trained_at - self.started_at, 3)),
            **self.totals(),
        }


def interval_rates(prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, float]:
    """Requests/s, impressions/s and events/s between two snapshots."""
    dt = cur["elapsed_s"] - prev["elapsed_s"]
    if dt <= 0:
        return {"requests_per_s": math.nan, "impressions_per_s": math.nan,
                "events_per_s": math.nan}
    return {"requests_per_s": (cur["requests"] - prev["requests"]) / dt,
            "impressions_per_s": (cur["impressions"] - prev["impressions"]) / dt,
            "events_per_s": (cur["events_sent"] - prev["events_sent"]) / dt}


def _aggregate(buckets: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = sum(b["impressions"] for b in buckets)

    def mean(key: str) -> float:
        return _ratio(sum(b[key] * b["impressions"] for b in buckets if b["impressions"]), n)

    return {"buckets": [b["start_s"] for b in buckets], "impressions": n,
            "expected_ctr": mean("expected_ctr"), "eventual_ctr": mean("eventual_ctr"),
            "oracle_ctr": mean("oracle_ctr"), "random_ctr": mean("random_ctr")}


def _share(bucket: dict[str, Any], statuses: Sequence[str]) -> float:
    n = bucket["impressions"]
    return _ratio(sum(bucket["statuses"].get(s, 0) for s in statuses), n) if n else 0.0


def ctr_lift(timeline: Sequence[dict[str, Any]], last: int = 3,
             min_share: float = 0.9) -> dict[str, Any]:
    """Expected CTR served by the prior vs by trained models at the end of `timeline`.

    "prior": every bucket at least `min_share` served by the prior; "trained": the last `last`
    buckets at least `min_share` served by a trained (or pinned) model, leaving out a final
    bucket cut short by the stop. Expected CTR, not realised: the same comparison without
    the click draws' noise (and without the clicks still to come).
    """
    sizes = sorted(b["impressions"] for b in timeline)
    full = [b for b in timeline if sizes and b["impressions"] >= 0.5 * sizes[len(sizes) // 2]]
    prior = [b for b in full if _share(b, ("prior",)) >= min_share]
    trained = [b for b in full if _share(b, ("trained", "pinned")) >= min_share][-last:]
    out: dict[str, Any] = {"prior": _aggregate(prior), "trained": _aggregate(trained)}
    before, after = out["prior"]["expected_ctr"], out["trained"]["expected_ctr"]
    out["expected_lift"] = _ratio(after, before) - 1.0
    out["rose"] = bool(prior and trained and after > before)
    return out


# ---------------------------------------------------------------------------- the driver

@dataclass(order=True)
class _Due:
    ts: float
    seq: int
    event: dict[str, Any] = field(compare=False)
    impression_ts: float = field(compare=False)


@dataclass(frozen=True)
class DriverConfig:
    rate: float = 40.0  # requests per second
    seed: int = 0
    max_in_flight: int = 16
    batch_interval_s: float = 0.15
    bucket_s: float = 10.0
    keep_last: int = 20_000
    timeout_s: float = 10.0
    drain_timeout_s: float = 10.0  # at stop: how long to keep trying to deliver due events
    max_retry_wait_s: float = 30.0
    # Ask for Thompson-sampled rankings (the service decides: global switch, caps, a model
    # with a posterior); the logged impressions then carry the propensities `ctrloop ope` needs.
    explore: bool = True
    # The world's conversion types (a key of CONVERSION_MIXES), when the driver builds the
    # world itself (no `world_config` given).
    conversion_mix: str = "single"

    def __post_init__(self) -> None:
        # `not 0 < x` also refuses NaN, which passes every comparison the other way round.
        if not 0 < self.rate <= 10_000:
            raise ValueError("--rate must be in (0, 10000] requests per second")
        if not 0 <= self.seed < 2**63:
            raise ValueError("--seed must be in 0..2**63-1 (a numpy seed)")
        if self.max_in_flight < 1 or self.bucket_s <= 0 or self.batch_interval_s <= 0:
            raise ValueError("max_in_flight >= 1, bucket_s > 0 and batch_interval_s > 0")
        if self.conversion_mix not in CONVERSION_MIXES:
            raise ValueError(f"conversion_mix must be one of {sorted(CONVERSION_MIXES)}")


class LiveDriver:
    """Drives `url` (a running scoring service) with the world's traffic until stopped.

        driver = LiveDriver("http://127.0.0.1:8000", DriverConfig(rate=40))
        await driver.run(duration=60)
        print(driver.snapshot(), driver.stats.served_auc())
    """

    def __init__(self, url: str, config: DriverConfig | None = None, *,
                 world_config: WorldConfig | None = None,
                 client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url.rstrip("/")
        self.config = cfg = config or DriverConfig()
        self._clock = clock
        start = clock()
        self.world = World(world_config or WorldConfig(seed=cfg.seed, start_ts=start,
                                                       conversion_mix=cfg.conversion_mix))
        self.stats = DriverStats(started_at=start, bucket_s=cfg.bucket_s,
                                 keep_last=cfg.keep_last)
        self._rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_LIVE_CLICKS))
        self._conv_rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_LIVE_CONVERSIONS))
        self._position_bias = tuple(self.world.config.position_bias)
        self._client = client
        self._own_client = client is None
        self._due: list[_Due] = []
        self._seq = 0
        self._delivering = 0  # events of the batch being posted (popped from _due)
        self._last_ts = start
        self._stop = asyncio.Event()
        self._producing_done = False

    # -- public -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(self._clock(), pending_events=self.pending_events)

    @property
    def pending_events(self) -> int:
        """Clicks and conversions drawn but not yet accepted by the service."""
        return len(self._due) + self._delivering

    async def run(self, duration: float | None = None) -> DriverStats:
        """Send traffic until `duration` seconds pass or `request_stop()`, then drain."""
        cfg = self.config
        if self._client is None:
            # Idle connections expire well before uvicorn's 5 s keep-alive: at equal timeouts
            # a reused connection can be closed by the server mid-request (a ReadError).
            limits = httpx.Limits(max_connections=cfg.max_in_flight + 2,
                                  max_keepalive_connections=cfg.max_in_flight + 2,
                                  keepalive_expiry=2.0)
            self._client = httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits)
        try:
            events = asyncio.create_task(self._events_loop(), name="live-events")
            try:
                await self._requests_loop(duration)
            finally:
                self._producing_done = True
                await self._drain(events)
        finally:
            if self._own_client:
                await self._client.aclose()
                self._client = None
        return self.stats

    # -- requests -----------------------------------------------------------------------

    async def _requests_loop(self, duration: float | None) -> None:
        cfg = self.config
        sem = asyncio.Semaphore(cfg.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        t_end = math.inf if duration is None else time.monotonic() + duration
        next_t = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() < t_end:
                await sem.acquire()  # a slow service slows the driver instead of piling up
                task = asyncio.create_task(self._score_one(sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_t += 1.0 / cfg.rate
                now = time.monotonic()
                if next_t < now - 1.0:
                    next_t = now  # fell behind (a stall): resume the rate, do not burst
                await self._sleep_or_stop(min(next_t, t_end) - now)
        finally:
            if tasks:
                await asyncio.wait(tasks, timeout=cfg.timeout_s + 1.0)

    async def _sleep_or_stop(self, seconds: float) -> None:
        if seconds < 0.5:
            # The usual gap between requests: a plain sleep costs far less than wait_for's
            # task, and a stop is still seen within one gap.
            await asyncio.sleep(max(seconds, 0.0))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _sample(self) -> tuple[Request, RequestBatch, np.ndarray]:
        # The world needs non-decreasing time; the wall clock may step back (NTP).
        ts = max(self._last_ts, self._clock())
        self._last_ts = ts
        batch = self.world.sample_batch(np.asarray([ts], np.float64))
        request = self.world.request_at(batch, 0)
        ads = np.asarray([a.index for a in request.candidates], np.int64)
        ones = np.ones(ads.shape[0], np.int64)
        base = self.world.true_ctr_batch(batch, np.zeros_like(ads), ads, ones)
        return request, batch, base

    async def _score_one(self, sem: asyncio.Semaphore) -> None:
        stats = self.stats
        stats.in_flight += 1
        try:
            request, _, base = self._sample()
            body = orjson.dumps(score_body(request, self.config.explore))
            t0 = time.perf_counter()
            try:
                assert self._client is not None
                resp = await self._client.post(f"{self.url}/v1/score", content=body,
                                               headers={"content-type": "application/json"})
            except httpx.HTTPError as e:
                stats.score_errors[type(e).__name__] += 1
                return
            latency = time.perf_counter() - t0
            if resp.status_code != 200:
                stats.score_errors[str(resp.status_code)] += 1
                if stats.score_errors[str(resp.status_code)] <= 3:
                    log.warning("/v1/score answered %d: %s", resp.status_code, resp.text[:500])
                return
            self._on_scored(request, base, orjson.loads(resp.content), latency)
        finally:
            stats.in_flight -= 1
            sem.release()

    def _on_scored(self, request: Request, base: np.ndarray, answer: dict[str, Any],
                   latency: float) -> None:
        index = {ad.id: j for j, ad in enumerate(request.candidates)}
        version, status = str(answer["model_version"]), str(answer["model_status"])
        served: list[Served] = []
        for c in answer["candidates"][: request.n_slots]:
            j = index[c["ad_id"]]
            ad = request.candidates[j]
            ctr = float(base[j]) * self._position_bias[int(c["rank"]) - 1]
            click_ts = self.world.sample_click(self._rng, ctr, request.ts)
            served.append(Served(request.ts, float(c["pctr"]), ctr, float(base[j]),
                                 click_ts is not None, status, version))
            if click_ts is not None and c.get("impression_id"):
                self._schedule_click(request, ad, str(c["impression_id"]), click_ts)
        n = len(served)
        if not answer.get("logged", True):
            self.stats.impressions_unlogged += n
        cost = None
        if answer.get("explored"):
            cost = float((answer.get("exploration") or {}).get("cost") or 0.0)
        self.stats.record_request(
            request.ts, served, oracle_ctr_sum(base, self._position_bias, n),
            random_ctr_sum(base, self._position_bias, n), latency, explore_cost=cost)

    def _schedule_click(self, request: Request, ad: Ad, impression_id: str,
                        click_ts: float) -> None:
        self._push({"type": "click", "impression_id": impression_id, "ts": click_ts},
                   request.ts)
        for conv in self.world.sample_conversions(self._conv_rng, request.user_index, ad, click_ts):
            self.stats.conversions_drawn += 1
            self.stats.conversions_drawn_by_type[conv.conversion_type] += 1
            self._push({"type": "conversion", "impression_id": impression_id, "ts": conv.ts,
                        "conversion_type": conv.conversion_type}, request.ts)

    def _push(self, event: dict[str, Any], impression_ts: float) -> None:
        self._seq += 1
        heapq.heappush(self._due, _Due(float(event["ts"]), self._seq, event, impression_ts))

    # -- events -------------------------------------------------------------------------

    def _pop_due(self, now: float) -> list[_Due]:
        out: list[_Due] = []
        while self._due and self._due[0].ts <= now and len(out) < MAX_EVENTS_PER_POST:
            out.append(heapq.heappop(self._due))
        return out

    async def _events_loop(self) -> None:
        while True:
            batch = self._pop_due(self._clock())
            if batch:
                await self._deliver(batch)
                if len(batch) == MAX_EVENTS_PER_POST:
                    continue  # a backlog: post the next batch right away
            elif self._producing_done:
                return
            await asyncio.sleep(self.config.batch_interval_s)

    async def _deliver(self, batch: list[_Due]) -> None:
        """Post until accepted; 503 and connection errors are retried, never dropped."""
        body = orjson.dumps({"events": [d.event for d in batch]})
        self._delivering = len(batch)
        try:
            while True:
                outcome = await self._post_events(body)
                if not isinstance(outcome, float):
                    break
                self.stats.event_retries += 1
                await asyncio.sleep(outcome)
        finally:
            self._delivering = 0
        if outcome == "rejected":
            self.stats.events_rejected += len(batch)
            return
        for d in batch:
            if d.event["type"] == "click":
                self.stats.record_click_arrived(d.impression_ts)
            else:
                self.stats.conversions_sent += 1

    async def _post_events(self, body: bytes) -> float | Literal["accepted", "rejected"]:
        """The batch's fate, or the seconds to wait before posting it again."""
        assert self._client is not None
        self.stats.event_posts += 1
        try:
            resp = await self._client.post(f"{self.url}/v1/events", content=body,
                                           headers={"content-type": "application/json"})
        except httpx.HTTPError as e:
            log.warning("posting events failed (%s: %s); retrying in 1 s", type(e).__name__, e)
            return 1.0
        if resp.status_code == 202:
            return "accepted"
        if resp.status_code >= 500:
            return retry_after(resp.headers.get("retry-after"), self.config.max_retry_wait_s)
        # A 4xx: the same bytes can never succeed. A bug in the driver or the service, so it
        # is logged loudly and counted rather than retried forever.
        log.error("/v1/events rejected a batch with %d: %s", resp.status_code, resp.text[:1000])
        return "rejected"

    async def _drain(self, events: asyncio.Task[None]) -> None:
        """Deliver what is due by now (bounded); clicks due later stay counted as pending."""
        try:
            await asyncio.wait_for(asyncio.shield(events), self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("stopped with events undelivered: the service did not accept them "
                        "within %.0f s", self.config.drain_timeout_s)
        finally:
            if not events.done():
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await events


def retry_after(header: str | None, cap: float) -> float:
    """Seconds to wait from a Retry-After header (seconds form), 1 s when absent or odd."""
    try:
        value = float(header) if header is not None else 1.0
    except ValueError:
        value = 1.0
    if not math.isfinite(value):
        value = 1.0
    return min(max(value, 0.1), cap)


def score_body(request: Request, explore: bool = False) -> dict[str, Any]:
    """The /v1/score body for a simulated request: show and log the top n_slots."""
    return {
        "request_id": f"sim{request.request_id}",
        "user_id": request.user_id,
        "ts": request.ts,  # impression time = the world's time, so click delays line up
        "features": request.features,
        "candidates": [{"ad_id": ad.id, "advertiser_id": ad.advertiser_id,
                        "features": ad.features, "bid": ad.bid} for ad in request.candidates],
        "options": {"top_k": request.n_slots, "log": True, "explore": explore},
    }


Report = Callable[[dict[str, Any], dict[str, float]], Awaitable[None]]


async def run_with_reports(driver: LiveDriver, duration: float | None, interval_s: float,
                           report: Report) -> DriverStats:
    """`driver.run(duration)`, calling `report(snapshot, interval rates)` every interval."""

    async def reporter() -> None:
        prev = driver.snapshot()
        while True:
            await asyncio.sleep(interval_s)
            cur = driver.snapshot()
            await report(cur, interval_rates(prev, cur))
            prev = cur

    task = asyncio.create_task(reporter(), name="live-reports")
    try:
        return await driver.run(duration)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def stop_on_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Within a running loop: SIGINT and SIGTERM call `callback` (a graceful stop) instead of
    raising in whatever code happens to run."""
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        loop.add_signal_handler(sig, callback)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
            # remove_signal_handler leaves the default; the caller's handler comes back.
            if old[sig] is not None:
                signal.signal(sig, old[sig])
