"""HTTP request and response bodies of the scoring service, with the examples OpenAPI shows.

Limits (id lengths, feature counts, value bounds) come from the event contract in
`ctrloop/core/events.py`, so a request the service accepts always yields impressions the trainer
accepts. Requests are parsed straight from bytes with `model_validate_json` (4x faster than
FastAPI's default json.loads + validate, ../shared/docs/measured-here.md).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    with_config,
)
from typing_extensions import TypedDict

from ctrloop.core.events import (
    MAX_ABS_NUMBER,
    MAX_CONVERSION_TYPE_LEN,
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_INT_VERSION,
    MAX_POSITION,
    MAX_STRING_VALUE_LEN,
    MAX_TS,
    MIN_TS,
)

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)]
# Booleans become the strings "true"/"false" as in the contract, so the encoder hashes (and the
# logged impression carries) exactly what the trainer will see. Members are tried left to right
# (strict bool first-come would turn 0/1 into booleans); measured 3x cheaper than smart mode.
FeatureValue = Annotated[
    Annotated[str, StringConstraints(max_length=MAX_STRING_VALUE_LEN)]
    | Annotated[bool, Strict(), AfterValidator(lambda b: "true" if b else "false")]
    | Annotated[int, Field(ge=-int(MAX_ABS_NUMBER), le=int(MAX_ABS_NUMBER))]
    | Annotated[float, Field(ge=-MAX_ABS_NUMBER, le=MAX_ABS_NUMBER, allow_inf_nan=False)]
    | None,
    Field(union_mode="left_to_right"),
]
# Names are checked for length in `check_feature_names` (a constrained key type costs ~100 us
# per 100-candidate request; names repeat, so a cache of checked names makes it nearly free).
Features = Annotated[dict[str, FeatureValue], Field(max_length=MAX_FEATURES)]
Timestamp = Annotated[float, Field(ge=MIN_TS, le=MAX_TS, allow_inf_nan=False,
                                   description="Unix seconds (event time)")]
Bid = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False,
                             description="what the advertiser pays per click; ranking uses 1 "
                                         "when absent")]
HARD_MAX_CANDIDATES = 10_000  # the schema's bound; the configured limit is checked per request
RankBy = Literal["bid_pctr", "pctr", "bid_pctr_pcvr"]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True,
                     strict=True)  # "log": "yes" or "top_k": "3" are mistakes, not requests

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
_EXPLORE_EXAMPLE: dict[str, Any] = {
    **_SCORE_EXAMPLE, "options": {"top_k": 1, "log": True, "explore": True, "seed": 7}}


# Requests are TypedDicts, not BaseModels: validating 100 candidates into plain dicts measured
# 161 us against 275 us for model instances (and 452 us for smart-mode unions), the largest
# cost of a request after the model itself.
@with_config(_STRICT)
class Candidate(TypedDict):
    ad_id: Id
    advertiser_id: Id
    features: NotRequired[Features]
    """ad.* features; they override request features"""
    bid: NotRequired[Bid | None]


@with_config(_STRICT)
class ScoreOptions(TypedDict, total=False):
    explore: bool
    """rank by a Thompson sample from the model's posterior (exploration) where the model has
    one and the service allows it; default false (rank by the posterior mean)"""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None
    """seeds this request's posterior draws: the same request, model and seed give the same
    ranking and propensities; default random"""
    top_k: Annotated[int, Field(ge=1, le=HARD_MAX_CANDIDATES)] | None
    """return (and log) only the k best; default all candidates"""
    log: bool
    """write an impression event for each of the top_k to Kafka; needs top_k; default false"""
    rank_by: RankBy
    """score = bid x pCTR (bid 1 when absent; the default), pCTR alone, or bid x pCTR x pCVR
    (expected value per impression of a conversion bid; needs a served pCVR model)"""
    conversion_type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    """the conversion type that `pcvr` (and ranking by bid_pctr_pcvr) is for, one of the
    served pCVR model's types; default its first (needs a pCVR model learned per type)"""


@with_config(ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True,
                        strict=True,
                        json_schema_extra={"examples": [_SCORE_EXAMPLE, _EXPLORE_EXAMPLE]}))
class ScoreRequest(TypedDict):
    request_id: NotRequired[Id | None]
    """echoed back; generated when absent"""
    user_id: Id
    ts: NotRequired[Timestamp | None]
    """impression time (Unix seconds); default now"""
    features: NotRequired[Features]
    """user.* and ctx.* features"""
    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=HARD_MAX_CANDIDATES)]
    options: NotRequired[ScoreOptions]


