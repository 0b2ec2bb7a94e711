"""The event contract (docs/events.md): what is accepted, what is rejected and with which reason."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrloop.core.errors import CtrloopError, InvalidEvent
from ctrloop.core.events import (
    MAX_FEATURES,
    MAX_LINE_BYTES,
    MAX_TS,
    MIN_TS,
    Click,
    Conversion,
    Impression,
    decode_event,
    encode_event,
    event_type,
    parse_event,
    to_dict,
)

TS = 1767225600.25
_DROP = object()  # marks a field to leave out


def impression(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "impression",
        "impression_id": "r81-2",
        "ts": TS,
        "user_id": "u1931",
        "ad_id": "a77",
        "advertiser_id": "adv12",
        "features": {"user.age": "25-34", "user.sessions_7d": 12, "ad.bid": 1.8},
    }
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


def click(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "click", "impression_id": "r81-2", "ts": TS + 3}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


def conversion(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "conversion", "impression_id": "r81-2", "ts": TS + 60}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


def features(**kv: Any) -> dict[str, Any]:
    return impression(features=kv)


# --- invalid events -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    name: str
    event: Any
    reason: str  # a substring of InvalidEvent.reason


BAD_EVENTS = [
    # ids
    Bad("missing impression_id", impression(impression_id=_DROP), "missing field 'impression_id'"),
    Bad("null impression_id", click(impression_id=None), "missing field 'impression_id'"),
    Bad("int impression_id", click(impression_id=5), "'impression_id' must be a string, got int"),
    Bad("list user_id", impression(user_id=["u"]), "'user_id' must be a string, got list"),
    Bad("empty id", click(impression_id=""), "'impression_id' must have 1-128 characters, got 0"),
    Bad("129-char id", click(impression_id="x" * 129), "must have 1-128 characters, got 129"),
    Bad("missing ad_id", impression(ad_id=_DROP), "missing field 'ad_id'"),
    Bad("empty advertiser_id", impression(advertiser_id=""), "'advertiser_id' must have 1-128"),
    # ts
    Bad("missing ts", click(ts=_DROP), "missing field 'ts'"),
    Bad("string ts", click(ts="1767225600"), "'ts' must be a number (Unix seconds), got str"),
    Bad("bool ts", click(ts=True), "'ts' must be a number (Unix seconds), got bool"),
    Bad("NaN ts", click(ts=float("nan")), "'ts' nan is not a Unix time between 2000 and 2100"),
    Bad("inf ts", click(ts=float("inf")), "'ts' inf is not a Unix time"),
    Bad("-inf ts", click(ts=float("-inf")), "'ts' -inf is not a Unix time"),
    Bad("milliseconds ts", click(ts=1767225600250), "is not a Unix time between 2000 and 2100"),
    Bad("zero ts", click(ts=0), "'ts' 0.0 is not a Unix time"),
    Bad("just before 2000", click(ts=MIN_TS - 0.001), "is not a Unix time"),
    Bad("just after 2100", click(ts=MAX_TS + 0.001), "is not a Unix time"),
    Bad("huge ts", click(ts=1e308), "is not a Unix time"),
    # features
    Bad("features a list", impression(features=[1, 2]), "'features' must be an object, got list"),
    Bad("features a string", impression(features="a=b"), "'features' must be an object, got str"),
    Bad("257 features", impression(features={f"f{i}": i for i in range(MAX_FEATURES + 1)}),
        "'features' has 257 entries, at most 256 allowed"),
    Bad("empty feature name", features(**{"": 1}), "feature name must have 1-128 characters"),
    Bad("129-char feature name", features(**{"n" * 129: 1}),
        "feature name must have 1-128 characters"),
    Bad("NaN feature", features(x=float("nan")), "feature 'x' value nan is not a finite number"),
    Bad("inf feature", features(x=float("inf")), "feature 'x' value inf is not a finite number"),
    Bad("-inf feature", features(x=float("-inf")), "value -inf is not a finite number"),
    Bad("huge feature", features(x=1.0000001e12), "is not a finite number within ±1e12"),
    Bad("huge negative int feature", features(x=-(10**13)), "is not a finite number within"),
    Bad("64-bit int feature", features(x=2**63 - 1), "is not a finite number within ±1e12"),
    Bad("1025-char string feature", features(x="v" * 1025),
        "feature 'x' has a 1025-character value, at most 1024 allowed"),
    Bad("10 MB string feature", features(x="v" * (10 << 20)),
        "feature 'x' has a 10485760-character value, at most 1024 allowed"),
    Bad("list feature", features(x=[1]), "feature 'x' must be a string, number, boolean or null"),
    Bad("object feature", features(x={"a": 1}), "got dict"),
    # optional impression fields
    Bad("negative position", impression(position=-1), "'position' must be an integer 0-10000"),
    Bad("position too large", impression(position=10_001), "'position' must be an integer"),
    Bad("float position", impression(position=1.5), "'position' must be an integer"),
    Bad("string position", impression(position="1"), "'position' must be an integer"),
    Bad("bool position", impression(position=True), "'position' must be an integer"),
    Bad("zero propensity", impression(propensity=0), "'propensity' must be a number in (0, 1]"),
    Bad("propensity above 1", impression(propensity=1.5), "'propensity' must be a number in"),
    Bad("negative propensity", impression(propensity=-0.1), "'propensity' must be a number in"),
    Bad("NaN propensity", impression(propensity=float("nan")), "'propensity' must be a number"),
    Bad("string propensity", impression(propensity="0.5"), "'propensity' must be a number"),
    Bad("bool propensity", impression(propensity=True), "'propensity' must be a number"),
    Bad("float model_version", impression(model_version=1.5),
        "'model_version' must be a string or integer"),
    Bad("bool model_version", impression(model_version=True), "'model_version' must be a string"),
    Bad("list model_version", impression(model_version=["1"]), "'model_version' must be a string"),
    Bad("129-char model_version", impression(model_version="v" * 129),
        "'model_version' must be a string or integer"),
    # conversion
    Bad("empty conversion_type", conversion(conversion_type=""),
        "'conversion_type' must be a string of 1-64 characters"),
    Bad("65-char conversion_type", conversion(conversion_type="c" * 65), "'conversion_type'"),
    Bad("int conversion_type", conversion(conversion_type=3), "'conversion_type'"),
    # envelope
    Bad("unknown type", click(type="view"), "unknown event type 'view'"),
    Bad("int type", click(type=1), "unknown event type 1"),
    Bad("missing type", click(type=_DROP), "missing field 'type'"),
    Bad("a list", [click()], "an event must be a JSON object, got list"),
    Bad("a string", "click", "an event must be a JSON object, got str"),
    Bad("null", None, "an event must be a JSON object, got NoneType"),
]


@pytest.mark.parametrize("case", BAD_EVENTS, ids=lambda c: c.name)
def test_parse_event_rejects_with_reason(case: Bad) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(case.event)
    assert case.reason in info.value.reason
    assert str(info.value) == info.value.reason
    assert isinstance(info.value, CtrloopError)


@dataclass(frozen=True)
class BadLine:
    name: str
    line: bytes
    reason: str


def _line(d: dict[str, Any]) -> bytes:
    return orjson.dumps(d)


BAD_LINES = [
    BadLine("not JSON", b"{not json", "not valid JSON"),
    BadLine("truncated JSON", _line(click())[:-3], "not valid JSON"),
    BadLine("empty line", b"", "not valid JSON"),
    BadLine("NaN literal", b'{"type": "click", "impression_id": "a", "ts": NaN}', "not valid JSON"),
    BadLine("1e999 ts", b'{"type": "click", "impression_id": "a", "ts": 1e999}',
            "not valid JSON"),
    BadLine("-1e999 feature", _line(features(x=7.5)).replace(b"7.5", b"-1e999"),
            "not valid JSON"),
    BadLine("huge integer ts", b'{"type":"click","impression_id":"a","ts":' + b"9" * 40 + b"}",
            "is not a Unix time"),
    BadLine("1e300 feature", _line(features(x=1.0)).replace(b"1.0", b"1e300"),
            "feature 'x' value 1e+300 is not a finite number"),
    BadLine("line over 64 KiB", _line(features(x="v" * (MAX_LINE_BYTES + 1))),
            "bytes, at most 65536 allowed"),
    BadLine("10 MB string", _line(features(x="v" * (10 << 20))),
            "bytes, at most 65536 allowed"),
    BadLine("JSON array", b"[1, 2]", "an event must be a JSON object, got list"),
    BadLine("JSON number", b"3", "an event must be a JSON object, got int"),
    BadLine("missing id", _line(click(impression_id=_DROP)), "missing field 'impression_id'"),
]


@pytest.mark.parametrize("case", BAD_LINES, ids=lambda c: c.name)
def test_decode_event_rejects_with_reason(case: BadLine) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(case.line)
    assert case.reason in info.value.reason


def test_line_limit_is_exactly_64_kib() -> None:
    base = _line(features(x=""))
    pad = MAX_LINE_BYTES - len(base)
    # A 64 KiB line is still parsed (and then rejected only for its 1024-character rule) ...
    at_limit = _line(features(x="v" * pad))
    assert len(at_limit) == MAX_LINE_BYTES
    with pytest.raises(InvalidEvent, match="character value"):
        decode_event(at_limit)
    # ... one byte more is rejected before parsing.
    with pytest.raises(InvalidEvent, match="65537 bytes"):
        decode_event(_line(features(x="v" * (pad + 1))))


def test_kind_argument_overrides_missing_type() -> None:
    # On Kafka the topic says what an event is; the payload has no "type".
    ev = decode_event(_line(click(type=_DROP)), kind="click")
    assert ev == Click("r81-2", TS + 3)
    with pytest.raises(InvalidEvent, match="unknown event type 'views'"):
        decode_event(_line(click()), kind="views")


# --- valid events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Good:
    name: str
    event: dict[str, Any]
    expected: Any


GOOD_EVENTS = [
    Good("full impression", impression(position=1, model_version="17", propensity=0.42),
         Impression("r81-2", TS, "u1931", "a77", "adv12",
                    {"user.age": "25-34", "user.sessions_7d": 12, "ad.bid": 1.8},
                    position=1, model_version="17", propensity=0.42)),
    Good("integer model_version becomes a string", impression(model_version=17, features=None),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {}, model_version="17")),
    Good("integer propensity 1 becomes float", impression(propensity=1, features={}),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {}, propensity=1.0)),
    Good("no features field", impression(features=_DROP),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {})),
    Good("bool features become strings", features(a=True, b=False, c=1),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {"a": "true", "b": "false", "c": 1})),
    Good("null feature kept as missing", features(a=None),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {"a": None})),
    Good("limits are inclusive",
         impression(impression_id="i" * 128, position=10_000, propensity=1.0,
                    features={"n" * 128: "v" * 1024, "big": 1e12, "small": -1e12}),
         Impression("i" * 128, TS, "u1931", "a77", "adv12",
                    {"n" * 128: "v" * 1024, "big": 1e12, "small": -1e12},
                    position=10_000, propensity=1.0)),
    Good("256 features", impression(features={f"f{i}": i for i in range(MAX_FEATURES)}),
         Impression("r81-2", TS, "u1931", "a77", "adv12",
                    {f"f{i}": i for i in range(MAX_FEATURES)})),
    Good("position 0", impression(position=0, features={}),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {}, position=0)),
    Good("unknown top-level fields ignored",
         impression(features={}, schema="v2", extra={"nested": [1]}, experiment=None),
         Impression("r81-2", TS, "u1931", "a77", "adv12", {})),
    Good("integer ts", click(ts=1767225600), Click("r81-2", 1767225600.0)),
    Good("ts bounds inclusive (2000)", click(ts=MIN_TS), Click("r81-2", MIN_TS)),
    Good("ts bounds inclusive (2100)", click(ts=int(MAX_TS)), Click("r81-2", MAX_TS)),
    Good("click with unknown field", click(user_id="u1"), Click("r81-2", TS + 3)),
    Good("conversion default type", conversion(), Conversion("r81-2", TS + 60, "default")),
    Good("conversion null type", conversion(conversion_type=None),
         Conversion("r81-2", TS + 60, "default")),
    Good("conversion with type", conversion(conversion_type="purchase"),
         Conversion("r81-2", TS + 60, "purchase")),
]


@pytest.mark.parametrize("case", GOOD_EVENTS, ids=lambda c: c.name)
def test_parse_event_accepts(case: Good) -> None:
    ev = parse_event(case.event)
    assert ev == case.expected
    assert type(ev.ts) is float
    # And the same through a JSON line.
    assert decode_event(orjson.dumps(case.event)) == case.expected


def test_bool_features_do_not_mutate_the_input() -> None:
    d = features(a=True)
    parse_event(d)
    assert d["features"] == {"a": True}


def test_string_input_is_accepted() -> None:
    assert decode_event('{"type":"click","impression_id":"a","ts":1767225600}') == Click(
        "a", 1767225600.0)


# --- encoding -------------------------------------------------------------------------------


def test_to_dict_leaves_out_unset_optional_fields() -> None:
    imp = Impression("i", TS, "u", "a", "adv", {"x": 1})
    assert to_dict(imp) == {"impression_id": "i", "ts": TS, "user_id": "u", "ad_id": "a",
                            "advertiser_id": "adv", "features": {"x": 1}}
    assert to_dict(Click("i", TS), with_type=True) == {"type": "click", "impression_id": "i",
                                                       "ts": TS}
    assert list(to_dict(Conversion("i", TS), with_type=True)) == [
        "type", "impression_id", "ts", "conversion_type"]


@pytest.mark.parametrize("case", GOOD_EVENTS, ids=lambda c: c.name)
def test_encode_decode_roundtrip(case: Good) -> None:
    ev = case.expected
    assert decode_event(encode_event(ev, with_type=True)) == ev
    assert decode_event(encode_event(ev), kind=event_type(ev)) == ev
    assert event_type(ev) == case.event["type"]


ids = st.text(min_size=1, max_size=128)
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
feature_values = st.one_of(st.none(), st.text(max_size=1024), finite,
                           st.integers(min_value=-10**12, max_value=10**12))
impressions = st.builds(
    Impression,
    impression_id=ids,
    ts=st.floats(min_value=MIN_TS, max_value=MAX_TS),
    user_id=ids,
    ad_id=ids,
    advertiser_id=ids,
    features=st.dictionaries(st.text(min_size=1, max_size=128), feature_values, max_size=20),
    position=st.none() | st.integers(0, 10_000),
    model_version=st.none() | st.text(max_size=128),
    propensity=st.none() | st.floats(min_value=1e-9, max_value=1.0),
)
events = st.one_of(
    impressions,
    st.builds(Click, ids, st.floats(min_value=MIN_TS, max_value=MAX_TS)),
    st.builds(Conversion, ids, st.floats(min_value=MIN_TS, max_value=MAX_TS),
              st.text(min_size=1, max_size=64)),
)


@given(events)
def test_every_valid_event_roundtrips(ev: Impression | Click | Conversion) -> None:
    line = encode_event(ev, with_type=True)
    back = decode_event(line) if len(line) <= MAX_LINE_BYTES else parse_event(orjson.loads(line))
    assert back == ev
    assert math.isfinite(back.ts)


def test_decoded_event_is_independent_of_other_events() -> None:
    # Feature names are cached after their first check; a later bad name must still fail.
    parse_event(features(ok=1))
    with pytest.raises(InvalidEvent):
        parse_event(features(**{"": 1}))
    assert parse_event(features(ok=2)).features == {"ok": 2}
