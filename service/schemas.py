"""HTTP request and response bodies of the scoring service, with the examples OpenAPI shows.

Limits (id lengths, feature counts, value bounds) come from the event contract in
`ctrloop/core/events.py`, so a request the service accepts always yields impressions the trainer
accepts. Requests are parsed straight from bytes with `model_validate_json` (4x faster than
FastAPI's default json.loads + validate, ../shared/docs/measured-here.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Annotated, Any, Literal, NotRequired, cast, get_args

import numpy as np
import orjson
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


# --- Fast path for /v1/score --------------------------------------------------------------
# `SCORE_REQUEST.validate_json` plus `check_feature_names` costs ~3x `orjson.loads` on a
# 100-candidate body, mostly pydantic's own JSON parsing (validating against `Any` costs about
# as much). `fast_score_request` parses with orjson and checks the common shapes with C-level
# passes over columns of values: ~2.2x orjson.loads, 0.75-0.85x the pydantic path in a hot
# loop (thread time, interleaved; the checks touch ~1000 objects, about one more
# orjson.loads). With caches flushed between calls both get ~3x slower and the gain shrinks
# to ~0.95x, so what it saves a server is for an end-to-end run to say. Whatever it is not
# sure about goes back to pydantic, which also words the 4xx. Pydantic's strict-mode
# semantics it mirrors (each verified against pydantic 2.13, see
# tests/unit/test_fast_score_request.py):
# - strict float (ts, bid) takes a JSON integer and returns it as a float; rejects true/false;
# - strict int (top_k, seed) rejects 3.0 and true; bool (explore, log) only takes true/false;
# - FeatureValue (left to right): true/false -> "true"/"false", 1 -> int, 1.0 -> float;
#   ints and floats share the +-1e12 bound, so an out-of-range int also fails the float member;
# - NaN/Infinity literals and overflowing floats (1e400) are rejected by both parsers;
# - integers beyond 64 bits come out of orjson as floats of magnitude >= 2**63: outside every
#   numeric bound here and not an int, so they can only fail, as they do in pydantic;
# - lengths count code points (Python's len);
# - duplicate keys: orjson and pydantic's TypedDicts keep the last value, but pydantic's dicts
#   (features) validate every pair, so {"x": [], "x": 1} is rejected. Duplicates are ruled out
#   by counting colons (see _request_ok).
# Key order may differ from pydantic's (TypedDicts come back in declaration order); values,
# types and equality do not.

_REQUEST_KEYS = frozenset({"request_id", "user_id", "ts", "features", "candidates", "options"})
_CANDIDATE_ROW = itemgetter("ad_id", "advertiser_id", "features", "bid")
_AD_ID = itemgetter("ad_id")
_ADVERTISER_ID = itemgetter("advertiser_id")
_OPTION_KEYS = frozenset({"explore", "seed", "top_k", "log", "rank_by", "conversion_type"})
_RANK_BY = frozenset(get_args(RankBy))
_MAX_SEED = 2**63 - 1
_MAX_OPTION_CONVERSION_TYPE_LEN = 64  # ScoreOptions.conversion_type's bound
_NUMBERS = frozenset({int, float})
_FEATURE_VALUE_TYPES = frozenset({str, bool, int, float, type(None)})
_BID_TYPES = frozenset({int, float, type(None)})
_COLON = ord(":")
_DICT_ONLY = frozenset({dict})
_STR_OR_NONE = frozenset({str, type(None)})


class _SlowPath(Exception):
    """Not certain the request is valid (or certain it is not): let pydantic decide."""


def fast_score_request(body: bytes) -> ScoreRequest | None:
    """`SCORE_REQUEST.validate_json(body)` for the common valid requests, with feature names
    already checked as `check_feature_names` does; None means "use the pydantic path" (the body
    may still be valid, or is invalid and pydantic words the error)."""
    try:
        req = orjson.loads(body)
        if type(req) is dict and _request_ok(req, body):
            return cast(ScoreRequest, req)
    except Exception:  # any surprise (bad JSON, an odd shape) is pydantic's to judge
        pass
    return None


def _request_ok(req: dict[str, Any], body: bytes) -> bool:
    """Checks (and, as pydantic would, converts) `req` in place; raises _SlowPath, or returns
    whether `req` has no keys left unchecked and `body` had no duplicate keys."""
    if not _REQUEST_KEYS.issuperset(req):
        raise _SlowPath
    # Colons inside the strings checked, each string counted once (see the end)
    inside: list[int] = [_check_id(req["user_id"])]
    if (rid := req.get("request_id")) is not None:
        inside.append(_check_id(rid))
    if (ts := req.get("ts")) is not None:
        if (type(ts) is not float and type(ts) is not int) or not MIN_TS <= ts <= MAX_TS:
            raise _SlowPath
        req["ts"] = float(ts)  # strict float takes a JSON integer but returns a float
    checked = len(req)  # keys checked, counted as the body's colons are
    if "features" in req:
        user_feats = req["features"]
        if type(user_feats) is not dict:
            raise _SlowPath
        _check_feature_dict(user_feats, inside)
        checked += len(user_feats)
    if "options" in req:
        checked += _check_options(req["options"], inside)
    cands = req["candidates"]
    if type(cands) is not list or not 0 < len(cands) <= HARD_MAX_CANDIDATES:
        raise _SlowPath
    checked += _check_candidates(cands, inside)
    # The body has a colon per key it holds, duplicates included, plus the colons written
    # inside its strings, and `req` holds at least the keys checked: so at least `checked`
    # colons, exactly that many only if no key went unchecked and none was a dropped duplicate.
    # With colons inside strings: the strings checked appear in the body as written unless a
    # \u escape spells a colon, so then the body has at least `checked + inside` colons, with
    # the same exactly-if.
    colons = int(np.count_nonzero(np.frombuffer(body, np.uint8) == _COLON))  # 2x bytes.count
    return colons == checked or (colons == checked + sum(inside)
                                 and (b"\\" not in body or b"\\u" not in body))  # memchr first


def _check_id(value: Any) -> int:
    """An id's colon count, once checked."""
    if type(value) is not str or not 0 < len(value) <= MAX_ID_LEN:
        raise _SlowPath
    return value.count(":")


