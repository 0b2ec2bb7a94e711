"""A seeded ground-truth ad world: users, advertisers, ads and a hidden true CTR.

The world exists so that every number the service reports can be checked against the truth:
the true click probability of each impression is known, so a model's AUC can be compared with
the oracle's, and its calibration with the real click rate.

The true CTR is built only from what an impression shows a model (its features plus the user
and ad ids) and the position it was shown in, so a good model can approach the oracle:

    logit = bias + main effects of the user, context and ad features
            + pairwise interactions (interest × category, device × creative type,
              hour × category, age × category, site topic × category)
            + ad quality (learnable only through `ad.id` / `ad.advertiser_id`)
            + a small per-user effect (learnable only through `user.id`)
    ctr   = sigmoid(logit) · position_bias[position - 1]

Conversions (per click) have a true CVR built the same way, from features a model sees
(category, landing, creative, interest match, age × category, engagement) plus advertiser and ad
effects learnable through the ids. Each advertiser has its own conversion-delay distribution
(lognormal, median log-uniform in minutes to half a day, capped at the attribution horizon) and
reporting behaviour: `streaming` advertisers report each conversion seconds after it happens;
`bursty` ones upload everything since the last upload at irregular times (gaps uniform in
6–48 h), so their reported conversions arrive in spikes (`bursty_share` sets the mix).
All conversion draws come from seed streams of their own, so a seed's clicks do not change.

Conversion types (`WorldConfig.conversion_mix`, presets in `CONVERSION_MIXES`): "single" is one
type, "default", at most once per click — the world as it was before types existed, draw for
draw. "funnel" has a frequent, fast "signup" (always reported streaming) and a rare, slow
"purchase" (reported as its advertiser reports). Each type t has its own true logit

    logit_t = bias_t + a_t · z_shared + z_t

where z_shared is the CVR logit above (without its bias) and z_t a type-specific per-ad and
per-advertiser effect, so the types' rates are correlated but not equal: what a shared
(multi-task) model learns about one type helps with the other. bias_t is calibrated so the mean
rate over (user, active ad) pairs is the type's base rate. Given the click, each type converts
independently (a purchase does not need a signup: a simplification), at most once per type.

Scenario knobs (WorldConfig's last group; ctrloop/sim/scenarios.py, docs/scenarios.md), all
off by default and drawn from seed streams of their own, so a world without them is the world
from before them byte for byte: delay families with per-advertiser means (exponential,
lognormal, heavy-tailed mixture), bursty advertisers' kinds (random gaps, periodic dumps, a
one-off backfill), numeric hour / age / price with non-monotone category-dependent effects,
drift of advertisers' CVR at a time, skewed advertiser traffic, diurnal request rates.

Ads retire and new ads arrive continuously; a new ad's quality is drawn afresh, so nothing
but its own impressions tells a model how good it is — the reason exploration is needed.

`World` is pure: no I/O, and all randomness comes from numpy Generators seeded from
`WorldConfig.seed`. Two APIs share one implementation: a per-request one for a live driver
(`sample_request`, `true_ctr`, `sample_click`) and a vectorised one for bulk streams
(`sample_batch`, `true_ctr_batch`, `sample_clicks`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
FeatureValue = str | int | float

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_SHARES = (0.16, 0.26, 0.22, 0.16, 0.12, 0.08)
GENDERS = ("f", "m", "u")
GENDER_SHARES = (0.46, 0.46, 0.08)
# (country, UTC offset in hours, traffic share): the offset makes `ctx.hour` the user's local
# hour, so an hour of event time still covers many hours of the day.
REGIONS: tuple[tuple[str, float, float], ...] = (
    ("US", -5.0, 0.20), ("CA", -5.0, 0.03), ("MX", -6.0, 0.04), ("BR", -3.0, 0.07),
    ("AR", -3.0, 0.02), ("GB", 0.0, 0.06), ("FR", 1.0, 0.05), ("DE", 1.0, 0.06),
    ("ES", 1.0, 0.04), ("IT", 1.0, 0.04), ("PL", 1.0, 0.03), ("TR", 3.0, 0.03),
    ("IN", 5.5, 0.10), ("ID", 7.0, 0.05), ("TH", 7.0, 0.02), ("PH", 8.0, 0.03),
    ("CN", 8.0, 0.04), ("JP", 9.0, 0.04), ("KR", 9.0, 0.02), ("AU", 10.0, 0.03),
)
DEVICES = ("ios", "android", "desktop", "tablet")
DEVICE_SHARES = (0.33, 0.42, 0.2, 0.05)
# P(wifi | device): desktops are nearly always on a fixed line.
WIFI_SHARE = (0.6, 0.55, 0.97, 0.9)
CONNECTIONS = ("wifi", "cellular")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
CATEGORIES = (
    "games", "shopping", "finance", "travel", "food", "auto",
    "fashion", "tech", "health", "entertainment", "education", "sports",
)
CREATIVE_TYPES = ("banner", "native", "video", "interstitial")
CREATIVE_SHARES = (0.35, 0.3, 0.2, 0.15)
AD_SIZES = ("320x50", "300x250", "728x90", "1080x1920", "1200x628")
LANDINGS = ("app_store", "web")

# Child seed streams, fixed so that adding a consumer never shifts an existing one.
SEED_STRUCTURE = 0
SEED_TRAFFIC = 1
SEED_ADS = 2
SEED_CHURN = 3
SEED_CALIBRATION = 4
SEED_ADVERTISERS = 5
SEED_CVR_STRUCTURE = 6  # conversion effects: drawn apart so the CTR world stays byte-identical
SEED_CVR_ADS = 7  # per-ad conversion quality, drawn in ad-index order
SEED_CVR_CALIBRATION = 8
# Conversion types' own effects, child t per type: new streams, so adding types leaves every
# draw above (and the "single" mix's conversions) where it was.
SEED_CVR_TYPE_ADS = 9  # per-ad type-specific effects, drawn in ad-index order
# Scenario knobs (WorldConfig's last group, ctrloop/sim/scenarios.py): new streams, so a world
# with every knob off draws exactly what it drew before they existed.
SEED_NUMERIC = 10  # numeric-feature structure: users' ages in years, per-category curves
SEED_NUMERIC_ADS = 11  # per-ad prices, drawn as ads are created
# Child streams of an advertiser's own seed (SEED_ADVERTISERS, i, k).
ADV_SEED_PROFILE = 0
ADV_SEED_UPLOADS = 1
ADV_SEED_TYPES = 2  # (SEED_ADVERTISERS, i, ADV_SEED_TYPES, t): type t's effect and delay median
ADV_SEED_SCENARIO = 3  # delay family and mean, reporting kind, upload phase, drift

DELAY_FAMILIES = ("exponential", "lognormal", "heavy")
BURSTY_KINDS = ("random", "periodic", "backfill")
# The "heavy" family: a fast exponential (share HEAVY_FAST_SHARE, mean HEAVY_FAST_MEAN x the
# advertiser's mean) mixed with a Lomax (Pareto II) tail of shape HEAVY_TAIL_SHAPE whose mean
# makes the mixture's mean the advertiser's: 0.8 * 0.25 + 0.2 * 4 = 1.
HEAVY_FAST_SHARE = 0.8
HEAVY_FAST_MEAN = 0.25
HEAVY_TAIL_SHAPE = 2.5
# Numeric features: users' age in years within their bucket (65+ means 65-80).
AGE_YEARS = ((18, 25), (25, 35), (35, 45), (45, 55), (55, 65), (65, 81))


TypeReporting = Literal["streaming", "advertiser"]


@dataclass(frozen=True, slots=True)
class ConversionType:
    """One kind of conversion a click can lead to: one task of a multi-task pCVR model.

    `base_cvr` and the delay-median range left None take the WorldConfig's values (`base_cvr`,
    `conversion_delay_median_min_s` / `_max_s`), and the delay median is then the advertiser's
    own profile's: that is how the "single" mix reproduces the world from before types.
    reporting "streaming": reported seconds after it happens whatever the advertiser does (an
    in-app event, say); "advertiser": as the advertiser reports (bursty ones upload in bursts).
    The type's logit is `bias + shared_weight · z_shared + z_type`, z_type a per-ad plus a
    per-advertiser effect, each normal with sd `specific_sd`.
    """

    name: str
    base_cvr: float | None = None  # mean rate over (user, active ad) pairs, per click
    delay_median_min_s: float | None = None  # per-advertiser median delay: log-uniform in
    delay_median_max_s: float | None = None  # [min, max], capped at the attribution horizon
    reporting: TypeReporting = "advertiser"
    shared_weight: float = 1.0
    specific_sd: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a conversion type needs a name")
        if self.base_cvr is not None and not 0 < self.base_cvr < 1:
            raise ValueError(f"conversion type {self.name!r}: base_cvr must be in (0, 1)")
        if (self.delay_median_min_s is None) != (self.delay_median_max_s is None):
            raise ValueError(f"conversion type {self.name!r}: give both delay bounds or none")
        if self.delay_median_min_s is not None and self.delay_median_max_s is not None and not (
                0 < self.delay_median_min_s <= self.delay_median_max_s):
            raise ValueError(f"conversion type {self.name!r}: need 0 < delay min <= max")
        if self.reporting not in ("streaming", "advertiser"):
            raise ValueError(f"conversion type {self.name!r}: reporting must be 'streaming' "
                             "or 'advertiser'")
        if self.specific_sd < 0:
            raise ValueError(f"conversion type {self.name!r}: specific_sd must be >= 0")

    @property
    def own_delays(self) -> bool:
        """Whether the type draws its own delay medians (else the advertiser profile's)."""
        return self.delay_median_min_s is not None


# The first type of a mix is the one `true_cvr_batch` and the truth's top-level fields describe.
# A new mix is one entry here (and a `--conversion-mix` choice, which reads these keys).
CONVERSION_MIXES: dict[str, tuple[ConversionType, ...]] = {
    "single": (ConversionType("default"),),
    "funnel": (
        ConversionType("signup", base_cvr=0.10, delay_median_min_s=120.0,
                       delay_median_max_s=3600.0, reporting="streaming", shared_weight=0.7,
                       specific_sd=0.3),
        ConversionType("purchase", base_cvr=0.02, delay_median_min_s=3600.0,
                       delay_median_max_s=2 * 86_400.0, reporting="advertiser",
                       shared_weight=1.0, specific_sd=0.3),
    ),
}


def seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    """The child seed stream `key` of `seed`, as `SeedSequence.spawn` would make it."""
    return np.random.SeedSequence(seed, spawn_key=key)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes the world; the same config always builds the same world."""

    seed: int = 0
    start_ts: float = 1767225600.0  # 2026-01-01T00:00:00Z
    impressions_per_second: float = 300.0  # event time
    # P(a request has 1, 2, 3... slots); slot k is shown at position k.
    slot_probs: tuple[float, ...] = (0.5, 0.3, 0.2)
    # Examination probability by position: multiplies the click probability.
    position_bias: tuple[float, ...] = (1.0, 0.7, 0.5)
    candidates_min: int = 4  # eligible ads per request, drawn uniformly in [min, max]
    candidates_max: int = 12
    n_users: int = 50_000
    n_advertisers: int = 200
    n_sites: int = 500
    ad_pool_size: int = 1000  # active ads at any time
    ad_churn_per_hour: float = 0.05  # fraction of the pool replaced per hour of event time
    base_ctr: float = 0.03  # mean true CTR over impressions, hit by calibrating the bias
    interaction_scale: float = 1.0  # multiplies every pairwise interaction
    ad_quality_sd: float = 0.5  # per-ad effect, learnable only through ad.id
    advertiser_quality_sd: float = 0.3  # per-advertiser effect, shared by its ads
    user_effect_sd: float = 0.3  # per-user effect, learnable only through user.id
    click_delay_median_s: float = 20.0  # lognormal delay from impression to click
    click_delay_sigma: float = 1.7  # ~1.3% of clicks come later than 15 minutes
    click_delay_min_s: float = 0.5
    click_delay_max_s: float = 86_400.0  # bounds how long a click stays pending
    # Conversions (per click). base_cvr 0 turns them off, every type of every mix.
    base_cvr: float = 0.08  # mean true CVR over clicks, hit by calibrating the CVR bias
    # Which conversion types a click can lead to: a key of CONVERSION_MIXES. "single" is one
    # type ("default", at base_cvr); "funnel" is "signup" (~10%, fast, streamed) and
    # "purchase" (~2%, hours to days, reported as the advertiser reports).
    conversion_mix: str = "single"
    advertiser_cvr_sd: float = 0.5  # per-advertiser CVR effect, shared by its ads
    ad_cvr_sd: float = 0.4  # per-ad CVR effect, learnable only through ad.id
    # The conversion mix: the share of advertisers that upload conversions in bursts at
    # irregular times instead of reporting each one as it happens.
    bursty_share: float = 0.3
    # Per advertiser, the median delay from click to conversion is log-uniform in this range
    # and the delay lognormal around it, capped at the attribution horizon.
    conversion_delay_median_min_s: float = 300.0
    conversion_delay_median_max_s: float = 43_200.0
    conversion_delay_sigma: float = 1.0
    conversion_horizon_s: float = 7 * 86_400.0  # later conversions are not attributed
    report_lag_median_s: float = 30.0  # streaming advertisers: conversion -> report
    burst_gap_min_s: float = 6 * 3600.0  # bursty advertisers: gaps between uploads are
    burst_gap_max_s: float = 48 * 3600.0  # uniform in [min, max]
    # --- Scenario knobs (docs/scenarios.md). Every default is off: a world that leaves them
    # alone is byte-identical to one from before they existed (their draws use new streams).
    # Conversion-delay family. None: the lognormal around a log-uniform median above. Else
    # each advertiser's *mean* delay is log-uniform in [delay_mean_min_s, delay_mean_max_s] and
    # its shape the family's: "exponential", "lognormal" (sigma conversion_delay_sigma),
    # "heavy" (80% fast exponential + 20% Lomax tail), "mixed" (one of the three per advertiser).
    delay_family: str | None = None
    delay_mean_min_s: float = 600.0
    delay_mean_max_s: float = 3 * 86_400.0
    # How bursty advertisers report, as weights over BURSTY_KINDS: "random" (uploads at gaps
    # uniform in burst_gap_min_s..max_s, the only kind when empty), "periodic" (an upload every
    # dump_period_s at the advertiser's own phase), "backfill" (nothing until backfill_after_s
    # after the start, then everything so far in one upload, then live).
    bursty_kinds: tuple[tuple[str, float], ...] = ()
    dump_period_s: float = 86_400.0
    backfill_after_s: float = 21 * 86_400.0
    # Numeric features: `ctx.hour` (local hour, 0-23) and `user.age` (years) become numbers and
    # ads gain `ad.price`; each has a smooth, non-monotone effect whose shape depends on the ad's
    # category (hour and age on the CTR, price on the CVR), scaled by numeric_effect_scale.
    numeric_features: bool = False
    numeric_effect_scale: float = 1.0
    # Drift: this share of advertisers has its CVR logit moved by +-drift_logit (sign at random)
    # for clicks on impressions from drift_at_s after the start on.
    drift_share: float = 0.0
    drift_at_s: float = 10 * 86_400.0
    drift_logit: float = 0.7
    # Advertisers' share of the ad pool (so of traffic) is lognormal with this sigma: larger
    # makes a few giants and a long tail of low-traffic advertisers.
    advertiser_size_sigma: float = 1.0
    # Diurnal traffic: the request rate is (1 + a cos(2 pi (t - 18h UTC) / 1 day)) times its
    # mean; 0 keeps it constant.
    diurnal_amplitude: float = 0.0

    def __post_init__(self) -> None:
        if not self.slot_probs or abs(sum(self.slot_probs) - 1.0) > 1e-9:
            raise ValueError("slot_probs must sum to 1")
        if min(self.slot_probs) < 0:
            raise ValueError("slot_probs must be non-negative")
        if len(self.position_bias) < len(self.slot_probs):
            raise ValueError("position_bias needs one entry per slot")
        if not all(0 < b <= 1 for b in self.position_bias):
            raise ValueError("position_bias entries must be in (0, 1]")
        if not len(self.slot_probs) <= self.candidates_min <= self.candidates_max:
            raise ValueError("need max slots <= candidates_min <= candidates_max")
        if self.candidates_max > self.ad_pool_size:
            raise ValueError("candidates_max cannot exceed ad_pool_size")
        if min(self.n_users, self.n_advertisers, self.n_sites) < 1:
            raise ValueError("n_users, n_advertisers and n_sites must be positive")
        if not 0 < self.base_ctr < min(self.position_bias):
            raise ValueError("base_ctr must be in (0, min(position_bias))")
        if self.impressions_per_second <= 0 or self.ad_churn_per_hour < 0:
            raise ValueError("impressions_per_second must be > 0, ad_churn_per_hour >= 0")
        if not 0 < self.click_delay_min_s <= self.click_delay_median_s <= self.click_delay_max_s:
            raise ValueError("need 0 < click_delay_min_s <= median <= max")
        if not 0 <= self.base_cvr < 1 or not 0 <= self.bursty_share <= 1:
            raise ValueError("base_cvr must be in [0, 1) and bursty_share in [0, 1]")
        if self.conversion_mix not in CONVERSION_MIXES:
            raise ValueError(f"conversion_mix must be one of {sorted(CONVERSION_MIXES)}, "
                             f"not {self.conversion_mix!r}")
        if not (0 < self.conversion_delay_median_min_s <= self.conversion_delay_median_max_s
                <= self.conversion_horizon_s):
            raise ValueError("need 0 < conversion delay median min <= max <= horizon")
        if not 0 < self.burst_gap_min_s <= self.burst_gap_max_s:
            raise ValueError("need 0 < burst_gap_min_s <= burst_gap_max_s")
        if self.report_lag_median_s < 0 or self.conversion_delay_sigma < 0:
            raise ValueError("report_lag_median_s and conversion_delay_sigma must be >= 0")
        self._check_scenario_knobs()

    def _check_scenario_knobs(self) -> None:
        if self.delay_family not in (None, "mixed", *DELAY_FAMILIES):
            raise ValueError(f"delay_family must be None, 'mixed' or one of {DELAY_FAMILIES}")
        if not 0 < self.delay_mean_min_s <= self.delay_mean_max_s:
            raise ValueError("need 0 < delay_mean_min_s <= delay_mean_max_s")
        kinds = dict(self.bursty_kinds)
        if (set(kinds) - set(BURSTY_KINDS) or min(kinds.values(), default=1.0) < 0
                or (kinds and sum(kinds.values()) <= 0)):
            raise ValueError(f"bursty_kinds: non-negative weights over {BURSTY_KINDS}")
        if self.dump_period_s <= 0 or self.backfill_after_s <= 0:
            raise ValueError("dump_period_s and backfill_after_s must be > 0")
        if not 0 <= self.drift_share <= 1 or self.drift_at_s < 0:
            raise ValueError("drift_share must be in [0, 1] and drift_at_s >= 0")
        if self.advertiser_size_sigma <= 0 or not 0 <= self.diurnal_amplitude < 1:
            raise ValueError("advertiser_size_sigma must be > 0, diurnal_amplitude in [0, 1)")

    @property
    def conversion_type_specs(self) -> tuple[ConversionType, ...]:
        return CONVERSION_MIXES[self.conversion_mix]

    @property
    def max_slots(self) -> int:
        return len(self.slot_probs)

    @property
    def mean_slots(self) -> float:
        return sum((k + 1) * p for k, p in enumerate(self.slot_probs))


def feature_table(config: WorldConfig) -> tuple[tuple[str, str, int | None], ...]:
    """(name, kind, cardinality) of every feature in the events, in event order.

    Cardinality is None for numeric features. `user.id`, `ad.id` and `ad.advertiser_id` are
    not here: the encoder derives them from the events' top-level ids.
    """
    numeric = config.numeric_features
    table = (
        ("user.age", "numeric", None) if numeric else ("user.age", "categorical", len(AGE_BUCKETS)),
        ("user.gender", "categorical", len(GENDERS)),
        ("user.region", "categorical", len(REGIONS)),
        ("user.interest", "categorical", len(CATEGORIES)),
        ("user.sessions_7d", "numeric", None),
        ("ctx.device", "categorical", len(DEVICES)),
        ("ctx.hour", "numeric", None) if numeric else ("ctx.hour", "categorical", 24),
        ("ctx.weekday", "categorical", len(WEEKDAYS)),
        ("ctx.site", "categorical", config.n_sites),
        ("ctx.connection", "categorical", len(CONNECTIONS)),
        ("ad.category", "categorical", len(CATEGORIES)),
        ("ad.creative_type", "categorical", len(CREATIVE_TYPES)),
        ("ad.size", "categorical", len(AD_SIZES)),
        ("ad.landing", "categorical", len(LANDINGS)),
        ("ad.bid", "numeric", None),
    )
    return (*table, ("ad.price", "numeric", None)) if numeric else table


@dataclass(frozen=True, slots=True)
class Advertiser:
    index: int
    id: str
    vertical: str  # the category most of its ads are in
    base_bid: float
    # Its own random stream, so that per-advertiser behaviour (conversion rates, reporting
    # delays) can be added without shifting any other draw of the world.
    seed: np.random.SeedSequence


@dataclass(frozen=True, slots=True, eq=False)
class Ad:
    """An ad as a serving system sees it; its quality stays hidden inside the World."""

    index: int
    id: str
    advertiser_index: int
    advertiser_id: str
    created_ts: float
    bid: float
    features: dict[str, FeatureValue]  # shared, treat as read-only


@dataclass(frozen=True, slots=True)
class Context:
    """Integer codes of a request's context, indexes into the label tuples above."""

    device: int
    hour: int
    weekday: int
    site: int
    connection: int


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One ad request: who asks, in what context, and which ads are eligible."""

    request_id: int
    ts: float
    user_index: int
    user_id: str
    context: Context
    features: dict[str, FeatureValue]  # user.* and ctx.*; ad.* come with each candidate
    n_slots: int  # positions 1..n_slots are to be filled
    candidates: tuple[Ad, ...]


@dataclass(frozen=True, slots=True)
class Conversion:
    ts: float  # when the advertiser reports it: the event's ts
    conversion_type: str = "default"
    occurred_ts: float | None = None  # when it happened (truth only; bursty ones lag a lot)


Reporting = Literal["streaming", "bursty"]


@dataclass(frozen=True, slots=True)
class ConversionProfile:
    """How one advertiser's conversions happen and get reported.

    In `World.conversion_profiles` it is the advertiser's own (cvr_effect: its shared CVR
    effect); in `World.type_profiles[t]` the advertiser's for conversion type t (cvr_effect:
    the type-specific effect z_t; reporting: resolved, "streaming" for streamed types).
    """

    cvr_effect: float
    delay_median_s: float
    delay_sigma: float
    reporting: Reporting
    # The delay's shape (DELAY_FAMILIES; "lognormal" draws median * exp(sigma * N) as the
    # world did before families) and its mean before the horizon cap (lognormal: derived).
    delay_family: str = "lognormal"
    delay_mean_s: float = math.nan


class _UploadSchedule:
    """A bursty advertiser's upload times: a fixed random sequence, extended lazily.

    The sequence depends only on the advertiser's seed, so asking in any order (conversions are
    drawn per click, not in conversion-time order) gives the same answers.
    """

    def __init__(self, seed: np.random.SeedSequence, start_ts: float, gap_min: float,
                 gap_max: float) -> None:
        self._rng = np.random.default_rng(seed)
        self._gap = (gap_min, gap_max)
        # The first upload lands anywhere in the first gap, so advertisers are out of phase.
        self._times = [start_ts + float(self._rng.uniform(0.0, gap_max))]

    def next_upload(self, ts: float) -> float:
        """The first upload at or after `ts`."""
        times = self._times
        while times[-1] < ts:
            times.append(times[-1] + float(self._rng.uniform(*self._gap)))
        return times[bisect.bisect_left(times, ts)]


class _PeriodicSchedule:
    """An advertiser that uploads every `period` seconds, at its own phase."""

    def __init__(self, first_ts: float, period: float) -> None:
        self._first = first_ts
        self._period = period

    def next_upload(self, ts: float) -> float:
        k = max(0.0, math.ceil((ts - self._first) / self._period))
        return self._first + k * self._period


class _BackfillSchedule:
    """An advertiser that reports nothing until `backfill_ts`, uploads everything up to then in
    one backfill, and reports live after it (NaN: not an upload, the caller streams it)."""

    def __init__(self, backfill_ts: float) -> None:
        self.backfill_ts = backfill_ts

    def next_upload(self, ts: float) -> float:
        return self.backfill_ts if ts <= self.backfill_ts else math.nan


@dataclass(frozen=True, slots=True)
class RequestBatch:
    """Requests in column form: row i of every array is request `request_ids[i]`."""

    request_ids: IntArray
    ts: FloatArray
    user: IntArray
    device: IntArray
    hour: IntArray
    weekday: IntArray
    site: IntArray
    connection: IntArray
    n_slots: IntArray
    n_candidates: IntArray
    candidates: IntArray  # (n, candidates_max) ad indices, padded with -1

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class _AdColumns:
    """Ad attributes as growable arrays, so CTRs can be computed by gathering."""

    n: int = 0
    category: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    creative: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    main: FloatArray = field(default_factory=lambda: np.zeros(0, np.float64))
    quality: FloatArray = field(default_factory=lambda: np.zeros(0, np.float64))
    log_price: FloatArray = field(default_factory=lambda: np.zeros(0, np.float64))

    def append(self, category: IntArray, creative: IntArray, main: FloatArray,
               quality: FloatArray, log_price: FloatArray | None = None) -> None:
        k = category.shape[0]
        if self.n + k > self.category.shape[0]:
            # Doubling keeps appends amortised O(1) while ads keep arriving.
            cap = max(2 * self.category.shape[0], self.n + k, 64)
            for name in ("category", "creative", "main", "quality", "log_price"):
                old = getattr(self, name)
                new = np.zeros(cap, old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        self.category[self.n : self.n + k] = category
        self.creative[self.n : self.n + k] = creative
        self.main[self.n : self.n + k] = main
        self.quality[self.n : self.n + k] = quality
        self.log_price[self.n : self.n + k] = 0.0 if log_price is None else log_price
        self.n += k


def _cdf(weights: FloatArray) -> FloatArray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _draw(rng: np.random.Generator, cdf: FloatArray, n: int) -> IntArray:
    # searchsorted on a precomputed CDF: Generator.choice(p=...) rebuilds it on every call.
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, cdf.shape[0] - 1).astype(np.int64)


def _sigmoid(x: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-x))


class World:
    """The ground truth. Mutable only in time: `advance_to` retires and creates ads."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = cfg = config if config is not None else WorldConfig()
        struct = np.random.default_rng(seed_sequence(cfg.seed, SEED_STRUCTURE))
        self._traffic_rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_TRAFFIC))
        self._ads_rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_ADS))
        self._churn_rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_CHURN))
        self._slot_cdf = _cdf(np.asarray(cfg.slot_probs, np.float64))
        self._position_bias = np.asarray(cfg.position_bias, np.float64)
        self._build_effects(struct)
        self._build_users(struct)
        self._build_sites(struct)
        self._build_advertisers(struct)
        self._build_numeric()

        self._ads: list[Ad] = []
        self._cols = _AdColumns()
        # Initial ads have the steady-state age distribution of the churn process.
        lifetime_s = (
            3600.0 / cfg.ad_churn_per_hour if cfg.ad_churn_per_hour > 0 else 30 * 86400.0
        )
        ages = self._ads_rng.exponential(lifetime_s, cfg.ad_pool_size)
        created = np.round(cfg.start_ts - ages, 3)
        self._pool = np.asarray([a.index for a in self._create_ads(created)], np.int64)
        self._n_initial_ads = len(self._ads)
        churn_rate = cfg.ad_pool_size * cfg.ad_churn_per_hour / 3600.0
        self._churn_mean_gap = 1.0 / churn_rate if churn_rate > 0 else math.inf
        self._next_churn_ts = cfg.start_ts + self._churn_gap()
        self._next_request_id = 0
        self.bias = self._calibrate_bias(
            np.random.default_rng(seed_sequence(cfg.seed, SEED_CALIBRATION))
        )
        self._build_conversions()

    # ----------------------------------------------------------------- construction

    def _build_effects(self, rng: np.random.Generator) -> None:
        n_cat = len(CATEGORIES)
        s = self.config.interaction_scale
        self._b_age = rng.normal(0, 0.15, len(AGE_BUCKETS))
        self._b_gender = rng.normal(0, 0.1, len(GENDERS))
        self._b_region = rng.normal(0, 0.15, len(REGIONS))
        self._b_interest = rng.normal(0, 0.1, n_cat)
        self._b_sessions = 0.15  # per unit of log1p(sessions_7d): engaged users click more
        self._b_device = rng.normal(0, 0.2, len(DEVICES))
        hours = np.arange(24)
        # People click more in the evening; the smooth curve plus noise is what a model sees.
        self._b_hour = 0.25 * np.cos(2 * np.pi * (hours - 21) / 24) + rng.normal(0, 0.05, 24)
        self._b_weekday = rng.normal(0, 0.05, len(WEEKDAYS))
        self._b_connection = rng.normal(0, 0.1, len(CONNECTIONS))
        self._b_category = rng.normal(0, 0.3, n_cat)
        self._b_creative = rng.normal(0, 0.25, len(CREATIVE_TYPES))
        self._b_size = rng.normal(0, 0.15, len(AD_SIZES))
        self._b_landing = rng.normal(0, 0.1, len(LANDINGS))
        self._b_bid = 0.2  # per unit of log(bid): higher bidders run better campaigns
        # Interactions: these are what separate a factorisation model from a linear one.
        self._w_interest_cat = s * (1.0 * np.eye(n_cat) + rng.normal(0, 0.15, (n_cat, n_cat)))
        self._w_device_creative = s * rng.normal(0, 0.35, (len(DEVICES), len(CREATIVE_TYPES)))
        self._w_hour_cat = s * rng.normal(0, 0.2, (24, n_cat))
        self._w_age_cat = s * rng.normal(0, 0.3, (len(AGE_BUCKETS), n_cat))
        self._w_site_topic = s * 0.5  # when the site's (hidden) topic is the ad's category

    def _build_users(self, rng: np.random.Generator) -> None:
        n = self.config.n_users
        self._u_age = _draw(rng, _cdf(np.asarray(AGE_SHARES)), n)
        self._u_gender = _draw(rng, _cdf(np.asarray(GENDER_SHARES)), n)
        self._u_region = _draw(rng, _cdf(np.asarray([r[2] for r in REGIONS])), n)
        cat_popularity = rng.dirichlet(np.full(len(CATEGORIES), 5.0))
        self._u_interest = _draw(rng, _cdf(cat_popularity), n)
        self._u_device = _draw(rng, _cdf(np.asarray(DEVICE_SHARES)), n)
        # A few heavy users make much of the traffic; their session counts show it.
        activity = rng.lognormal(0.0, 1.0, n)
        self._u_sessions = rng.poisson(3.0 * activity).astype(np.int64)
        self._user_cdf = _cdf(activity)
        lsess = np.log1p(self._u_sessions)
        self._u_main = (
            self._b_age[self._u_age]
            + self._b_gender[self._u_gender]
            + self._b_region[self._u_region]
            + self._b_interest[self._u_interest]
            + self._b_sessions * (lsess - lsess.mean())
        )
        self._u_effect = rng.normal(0, self.config.user_effect_sd, n)
        self._u_offset_s = np.asarray([r[1] for r in REGIONS])[self._u_region] * 3600.0

    def _build_sites(self, rng: np.random.Generator) -> None:
        n = self.config.n_sites
        # Zipf-like traffic: a handful of big publishers and a long tail.
        self._site_cdf = _cdf(1.0 / np.arange(1, n + 1) ** 1.1)
        self._b_site = rng.normal(0, 0.4, n)
        self._site_topic = rng.integers(0, len(CATEGORIES), n)
        self._site_labels = [f"s{i}" for i in range(n)]

    def _build_advertisers(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n = cfg.n_advertisers
        verticals = rng.integers(0, len(CATEGORIES), n)
        base_bids = np.round(rng.lognormal(0.0, 0.5, n), 2)
        self.advertisers: tuple[Advertiser, ...] = tuple(
            Advertiser(
                index=i,
                id=f"adv{i}",
                vertical=CATEGORIES[int(verticals[i])],
                base_bid=float(base_bids[i]),
                seed=seed_sequence(cfg.seed, SEED_ADVERTISERS, i),
            )
            for i in range(n)
        )
        self._adv_vertical = verticals.astype(np.int64)
        self._adv_base_bid = base_bids
        self._adv_quality = rng.normal(0, cfg.advertiser_quality_sd, n)
        # Big advertisers run many ads at once.
        size = rng.lognormal(0.0, 1.0, n)
        if cfg.advertiser_size_sigma != 1.0:
            # lognormal(0, 1) ** s is lognormal(0, s): the same advertisers stay the big ones.
            size = size ** cfg.advertiser_size_sigma
        self._adv_cdf = _cdf(size)

    def _build_numeric(self) -> None:
        """Numeric features' hidden structure (off: nothing is drawn). Each category has its
        own hour-of-day curve (a phase), age peak and sweet-spot price, so the effects are
        non-monotone and interact with the ad's category."""
        cfg = self.config
        self._numeric = cfg.numeric_features
        if not self._numeric:
            return
        rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_NUMERIC))
        n_cat = len(CATEGORIES)
        lo = np.asarray([a for a, _ in AGE_YEARS], np.float64)[self._u_age]
        hi = np.asarray([b for _, b in AGE_YEARS], np.float64)[self._u_age]
        self._u_age_years = np.floor(lo + rng.random(cfg.n_users) * (hi - lo)).astype(np.int64)
        self._hour_phase = rng.uniform(0.0, 24.0, n_cat)  # the category's best local hour
        self._age_peak = rng.uniform(20.0, 70.0, n_cat)  # the category's best age
        self._price_mu = rng.normal(3.0, 1.0, n_cat)  # typical log price of the category
        self._price_sweet = self._price_mu + rng.normal(0.0, 0.5, n_cat)  # converts best
        self._numeric_ads_rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_NUMERIC_ADS))

    def hour_effect(self, hour: IntArray, category: IntArray) -> FloatArray:
        """The numeric hour-of-day term of the CTR logit (zero without numeric features): a
        daily cosine peaking at the category's own hour."""
        if not self._numeric:
            return np.zeros(np.shape(hour), np.float64)
        s = 0.4 * self.config.numeric_effect_scale
        return s * np.cos(2 * np.pi * (np.asarray(hour) - self._hour_phase[category]) / 24.0)

    def age_effect(self, age_years: IntArray, category: IntArray) -> FloatArray:
        """The numeric age term of the CTR logit: a bump (width ~12 years) at the category's
        peak age, centred so it averages near zero."""
        if not self._numeric:
            return np.zeros(np.shape(age_years), np.float64)
        s = 0.5 * self.config.numeric_effect_scale
        d = (np.asarray(age_years, np.float64) - self._age_peak[category]) / 12.0
        return s * (np.exp(-0.5 * d * d) - 0.5)

    def price_effect(self, log_price: FloatArray, category: IntArray) -> FloatArray:
        """The numeric price term of the CVR logit: highest at the category's sweet spot,
        falling off on both sides (too cheap looks dubious, too dear does not sell)."""
        if not self._numeric:
            return np.zeros(np.shape(log_price), np.float64)
        s = 0.5 * self.config.numeric_effect_scale
        d = np.asarray(log_price, np.float64) - self._price_sweet[category]
        return s * (0.5 - d * d)

    def _create_ads(self, created_ts: FloatArray) -> list[Ad]:
        rng = self._ads_rng
        k = created_ts.shape[0]
        adv = _draw(rng, self._adv_cdf, k)
        in_vertical = rng.random(k) < 0.8
        category = np.where(in_vertical, self._adv_vertical[adv],
                            rng.integers(0, len(CATEGORIES), k))
        creative = _draw(rng, _cdf(np.asarray(CREATIVE_SHARES)), k)
        size = rng.integers(0, len(AD_SIZES), k)
        # Games advertisers mostly send people to an app store.
        p_app = np.where(category == CATEGORIES.index("games"), 0.85, 0.3)
        landing = np.where(rng.random(k) < p_app, 0, 1)
        bid = np.maximum(np.round(self._adv_base_bid[adv] * rng.lognormal(0, 0.25, k), 2), 0.05)
        main = (
            self._b_category[category]
            + self._b_creative[creative]
            + self._b_size[size]
            + self._b_landing[landing]
            + self._b_bid * np.log(bid)
        )
        quality = self._adv_quality[adv] + rng.normal(0, self.config.ad_quality_sd, k)
        log_price = None
        if self._numeric:
            log_price = self._price_mu[category] + 0.8 * self._numeric_ads_rng.standard_normal(k)
            log_price = np.log(np.maximum(np.round(np.exp(log_price), 2), 0.01))
        self._cols.append(category, creative, main, quality, log_price)
        new: list[Ad] = []
        for j in range(k):
            a = int(adv[j])
            b = float(bid[j])
            ad = Ad(
                index=len(self._ads),
                id=f"a{len(self._ads)}",
                advertiser_index=a,
                advertiser_id=self.advertisers[a].id,
                created_ts=float(created_ts[j]),
                bid=b,
                features={
                    "ad.category": CATEGORIES[int(category[j])],
                    "ad.creative_type": CREATIVE_TYPES[int(creative[j])],
                    "ad.size": AD_SIZES[int(size[j])],
                    "ad.landing": LANDINGS[int(landing[j])],
                    "ad.bid": b,
                    **({"ad.price": round(math.exp(float(log_price[j])), 2)}
                       if log_price is not None else {}),
                },
            )
            self._ads.append(ad)
            new.append(ad)
        return new

    def _calibrate_bias(self, rng: np.random.Generator) -> float:
        """The bias that makes the mean true CTR over impressions equal `base_ctr`.

        Measured over a week of contexts, so the hour effects average out rather than
        fixing the CTR of whichever hour the stream happens to start in.
        """
        cfg = self.config
        n = 20_000
        ts = np.sort(cfg.start_ts + rng.random(n) * 7 * 86400.0)
        user, device, hour, weekday, site, conn = self._sample_contexts(rng, ts)
        ads = self._pool[rng.integers(0, self._pool.shape[0], n)]
        # Positions weighted as impressions see them: slot k exists if n_slots >= k.
        share = np.cumsum(np.asarray(cfg.slot_probs)[::-1])[::-1]
        pos = _draw(rng, _cdf(share), n) + 1
        z = sum(self._terms(user, device, hour, weekday, site, conn, ads).values())
        pb = self._position_bias[pos - 1]
        lo, hi = -20.0, 20.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if float(np.mean(_sigmoid(mid + z) * pb)) < cfg.base_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    # ----------------------------------------------------------------- conversions

    def _build_conversions(self) -> None:
        """The CVR world: effects, advertiser profiles, upload schedules, calibrated bias.

        Every draw comes from seed streams of its own (SEED_CVR_*, the advertisers' seeds), so
        the impressions and clicks of a seed are the same with or without conversions.
        """
        cfg = self.config
        rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_CVR_STRUCTURE))
        n_cat = len(CATEGORIES)
        self._cvr_category = rng.normal(0, 0.4, n_cat)
        self._cvr_landing = np.asarray([-0.3, 0.3])  # app installs convert less than web
        self._cvr_creative = rng.normal(0, 0.15, len(CREATIVE_TYPES))
        self._cvr_interest_match = 0.5  # users buy what they are interested in
        self._cvr_age_cat = rng.normal(0, 0.25, (len(AGE_BUCKETS), n_cat))
        lsess = np.log1p(self._u_sessions)
        self._cvr_user = 0.1 * (lsess - lsess.mean())
        scenario = [self._scenario_draws(adv.index) for adv in self.advertisers]
        self.conversion_profiles = tuple(
            self._conversion_profile(adv.index, draws)
            for adv, draws in zip(self.advertisers, scenario, strict=True)
        )
        self._adv_cvr = np.asarray([p.cvr_effect for p in self.conversion_profiles])
        # Per advertiser: "streaming" or its bursty kind (BURSTY_KINDS).
        self.reporting_kinds: tuple[str, ...] = tuple(
            "streaming" if p.reporting == "streaming" else self._bursty_kind(d[2])
            for p, d in zip(self.conversion_profiles, scenario, strict=True)
        )
        self._uploads = {
            p_i: self._upload_schedule(p_i, kind, scenario[p_i][3])
            for p_i, kind in enumerate(self.reporting_kinds) if kind != "streaming"
        }
        # Drift: the CVR logit shift of each advertiser from drift_ts on (0: no drift).
        self.drift_ts = cfg.start_ts + cfg.drift_at_s
        self.adv_drift = np.asarray(
            [(cfg.drift_logit if d[5] < 0.5 else -cfg.drift_logit) if d[4] < cfg.drift_share
             else 0.0 for d in scenario], np.float64)
        self._cvr_ads_rng = np.random.default_rng(seed_sequence(cfg.seed, SEED_CVR_ADS))
        self._ad_cvr_main = np.zeros(0, np.float64)
        self._ad_adv = np.zeros(0, np.int64)
        self._build_conversion_types()
        self.cvr_biases = tuple(0.0 for _ in self._type_specs)
        if cfg.base_cvr > 0:
            self.cvr_biases = self._calibrate_cvr_biases(
                np.random.default_rng(seed_sequence(cfg.seed, SEED_CVR_CALIBRATION)))
        self.cvr_bias = self.cvr_biases[0]  # the first type's, as `true_cvr_batch` is

    def _build_conversion_types(self) -> None:
        """Per type: base rate, per-advertiser profiles and type-specific effects.

        Only new streams are drawn from (the advertisers' ADV_SEED_TYPES children and
        SEED_CVR_TYPE_ADS), so a mix never moves a click or the shared CVR effects.
        """
        cfg = self.config
        self._type_specs = cfg.conversion_type_specs
        self.conversion_types: tuple[str, ...] = tuple(t.name for t in self._type_specs)
        self._type_base_cvr = tuple(cfg.base_cvr if t.base_cvr is None else t.base_cvr
                                    for t in self._type_specs)
        self.type_profiles: tuple[tuple[ConversionProfile, ...], ...] = tuple(
            tuple(self._type_profile(t, spec, i) for i in range(len(self.conversion_profiles)))
            for t, spec in enumerate(self._type_specs)
        )
        self._adv_type_effect = [np.asarray([p.cvr_effect for p in profs], np.float64)
                                 for profs in self.type_profiles]
        # A type with no specific effects (the "single" mix's) needs no per-ad stream.
        self._type_ads_rngs = [
            np.random.default_rng(seed_sequence(cfg.seed, SEED_CVR_TYPE_ADS, t))
            if spec.specific_sd > 0 else None
            for t, spec in enumerate(self._type_specs)
        ]
        self._ad_type_effect = [np.zeros(0, np.float64) for _ in self._type_specs]

    def _type_profile(self, t: int, spec: ConversionType, index: int) -> ConversionProfile:
        """Advertiser `index`'s profile for conversion type `t` (`spec`)."""
        cfg = self.config
        prof = self.conversion_profiles[index]
        reporting: Reporting = "streaming" if spec.reporting == "streaming" else prof.reporting
        if spec.specific_sd == 0 and not spec.own_delays:
            # Nothing of its own to draw: exactly the advertiser's profile (the "single" mix).
            return dataclasses.replace(prof, cvr_effect=0.0, reporting=reporting)
        rng = np.random.default_rng(
            seed_sequence(cfg.seed, SEED_ADVERTISERS, index, ADV_SEED_TYPES, t))
        # Both drawn always, in this order, so one knob of a type never shifts the other draw.
        effect = spec.specific_sd * float(rng.standard_normal())
        u = float(rng.random())
        median = prof.delay_median_s
        if spec.delay_median_min_s is not None and spec.delay_median_max_s is not None:
            horizon = cfg.conversion_horizon_s
            lo = math.log(min(spec.delay_median_min_s, horizon))
            hi = math.log(min(spec.delay_median_max_s, horizon))
            median = math.exp(lo + u * (hi - lo))
        return ConversionProfile(effect, median, cfg.conversion_delay_sigma, reporting)

    def _scenario_draws(self, index: int) -> tuple[float, ...]:
        """Advertiser `index`'s uniforms for the scenario knobs, always all six in this order
        (delay family, delay mean, bursty kind, upload phase, drift, drift sign), so one knob
        never shifts another's draw; from a stream of its own, so knobs off draw nothing old."""
        rng = np.random.default_rng(
            seed_sequence(self.config.seed, SEED_ADVERTISERS, index, ADV_SEED_SCENARIO))
        return tuple(float(u) for u in rng.random(6))

    def _bursty_kind(self, u: float) -> str:
        weights = dict(self.config.bursty_kinds)
        if not weights:
            return "random"
        total = sum(weights.values())
        acc = 0.0
        for kind in BURSTY_KINDS:
            acc += weights.get(kind, 0.0) / total
            if u < acc:
                return kind
        return next(k for k in reversed(BURSTY_KINDS) if weights.get(k, 0.0) > 0)

    def _upload_schedule(self, index: int, kind: str,
                         phase: float) -> _UploadSchedule | _PeriodicSchedule | _BackfillSchedule:
        cfg = self.config
        if kind == "periodic":
            return _PeriodicSchedule(cfg.start_ts + phase * cfg.dump_period_s, cfg.dump_period_s)
        if kind == "backfill":
            return _BackfillSchedule(cfg.start_ts + cfg.backfill_after_s)
        return _UploadSchedule(seed_sequence(cfg.seed, SEED_ADVERTISERS, index, ADV_SEED_UPLOADS),
                               cfg.start_ts, cfg.burst_gap_min_s, cfg.burst_gap_max_s)

    def _conversion_profile(self, index: int, draws: tuple[float, ...]) -> ConversionProfile:
        cfg = self.config
        rng = np.random.default_rng(
            seed_sequence(cfg.seed, SEED_ADVERTISERS, index, ADV_SEED_PROFILE))
        lo, hi = math.log(cfg.conversion_delay_median_min_s), \
            math.log(cfg.conversion_delay_median_max_s)
        cvr_effect = float(rng.normal(0, cfg.advertiser_cvr_sd))
        median = math.exp(float(rng.uniform(lo, hi)))
        # Drawn last and compared with the share, so raising bursty_share only adds bursty
        # advertisers and leaves every other draw alone.
        bursty = float(rng.random()) < cfg.bursty_share
        reporting: Reporting = "bursty" if bursty else "streaming"
        sigma = cfg.conversion_delay_sigma
        if cfg.delay_family is None:
            return ConversionProfile(cvr_effect, median, sigma, reporting,
                                     delay_mean_s=median * math.exp(sigma * sigma / 2))
        family = cfg.delay_family
        if family == "mixed":
            family = DELAY_FAMILIES[min(int(draws[0] * len(DELAY_FAMILIES)), 2)]
        lo, hi = math.log(cfg.delay_mean_min_s), math.log(cfg.delay_mean_max_s)
        mean = math.exp(lo + draws[1] * (hi - lo))
        # The lognormal's median is what its draw scales; mean = median * exp(sigma^2 / 2).
        median = mean * math.exp(-sigma * sigma / 2) if family == "lognormal" else mean
        return ConversionProfile(cvr_effect, median, sigma, reporting, family, mean)

    def draw_delay(self, profile: ConversionProfile, rng: np.random.Generator) -> float:
        """One click-to-conversion delay from `profile`'s family (before the horizon cap)."""
        family = profile.delay_family
        if family == "exponential":
            return float(rng.exponential(profile.delay_mean_s))
        if family == "heavy":
            if float(rng.random()) < HEAVY_FAST_SHARE:
                return float(rng.exponential(HEAVY_FAST_MEAN * profile.delay_mean_s))
            # Lomax(shape a, scale c) has mean c / (a - 1); numpy's pareto is Lomax(a, 1).
            tail_mean = (1 - HEAVY_FAST_SHARE * HEAVY_FAST_MEAN) / (1 - HEAVY_FAST_SHARE)
            scale = tail_mean * profile.delay_mean_s * (HEAVY_TAIL_SHAPE - 1)
            return float(rng.pareto(HEAVY_TAIL_SHAPE)) * scale
        return profile.delay_median_s * math.exp(profile.delay_sigma * float(rng.standard_normal()))

    def _ensure_ad_cvr(self, n: int) -> None:
        """Per-ad CVR terms for ads 0..n-1, drawn in index order (so in any call order)."""
        have = self._ad_cvr_main.shape[0]
        if n <= have:
            return
        idx = np.arange(have, n)
        cols = self._cols
        landing = np.asarray([LANDINGS.index(str(self._ads[i].features["ad.landing"]))
                              for i in idx.tolist()], np.int64)
        main = (self._cvr_category[cols.category[idx]] + self._cvr_landing[landing]
                + self._cvr_creative[cols.creative[idx]]
                + self._cvr_ads_rng.normal(0, self.config.ad_cvr_sd, idx.shape[0]))
        if self._numeric:
            main = main + self.price_effect(cols.log_price[idx], cols.category[idx])
        adv = np.asarray([self._ads[i].advertiser_index for i in idx.tolist()], np.int64)
        self._ad_cvr_main = np.concatenate([self._ad_cvr_main, main])
        self._ad_adv = np.concatenate([self._ad_adv, adv])
        for t, spec in enumerate(self._type_specs):
            rng = self._type_ads_rngs[t]
            own = (np.zeros(idx.shape[0]) if rng is None
                   else spec.specific_sd * rng.standard_normal(idx.shape[0]))
            self._ad_type_effect[t] = np.concatenate([self._ad_type_effect[t], own])

    def _cvr_logit(self, user: IntArray, ads: IntArray, ts: FloatArray | None = None
                   ) -> FloatArray:
        """The shared CVR logit (without bias) of clicks on impressions at `ts` (None: before
        any drift, as the calibration measures it)."""
        self._ensure_ad_cvr(int(ads.max()) + 1 if ads.size else 0)
        cat = self._cols.category[ads]
        z = (self._ad_cvr_main[ads] + self._adv_cvr[self._ad_adv[ads]]
             + self._cvr_interest_match * (self._u_interest[user] == cat)
             + self._cvr_age_cat[self._u_age[user], cat] + self._cvr_user[user])
        if ts is not None and self.config.drift_share > 0:
            z = z + self.adv_drift[self._ad_adv[ads]] * (np.asarray(ts) >= self.drift_ts)
        return z

    def _type_logit(self, t: int, ads: IntArray, z: FloatArray) -> FloatArray:
        """Type t's logit without its bias: a_t · z_shared + its own ad and advertiser effects.

        `ads` must be covered by `_ensure_ad_cvr` (`_cvr_logit` of them does it).
        """
        spec = self._type_specs[t]
        if spec.shared_weight == 1.0 and spec.specific_sd == 0:
            return z  # the "single" mix: exactly the shared logit, bit for bit
        return (spec.shared_weight * z + self._ad_type_effect[t][ads]
                + self._adv_type_effect[t][self._ad_adv[ads]])

    def _calibrate_cvr_biases(self, rng: np.random.Generator) -> tuple[float, ...]:
        """Per type, the bias that makes the mean true rate of (user, active ad) pairs the
        type's base rate. One sample serves every type (the first type's as before types)."""
        n = 20_000
        user = _draw(rng, self._user_cdf, n)
        ads = self._pool[rng.integers(0, self._pool.shape[0], n)]
        z = self._cvr_logit(user, ads)
        biases: list[float] = []
        for t, target in enumerate(self._type_base_cvr):
            zt = self._type_logit(t, ads, z)
            lo, hi = -20.0, 20.0
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                if float(np.mean(_sigmoid(mid + zt))) < target:
                    lo = mid
                else:
                    hi = mid
            biases.append(0.5 * (lo + hi))
        return tuple(biases)

    def true_cvr_by_type_batch(self, user: IntArray, ads: IntArray,
                               ts: FloatArray | None = None) -> dict[str, FloatArray]:
        """P(conversion of each type | click) of ad index `ads[j]` clicked by user `user[j]`,
        by type name in `conversion_types` order; `ts`: the impressions' times (drift)."""
        if self.config.base_cvr <= 0:
            return {name: np.zeros(np.shape(ads), np.float64) for name in self.conversion_types}
        user = np.asarray(user, np.int64)
        ads = np.asarray(ads, np.int64)
        z = self._cvr_logit(user, ads, ts)
        return {name: _sigmoid(self.cvr_biases[t] + self._type_logit(t, ads, z))
                for t, name in enumerate(self.conversion_types)}

    def true_cvr_batch(self, user: IntArray, ads: IntArray,
                       ts: FloatArray | None = None) -> FloatArray:
        """P(conversion | click) of ad index `ads[j]` clicked by user `user[j]`, for the first
        conversion type (the only one in the "single" mix); `ts`: the impressions' times
        (only a drifting world needs them; None is before any drift)."""
        if self.config.base_cvr <= 0:
            return np.zeros(np.shape(ads), np.float64)
        user = np.asarray(user, np.int64)
        ads = np.asarray(ads, np.int64)
        return _sigmoid(self.cvr_bias
                        + self._type_logit(0, ads, self._cvr_logit(user, ads, ts)))

    def true_cvr(self, user_index: int, ad: Ad, ts: float | None = None) -> float:
        """`true_cvr_batch` of one click: the first conversion type's rate."""
        at = None if ts is None else np.asarray([ts])
        return float(self.true_cvr_batch(np.asarray([user_index]), np.asarray([ad.index]),
                                         at)[0])

    def true_cvr_by_type(self, user_index: int, ad: Ad,
                         ts: float | None = None) -> dict[str, float]:
        """`true_cvr_by_type_batch` of one click."""
        at = None if ts is None else np.asarray([ts])
        rates = self.true_cvr_by_type_batch(np.asarray([user_index]), np.asarray([ad.index]),
                                            at)
        return {name: float(v[0]) for name, v in rates.items()}

    def report_ts(self, advertiser_index: int, occurred_ts: float,
                  rng: np.random.Generator, conversion_type: str | None = None) -> float:
        """When a conversion that happened at `occurred_ts` is reported to the ad system.

        By the advertiser's reporting behaviour, or by `conversion_type`'s when given (a
        streamed type is reported seconds later even by a bursty advertiser).
        """
        if conversion_type is None:
            reporting = self.conversion_profiles[advertiser_index].reporting
        else:
            t = self.conversion_types.index(conversion_type)
            reporting = self.type_profiles[t][advertiser_index].reporting
        if reporting == "bursty":
            upload = self._uploads[advertiser_index].next_upload(occurred_ts)
            if not math.isnan(upload):  # NaN: a backfill advertiser, live after its backfill
                return round(upload, 3)
        lag = float(rng.exponential(self.config.report_lag_median_s / math.log(2)))
        return round(occurred_ts + lag, 3)

    # ----------------------------------------------------------------- time and ads

    def _churn_gap(self) -> float:
        if math.isinf(self._churn_mean_gap):
            return math.inf
        return float(self._churn_rng.exponential(self._churn_mean_gap))

    def advance_to(self, ts: float) -> list[Ad]:
        """Apply every ad retirement/arrival up to `ts`; returns the ads created."""
        created: list[Ad] = []
        while self._next_churn_ts <= ts:
            slot = int(self._churn_rng.integers(0, self._pool.shape[0]))
            ad = self._create_ads(np.asarray([round(self._next_churn_ts, 3)]))[0]
            self._pool[slot] = ad.index
            created.append(ad)
            self._next_churn_ts += self._churn_gap()
        return created

    @property
    def ads(self) -> Sequence[Ad]:
        """Every ad ever created, indexed by `Ad.index` (retired ones included)."""
        return self._ads

    def active_ads(self) -> tuple[Ad, ...]:
        return tuple(self._ads[i] for i in self._pool.tolist())

    @property
    def n_new_ads(self) -> int:
        """Ads created after `start_ts`."""
        return len(self._ads) - self._n_initial_ads

    @property
    def request_rate(self) -> float:
        """Requests per second of event time that give `impressions_per_second`."""
        return self.config.impressions_per_second / self.config.mean_slots

    # ----------------------------------------------------------------- requests

    def _sample_contexts(
        self, rng: np.random.Generator, ts: FloatArray
    ) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray, IntArray]:
        n = ts.shape[0]
        user = _draw(rng, self._user_cdf, n)
        device = np.where(rng.random(n) < 0.85, self._u_device[user],
                          rng.integers(0, len(DEVICES), n))
        local = ts + self._u_offset_s[user]
        hour = (np.floor(local / 3600.0) % 24).astype(np.int64)
        # 1970-01-01 was a Thursday (index 3).
        weekday = ((np.floor(local / 86400.0) + 3) % 7).astype(np.int64)
        site = _draw(rng, self._site_cdf, n)
        wifi = rng.random(n) < np.asarray(WIFI_SHARE)[device]
        conn = np.where(wifi, 0, 1).astype(np.int64)
        return user, device.astype(np.int64), hour, weekday, site, conn

    def _sample_candidates(self, n_cand: IntArray) -> IntArray:
        """Distinct pool slots per row (first n_cand[i] columns), padded with -1."""
        rng = self._traffic_rng
        n, kmax = n_cand.shape[0], self.config.candidates_max
        pool = self._pool.shape[0]
        cols = np.arange(kmax)
        valid = cols[None, :] < n_cand[:, None]
        picks = rng.integers(0, pool, (n, kmax))
        # Duplicates are rare (kmax << pool), so redraw the rows that have any.
        while True:
            keyed = np.where(valid, picks, -1 - cols[None, :])
            srt = np.sort(keyed, axis=1)
            bad = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
            if bad.size == 0:
                break
            picks[bad] = rng.integers(0, pool, (bad.size, kmax))
        return np.where(valid, self._pool[picks], -1)

    def sample_batch(self, ts: FloatArray) -> RequestBatch:
        """Sample one request per timestamp (non-decreasing), applying ad churn in between."""
        cfg = self.config
        ts = np.asarray(ts, np.float64)
        if ts.ndim != 1 or ts.shape[0] == 0:
            raise ValueError("ts must be a non-empty 1-d array")
        if np.any(np.diff(ts) < 0):
            raise ValueError("ts must be non-decreasing")
        n = ts.shape[0]
        rng = self._traffic_rng
        user, device, hour, weekday, site, conn = self._sample_contexts(rng, ts)
        n_slots = _draw(rng, self._slot_cdf, n) + 1
        n_cand = rng.integers(cfg.candidates_min, cfg.candidates_max + 1, n)
        candidates = np.empty((n, cfg.candidates_max), np.int64)
        start = 0
        # Each segment sees the pool as it is between two churn events.
        while start < n:
            self.advance_to(float(ts[start]))
            end = int(np.searchsorted(ts, self._next_churn_ts, side="left"))
            end = max(end, start + 1)
            candidates[start:end] = self._sample_candidates(n_cand[start:end])
            start = end
        ids = np.arange(self._next_request_id, self._next_request_id + n, dtype=np.int64)
        self._next_request_id += n
        return RequestBatch(ids, ts, user, device, hour, weekday, site, conn, n_slots,
                            n_cand, candidates)

    def request_features(self, batch: RequestBatch) -> list[dict[str, FeatureValue]]:
        """The user.* and ctx.* features of each request of `batch`."""
        u = batch.user
        region_labels = [r[0] for r in REGIONS]
        hour_labels = [str(h) for h in range(24)]
        site_labels = self._site_labels
        rows = [
            {
                "user.age": AGE_BUCKETS[a],
                "user.gender": GENDERS[g],
                "user.region": region_labels[r],
                "user.interest": CATEGORIES[i],
                "user.sessions_7d": s,
                "ctx.device": DEVICES[d],
                "ctx.hour": hour_labels[h],
                "ctx.weekday": WEEKDAYS[w],
                "ctx.site": site_labels[st],
                "ctx.connection": CONNECTIONS[c],
            }
            for a, g, r, i, s, d, h, w, st, c in zip(
                self._u_age[u].tolist(), self._u_gender[u].tolist(),
                self._u_region[u].tolist(), self._u_interest[u].tolist(),
                self._u_sessions[u].tolist(), batch.device.tolist(), batch.hour.tolist(),
                batch.weekday.tolist(), batch.site.tolist(), batch.connection.tolist(),
                strict=True,
            )
        ]
        if self._numeric:
            # The same values as numbers: what a model must bin or embed itself.
            for row, years, h in zip(rows, self._u_age_years[u].tolist(), batch.hour.tolist(),
                                     strict=True):
                row["user.age"] = years
                row["ctx.hour"] = h
        return rows

    def request_at(self, batch: RequestBatch, i: int) -> Request:
        """Row `i` of `batch` as a `Request` object."""
        row = slice(i, i + 1)
        sub = RequestBatch(*(getattr(batch, f.name)[row] for f in fields(RequestBatch)))
        k = int(batch.n_candidates[i])
        return Request(
            request_id=int(batch.request_ids[i]),
            ts=float(batch.ts[i]),
            user_index=int(batch.user[i]),
            user_id=f"u{int(batch.user[i])}",
            context=Context(int(batch.device[i]), int(batch.hour[i]), int(batch.weekday[i]),
                            int(batch.site[i]), int(batch.connection[i])),
            features=self.request_features(sub)[0],
            n_slots=int(batch.n_slots[i]),
            candidates=tuple(self._ads[a] for a in batch.candidates[i, :k].tolist()),
        )

    def sample_request(self, ts: float) -> Request:
        """One request at event time `ts` (call with non-decreasing ts: the pool moves on)."""
        return self.request_at(self.sample_batch(np.asarray([ts], np.float64)), 0)

    # ----------------------------------------------------------------- truth

    def _terms(self, user: IntArray, device: IntArray, hour: IntArray, weekday: IntArray,
               site: IntArray, conn: IntArray, ad: IntArray) -> dict[str, FloatArray]:
        cols = self._cols
        cat = cols.category[ad]
        interest = self._u_interest[user]
        terms = {
            "user": self._u_main[user],
            "context": (self._b_device[device] + self._b_hour[hour] + self._b_weekday[weekday]
                        + self._b_site[site] + self._b_connection[conn]),
            "ad": cols.main[ad],
            "interactions": (
                self._w_interest_cat[interest, cat]
                + self._w_device_creative[device, cols.creative[ad]]
                + self._w_hour_cat[hour, cat]
                + self._w_age_cat[self._u_age[user], cat]
                + self._w_site_topic * (self._site_topic[site] == cat)
            ),
            "ad_quality": cols.quality[ad],
            "user_effect": self._u_effect[user],
        }
        if self._numeric:
            terms["numeric"] = (self.hour_effect(hour, cat)
                                + self.age_effect(self._u_age_years[user], cat))
        return terms

    def _check_positions(self, position: IntArray) -> None:
        if position.size and (position.min() < 1 or position.max() > self.config.max_slots):
            raise ValueError(f"position must be in 1..{self.config.max_slots}")

    def logit_terms_batch(self, batch: RequestBatch, rows: IntArray,
                          ads: IntArray) -> dict[str, FloatArray]:
        """`logit_terms` for ad index `ads[j]` in request `rows[j]` of `batch`."""
        terms = self._terms(
            batch.user[rows], batch.device[rows], batch.hour[rows], batch.weekday[rows],
            batch.site[rows], batch.connection[rows], ads,
        )
        return {"bias": np.full(rows.shape[0], self.bias), **terms}

    def true_ctr_batch(self, batch: RequestBatch, rows: IntArray, ads: IntArray,
                       positions: IntArray) -> FloatArray:
        """True CTR of ad index `ads[j]` shown at `positions[j]` for request `rows[j]`."""
        self._check_positions(positions)
        z = sum(self.logit_terms_batch(batch, rows, ads).values())
        return _sigmoid(z) * self._position_bias[positions - 1]

    def logit_terms(self, request: Request, ad: Ad) -> dict[str, float]:
        """The parts of the true logit (before position bias); they sum to the logit.

        Keys: bias, user, context, ad (feature main effects), interactions, ad_quality,
        user_effect. For analysis and tests, e.g. what a model without interactions loses.
        """
        c = request.context
        terms = self._terms(*(np.asarray([v], np.int64) for v in (
            request.user_index, c.device, c.hour, c.weekday, c.site, c.connection, ad.index)))
        return {"bias": self.bias, **{k: float(v[0]) for k, v in terms.items()}}

    def true_ctr(self, request: Request, ad: Ad, position: int) -> float:
        """P(click) if `ad` is shown to `request` at `position` (1 = top)."""
        self._check_positions(np.asarray([position]))
        z = sum(self.logit_terms(request, ad).values())
        return float(1.0 / (1.0 + math.exp(-z))) * self.config.position_bias[position - 1]

    def _click_delays(self, rng: np.random.Generator, n: int) -> FloatArray:
        cfg = self.config
        d = cfg.click_delay_median_s * np.exp(cfg.click_delay_sigma * rng.standard_normal(n))
        return np.clip(d, cfg.click_delay_min_s, cfg.click_delay_max_s)

    def sample_clicks(self, rng: np.random.Generator, ctr: FloatArray,
                      ts: FloatArray) -> FloatArray:
        """Click ts per impression (rounded to ms), NaN where the user does not click."""
        ctr = np.asarray(ctr, np.float64)
        clicked = rng.random(ctr.shape[0]) < ctr
        click_ts = np.round(np.asarray(ts, np.float64) + self._click_delays(rng, ctr.shape[0]), 3)
        return np.where(clicked, click_ts, np.nan)

    def sample_click(self, rng: np.random.Generator, ctr: float, ts: float) -> float | None:
        """The click ts of one impression shown at `ts`, or None if it is never clicked."""
        t = float(self.sample_clicks(rng, np.asarray([ctr]), np.asarray([ts]))[0])
        return None if math.isnan(t) else t

    def sample_conversions(self, rng: np.random.Generator, user_index: int, ad: Ad,
                           click_ts: float, at_ts: float | None = None
                           ) -> tuple[Conversion, ...]:
        """The conversions that follow a click: at most one per type, in `conversion_types`
        order (so none, one or several; "single" mix: at most one, of type "default").

        Per type, whether it converts is drawn with the type's true rate, independently of the
        other types given the click; when it happens, from the advertiser's delay distribution
        for the type (capped at the attribution horizon); when it is reported, from the type's
        reporting (`report_ts`). Draws come only from `rng`, the caller's conversion stream,
        and the advertiser's own upload schedule. The rates are those at `at_ts` (the
        impression's time, so the truth file's "cvr" is the rate drawn with), else `click_ts`.
        """
        if self.config.base_cvr <= 0:
            return ()
        at = click_ts if at_ts is None else at_ts
        if len(self.conversion_types) == 1:
            rates = [self.true_cvr(user_index, ad, at)]
        else:
            rates = list(self.true_cvr_by_type(user_index, ad, at).values())
        out: list[Conversion] = []
        for t, (name, p) in enumerate(zip(self.conversion_types, rates, strict=True)):
            if rng.random() >= p:
                continue
            prof = self.type_profiles[t][ad.advertiser_index]
            delay = self.draw_delay(prof, rng)
            occurred = round(click_ts + min(delay, self.config.conversion_horizon_s), 3)
            reported = self.report_ts(ad.advertiser_index, occurred, rng, name)
            out.append(Conversion(ts=reported, conversion_type=name, occurred_ts=occurred))
        return tuple(out)
