"""Conversion-delay policies: when a click becomes a pCVR training sample, and with what label.

Conversions are reported minutes to days after the click, and some advertisers upload them in
bursts at irregular times. A click released to training before its conversion is reported is a
*fake negative*; waiting long for every click makes the model stale. A policy decides, per click,
when to release it and with which label, and what to do when a conversion comes after the click
was released as a negative. Every policy here is pure and driven by event time only (the caller
feeds clicks and conversions and moves a watermark), so the same object runs on Kafka and in
replay, and `state()`/`restore()` make a restart invisible.

Policies, by name (`build_policy`):

- `naive`: each click is released at once as a negative; when its conversion comes, a positive
  is released as well (the negative stays: this is the biased baseline).
- `fnw`: the same samples, learned with the fake-negative weights of Ktena et al. (2019):
  positives weigh 1 + p, negatives (1 - p)(1 + p), p the model's current pCVR (no gradient).
  Unbiased when *every* conversion eventually gets its duplicate positive, whatever the delay.
- `fixed:SECONDS`: a click waits SECONDS of event time; its label is "conversion reported at or
  before click_ts + SECONDS" (the edge is inclusive).
- `variance` (paper §6.3, designed here): a per-advertiser wait chosen from the dispersion of the
  advertiser's conversion reports (below); labels and late corrections as `fixed`.
- `oracle`: the eventual label is known at the click (read from the simulator's truth): the
  "prophet" every other policy is measured against. Replay only.

**Late conversions are corrected, not dropped.** When a conversion arrives after its click was
released with label q (0, or the variance policy's expected label), `fixed` and `variance` emit a
*retraction pair*: the same features with label 1 and weight +1, and with label q and weight -1.
Summed over the stream, every click then contributes exactly one sample with its eventual label
(the -1 cancels the earlier sample's loss term to first order; on the logit its gradient is a
constant push of 1 - q toward the positive), so the correction is unbiased whatever the delay
distribution, unlike a bare duplicate positive (which leaves the fake negative in, `naive`) or
FNW's weights (which assume every click was first released as a negative). Clicks are remembered
for `remember_s` after release (the attribution horizon plus the longest upload gap); a
conversion for a click forgotten by then is counted (`unmatched_conversions`) and dropped.

**The variance policy's delay rule (issue 11: `wait_rule="delay"`, opt-in).** Per advertiser key
(the advertiser's feature bucket) the policy keeps a histogram of *click-to-report* delays
(25 log-spaced bins from 1 minute to 16 days, exponentially decayed with `half_life_s`, 7 days),
one entry per matched conversion at its report time. A click of the key waits

    W = clamp(Q_q(h_key + n0 * h_pool / |h_pool|), floor, ceiling)

Q_q the `wait_quantile` (q = 0.9) of the histogram, log-interpolated inside a bin, h_pool the sum
of every key's histogram, n0 = `shrink_reports` pseudo-reports of the pool (thin keys borrow the
pool's shape), and the ceiling before any report anywhere (volatile until shown otherwise).
Why this statistic: the bias a fast release costs is the share of an advertiser's conversions
still to be reported when its clicks go out, and that share is 1 - F(W), F the advertiser's
click-to-report delay distribution. Waiting the q-quantile holds it at 1 - q for *every*
advertiser, whatever its delays (10 minutes or 3 days) and whatever its reporting: for a bursty
advertiser the delay includes the wait for the next upload, so its gaps (hours to days) are in
the histogram and its wait covers them, while a streaming advertiser with short delays is
released in minutes. The report-time histogram is an unbiased sample of the delays under
steady traffic (every click's conversion is reported at some time; reports arriving now come
from clicks of all ages); it is biased short only while a key is younger than its delays (the
first days of an advertiser or of the stream), which the pool's pseudo-reports soften. Silence
changes nothing (a bursty advertiser between uploads is silent too): the histogram decays only
with time, toward the pool's shape. It is not the default: on the held-out seeds every segment
over-predicted under it (+17% to +94% against the true CVR, seed by seed), against -15% to +20%
under the dispersion rule, for an AUC 0.011 closer to the prophet on average; the learner
over-predicts from late but correct labels (docs/delays.md). What the dispersion rule below
gets wrong, measured (docs/delays.md): gaps between uploads longer than its 48 h window look
like no reports at all, so a bursty advertiser falls back to the pool (mostly streaming,
D ~ 1) and is released after the floor; and the pool's D, moved by any big upload, moves every
thin advertiser's wait between the floor and the ceiling together, so the share of fake
negatives in training swings by day (per-day bias -42% to +30% on one world).

**The dispersion statistic (`wait_rule="dispersion"`, the default; computed and reported under
either rule).** Event time is cut into buckets of `bucket_s` (1 h); the
statistic looks at the last K = `window_buckets` (48) whole buckets of *reported* conversions
r_1..r_K:

    D = sum_k (r_k - r_mean)^2 / ((K - 1) * r_mean)                  (index of dispersion)

D is about 1 when reports arrive as a Poisson stream (an advertiser that reports as conversions
happen, at steady traffic) and about (reports per upload) when they arrive in uploads, so it
separates streaming from bursty reporting once an advertiser has a few reports per upload.
It is shrunk toward the pool (the report-weighted mean D of all advertisers; `prior_dispersion`
before any data) by the number of reports n in the window: D~ = (n D + n0 D_pool) / (n + n0),
n0 = `shrink_reports` — thin advertisers borrow the coarser level. The wait is

    W(D~) = floor                                   if D~ <= d_lo
          = floor * (ceiling / floor) ** t,  t = (ln D~ - ln d_lo) / (ln d_hi - ln d_lo)
          = ceiling                                 if D~ >= d_hi

with floor 5 min, ceiling 3 days (the longest upload gap of the simulator plus conversion
delay), d_lo 2, d_hi 8: stable advertisers are released within minutes, volatile ones when their
uploads have come in. Waits are recomputed when the bucket changes and apply to clicks from then.

A click released with label 0 whose conversion comes later is a fake negative until the
retraction pair arrives, so the bias of a fast release is the conversion mass still to come; it
is small for advertisers whose delays are short and for ads with a long history, and largest for
new ads of advertisers with long delays (docs/benchmarks.md measures it). `soft_labels=True`
(off by default) releases an unconverted click with the expected label
q = h (1 - F(W)) / (1 - h F(W)) instead (h: the advertiser's decayed conversion rate, F: its
decayed click-to-report delay histogram). Without more, it over-counts (measured +50% on a
5-day simulation): q is fixed at release while the posterior of a click that stays unconverted
keeps falling. So a soft-labelled click still unconverted at `settle_s` (3 days) after the click
is *settled*: a retraction pair (label 0, weight +1) and (label q, weight -1) turns it into a
negative, and a conversion after that is corrected as usual; every click's net label is then its
eventual one, as with hard labels. Measured on a month (docs/benchmarks.md), it is unstable:
the settle pairs push the logit down at a constant rate q whatever the prediction, and with one
per unconverted click they dominate the loss (per-day bias between +74% and -100%, AUC 0.55).
Kept as an option for experiments, off by default.

**State and memory.** Pending clicks (with their feature rows), remembered released clicks and
per-advertiser statistics are plain data in `state()`. At most `max_clicks` clicks are held
(pending plus remembered); at the cap the oldest remembered click is forgotten (its late
conversion, if any, will be dropped and counted), and if none is remembered the pending click
with the earliest deadline is released early with the label it has (counted as `evicted`).
Orphan conversions (before their click) wait `orphan_ttl` seconds, at most `max_orphans`.
`state()` also carries the `PolicyConfig`, so a reader of a checkpoint can rebuild the policy.

**Observability.** `key_view(key)` gives a key's current wait and, for `variance`, the statistic
raw and shrunk and the reports in its window, without side effects; `pool_view()` the pooled
statistic. `ctrloop/core/delay_report.py` joins them with the model's calibration over matured
clicks into a bounded per-advertiser report (published with every pCVR snapshot, exported on
the service's /metrics, printed by `ctrloop delay-report`).

**Conversion types.** Without `conversion_types` (PipelineConfig; CTRLOOP_CONVERSION_TYPES),
every conversion counts for its click whatever its type and the first one decides the label.
With them, the pipeline holds one policy per type, so the policy key is in effect (advertiser,
type): each type has its own statistic and wait (a purchase uploaded in bursts waits, a signup
reported live does not). A click is a pending sample per type, released per type with that
type's label, and the retraction pairs are per type too; samples carry the type's index
(`CvrSample.task`), and the pCVR model is the multi-task STEM FwFM (ctrloop/core/models/stem.py,
one output per type, a sample's loss touching only its type's output). Conversions of a type
not listed are counted (`cvr_other_types`) and not learned. Memory: the pending and remembered
clicks are held once per type (`max_clicks` is per type).
"""

