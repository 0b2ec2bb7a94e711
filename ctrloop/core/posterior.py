"""A Gaussian-process posterior over the CTR logit, updated online (issue 5; notes §2).

The logit is f(x) = m(x) + g(x): m is the FwFM (the learned mean function) and g a residual
with an additive delta kernel over the hashed embedding rows a FeatureEncoder produces,

    k(x, x') = sum_f s_f^2 * [row_f(x) == row_f(x')],

i.e. in weight space one independent weight w_r ~ N(0, s_f^2) per row r of field f, and
g(x) = sum_f w_{row_f(x)}. That is exactly the FwFM's linear part, so the posterior mean of g
is already carried by m (zero here) and only its covariance is new. The Laplace approximation
of the logistic likelihood, kept diagonal, gives per row

    precision_r = 1 / s_f^2 + sum_{samples touching r} weight * p (1 - p),

p the model's prediction for the sample when it was learned, and the logit's variance is

    Sigma(x) = scale * sum_f 1 / precision_{row_f(x)}.

Rows never touched (a new ad's id, a new creative) keep the prior: wide; rows seen often are
narrow. Two candidates sharing a row (an advertiser, the request's user) are correlated through
it, so a joint Thompson draw takes one perturbation per unique row.

Forgetting: evidence halves every `half_life_s` of event time, so a drifting world widens old
rows back toward the prior. It is stored scaled by a global factor (`_decay`) so that moving
time costs O(1), not a pass over the table: evidence_r = stored_r * decay.

Why this approximation, the measured coverage and the defaults: docs/exploration.md.

>>> from ctrloop.core.features import FeatureSpec, Field
>>> spec = FeatureSpec((Field("ad.id", "categorical", "ad", 8),))
>>> post = LogitPosterior(spec, PosteriorConfig(prior_var=1.0, field_prior_var={}, scale=1.0))
>>> rows = torch.tensor([[1], [2]])
>>> post.update(rows[:1], torch.tensor([0.5]))
>>> post.variance(rows).tolist()  # row 1 gained precision 0.25; row 2 keeps the prior
[0.800000011920929, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ctrloop.core.errors import ConfigError, SnapshotError
from ctrloop.core.features import FeatureSpec

# Below this the stored evidence is folded back (stored * decay, decay = 1); far from float32's
# range even for rows with 1e9 samples' worth of evidence.
_RENORMALIZE_BELOW = 1e-12

# Per-field prior variances s_f^2 and the scale, fit on the simulator (benchmarks/coverage.py,
# seed 1, hours 12-24 of a 48 h stream; docs/exploration.md). Only fields whose rows see
# little traffic need one: a row with thousands of samples is narrow under any prior. ctx.weekday
# is here because a new day is a never-seen row whose true effect is small.
DEFAULT_FIELD_PRIOR_VAR: dict[str, float] = {
    "user.id": 0.15, "ad.id": 0.25, "ad.advertiser_id": 0.02, "ctx.site": 0.08,
    "ctx.weekday": 0.02,
}
# > 1: the diagonal Laplace posterior is too sure of rows with much evidence, and the FwFM's
# own error (interactions it has not fit) is not in it at all.
DEFAULT_SCALE = 2.0


@dataclass(frozen=True)
class PosteriorConfig:
    """`prior_var` is s_f^2 for every field not named in `field_prior_var`; `scale` multiplies
    every variance (the calibration of the diagonal approximation); `half_life_s` is event
    time (math.inf: never forget)."""

    prior_var: float = 1.0
    field_prior_var: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_FIELD_PRIOR_VAR))
    scale: float = DEFAULT_SCALE
    half_life_s: float = 86_400.0

    def __post_init__(self) -> None:
        values = [self.prior_var, *self.field_prior_var.values()]
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ConfigError("posterior prior variances must be finite and > 0")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError("posterior scale must be finite and > 0")
        if not self.half_life_s > 0:
            raise ConfigError("posterior half_life_s must be > 0 seconds (inf: never forget)")

    def field_priors(self, spec: FeatureSpec) -> list[float]:
        # Names the spec lacks are ignored, not an error: the defaults name the simulator's
        # fields and must not stop a model with other fields from training.
        return [float(self.field_prior_var.get(n, self.prior_var)) for n in spec.names]


class LogitPosterior:
    """Diagonal Laplace posterior of the additive-kernel residual; see the module docstring."""

    def __init__(self, spec: FeatureSpec, config: PosteriorConfig | None = None,
                 *, priors: list[float] | None = None) -> None:
        self.spec = spec
        self.config = config or PosteriorConfig()
        prior = priors if priors is not None else self.config.field_priors(spec)
        if len(prior) != spec.num_fields:
            raise ConfigError(f"{len(prior)} prior variances for {spec.num_fields} fields")
        self.prior_var = torch.tensor(prior, dtype=torch.float32)
        self._prior_precision = 1.0 / self.prior_var
        self.scale = float(self.config.scale)
        self._evidence = torch.zeros(spec.total_buckets, dtype=torch.float32)
        self._decay = 1.0
        self.clock = -math.inf

    # --- learning ---------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Move event time to `now`, fading the evidence; earlier or infinite times are no-ops."""
        if not math.isfinite(now) or now <= self.clock:
            return
        if math.isfinite(self.clock) and math.isfinite(self.config.half_life_s):
            self._decay *= 2.0 ** (-(now - self.clock) / self.config.half_life_s)
            if self._decay < _RENORMALIZE_BELOW:
                self._evidence.mul_(self._decay)
                self._decay = 1.0
        self.clock = now

    @torch.no_grad()
    def update(self, rows: torch.Tensor, p: torch.Tensor,
               weights: torch.Tensor | None = None) -> None:
        """Add the curvature p(1-p) (times the sample weight) of each sample to every row it
        touches. Negative weights (retractions) take evidence back, never below none."""
        if rows.numel() == 0:
            return
        p = p.detach().to(torch.float32)
        h = p * (1.0 - p)
        if weights is not None:
            h = h * weights.to(torch.float32)
        flat = rows.reshape(-1)
        contrib = h.unsqueeze(1).expand(rows.shape).reshape(-1) / self._decay
        self._evidence.index_add_(0, flat, contrib)
        if weights is not None and bool((weights < 0).any()):
            touched = torch.unique(flat)
            self._evidence[touched] = self._evidence[touched].clamp_(min=0.0)

    # --- reading ----------------------------------------------------------------------------

    def evidence(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum of weight * p(1-p) per row (faded), same shape as `rows`."""
        # take: the same gather as indexing at ~60% of the cost (it is on the scoring path);
        # a served snapshot's evidence is already faded (decay 1), so no multiply then.
        ev = (torch.take(self._evidence, rows) if rows.dtype == torch.int64
              else self._evidence[rows])
        return ev if self._decay == 1.0 else ev * self._decay

    def row_variance(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [B, F]: each row's posterior variance of its residual weight, scale
        included. Column f of `rows` must hold field f's rows (FeatureEncoder's layout)."""
        precision = self._prior_precision + self.evidence(rows)
        return self.scale / precision

    def variance_table(self) -> torch.Tensor:
        """float32 [total_buckets]: `row_variance` of every row, for a reader whose posterior
        no longer changes (a served snapshot): one gather per request instead of three ops.
        Same float32 arithmetic, so the values are identical to `row_variance`'s."""
        buckets = torch.tensor([f.buckets for f in self.spec.fields])
        precision = torch.repeat_interleave(self._prior_precision, buckets)
        ev = self._evidence if self._decay == 1.0 else self._evidence * self._decay
        return self.scale / (precision + ev)

    def variance(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [B]: the posterior variance of the logit, Sigma(x)."""
        return self.row_variance(rows).sum(1)

    # --- checkpoint and snapshot ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs to continue bit for bit (a copy)."""
        return {"evidence": self._evidence.clone(), "decay": self._decay, "clock": self.clock}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ev = state["evidence"]
        if tuple(ev.shape) != (self.spec.total_buckets,):
            raise ConfigError(f"posterior state has {tuple(ev.shape)} rows, the spec "
                              f"{self.spec.total_buckets}")
        self._evidence = ev.to(torch.float32).clone()
        self._decay = float(state["decay"])
        self.clock = float(state["clock"])

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """One float32 per row: the faded evidence, so a reader needs no decay factor."""
        return {"posterior.evidence": (self._evidence * self._decay).contiguous()}

    def snapshot_header(self) -> dict[str, Any]:
        return {"prior_var": self.prior_var.tolist(), "scale": self.scale,
                "half_life_s": self.config.half_life_s if math.isfinite(
                    self.config.half_life_s) else None,
                "clock": self.clock if math.isfinite(self.clock) else None}

    @classmethod
    def from_snapshot(cls, spec: FeatureSpec, header: Mapping[str, Any],
                      tensors: Mapping[str, torch.Tensor]) -> LogitPosterior:
        """The serving copy of a published posterior; SnapshotError if it does not fit."""
        try:
            prior = [float(v) for v in header["prior_var"]]
            half = header.get("half_life_s")
            config = PosteriorConfig(prior_var=1.0, field_prior_var={}, scale=float(
                header["scale"]), half_life_s=math.inf if half is None else float(half))
            post = cls(spec, config, priors=prior)
            ev = tensors["posterior.evidence"]
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise SnapshotError(f"malformed posterior in snapshot ({type(e).__name__}: {e})"
                                ) from None
        if not all(math.isfinite(v) and v > 0 for v in prior):
            raise SnapshotError("posterior prior variances must be finite and > 0")
        if ev.dtype != torch.float32 or tuple(ev.shape) != (spec.total_buckets,):
            raise SnapshotError(f"posterior evidence is {ev.dtype} {tuple(ev.shape)}, expected "
                                f"float32 ({spec.total_buckets},)")
        if not bool(torch.isfinite(ev).all()) or bool((ev < 0).any()):
            raise SnapshotError("posterior evidence must be finite and >= 0")
        post._evidence = ev
        clock = header.get("clock")
        post.clock = -math.inf if clock is None else float(clock)
        return post