SCORE_REQUEST: TypeAdapter[ScoreRequest] = TypeAdapter(ScoreRequest)
_checked_names: set[str] = set()


def check_feature_names(req: ScoreRequest) -> str | None:
    """The contract's rule on names (1-128 characters); an error message or None."""
    known = _checked_names.issuperset
    for feats in (req.get("features") or {}, *(c.get("features") or {}
                                                 for c in req["candidates"])):
        if known(feats):
            continue  # every name checked before: one C-level pass, not one per name
        for name in feats:
            if name not in _checked_names:
                if not 0 < len(name) <= MAX_FEATURE_NAME_LEN:
                    return (f"feature name {name[:40]!r}... must have 1-"
                            f"{MAX_FEATURE_NAME_LEN} characters")
                if len(_checked_names) < 100_000:
                    _checked_names.add(name)
    return None


def _key_count(req: ScoreRequest) -> int:
    """How many keys the validated request holds (every object in it)."""
    cands = req["candidates"]
    return (len(req) + len(req.get("features") or ()) + len(req.get("options") or ())
            + sum(map(len, cands)) + sum([len(c.get("features") or ()) for c in cands]))


def duplicate_key_in_request(body: bytes, req: ScoreRequest) -> str | None:
    """`duplicate_key` for a /v1/score body that validated as `req`, cheap when no key repeats.

    The body holds a colon per key it writes, repeats included, plus those written inside its
    strings; `req` holds every key but a repeat's (the schema forbids unknown keys). So a body
    with exactly as many colons as `req` has keys repeats none; otherwise (colons in strings,
    or a repeat) the full check decides."""
    if body.count(b":") == _key_count(req):
        return None
    return duplicate_key(body, req)


def duplicate_key(body: bytes, doc: Any) -> str | None:
    """The first key `body` repeats inside one object, as a message, or None.

    JSON parsers disagree on which of two equal keys wins (orjson and pydantic keep the last,
    others the first), so a proxy or validator in front of the service could read another
    document than the service does: a repeated key is refused, not guessed at. `doc` is the
    body as parsed. Cheap proof first: a body holds one colon per key (repeated ones included)
    plus those inside its strings, so when `doc` accounts for every colon, nothing was dropped;
    otherwise (a repeat, or a colon written as \\u003a) the body is parsed again to find it."""
    colons = body.count(b":")
    keys = inside = 0
    stack = [doc]
    while stack:  # iterative: orjson allows 1024 levels, deeper than Python's recursion
        v = stack.pop()
        t = type(v)
        if t is dict:
            keys += len(v)
            for k, item in v.items():
                inside += k.count(":")
                stack.append(item)
        elif t is list:
            stack.extend(v)
        elif t is str:
            inside += v.count(":")
    if keys + inside == colons and b"\\u" not in body:
        # (A \u003a escape is a colon once parsed but not in the body: it could make up for
        # a repeated key's colon, so bodies with escapes get the full parse.)
        return None

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for k, _ in items:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except _Duplicate as e:
        return (f"request body has a duplicate key {e.args[0][:40]!r} in one object; send "
                "each key once (JSON parsers disagree on which value wins)")
    except (ValueError, RecursionError):  # orjson took it, so only nesting this deep
        pass
    return None


class _Duplicate(Exception):
    pass


class ScoredCandidate(BaseModel):
    ad_id: str
    rank: int = Field(description="1 = best; the position it is logged at")
    pctr: float = Field(description="the model's click probability")
    score: float = Field(description="the ranking value (bid x pCTR by default)")
    impression_id: str | None = Field(None, description="with options.log, when logged: report "
                                                        "clicks and conversions with this id")
    propensity: float | None = Field(
        None, description="P(this ad at this rank) under the serving policy: 1 for the "
                          "mean ranking; a Monte Carlo estimate over posterior draws for an "
                          "explored one (given for the top_k ranks; null without top_k)")
    pcvr: float | None = Field(None, description="P(conversion | click), with a pCVR model "
                                                 "(of options.conversion_type, when per type)")
    pcvr_by_type: dict[str, float] | None = Field(
        None, description="P(conversion of each type | click), with a pCVR model learned per "
                          "conversion type (CTRLOOP_CONVERSION_TYPES on the trainer)")
    pctr_mean: float | None = Field(
        None, description="posterior mean of the click probability, E[sigmoid(f)] (probit "
                          "approximation); with a posterior")
    logit_std: float | None = Field(
        None, description="posterior standard deviation of the CTR logit f; with a posterior")
    pctr_sample: float | None = Field(
        None, description="sigmoid of the sampled logit that ranked this ad; when explored")


