"""Service settings: one object per process, from CTRLOOP_* environment variables (CLI flags of
`ctrloop serve` override them by setting the variables before uvicorn starts its workers)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from ctrloop.io.settings import ConnectionSettings


class ServiceSettings(ConnectionSettings):
    model_config = SettingsConfigDict(env_prefix="CTRLOOP_", extra="ignore")

    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    max_candidates: int = Field(500, ge=1, le=10_000, description="candidates per /v1/score")
    max_events_per_request: int = Field(1000, ge=1, le=100_000,
                                        description="events per /v1/events")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="request body limit")
    produce_timeout_s: float = Field(5.0, gt=0, description="wait for Kafka acks this long")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503")
    reload_poll_s: float = Field(2.0, gt=0, description="registry polling (pub/sub fallback)")
    prior_ctr: float = Field(0.03, gt=0, lt=1, description="cold-start prediction")
    feature_spec: Path | None = Field(
        None, description="serve only snapshots with this spec (default: the first loaded)")
    admin_token: str | None = Field(
        None, min_length=8, description="bearer token of /v1/admin/*; unset: admin disabled")
    log_impressions: bool = Field(True, description="allow options.log (needs Kafka)")
    explore: bool = Field(True, description="allow options.explore (global switch)")
    # 128 = ctrloop.core.exploration.DEFAULT_DRAWS (a test keeps them equal); importing it here
    # would import torch into every reader of the settings.
    explore_draws: int = Field(
        128, ge=16, le=10_000,
        description="posterior draws per explored request for the propensities of its top_k")
    # 0.025 = ctrloop.core.exploration.DEFAULT_TEMPERATURE (a test keeps them equal).
    explore_temperature: float = Field(
        0.025, gt=0, le=10,
        description="Thompson sampling draws from the posterior with its variance times this "
                    "(1: the calibrated posterior; smaller explores less)")
    explore_cost_cap: float = Field(
        0.1, ge=0, le=1,
        description="explored requests fall back to the mean ranking while the running average "
                    "exploration cost (share of the greedy top_k's expected value) is at or "
                    "above this; 1: no cap")
    explore_max_share: float = Field(
        1.0, ge=0, le=1, description="at most this share of requests asking to explore do")

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, v: object) -> object:
        # Compose files write ${CTRLOOP_ADMIN_TOKEN:-}: an empty value means "admin disabled".
        return None if v == "" else v
