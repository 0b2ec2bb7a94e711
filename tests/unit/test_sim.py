"""The simulated ad world: determinism, the event contract, and a truth worth learning."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from ctrloop.core.metrics import auc
from ctrloop.sim.stream import generate, uniform_policy, write_files
from ctrloop.sim.world import World, WorldConfig, feature_table

N = 30_000
IMPRESSION_FIELDS = {
    "impression_id", "ts", "user_id", "ad_id", "advertiser_id", "features", "position",
    "propensity",
}
TRUTH_FIELDS = {
    "impression_id", "ts", "ad_id", "advertiser_id", "ad_created_ts", "ctr", "clicked",
    "click_ts", "cvr", "converted", "conversion_ts", "conversion_reported_ts", "reporting",
}

Pairs = list[tuple[dict[str, Any], dict[str, Any] | None]]


@pytest.fixture(scope="module")
def stream() -> Pairs:
    return list(generate(WorldConfig(seed=7), N))


def impressions(pairs: Pairs) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(e, t) for e, t in pairs if t is not None]


def check_id(value: Any) -> None:
    assert isinstance(value, str) and 1 <= len(value) <= 128


def check_impression(e: dict[str, Any]) -> None:
    """The rules of docs/events.md for an impression."""
    assert set(e) == IMPRESSION_FIELDS
    for key in ("impression_id", "user_id", "ad_id", "advertiser_id"):
        check_id(e[key])
    assert isinstance(e["ts"], float) and 946684800 <= e["ts"] <= 4102444800
    feats = e["features"]
    assert isinstance(feats, dict) and len(feats) <= 256
    for name, value in feats.items():
        assert 1 <= len(name) <= 128
        if isinstance(value, str):
            assert len(value) <= 1024
        else:
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert math.isfinite(value) and abs(value) <= 1e12
    assert isinstance(e["position"], int) and 0 <= e["position"] <= 10000
    assert isinstance(e["propensity"], float) and 0 < e["propensity"] <= 1


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    def run(seed: int, name: str) -> tuple[bytes, bytes, dict[str, Any]]:
        ev, tr = tmp_path / f"{name}.events.jsonl", tmp_path / f"{name}.truth.jsonl"
        summary = write_files(WorldConfig(seed=seed), 15_000, ev, tr)
        return ev.read_bytes(), tr.read_bytes(), summary

    a, b, c = run(3, "a"), run(3, "b"), run(4, "c")
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    summary = a[2]
    assert summary["impressions"] == 15_000
    lines = [orjson.loads(line) for line in a[0].splitlines()]
    assert sum(d["type"] == "impression" for d in lines) == 15_000
    assert sum(d["type"] == "click" for d in lines) == summary["clicks"] > 0
    assert all(d["type"] in {"impression", "click", "conversion"} for d in lines)
    ts = [d["ts"] for d in lines]
    assert ts == sorted(ts)
    truths = [orjson.loads(line) for line in a[1].splitlines()]
    assert len(truths) == 15_000 and all(set(t) == TRUTH_FIELDS for t in truths)
    assert summary["click_rate"] == pytest.approx(summary["clicks"] / 15_000)


def test_events_ordered_and_follow_the_contract(stream: Pairs) -> None:
    ts = [e["ts"] for e, _ in stream]
    assert ts == sorted(ts)
    names = [name for name, _, _ in feature_table(WorldConfig())]
    assert len(names) >= 12
    ids = set()
    for e, truth in impressions(stream):
        check_impression(e)
        assert re.fullmatch(r"r\d+-[1-3]", e["impression_id"])
        assert e["impression_id"].endswith(f"-{e['position']}")
        ids.add(e["impression_id"])
        assert list(e["features"]) == names  # no ids in features: the encoder adds them
        assert set(truth) == TRUTH_FIELDS
        assert truth["impression_id"] == e["impression_id"] and truth["ts"] == e["ts"]
        assert truth["ad_id"] == e["ad_id"] and truth["advertiser_id"] == e["advertiser_id"]
        assert 0 < truth["ctr"] < 1
        assert 0 < truth["cvr"] < 1  # conversions: tests/unit/test_conversions_sim.py
    assert len(ids) == N


def test_feature_kinds_match_the_table(stream: Pairs) -> None:
    cfg = WorldConfig()
    seen: dict[str, set[Any]] = {}
    for e, _ in impressions(stream):
        for name, value in e["features"].items():
            seen.setdefault(name, set()).add(value)
    for name, kind, card in feature_table(cfg):
        if kind == "numeric":
            assert all(isinstance(v, int | float) for v in seen[name])
        else:
            assert card is not None and all(isinstance(v, str) for v in seen[name])
            assert 1 < len(seen[name]) <= card
    assert len(seen["ctx.site"]) > 100  # the high-cardinality one really is


def test_clicks_follow_their_impression(stream: Pairs) -> None:
    shown: dict[str, float] = {}
    eventual = {t["impression_id"]: t["click_ts"] for _, t in impressions(stream) if t["clicked"]}
    clicked = set()
    for e, truth in stream:
        if truth is not None:
            shown[e["impression_id"]] = e["ts"]
            continue
        if "conversion_type" in e:
            continue  # tests/unit/test_conversions_sim.py
        assert set(e) == {"impression_id", "ts"}
        iid = e["impression_id"]
        assert iid in shown and shown[iid] < e["ts"]
        assert eventual[iid] == e["ts"] and iid not in clicked
        clicked.add(iid)
    assert clicked == set(eventual)
    delays = np.array([eventual[i] - shown[i] for i in clicked])
    assert 10 < np.median(delays) < 40
    assert 0 < np.mean(delays > 900) < 0.05  # a small tail beyond the click window


def test_click_rate_is_realistic_and_calibrated(stream: Pairs) -> None:
    truths = [t for _, t in impressions(stream)]
    mean_ctr = float(np.mean([t["ctr"] for t in truths]))
    rate = float(np.mean([t["clicked"] for t in truths]))
    assert 0.01 < rate < 0.05
    assert abs(rate - mean_ctr) < 4 * math.sqrt(mean_ctr * (1 - mean_ctr) / len(truths))


def test_propensity_is_one_over_candidates() -> None:
    cfg = WorldConfig(seed=1)
    allowed = {1.0 / k for k in range(cfg.candidates_min, cfg.candidates_max + 1)}
    props = [e["propensity"] for e, t in generate(cfg, 3000) if t is not None]
    assert set(props) <= allowed and len(set(props)) > 3


def test_new_ads_appear_over_the_stream() -> None:
    cfg = WorldConfig(seed=2, ad_churn_per_hour=3.0)
    truths = [t for _, t in generate(cfg, 20_000) if t is not None]
    new = [t for t in truths if t["ad_created_ts"] > cfg.start_ts]
    assert len({t["ad_id"] for t in new}) >= 10
    # A new ad is never shown before it exists, and its index is past the initial pool.
    assert all(t["ad_created_ts"] <= t["ts"] for t in new)
    assert all(int(t["ad_id"][1:]) >= cfg.ad_pool_size for t in new)


def test_true_ctr_rewards_learning_interactions() -> None:
    """Oracle AUC is high, and the oracle without its interaction term is clearly worse."""
    world = World(WorldConfig(seed=5))
    cfg = world.config
    policy = np.random.default_rng(1)
    clicks = np.random.default_rng(2)
    ts = cfg.start_ts + np.arange(25_000) * 0.005
    batch = world.sample_batch(ts)
    rows, positions, ads = uniform_policy(policy, batch)
    terms = world.logit_terms_batch(batch, rows, ads)
    ctr = world.true_ctr_batch(batch, rows, ads, positions)
    y = (~np.isnan(world.sample_clicks(clicks, ctr, batch.ts[rows]))).astype(np.float64)
    examination = np.asarray(cfg.position_bias)[positions - 1]
    z = sum(terms.values())
    assert np.allclose(ctr, examination / (1 + np.exp(-z)))
    ablated = examination / (1 + np.exp(terms["interactions"] - z))
    assert y.size > 40_000
    assert auc(y, ctr) > 0.7
    assert auc(y, ctr) - auc(y, ablated) > 0.015


def test_request_api_matches_the_batch_api() -> None:
    world = World(WorldConfig(seed=9))
    batch = world.sample_batch(np.array([world.config.start_ts + 1.0, world.config.start_ts + 2.0]))
    request = world.request_at(batch, 1)
    assert request.request_id == int(batch.request_ids[1])
    assert len(request.candidates) == int(batch.n_candidates[1]) >= world.config.candidates_min
    assert len({a.id for a in request.candidates}) == len(request.candidates)
    ads = np.array([a.index for a in request.candidates[:3]], np.int64)
    rows = np.ones(3, np.int64)
    positions = np.array([1, 2, 3], np.int64)
    batch_ctr = world.true_ctr_batch(batch, rows, ads, positions)
    for j, ad in enumerate(request.candidates[:3]):
        assert world.true_ctr(request, ad, j + 1) == pytest.approx(batch_ctr[j], rel=1e-12)
    assert set(request.features) | set(request.candidates[0].features) == {
        name for name, _, _ in feature_table(world.config)
    }
    with pytest.raises(ValueError):
        world.true_ctr(request, request.candidates[0], 4)
    convs = world.sample_conversions(np.random.default_rng(0), 0, request.candidates[0], 1.0)
    assert all(c.ts >= c.occurred_ts >= 1.0 for c in convs if c.occurred_ts is not None)


def test_live_request_api() -> None:
    world = World(WorldConfig(seed=11, ad_churn_per_hour=20.0))
    rng = np.random.default_rng(0)
    start = world.config.start_ts
    first = world.sample_request(start + 1.0)
    later = world.sample_request(start + 600.0)  # ~170 ads replaced in between
    assert later.request_id == first.request_id + 1 and later.ts == start + 600.0
    assert world.n_new_ads > 100
    assert set(a.index for a in later.candidates) <= set(a.index for a in world.active_ads())
    assert later.user_id == f"u{later.user_index}"
    ad = later.candidates[0]
    assert world.ads[ad.index] is ad
    assert world.sample_click(rng, 0.0, later.ts) is None
    click_ts = world.sample_click(rng, 1.0, later.ts)
    assert click_ts is not None and click_ts >= later.ts + world.config.click_delay_min_s - 1e-3


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        WorldConfig(slot_probs=(0.5, 0.4))
    with pytest.raises(ValueError):
        WorldConfig(position_bias=(1.0, 0.7))
    with pytest.raises(ValueError):
        WorldConfig(candidates_min=2)
    with pytest.raises(ValueError):
        WorldConfig(base_ctr=0.0)
