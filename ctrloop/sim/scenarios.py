"""Named scenarios and random worlds: the suite that quality is judged on (docs/scenarios.md).

One world is one guess at what traffic looks like; a model tuned on it can miss on the next.
Each scenario here changes what real traffic changes — the conversion-delay family and its
per-advertiser means, how advertisers report (live, periodic dumps, random dumps, a one-off
backfill), the share of bursty advertisers, numeric features with non-monotone effects, drift,
skewed advertiser traffic, position bias and per-user / per-ad effects — on top of a common
benchmark scale (more clicks and conversions per event day than the default world, so that
delays of days fit in a stream a small machine replays in minutes).

`build(name, seed)` gives the scenario's WorldConfig for a seed; "random" draws every knob from
the seed (`random_config`). A scenario's world is deterministic in (name, seed, overrides).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctrloop.sim.world import BURSTY_KINDS, DELAY_FAMILIES, WorldConfig

HOUR = 3600.0
DAY = 86_400.0

# The benchmark scale every scenario starts from: ~8.6k impressions per event day, a CTR and
# CVR high enough that 50 advertisers see conversions every day. A stream of N impressions
# spans N / (0.1 * 86400) days: 200k impressions are ~23 days.
SCALE: dict[str, Any] = {
    "impressions_per_second": 0.1,
    "base_ctr": 0.1,
    "base_cvr": 0.15,
    "n_advertisers": 50,
    "n_users": 20_000,
    "ad_pool_size": 300,
    "ad_churn_per_hour": 1.0 / 72,  # an ad lives ~3 days: a steady supply of new ads
}


@dataclass(frozen=True)
class Scenario:
    """A named world: what it stresses (one line), which goal of issue 11 it tests, and the
    WorldConfig fields it sets on top of SCALE."""

    name: str
    description: str
    goal: str
    knobs: dict[str, Any]

    def config(self, seed: int, **overrides: Any) -> WorldConfig:
        return WorldConfig(**{**SCALE, **self.knobs, "seed": seed, **overrides})


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("baseline", "today's world at benchmark scale: lognormal delays (medians 5 min - "
             "12 h), 30% bursty advertisers uploading at gaps of 6-48 h",
             "all pCVR and pCTR goals on the world they were built on", {}),
    Scenario("heldout_like", "like the held-out world of issue 11: new ads daily, diurnal "
             "traffic, numeric hour x category, delay means 10 min - 3 days, a third of "
             "advertisers dumping at gaps of hours to days",
             "every goal; the issue's misses should reproduce here",
             {"ad_churn_per_hour": 1.0 / 24, "diurnal_amplitude": 0.5,
              "numeric_features": True, "delay_family": "lognormal",
              "delay_mean_min_s": 10 * 60.0, "delay_mean_max_s": 3 * DAY,
              "bursty_share": 1 / 3, "burst_gap_min_s": 2 * HOUR,
              "burst_gap_max_s": 3 * DAY}),
    Scenario("delay_exponential", "exponential conversion delays, per-advertiser means 5 min "
             "- 2 days (a memoryless delay: the FNW / naive assumption holds per advertiser)",
             "pCVR bias of streaming advertisers, AUC vs oracle",
             {"delay_family": "exponential", "delay_mean_min_s": 5 * 60.0,
              "delay_mean_max_s": 2 * DAY}),
    Scenario("delay_heavy", "heavy-tailed delays: 80% fast exponential + 20% Lomax tail "
             "(shape 2.5), per-advertiser means 30 min - 3 days",
             "pCVR bias of streaming advertisers and new ads (late tails)",
             {"delay_family": "heavy", "delay_mean_min_s": 30 * 60.0,
              "delay_mean_max_s": 3 * DAY}),
    Scenario("delay_mixed", "each advertiser's delay family drawn from exponential / "
             "lognormal / heavy, means 10 min - 3 days",
             "per-advertiser share within +-10%",
             {"delay_family": "mixed", "delay_mean_min_s": 10 * 60.0,
              "delay_mean_max_s": 3 * DAY}),
    Scenario("periodic_dumps", "half the advertisers upload once a day at their own hour "
             "(a nightly batch job), the rest live",
             "pCVR bias of bursty advertisers (regular dumps)",
             {"bursty_share": 0.5, "bursty_kinds": (("periodic", 1.0),)}),
    Scenario("random_dumps", "40% of advertisers upload at random gaps of 2 h - 4 days",
             "pCVR bias of bursty advertisers (long irregular gaps)",
             {"bursty_share": 0.4, "burst_gap_min_s": 2 * HOUR, "burst_gap_max_s": 4 * DAY}),
    Scenario("backfill", "a quarter of the advertisers report nothing for 4 days, then "
             "backfill those days' conversions in one upload, then report live",
             "pCVR bias of bursty advertisers and overall around a backfill",
             {"bursty_share": 0.25, "bursty_kinds": (("backfill", 1.0),),
              "backfill_after_s": 4 * DAY}),
    Scenario("bursty_none", "no bursty advertisers: every conversion reported live",
             "streaming bias and AUC when the policy has nothing to wait for",
             {"bursty_share": 0.0}),
    Scenario("bursty_60", "60% bursty advertisers: random dumps (gaps 6 h - 2 days) and "
             "daily dumps, half each",
             "bursty and streaming bias when bursty advertisers dominate the shared weights",
             {"bursty_share": 0.6, "bursty_kinds": (("random", 0.5), ("periodic", 0.5))}),
    Scenario("numeric", "hour of day and age as numbers, a price per ad: smooth "
             "non-monotone effects whose shape depends on the ad's category",
             "pCTR AUC gap to the true rates (numeric encoding)",
             {"numeric_features": True, "numeric_effect_scale": 1.5}),
    Scenario("drift", "30% of advertisers have their CVR multiplied by ~2 or ~1/2 (logit "
             "+-0.7) from day 3 on",
             "pCVR bias over time after a change; per-advertiser share within +-10%",
             {"drift_share": 0.3, "drift_at_s": 3 * DAY, "drift_logit": 0.7}),
    Scenario("skewed_traffic", "advertiser sizes lognormal with sigma 2: a few giants, a long "
             "tail of low-traffic advertisers",
             "per-advertiser share within +-10% (low-traffic advertisers)",
             {"advertiser_size_sigma": 2.0}),
    Scenario("position_user", "strong position bias (1, 0.6, 0.35) and strong per-user and "
             "per-ad effects (sd 0.6 and 0.8)",
             "pCTR AUC gap (position not encoded, ids to learn)",
             {"position_bias": (1.0, 0.6, 0.35), "user_effect_sd": 0.6,
              "ad_quality_sd": 0.8}),
)}

RANDOM = "random"
RANDOM_DESCRIPTION = ("every knob drawn from the seed: delay family and means, bursty share "
                      "0-60% and kinds, gaps, numeric features, drift, skew, diurnal traffic")


def random_knobs(seed: int) -> dict[str, Any]:
    """The WorldConfig fields of the random world of `seed` (on top of SCALE)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7919,)))

    def log_uniform(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    family = [None, "mixed", *DELAY_FAMILIES][int(rng.integers(0, 2 + len(DELAY_FAMILIES)))]
    kinds = rng.dirichlet(np.ones(len(BURSTY_KINDS)))
    gap_min = log_uniform(HOUR, 12 * HOUR)
    pb2 = float(rng.uniform(0.4, 0.9))
    return {
        "delay_family": family,
        "delay_mean_min_s": log_uniform(60.0, HOUR),
        "delay_mean_max_s": log_uniform(12 * HOUR, 4 * DAY),
        "bursty_share": float(rng.uniform(0.0, 0.6)),
        "bursty_kinds": tuple((k, float(w)) for k, w in zip(BURSTY_KINDS, kinds, strict=True)),
        "burst_gap_min_s": gap_min,
        "burst_gap_max_s": gap_min + log_uniform(12 * HOUR, 4 * DAY),
        "dump_period_s": float(rng.choice([6 * HOUR, 12 * HOUR, DAY])),
        "backfill_after_s": float(rng.uniform(2, 5)) * DAY,
        "numeric_features": bool(rng.random() < 0.5),
        "drift_share": float(rng.uniform(0.0, 0.4)) if rng.random() < 0.5 else 0.0,
        "drift_at_s": float(rng.uniform(2, 5)) * DAY,
        "advertiser_size_sigma": float(rng.uniform(0.7, 2.0)),
        "diurnal_amplitude": float(rng.uniform(0.0, 0.7)),
        "position_bias": (1.0, pb2, pb2 * float(rng.uniform(0.5, 0.9))),
    }


def names() -> list[str]:
    """Every scenario name `build` takes, "random" last."""
    return [*SCENARIOS, RANDOM]


def describe(name: str) -> str:
    return RANDOM_DESCRIPTION if name == RANDOM else _get(name).description


def _get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(names())}") \
            from None


def build(name: str, seed: int, **overrides: Any) -> WorldConfig:
    """The WorldConfig of scenario `name` for `seed` (overrides win, e.g. a rate)."""
    if name == RANDOM:
        return WorldConfig(**{**SCALE, **random_knobs(seed), "seed": seed, **overrides})
    return _get(name).config(seed, **overrides)


def knobs_of(config: WorldConfig) -> dict[str, Any]:
    """The fields of `config` that differ from WorldConfig's defaults (for reports)."""
    default = WorldConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}

