"""Conversion types: "single" is the world from before types, "funnel" two correlated tasks."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ctrloop.cli import main
from ctrloop.sim.live import DriverConfig, LiveDriver
from ctrloop.sim.stream import generate, write_files
from ctrloop.sim.world import CONVERSION_MIXES, ConversionType, World, WorldConfig

# The config of test_conversions_sim.py: many conversions and bursty uploads in a short stream.
FAST = dict(seed=5, impressions_per_second=20.0, base_ctr=0.2, base_cvr=0.3,
            conversion_delay_median_min_s=60.0, conversion_delay_median_max_s=1800.0,
            burst_gap_min_s=1800.0, burst_gap_max_s=7200.0, bursty_share=0.4)
# Recorded with the code from before conversion types existed: "single" must not move a byte.
SINGLE_FILES_SHA256 = "c304187872bb11356c1c711dd16846a3"
SINGLE_SAMPLES_SHA256 = "40518f667fe44ca7c49aed82db764b88"

FUNNEL = dict(seed=5, impressions_per_second=20.0, base_ctr=0.2, bursty_share=0.5,
              conversion_mix="funnel")
N = 60_000

Pairs = list[tuple[dict[str, Any], dict[str, Any] | None]]


@pytest.fixture(scope="module")
def funnel() -> Pairs:
    return list(generate(WorldConfig(**FUNNEL), N))


def _truth(pairs: Pairs) -> dict[str, dict[str, Any]]:
    return {t["impression_id"]: t for _, t in pairs if t is not None}


def _conversions(pairs: Pairs) -> list[dict[str, Any]]:
    return [e for e, t in pairs if t is None and "conversion_type" in e]


# ---------------------------------------------------------------------------- single

def test_single_mix_files_are_byte_identical(tmp_path: Path) -> None:
    summary = write_files(WorldConfig(**FAST), 4000, tmp_path / "e", tmp_path / "t")
    h = hashlib.sha256((tmp_path / "e").read_bytes() + (tmp_path / "t").read_bytes())
    assert h.hexdigest()[:32] == SINGLE_FILES_SHA256
    assert (summary["clicks"], summary["conversions"]) == (876, 268)
    assert "conversion_types" not in summary
    assert b'"conversions"' not in (tmp_path / "t").read_bytes()


def test_single_mix_samples_are_unchanged() -> None:
    w = World(WorldConfig(seed=11))
    assert w.conversion_types == ("default",)
    rng = np.random.default_rng(1)
    convs = [w.sample_conversions(rng, i * 7 % 50000, w.ads[i % 1000], w.config.start_ts + i)
             for i in range(2000)]
    assert hashlib.sha256(repr(convs).encode()).hexdigest()[:32] == SINGLE_SAMPLES_SHA256
    users, ads = np.arange(500), np.arange(500)
    by_type = w.true_cvr_by_type_batch(users, ads)
    assert list(by_type) == ["default"]
    assert np.array_equal(by_type["default"], w.true_cvr_batch(users, ads))


def test_mixes_share_the_ctr_world() -> None:
    def imps_and_clicks(mix: str) -> list[dict[str, Any]]:
        cfg = WorldConfig(**{**FAST, "conversion_mix": mix})
        return [e for e, t in generate(cfg, 3000) if "conversion_type" not in e]

    assert imps_and_clicks("single") == imps_and_clicks("funnel")


# ---------------------------------------------------------------------------- funnel

def test_funnel_world_api() -> None:
    w = World(WorldConfig(seed=3, conversion_mix="funnel"))
    assert w.conversion_types == ("signup", "purchase")
    assert len(w.cvr_biases) == 2 and w.cvr_bias == w.cvr_biases[0]
    rng = np.random.default_rng(0)
    users = rng.integers(0, w.config.n_users, 20_000)
    ads = w.active_ads()
    ad_idx = np.asarray([ads[i].index for i in rng.integers(0, len(ads), 20_000)])
    rates = w.true_cvr_by_type_batch(users, ad_idx)
    assert np.array_equal(rates["signup"], w.true_cvr_batch(users, ad_idx))
    # Calibrated over (user, active ad) pairs to each type's base rate.
    assert rates["signup"].mean() == pytest.approx(0.10, rel=0.1)
    assert rates["purchase"].mean() == pytest.approx(0.02, rel=0.1)
    # Correlated (the shared part) but not the same (the type-specific part).
    logit = {k: np.log(v / (1 - v)) for k, v in rates.items()}
    corr = float(np.corrcoef(logit["signup"], logit["purchase"])[0, 1])
    assert 0.3 < corr < 0.95
    assert float(np.corrcoef(rates["signup"], rates["purchase"])[0, 1]) > 0.3
    # Per-advertiser delay medians in the types' own ranges; signups always streamed.
    signup, purchase = w.type_profiles
    assert all(120.0 <= p.delay_median_s <= 3600.0 for p in signup)
    assert all(3600.0 <= p.delay_median_s <= 2 * 86_400.0 for p in purchase)
    assert {p.reporting for p in signup} == {"streaming"}
    assert [p.reporting for p in purchase] == [p.reporting for p in w.conversion_profiles]


def test_funnel_types_appear_at_their_rates(funnel: Pairs) -> None:
    clicked = [t for t in _truth(funnel).values() if t["clicked"]]
    assert len(clicked) > 8000
    counts = Counter(c["conversion_type"] for c in _conversions(funnel))
    assert set(counts) == {"signup", "purchase"}
    for name, base, tol in (("signup", 0.10, 0.012), ("purchase", 0.02, 0.005)):
        true = np.mean([t["conversions"][name]["cvr"] for t in clicked])
        assert counts[name] / len(clicked) == pytest.approx(true, abs=tol)
        # Clicks lean to what users like, so their mean rate is near, not at, the base rate.
        assert true == pytest.approx(base, rel=0.35)


def test_funnel_truth_matches_the_conversion_events(funnel: Pairs) -> None:
    truth = _truth(funnel)
    clicks = {e["impression_id"]: e["ts"] for e, t in funnel
              if t is None and "conversion_type" not in e}
    seen: set[tuple[str, str]] = set()
    for c in _conversions(funnel):
        assert set(c) == {"impression_id", "ts", "conversion_type"}
        key = (c["impression_id"], c["conversion_type"])
        assert key not in seen  # at most one per type per click
        seen.add(key)
        t = truth[c["impression_id"]]
        tc = t["conversions"][c["conversion_type"]]
        assert t["clicked"] and tc["converted"]
        assert c["ts"] == tc["conversion_reported_ts"] >= tc["conversion_ts"] > clicks[
            c["impression_id"]]
    converted = {(i, name) for i, t in truth.items() for name, tc in t["conversions"].items()
                 if tc["converted"]}
    assert converted == seen
    both = sum(all(tc["converted"] for tc in t["conversions"].values()) for t in truth.values())
    assert both > 0  # independent given the click: a click can lead to both
    for t in truth.values():
        first = t["conversions"]["signup"]
        assert (t["cvr"], t["converted"], t["conversion_ts"], t["conversion_reported_ts"]) == (
            first["cvr"], first["converted"], first["conversion_ts"],
            first["conversion_reported_ts"])
        assert 0 < t["conversions"]["purchase"]["cvr"] < 1


def test_funnel_reporting_signups_fast_purchases_in_bursts(funnel: Pairs) -> None:
    truth = _truth(funnel)
    lags: dict[tuple[str, str], list[float]] = defaultdict(list)
    reports: dict[tuple[str, str], Counter[float]] = defaultdict(Counter)
    for c in _conversions(funnel):
        t = truth[c["impression_id"]]
        tc = t["conversions"][c["conversion_type"]]
        key = (t["reporting"], c["conversion_type"])
        lags[key].append(tc["conversion_reported_ts"] - tc["conversion_ts"])
        reports[key][c["ts"]] += 1
    bursty_signup = np.asarray(lags[("bursty", "signup")])
    assert bursty_signup.size > 100
    assert np.median(bursty_signup) < 120.0 and bursty_signup.max() < 1800.0
    bursty_purchase = np.asarray(lags[("bursty", "purchase")])
    assert bursty_purchase.size > 30 and np.median(bursty_purchase) > 3600.0
    shared = reports[("bursty", "purchase")]
    # Most bursty purchases arrive in an upload with other conversions...
    assert sum(n for n in shared.values() if n > 1) / sum(shared.values()) > 0.5
    # ... while streamed ones each come at their own time.
    streamed = reports[("streaming", "purchase")]
    assert sum(streamed.values()) / len(streamed) == pytest.approx(1.0, abs=0.05)


def test_funnel_delays(funnel: Pairs) -> None:
    truth = _truth(funnel)
    delays: dict[str, list[float]] = defaultdict(list)
    for t in truth.values():
        for name, tc in t["conversions"].items():
            if tc["converted"]:
                delays[name].append(tc["conversion_ts"] - t["click_ts"])
    assert np.median(delays["signup"]) < 3600.0 < np.median(delays["purchase"])
    assert max(delays["purchase"]) <= WorldConfig().conversion_horizon_s + 0.01


def test_funnel_is_deterministic(funnel: Pairs) -> None:
    again = list(generate(WorldConfig(**FUNNEL), 5000))
    assert again == list(generate(WorldConfig(**FUNNEL), 5000))
    # Up to its last impression, a shorter stream is the longer one's start (then it flushes).
    n = max(i for i, (_, t) in enumerate(again) if t is not None) + 1
    assert n > 5000 and again[:n] == funnel[:n]
    other = list(generate(WorldConfig(**{**FUNNEL, "seed": 6}), 5000))
    assert other[:100] != again[:100]


def test_sample_conversions_can_return_several() -> None:
    w = World(WorldConfig(seed=2, conversion_mix="funnel"))
    rng = np.random.default_rng(0)
    kinds = Counter()
    for i in range(20_000):
        convs = w.sample_conversions(rng, i % w.config.n_users, w.ads[i % 1000],
                                     w.config.start_ts + i)
        kinds[tuple(c.conversion_type for c in convs)] += 1
    assert set(kinds) == {(), ("signup",), ("purchase",), ("signup", "purchase")}


def test_funnel_summary_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events, truth = tmp_path / "e.jsonl", tmp_path / "t.jsonl"
    rc = main(["simulate", "--impressions", "3000", "--seed", "4", "--conversion-mix", "funnel",
               "--events-out", str(events), "--truth-out", str(truth)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    by_type = summary["conversion_types"]
    assert list(by_type) == ["signup", "purchase"]
    assert sum(v["conversions"] for v in by_type.values()) == summary["conversions"]
    types = Counter(json.loads(x).get("conversion_type") for x in events.read_bytes().splitlines())
    assert {k: by_type[k]["conversions"] for k in by_type} == {
        k: types[k] for k in by_type}
    first = json.loads(truth.read_bytes().splitlines()[0])
    assert set(first["conversions"]) == {"signup", "purchase"}


def test_driver_takes_the_mix() -> None:
    driver = LiveDriver("http://x", DriverConfig(seed=1, conversion_mix="funnel"))
    assert driver.world.conversion_types == ("signup", "purchase")
    assert LiveDriver("http://x").world.conversion_types == ("default",)
    with pytest.raises(ValueError):
        DriverConfig(conversion_mix="nope")


def test_mix_validation() -> None:
    assert set(CONVERSION_MIXES) >= {"single", "funnel"}
    with pytest.raises(ValueError):
        WorldConfig(conversion_mix="nope")
    with pytest.raises(ValueError):
        ConversionType("x", base_cvr=1.5)
    with pytest.raises(ValueError):
        ConversionType("x", delay_median_min_s=10.0)
    with pytest.raises(ValueError):
        ConversionType("x", delay_median_min_s=10.0, delay_median_max_s=5.0)
    # base_cvr 0 still turns every type off.
    w = World(WorldConfig(seed=1, base_cvr=0.0, conversion_mix="funnel"))
    assert w.sample_conversions(np.random.default_rng(0), 0, w.ads[0], 0.0) == ()
    assert all(not v.any() for v in w.true_cvr_by_type_batch(np.arange(5), np.arange(5)).values())