def _check_ids(ids: Sequence[Any], inside: list[int]) -> None:
    """A column of ids: all strings (join type-checks in C), none empty, none too long."""
    joined = "".join(ids)
    lengths = set(map(len, ids))  # one pass for both bounds; ids come in a few lengths
    if min(lengths) < 1 or max(lengths) > MAX_ID_LEN:
        raise _SlowPath
    if ":" in joined:  # memchr; counting is rarely needed
        inside.append(joined.count(":"))


def _check_options(opts: Any, inside: list[int]) -> int:
    """The options' key count; ScoreOptions has no nested values, so a few branches do."""
    if type(opts) is not dict or not _OPTION_KEYS.issuperset(opts):
        raise _SlowPath
    for key, value in opts.items():
        kind = type(value)
        if key == "explore" or key == "log":
            ok = kind is bool
        elif key == "top_k":
            ok = value is None or (kind is int and 1 <= value <= HARD_MAX_CANDIDATES)
        elif key == "seed":
            ok = value is None or (kind is int and 0 <= value <= _MAX_SEED)
        elif key == "rank_by":
            ok = kind is str and value in _RANK_BY
        else:  # conversion_type
            ok = kind is str and 0 < len(value) <= _MAX_OPTION_CONVERSION_TYPE_LEN
            if ok:
                inside.append(value.count(":"))
        if not ok:
            raise _SlowPath
    return len(opts)


def _check_candidates(cands: list[Any], inside: list[int]) -> int:
    """The number of keys checked in the candidates and their features."""
    # No dict check for the candidates themselves: each goes through a str-key lookup, which
    # raises TypeError on any other JSON value (list, string, number, null).
    try:
        # The common shape, all four keys in every candidate: columns in one pass. An unknown
        # fifth key is left to the colon count in _request_ok.
        ad_ids, advertiser_ids, feats, bids = zip(*map(_CANDIDATE_ROW, cands), strict=False)
        checked = 4 * len(cands)
    except KeyError:
        ad_ids = tuple(map(_AD_ID, cands))
        advertiser_ids = tuple(map(_ADVERTISER_ID, cands))
        feats = tuple([c["features"] for c in cands if "features" in c])
        bids = tuple([c["bid"] for c in cands if "bid" in c])
        checked = 2 * len(cands) + len(feats) + len(bids)
    _check_ids(ad_ids + advertiser_ids, inside)
    if bids:
        _check_bids(cands, bids)
    if not feats:
        return checked
    if set(map(type, feats)) != _DICT_ONLY:
        raise _SlowPath
    pairs = sum(map(len, feats))
    names = tuple(feats[0])
    try:
        uniform = len(names) * len(feats) == pairs and _check_uniform_features(feats, names,
                                                                               inside)
    except KeyError:  # same sizes, different names
        uniform = False
    if not uniform:
        _check_mixed_features(feats, inside)
    return checked + pairs