class Exploration(BaseModel):
    reason: Literal["explored", "not_requested", "disabled", "no_posterior", "cost_cap",
                    "share_cap"] = Field(
        description="explored, or why the posterior mean ranked: not_requested "
                    "(options.explore false), disabled (CTRLOOP_EXPLORE=false), no_posterior "
                    "(prior, or a model published without one), cost_cap (the running "
                    "exploration cost reached CTRLOOP_EXPLORE_COST_CAP), share_cap "
                    "(CTRLOOP_EXPLORE_MAX_SHARE)")
    draws: int | None = Field(None, description="posterior draws behind the propensities")
    seed: int | None = Field(None, description="options.seed, when given")
    cost: float | None = Field(
        None, description="1 - mean-model value of the explored top k / of the greedy top k "
                          "(k = top_k, or 1)")


class ScoreResponse(BaseModel):
    request_id: str
    model_version: str = Field(description='the version that scored every candidate; "prior" '
                                           "before the first model is loaded")
    model_status: Literal["prior", "trained", "pinned"]
    explored: bool = Field(description="whether the ranking used a posterior sample")
    exploration: Exploration
    logged: bool = Field(description="whether the impressions were handed to a live Kafka "
                                     "producer (false while Kafka is unavailable: then no "
                                     "impression_id is returned)")
    candidates: list[ScoredCandidate]

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "3f2a9c", "model_version": "42", "model_status": "trained",
        "explored": False, "exploration": {"reason": "not_requested"}, "logged": True,
        "candidates": [{"ad_id": "a77", "rank": 1, "pctr": 0.031, "score": 0.0558,
                        "impression_id": "3f2a9c.1", "propensity": 1.0,
                        "pctr_mean": 0.033, "logit_std": 0.41}]}, {
        "request_id": "3f2a9d", "model_version": "42", "model_status": "trained",
        "explored": True,
        "exploration": {"reason": "explored", "draws": 128, "seed": 7, "cost": 0.12},
        "logged": True,
        "candidates": [{"ad_id": "a78", "rank": 1, "pctr": 0.024, "score": 0.0612,
                        "impression_id": "3f2a9d.1", "propensity": 0.27,
                        "pctr_mean": 0.041, "logit_std": 1.35, "pctr_sample": 0.068}]}]})


class ImpressionEvent(BaseModel):
    """An impression (docs/events.md); the service logs these itself with options.log."""

    type: Literal["impression"]
    impression_id: Id
    ts: Timestamp
    user_id: Id
    ad_id: Id
    advertiser_id: Id
    features: Features | None = Field(
        default_factory=dict, description="null or absent: none (as the contract's parser reads "
                                          "it)")
    position: Annotated[int, Field(ge=0, le=MAX_POSITION)] | None = None
    # JSON Schema's integer includes 3.0: the contract's parser takes integral floats for both,
    # within ±2^53 (where a float is still exactly that integer).
    model_version: (Annotated[str, StringConstraints(max_length=MAX_ID_LEN)]
                    | Annotated[int, Field(ge=-MAX_INT_VERSION, le=MAX_INT_VERSION)]
                    | None) = None
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
        min_length=1, max_length=MAX_CONVERSION_TYPE_LEN)] | None = Field(
        "default", description='null or absent: "default" (the contract\'s parser has always '
                               "read null so; the schema says it)")


AnyEvent = Annotated[ImpressionEvent | ClickEvent | ConversionEvent, Field(discriminator="type")]


class EventsRequest(BaseModel):
    """Documents the body; events are checked one by one by the contract's own validator."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"events": [
        {"type": "click", "impression_id": "3f2a9c.1", "ts": 1767225612.9},
        {"type": "conversion", "impression_id": "3f2a9c.1", "ts": 1767229800.0,
         "conversion_type": "purchase"}]}]})

    events: Annotated[list[AnyEvent], Field(min_length=1)]


class EventsAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"accepted": 2, "by_type": {"click": 1, "conversion": 1}}]})

    accepted: int = Field(description="events acknowledged by Kafka")
    by_type: dict[str, int]


class ErrorBody(BaseModel):
    # str, a list of {loc, msg, type}, or (/v1/events 422) {"message", "errors": [{index, reason}]}
    detail: str | list[dict[str, Any]] | dict[str, Any] = Field(
        description="what is wrong and how to fix it")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": 41}]})

    version: Annotated[int, Field(ge=1)]
