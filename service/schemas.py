"""HTTP request and response bodies of the scoring service, with the examples OpenAPI shows.

Limits (id lengths, feature counts, value bounds) come from the event contract in
`ctrloop/events.py`, so a request the service accepts always yields impressions the trainer
accepts. Requests are parsed straight from bytes with `model_validate_json` (4x faster than
FastAPI's default json.loads + validate, ../shared/docs/measured-here.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from ctrloop.events import (
    MAX_ABS_NUMBER,
    MAX_CONVERSION_TYPE_LEN,
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_POSITION,
    MAX_STRING_VALUE_LEN,
    MAX_TS,
    MIN_TS,
)

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_FEATURE_NAME_LEN)]
# Booleans become the strings "true"/"false" as in the contract, so the encoder hashes (and the
# logged impression carries) exactly what the trainer will see; done inside validation, which
# is cheaper than a second pass over every candidate's features.
FeatureValue = (
    Annotated[str, StringConstraints(max_length=MAX_STRING_VALUE_LEN)]
    | Annotated[bool, AfterValidator(lambda b: "true" if b else "false")]
    | Annotated[int, Field(ge=-int(MAX_ABS_NUMBER), le=int(MAX_ABS_NUMBER))]
    | Annotated[float, Field(ge=-MAX_ABS_NUMBER, le=MAX_ABS_NUMBER, allow_inf_nan=False)]
    | None
)
Features = Annotated[dict[FeatureName, FeatureValue], Field(max_length=MAX_FEATURES)]
Timestamp = Annotated[float, Field(ge=MIN_TS, le=MAX_TS, allow_inf_nan=False,
                                   description="Unix seconds (event time)")]
HARD_MAX_CANDIDATES = 10_000  # the schema's bound; the configured limit is checked per request

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

_SCORE_EXAMPLE: dict[str, Any] = {
    "user_id": "u1931",
    "features": {"user.age": "25-34", "user.sessions_7d": 12, "ctx.device": "ios",
                 "ctx.hour": "14"},
    "candidates": [
        {"ad_id": "a77", "advertiser_id": "adv12",
         "features": {"ad.category": "games", "ad.creative": "video"}, "bid": 1.8},
        {"ad_id": "a78", "advertiser_id": "adv3",
         "features": {"ad.category": "travel", "ad.creative": "image"}, "bid": 0.9},
    ],
    "options": {"top_k": 1, "log": True},
}


class Candidate(BaseModel):
    model_config = _STRICT

    ad_id: Id
    advertiser_id: Id
    features: Features = Field(default_factory=dict,
                               description="ad.* features; they override request features")
    bid: Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)] | None = Field(
        None, description="what the advertiser pays per click; ranking uses 1 when absent")


class ScoreOptions(BaseModel):
    model_config = _STRICT

    explore: bool = Field(False, description="rank by a posterior sample (exploration) where "
                                             "the model has a posterior; else the mean")
    top_k: Annotated[int, Field(ge=1, le=HARD_MAX_CANDIDATES)] | None = Field(
        None, description="return (and log) only the k best; default all candidates")
    log: bool = Field(False, description="write an impression event for each of the top_k "
                                         "candidates to Kafka; needs top_k")
    rank_by: Literal["bid_pctr", "pctr"] = Field(
        "bid_pctr", description="score = bid x pCTR (bid 1 when absent), or pCTR alone")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False,
                              json_schema_extra={"examples": [_SCORE_EXAMPLE]})

    request_id: Id | None = Field(None, description="echoed back; generated when absent")
    user_id: Id
    ts: Timestamp | None = Field(None, description="impression time; default: now")
    features: Features = Field(default_factory=dict, description="user.* and ctx.* features")
    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=HARD_MAX_CANDIDATES)]
    options: ScoreOptions = Field(default_factory=ScoreOptions)


class ScoredCandidate(BaseModel):
    ad_id: str
    rank: int = Field(description="1 = best; the position it is logged at")
    pctr: float = Field(description="the model's click probability")
    score: float = Field(description="the ranking value (bid x pCTR by default)")
    impression_id: str | None = Field(None, description="with options.log: report clicks and "
                                                        "conversions with this id")
    propensity: float | None = Field(None, description="P(this ad at this rank) under the "
                                                       "serving policy, when known")
    # Filled by later releases: pCVR and the posterior used by exploration.
    pcvr: float | None = None
    pctr_mean: float | None = None
    pctr_std: float | None = None
    pctr_sample: float | None = None


class ScoreResponse(BaseModel):
    request_id: str
    model_version: str = Field(description='the version that scored every candidate; "prior" '
                                           "before the first model is loaded")
    model_status: Literal["prior", "trained", "pinned"]
    explored: bool = Field(description="whether the ranking used posterior samples")
    logged: bool = Field(description="whether impressions were queued to Kafka")
    candidates: list[ScoredCandidate]

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "3f2a9c", "model_version": "42", "model_status": "trained",
        "explored": False, "logged": True,
        "candidates": [{"ad_id": "a77", "rank": 1, "pctr": 0.031, "score": 0.0558,
                        "impression_id": "3f2a9c.1", "propensity": 1.0}]}]})


class ImpressionEvent(BaseModel):
    """An impression (docs/events.md); the service logs these itself with options.log."""

    type: Literal["impression"]
    impression_id: Id
    ts: Timestamp
    user_id: Id
    ad_id: Id
    advertiser_id: Id
    features: Features = Field(default_factory=dict)
    position: Annotated[int, Field(ge=0, le=MAX_POSITION)] | None = None
    model_version: str | int | None = None
    propensity: Annotated[float, Field(gt=0, le=1)] | None = None


class ClickEvent(BaseModel):
    type: Literal["click"]
    impression_id: Id
    ts: Timestamp


class ConversionEvent(BaseModel):
    type: Literal["conversion"]
    impression_id: Id
    ts: Timestamp
    conversion_type: Annotated[str, StringConstraints(
        min_length=1, max_length=MAX_CONVERSION_TYPE_LEN)] = "default"


AnyEvent = Annotated[ImpressionEvent | ClickEvent | ConversionEvent, Field(discriminator="type")]


class EventsRequest(BaseModel):
    """Documents the body; events are checked one by one by the contract's own validator."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"events": [
        {"type": "click", "impression_id": "3f2a9c.1", "ts": 1767225612.9},
        {"type": "conversion", "impression_id": "3f2a9c.1", "ts": 1767229800.0,
         "conversion_type": "purchase"}]}]})

    events: Annotated[list[AnyEvent], Field(min_length=1)]


class EventsAccepted(BaseModel):
    accepted: int = Field(description="events acknowledged by Kafka")
    by_type: dict[str, int]


class ErrorBody(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="what is wrong and how to fix it")


class PinRequest(BaseModel):
    model_config = _STRICT

    version: Annotated[int, Field(ge=1)]