def _check_bids(cands: list[dict[str, Any]], bids: Sequence[Any]) -> None:
    kinds = set(map(type, bids))
    if kinds != {float}:
        if not kinds <= _BID_TYPES:
            raise _SlowPath
        bids = [b for b in bids if b is not None]
        if not bids:
            return
    if not (min(bids) > 0 and max(bids) <= 1e9):
        raise _SlowPath
    if int in kinds:  # strict float takes a JSON integer but returns a float
        for c in cands:
            if type(c.get("bid")) is int:
                c["bid"] = float(c["bid"])


def _check_uniform_features(feats: Sequence[dict[str, Any]], names: tuple[str, ...],
                            inside: list[int]) -> bool:
    """Every dict in `feats` has exactly `names` (the sizes add up, and a missing name raises
    KeyError): check the names once and the values a column per name."""
    k = len(names)
    if not k:
        return True
    if k > MAX_FEATURES:
        raise _SlowPath
    _check_names(names)
    get = itemgetter(*names)
    # Rows all have k values, so zip's strict check would only cost time.
    columns = zip(*map(get, feats), strict=False) if k > 1 else [tuple(map(get, feats))]
    if any([_check_values(col, inside) for col in columns]):  # a list: checks every column
        _strings_for_bools(feats)
    if ":" in (joined := "".join(names)):
        inside.append(joined.count(":") * len(feats))  # every dict holds every name
    return True


def _check_mixed_features(feats: Sequence[dict[str, Any]], inside: list[int]) -> None:
    """Feature dicts of differing names, as when some ads lack a feature: a column per name,
    None where a dict lacks it (a valid value, so it changes no outcome)."""
    if max(map(len, feats)) > MAX_FEATURES:
        raise _SlowPath
    names = set().union(*feats)  # dicts' stored hashes: 2x set(chain(...))
    _check_names(names)
    if any([_check_values(tuple(map(dict.get, feats, repeat(name))), inside)
            for name in names]):
        _strings_for_bools(feats)
    for name in names:
        if ":" in name:  # rare: count it once per dict holding it
            inside.append(name.count(":") * sum(map(dict.__contains__, feats, repeat(name))))


def _check_feature_dict(feats: dict[str, Any], inside: list[int]) -> None:
    """The request's own features: one dict, usually a few mixed values."""
    if len(feats) > MAX_FEATURES:
        raise _SlowPath
    _check_names(feats)
    if _check_values(list(feats.values()), inside):
        _strings_for_bools([feats])
    inside.append("".join(feats).count(":"))


def _check_names(names: Iterable[str]) -> None:
    """`check_feature_names`' rule, sharing its cache of names already seen."""
    if _checked_names.issuperset(names):
        return
    for name in names:
        if name not in _checked_names:
            if not 0 < len(name) <= MAX_FEATURE_NAME_LEN:
                raise _SlowPath
            if len(_checked_names) < 100_000:
                _checked_names.add(name)


def _check_values(values: Sequence[Any], inside: list[int]) -> bool:
    """Feature values (a column, usually of one type); returns whether any is a bool, and
    adds the colons inside its strings to `inside`."""
    if values and type(values[0]) is str:
        try:
            joined = "".join(values)  # all strings, the common column: type-checked in C
        except TypeError:
            pass
        else:
            if (len(joined) > MAX_STRING_VALUE_LEN
                    and max(map(len, values)) > MAX_STRING_VALUE_LEN):
                raise _SlowPath
            if ":" in joined:
                inside.append(joined.count(":"))
            return False
    kinds = set(map(type, values))
    if not kinds <= _NUMBERS:
        if not kinds <= _FEATURE_VALUE_TYPES:
            raise _SlowPath
        if kinds <= _STR_OR_NONE:  # a string column some dicts lack (None): filter in C
            strings: Sequence[str] = tuple(filter(None, values))
            values = ()
        else:
            strings = [v for v in values if type(v) is str]
            values = [v for v in values if type(v) is int or type(v) is float]
        if strings and max(map(len, strings)) > MAX_STRING_VALUE_LEN:
            raise _SlowPath
        inside.append("".join(strings).count(":"))
    # orjson yields no NaN (it rejects NaN, Infinity and 1e400), so min/max see every value.
    if values and not (min(values) >= -MAX_ABS_NUMBER and max(values) <= MAX_ABS_NUMBER):
        raise _SlowPath
    return bool in kinds


def _strings_for_bools(feats: Sequence[dict[str, Any]]) -> None:
    """As FeatureValue's AfterValidator: booleans become "true"/"false"."""
    for f in feats:
        for name, value in list(f.items()):
            if type(value) is bool:
                f[name] = "true" if value else "false"


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
    if keys + inside == colons:
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
