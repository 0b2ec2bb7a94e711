"""Trainer settings: one object per process, read from CTRLOOP_* environment variables at the
entry point (CLI flags override), validated when built, passed down. Nothing below reads the
environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctrloop.core.delays import validate_policy_name
from ctrloop.core.errors import ConfigError
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig
from ctrloop.core.models import check_hparams, model_parameters
from ctrloop.core.posterior import DEFAULT_SCALE, PosteriorConfig
from ctrloop.io.settings import ConnectionSettings
from ctrloop.trainer.pipeline import PipelineConfig


class LearningSettings(BaseSettings):
    """What replay and the streaming trainer share: the join, the model, the cadence."""

    model_config = SettingsConfigDict(env_prefix="CTRLOOP_", extra="ignore")

    # 120 s, not the 900 s of classic attribution: positives are learned at click time but
    # negatives only when the window closes, and that lag biases the served model upward for
    # anything fresh (docs/benchmarks.md: served calibration 1.01 at 120 s, 1.07 at 300 s, 1.9
    # at 900 s on the simulator). Longer windows want the delay policies of the pCVR release.
    click_window: float = Field(120.0, gt=0, description="click-attribution window, seconds")
    allowed_lateness: float = Field(30.0, ge=0, description="watermark = max ts - this")
    publish_interval: float = Field(1.0, gt=0, description="event-time seconds between snapshots")
    # Learning cadence (trainer/pipeline.py): 1 learns every tick's released samples at that
    # tick; more trades a staler served model for fewer optimizer steps on sparse streams.
    min_learn_samples: int = Field(1, ge=1, description="learn once this many samples wait")
    max_learn_wait: float = Field(60.0, ge=0, description="...or the oldest waited this long, "
                                  "event seconds")
    warmup: bool = Field(True, description="skip positives of a fresh trainer's first window")
    max_pending: int = Field(2_000_000, ge=1, description="impressions held by the joiner")
    evict: Literal["emit", "drop"] = "emit"
    model: str = "fwfm"
    dim: int = Field(16, ge=1, le=512, description="embedding size (fwfm; other models that "
                     "take a dim when given)")
    # The architecture's own hyper-parameters (ctrloop/core/models/), a JSON object, e.g.
    # '{"tables": [16, 16], "experts": [{"type": "gwpfm", "table": 0}]}' for hmoe.
    model_params: str = Field("", description="JSON object of the model's hyper-parameters "
                              "(see ctrloop/core/models/)")
    batch_size: int = Field(1024, ge=1)
    rank_loss_weight: float = Field(0.0, ge=0, description="weight of the pairwise ranking "
                                    "loss added to BCE (0: BCE alone)")
    sparse_lr: float = Field(0.05, gt=0)
    adagrad_initial: float = Field(1e-6, ge=0, description="Adagrad's initial accumulator for "
                                   "embedding rows (0: plain Adagrad, a row's first step is a "
                                   "full learning-rate step)")
    dense_lr: float = Field(1e-3, gt=0)
    metrics_window: int = Field(100_000, ge=1)
    feature_spec: Path | None = None
    seed: int = 0
    # pCVR: when a click becomes a training sample (ctrloop/core/delays/). `oracle` reads the
    # simulator's truth and exists for replay measurements only.
    delay_policy: str = Field("variance", description="variance, fixed:SECONDS, naive, fnw, "
                              "oracle (replay with --truth only)")
    # Several conversion types as tasks of one pCVR model (STEM), each with its own delay
    # statistics and window. Empty: one task, and every conversion counts whatever its type.
    conversion_types: str = Field("", description="comma-separated conversion types learned as "
                                  "tasks of one pCVR model, e.g. signup,purchase (empty: one "
                                  "task, any type)")

    # The GP posterior over the pCTR logit (ctrloop/core/posterior.py, docs/exploration.md). The
    # per-field prior variances of the simulator's id fields are built in (measured); the
    # prior here is for every other field.
    posterior: bool = Field(True, description="publish a posterior over the pCTR logit")
    posterior_prior_var: float = Field(1.0, gt=0, description="prior variance of a row's "
                                       "residual logit weight (fields without a default)")
    posterior_scale: float = Field(DEFAULT_SCALE, gt=0,
                                   description="multiplies every posterior variance")
    posterior_half_life_s: float = Field(86_400.0, gt=0,
                                         description="event seconds for evidence to halve")

    @field_validator("delay_policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        try:
            return validate_policy_name(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("conversion_types")
    @classmethod
    def _types(cls, v: str) -> str:
        names = [t.strip() for t in v.split(",") if t.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"conversion types must be distinct, got {v!r}")
        if any(len(t) > 64 for t in names):
            raise ValueError("a conversion type is at most 64 characters")
        return ",".join(names)

    @field_validator("model_params")
    @classmethod
    def _params_json(cls, v: str) -> str:
        if not v.strip():
            return ""
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"model params are not valid JSON ({e}): {v!r}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"model params must be a JSON object, got {v!r}")
        return v

    @model_validator(mode="after")
    def _params_fit_model(self) -> LearningSettings:
        try:
            check_hparams(self.model, self.model_hparams())
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def model_hparams(self) -> dict[str, Any]:
        """The model params, with `dim` added where the model takes one: always for fwfm (its
        default before model params existed), for the others only when dim was set."""
        params: dict[str, Any] = json.loads(self.model_params) if self.model_params else {}
        if self.model not in ("fwfm",) and "dim" not in self.model_fields_set:
            return params
        if "dim" in params and "dim" in self.model_fields_set and params["dim"] != self.dim:
            raise ConfigError(f"dim given twice, {self.dim} and {params['dim']} in model params")
        if "dim" in model_parameters(self.model):
            params.setdefault("dim", self.dim)
        return params

    def pipeline_config(self) -> PipelineConfig:
        hparams = self.model_hparams()
        return PipelineConfig(
            conversion_types=tuple(t for t in self.conversion_types.split(",") if t),
            publish_interval=self.publish_interval,
            allowed_lateness=self.allowed_lateness,
            warmup=self.warmup,
            min_learn_samples=self.min_learn_samples,
            max_learn_wait=self.max_learn_wait,
            delay_policy=self.delay_policy,
            posterior=PosteriorConfig(prior_var=self.posterior_prior_var,
                                      scale=self.posterior_scale,
                                      half_life_s=self.posterior_half_life_s)
            if self.posterior else None,
            joiner=JoinerConfig(click_window=self.click_window, max_pending=self.max_pending,
                                evict=self.evict),
            learner=LearnerConfig(model=self.model, hparams=hparams, batch_size=self.batch_size,
                                  sparse_lr=self.sparse_lr, dense_lr=self.dense_lr,
                                  metrics_window=self.metrics_window,
                                  rank_weight=self.rank_loss_weight,
                                  adagrad_initial=self.adagrad_initial),
        )


class TrainerSettings(LearningSettings, ConnectionSettings):
    """`ctrloop train`: Kafka in, Redis registry out, checkpoints on local disk."""

    model_config = SettingsConfigDict(env_prefix="CTRLOOP_", extra="ignore")

    group_id: str = "ctrloop-trainer"
    registry_keep: int = Field(5, ge=1, description="snapshots kept in the registry")
    checkpoint_dir: Path = Path("runs/trainer")
    checkpoint_interval_s: float = Field(10.0, gt=0, description="wall seconds")
    min_publish_interval_s: float = Field(1.0, ge=0, description="wall seconds between pushes")
    idle_advance_s: float = Field(2.0, gt=0, description="idle this long: move event time on")
    log_interval_s: float = Field(5.0, gt=0)
    max_events: int | None = Field(None, ge=1, description="stop after this many (tests)")
    stop_when_idle_s: float | None = Field(None, gt=0, description="stop after idle (tests)")
