"""The scenario suite (ctrloop/sim/scenarios.py) and the world knobs behind it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from ctrloop.cli import main
from ctrloop.sim import World, WorldConfig, feature_table, generate, scenarios
from ctrloop.sim.stream import diurnal_time
from ctrloop.sim.world import CATEGORIES, HEAVY_TAIL_SHAPE, ConversionProfile

DAY = 86_400.0


def _stream_hash(config: WorldConfig, n: int) -> str:
    h = hashlib.md5()
    for ev, tr in generate(config, n):
        h.update(orjson.dumps(ev, option=orjson.OPT_SORT_KEYS))
        h.update(orjson.dumps(tr, option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()


def test_knobs_off_leave_the_world_byte_identical() -> None:
    # The hash of this stream from the code before the scenario knobs existed (commit 55ec306):
    # every knob at its default must draw exactly what it drew then.
    cfg = WorldConfig(seed=3, impressions_per_second=0.5, base_ctr=0.1, base_cvr=0.15)
    assert _stream_hash(cfg, 1500) == "b7297606a2abaf159db455994097d8f5"


@pytest.mark.parametrize("name", scenarios.names())
def test_each_scenario_builds_and_is_deterministic(name: str) -> None:
    a, b = scenarios.build(name, 7), scenarios.build(name, 7)
    assert a == b
    assert _stream_hash(a, 300) == _stream_hash(b, 300)
    assert scenarios.describe(name)
    if name != "baseline":
        assert scenarios.build(name, 7) != scenarios.build("baseline", 7)


def test_scenario_registry_documents_each_name() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "scenarios.md").read_text()
    for name in scenarios.names():
        assert f"`{name}`" in doc, name
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.build("nope", 0)


def test_random_worlds_differ_by_seed_and_stay_in_range() -> None:
    knobs = [scenarios.random_knobs(s) for s in range(30)]
    assert len({k["bursty_share"] for k in knobs}) == 30
    assert all(0 <= k["bursty_share"] <= 0.6 for k in knobs)
    assert all(k["delay_mean_min_s"] <= k["delay_mean_max_s"] for k in knobs)
    assert {k["delay_family"] for k in knobs} >= {None, "mixed", "heavy"}
    assert scenarios.random_knobs(4) == scenarios.random_knobs(4)


# --- delay families -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["exponential", "lognormal", "heavy"])
def test_delay_family_has_the_stated_mean(family: str) -> None:
    w = World(WorldConfig(seed=1, n_users=100, delay_family=family, delay_mean_min_s=3600.0,
                          delay_mean_max_s=3600.0))
    prof = w.conversion_profiles[0]
    assert prof.delay_family == family and prof.delay_mean_s == pytest.approx(3600.0)
    rng = np.random.default_rng(0)
    d = np.asarray([w.draw_delay(prof, rng) for _ in range(200_000)])
    assert d.mean() == pytest.approx(3600.0, rel=0.03)


def test_heavy_tail_is_heavier_than_exponential() -> None:
    rng = np.random.default_rng(0)
    w = World(WorldConfig(seed=1, n_users=100, delay_family="heavy"))
    heavy = dataclasses.replace(w.conversion_profiles[0], delay_mean_s=3600.0)
    expo = dataclasses.replace(heavy, delay_family="exponential")
    dh = np.asarray([w.draw_delay(heavy, rng) for _ in range(100_000)])
    de = np.asarray([w.draw_delay(expo, rng) for _ in range(100_000)])
    # P(> 10 x mean): e^-10 ~ 5e-5 for the exponential; the Lomax tail keeps ~0.1%.
    assert np.mean(dh > 36_000) > 10 * max(np.mean(de > 36_000), 1e-5)
    # A Lomax of shape a has P(X > x) ~ x^-a: the log-log slope of the tail is about -a.
    q = np.quantile(dh, [0.99, 0.999])
    slope = math.log(0.001 / 0.01) / math.log(q[1] / q[0])
    assert slope == pytest.approx(-HEAVY_TAIL_SHAPE, abs=0.6)


def test_mixed_family_spreads_over_families_and_means() -> None:
    w = World(WorldConfig(seed=2, n_users=100, n_advertisers=60, delay_family="mixed",
                          delay_mean_min_s=600.0, delay_mean_max_s=3 * DAY))
    fams = {p.delay_family for p in w.conversion_profiles}
    means = [p.delay_mean_s for p in w.conversion_profiles]
    assert fams == {"exponential", "lognormal", "heavy"}
    assert min(means) < 3600 and max(means) > DAY
    assert all(600 <= m <= 3 * DAY for m in means)


def test_conversion_delays_follow_the_family_through_the_stream() -> None:
    # Through sample_conversions: the mean occurred - click delay is the profile's mean.
    w = World(WorldConfig(seed=4, n_users=200, base_cvr=0.5, delay_family="exponential",
                          delay_mean_min_s=1800.0, delay_mean_max_s=1800.0, bursty_share=0.0))
    rng = np.random.default_rng(1)
    delays = [c.occurred_ts - 1e9 for i in range(20_000)
              for c in w.sample_conversions(rng, i % 200, w.ads[i % 1000], 1e9)]
    assert np.mean(delays) == pytest.approx(1800.0, rel=0.05)


# --- reporting kinds -----------------------------------------------------------------------------

def test_backfill_reports_weeks_of_conversions_at_one_time() -> None:
    cfg = WorldConfig(seed=5, n_users=500, base_cvr=0.5, bursty_share=1.0,
                      bursty_kinds=(("backfill", 1.0),), backfill_after_s=14 * DAY)
    w = World(cfg)
    backfill_ts = cfg.start_ts + 14 * DAY
    assert set(w.reporting_kinds) == {"backfill"}
    rng = np.random.default_rng(0)
    convs = [c for i in range(6000)
             for c in w.sample_conversions(rng, i % 500, w.ads[i % 1000],
                                           cfg.start_ts + i * 20 * DAY / 6000)]
    before = [c for c in convs if c.occurred_ts <= backfill_ts]
    after = [c for c in convs if c.occurred_ts > backfill_ts]
    assert before and after
    # Everything that happened in the first two weeks is reported in the one backfill...
    assert {c.ts for c in before} == {round(backfill_ts, 3)}
    assert min(c.occurred_ts for c in before) < cfg.start_ts + DAY
    # ...and afterwards the advertiser reports live (seconds to minutes).
    assert max(c.ts - c.occurred_ts for c in after) < 3600


def test_periodic_dumps_upload_on_the_advertisers_period() -> None:
    cfg = WorldConfig(seed=6, n_users=500, base_cvr=0.5, bursty_share=1.0,
                      bursty_kinds=(("periodic", 1.0),), dump_period_s=DAY)
    w = World(cfg)
    rng = np.random.default_rng(0)
    by_adv: dict[int, list[tuple[float, float]]] = {}
    for i in range(4000):
        ad = w.ads[i % 1000]
        for c in w.sample_conversions(rng, i % 500, ad, cfg.start_ts + i * 60.0):
            by_adv.setdefault(ad.advertiser_index, []).append((c.occurred_ts, c.ts))
    phases = set()
    for pairs in by_adv.values():
        for occurred, reported in pairs:
            assert 0 <= reported - occurred <= DAY + 1e-3
        offsets = {round((r - cfg.start_ts) % DAY, 2) for _, r in pairs}
        assert len(offsets) == 1  # one upload time of day per advertiser
        phases |= offsets
    assert len(phases) > 10  # advertisers upload at their own hours


def test_bursty_kinds_mix_and_truth_names_the_kind() -> None:
    cfg = WorldConfig(seed=8, n_users=500, n_advertisers=90, bursty_share=0.6,
                      bursty_kinds=(("random", 1.0), ("periodic", 1.0), ("backfill", 1.0)),
                      impressions_per_second=0.5, base_ctr=0.1)
    w = World(cfg)
    kinds = w.reporting_kinds
    assert set(kinds) == {"streaming", "random", "periodic", "backfill"}
    # The kinds split bursty advertisers only: which ones are bursty is bursty_share's draw.
    plain = World(dataclasses.replace(cfg, bursty_kinds=()))
    assert [k == "streaming" for k in kinds] == [k == "streaming" for k in plain.reporting_kinds]
    truths = [t for _, t in generate(cfg, 300) if t is not None]
    assert all(t["reporting_kind"] == kinds[int(t["advertiser_id"][3:])] for t in truths)
    assert all((t["reporting"] == "bursty") == (t["reporting_kind"] != "streaming")
               for t in truths)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6])
def test_bursty_share_sets_the_share(share: float) -> None:
    w = World(WorldConfig(seed=9, n_users=100, n_advertisers=400, bursty_share=share))
    got = np.mean([p.reporting == "bursty" for p in w.conversion_profiles])
    assert got == pytest.approx(share, abs=0.07)


# --- drift ------------------------------------------------------------------------------------

def test_drift_changes_the_true_cvr_at_the_stated_time() -> None:
    cfg = WorldConfig(seed=10, n_users=1000, n_advertisers=100, drift_share=0.3,
                      drift_at_s=5 * DAY, drift_logit=0.7)
    w = World(cfg)
    drifting = w.adv_drift != 0
    assert 0.15 < drifting.mean() < 0.45
    assert set(np.abs(w.adv_drift[drifting]).round(6)) == {0.7}
    assert (w.adv_drift > 0).any() and (w.adv_drift < 0).any()
    ads = np.arange(1000)
    users = np.arange(1000) % 1000
    t = cfg.start_ts + 5 * DAY
    before = w.true_cvr_batch(users, ads, np.full(1000, t - 1.0))
    at = w.true_cvr_batch(users, ads, np.full(1000, t))
    assert np.array_equal(before, w.true_cvr_batch(users, ads))  # no ts: before the drift
    logit = np.log(at / (1 - at)) - np.log(before / (1 - before))
    adv = np.asarray([w.ads[i].advertiser_index for i in ads])
    assert np.allclose(logit, w.adv_drift[adv], atol=1e-9)


def test_drift_truth_matches_the_conversions_drawn() -> None:
    # After the drift the truth's cvr is the rate the conversions were drawn with: the share
    # of clicks that convert matches the mean truth cvr, and both moved from before.
    cfg = dataclasses.replace(scenarios.build("drift", 3), drift_share=1.0, drift_logit=1.5,
                              drift_at_s=1.5 * DAY)
    drift_ts = cfg.start_ts + cfg.drift_at_s
    rows = [(t["ts"] >= drift_ts, t["cvr"], t["converted"]) for _, t in generate(cfg, 30_000)
            if t is not None and t["clicked"]]
    for after in (False, True):
        sel = [(c, y) for a, c, y in rows if a == after]
        cvr = np.mean([c for c, _ in sel])
        rate = np.mean([y for _, y in sel])
        se = math.sqrt(cvr * (1 - cvr) / len(sel))
        assert abs(rate - cvr) < 4 * se, (after, rate, cvr)


# --- numeric features --------------------------------------------------------------------------

def test_numeric_features_are_numbers_with_their_kinds() -> None:
    cfg = scenarios.build("numeric", 1)
    kinds = {n: k for n, k, _ in feature_table(cfg)}
    assert kinds["ctx.hour"] == kinds["user.age"] == kinds["ad.price"] == "numeric"
    for ev, tr in generate(cfg, 200):
        if tr is None:
            continue
        f = ev["features"]
        assert isinstance(f["ctx.hour"], int) and 0 <= f["ctx.hour"] <= 23
        assert isinstance(f["user.age"], int) and 18 <= f["user.age"] <= 80
        assert isinstance(f["ad.price"], float) and f["ad.price"] > 0
    assert "ad.price" not in dict((n, k) for n, k, _ in feature_table(WorldConfig()))


def _turns(values: np.ndarray) -> int:
    """How often a sequence changes direction (0: monotone)."""
    d = np.sign(np.diff(values))
    d = d[d != 0]
    return int(np.sum(d[1:] != d[:-1]))


def test_hour_of_day_effect_is_non_monotone_and_interacts_with_category() -> None:
    w = World(scenarios.build("numeric", 2))
    hours = np.arange(24)
    peaks = set()
    for c in range(len(CATEGORIES)):
        eff = w.hour_effect(hours, np.full(24, c))
        assert _turns(eff) >= 1  # rises and falls within the day
        assert eff.max() - eff.min() > 0.5
        peaks.add(int(np.argmax(eff)))
    assert len(peaks) >= 5  # categories peak at different hours: an interaction
    off = World(WorldConfig(seed=2, n_users=100))
    assert not off.hour_effect(hours, np.zeros(24, np.int64)).any()


def test_age_and_price_effects_are_non_monotone_and_category_specific() -> None:
    w = World(scenarios.build("numeric", 3))
    ages = np.arange(18, 81)
    lp = np.linspace(0.0, 7.0, 50)
    age_peaks, price_peaks = set(), set()
    for c in range(len(CATEGORIES)):
        a = w.age_effect(ages, np.full(ages.size, c))
        p = w.price_effect(lp, np.full(lp.size, c))
        assert _turns(p) == 1  # a sweet spot: up, then down
        age_peaks.add(int(ages[np.argmax(a)]))
        price_peaks.add(round(float(lp[np.argmax(p)]), 1))
        # The bump sits inside the range for most categories: non-monotone there.
    assert len(age_peaks) >= 5 and len(price_peaks) >= 5


def test_numeric_truth_is_calibrated() -> None:
    cfg = scenarios.build("numeric", 4)
    ctr = [t["ctr"] for _, t in generate(cfg, 20_000) if t is not None]
    assert np.mean(ctr) == pytest.approx(cfg.base_ctr, rel=0.1)


# --- traffic -------------------------------------------------------------------------------------

def test_advertiser_size_sigma_skews_traffic() -> None:
    def shares(sigma: float) -> np.ndarray:
        w = World(WorldConfig(seed=11, n_users=100, advertiser_size_sigma=sigma))
        counts = np.bincount([a.advertiser_index for a in w.ads], minlength=200)
        return np.sort(counts)[::-1] / counts.sum()

    flat, skewed = shares(1.0), shares(2.0)
    assert skewed[:5].sum() > flat[:5].sum() + 0.1  # giants take more
    assert np.sum(skewed < 0.5 / 200) > np.sum(flat < 0.5 / 200)  # more low-traffic ones


def test_diurnal_time_follows_the_rate_curve() -> None:
    start = WorldConfig().start_ts
    u = start + np.sort(np.random.default_rng(0).random(400_000)) * 10 * DAY
    t = diurnal_time(u, start, 0.5)
    assert np.all(np.diff(t) >= 0)
    hour = ((t - start) % DAY / 3600).astype(int)  # start_ts is midnight UTC
    counts = np.bincount(hour, minlength=24)
    # Rate (1 + 0.5 cos(2 pi (h - 18) / 24)): the 18h hour has ~3x the 6h one.
    assert counts[18] / counts[6] == pytest.approx(3.0, rel=0.1)
    assert abs(t[-1] - u[-1]) < 3600  # the same mean rate: whole days keep their count


def test_profile_defaults_keep_the_old_fields() -> None:
    p = ConversionProfile(0.1, 60.0, 1.0, "streaming")
    assert p.delay_family == "lognormal" and math.isnan(p.delay_mean_s)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_simulate_scenario_writes_events_and_truth(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ev, tr = tmp_path / "e.jsonl", tmp_path / "t.jsonl"
    rc = main(["simulate", "--scenario", "backfill", "--seed", "3", "--impressions", "400",
               "--events-out", str(ev), "--truth-out", str(tr)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scenario"] == "backfill" and summary["impressions"] == 400
    truths = [orjson.loads(line) for line in tr.read_bytes().splitlines()]
    assert len(truths) == 400 and {"reporting_kind"} <= truths[0].keys()
    # The same as building the scenario's world directly.
    again = tmp_path / "t2.jsonl"
    from ctrloop.sim import write_files

    write_files(scenarios.build("backfill", 3), 400, tmp_path / "e2.jsonl", again)
    assert again.read_bytes() == tr.read_bytes()


def test_cli_simulate_rejects_an_unknown_scenario(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--scenario", "nope", "--events-out", str(tmp_path / "e")])
    assert e.value.code == 2
