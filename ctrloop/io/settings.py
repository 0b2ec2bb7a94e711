"""Settings shared by every process: where Kafka and Redis are and what the topics are called.

Each process builds one settings object at its entry point (trainer/settings.py,
service/settings.py subclass this one), from CTRLOOP_* environment variables overridden by CLI
flags; nothing below the entry point reads the environment.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctrloop.core.events import DEFAULT_MAX_AHEAD_S


class ConnectionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTRLOOP_", extra="ignore")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap host:port")
    topic_impressions: str = "impressions"
    topic_clicks: str = "clicks"
    topic_conversions: str = "conversions"
    topic_dead_letter: str = "ctrloop.dead-letter"
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="model registry")
    registry_namespace: str = Field("ctrloop", min_length=1,
                                    description="prefix of every registry key and channel")
    max_event_ahead_s: float = Field(
        DEFAULT_MAX_AHEAD_S, gt=0, le=30 * 86400,
        description="refuse events whose ts is more than this ahead of the receiver's clock "
                    "(service: wall clock -> 422; trainer: Kafka record timestamp -> DLQ)")

    @model_validator(mode="after")
    def _topics_differ(self) -> ConnectionSettings:
        names = [self.topic_impressions, self.topic_clicks, self.topic_conversions,
                 self.topic_dead_letter]
        if len(set(names)) != len(names):
            raise ValueError(f"topic names must all differ, got {names}")
        return self

    @property
    def topic_of(self) -> dict[str, str]:
        """Event type → topic."""
        return {"impression": self.topic_impressions, "click": self.topic_clicks,
                "conversion": self.topic_conversions}