from __future__ import annotations

from collections.abc import Collection

from ctrloop.core.delays.base import CvrSample, DelayPolicy, PolicyConfig, PolicyStats
from ctrloop.core.delays.fixed import FixedPolicy
from ctrloop.core.delays.naive import FNWPolicy, NaivePolicy
from ctrloop.core.delays.oracle import OraclePolicy
from ctrloop.core.delays.variance import DELAY_EDGES, VariancePolicy
from ctrloop.core.delays.variance import _cdf_at as _cdf_at
from ctrloop.core.delays.variance import _KeyStats as _KeyStats
from ctrloop.core.errors import ConfigError

POLICY_NAMES = ("variance", "fixed:SECONDS", "naive", "fnw", "oracle")


def build_policy(name: str, config: PolicyConfig | None = None,
                 converted: Collection[str] | None = None) -> DelayPolicy:
    """A policy by name: variance, fixed:SECONDS, naive, fnw, oracle (needs `converted`)."""
    name = name.strip()
    if name == "variance":
        return VariancePolicy(config)
    if name == "naive":
        return NaivePolicy(config)
    if name == "fnw":
        return FNWPolicy(config)
    if name == "oracle":
        if converted is None:
            raise ConfigError("delay policy 'oracle' reads the truth: replay with --truth")
        return OraclePolicy(converted, config)
    if name.startswith("fixed:"):
        try:
            seconds = float(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"bad delay policy {name!r}: fixed:SECONDS needs a number") from None
        return FixedPolicy(seconds, config)
    raise ConfigError(f"unknown delay policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def validate_policy_name(name: str) -> str:
    """Raise ConfigError for a name `build_policy` would refuse (oracle is accepted here)."""
    build_policy(name, converted=() if name.strip() == "oracle" else None)
    return name


__all__ = ["DELAY_EDGES", "POLICY_NAMES", "CvrSample", "DelayPolicy", "FNWPolicy", "FixedPolicy",
           "NaivePolicy", "OraclePolicy", "PolicyConfig", "PolicyStats", "VariancePolicy",
           "build_policy", "validate_policy_name"]
