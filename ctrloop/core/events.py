"""The event contract (docs/events.md): impressions, clicks, conversions; validation and JSON.

Validation lives here and only here, so Kafka, HTTP and file inputs reject the same events for
the same reasons. It is written as plain checks rather than a pydantic model because it runs once
per event on the trainer's hot path (pydantic validation costs several times more per event).

>>> parse_event({"type": "click", "impression_id": "i1", "ts": 1767225600.5})
Click(impression_id='i1', ts=1767225600.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ctrloop.core.errors import InvalidEvent

SCHEMA_VERSION = 1
MIN_TS = 946_684_800.0  # 2000-01-01
MAX_TS = 4_102_444_800.0  # 2100-01-01
MAX_ID_LEN = 128
MAX_FEATURES = 256
MAX_FEATURE_NAME_LEN = 128
MAX_STRING_VALUE_LEN = 1024
MAX_ABS_NUMBER = 1e12
MAX_LINE_BYTES = 64 * 1024
MAX_POSITION = 10_000
MAX_INT_VERSION = 2**53  # an integer model_version: exact as a JSON float too
MAX_CONVERSION_TYPE_LEN = 64
# How far an event's `ts` may run ahead of the clock of whoever receives it (the service's wall
# clock; the trainer's Kafka record timestamp). One event stamped in 2099 must not move event
# time for everyone (docs/reliability.md): it is refused, not clamped. CTRLOOP_MAX_EVENT_AHEAD_S.
DEFAULT_MAX_AHEAD_S = 600.0

FeatureValue = str | float | int | None


@dataclass(slots=True)
class Impression:
    impression_id: str
    ts: float
    user_id: str
    ad_id: str
    advertiser_id: str
    features: dict[str, FeatureValue] = field(default_factory=dict)
    position: int | None = None
    model_version: str | None = None
    propensity: float | None = None


@dataclass(slots=True)
class Click:
    impression_id: str
    ts: float


@dataclass(slots=True)
class Conversion:
    impression_id: str
    ts: float
    conversion_type: str = "default"


Event = Impression | Click | Conversion
EVENT_TYPES = ("impression", "click", "conversion")


def _id(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        if v is None:
            raise InvalidEvent(f"missing field {key!r}")
        raise InvalidEvent(f"{key!r} must be a string, got {type(v).__name__}")
    if not 0 < len(v) <= MAX_ID_LEN:
        raise InvalidEvent(f"{key!r} must have 1-{MAX_ID_LEN} characters, got {len(v)}")
    return v


def _ts(d: dict[str, Any]) -> float:
    v = d.get("ts")
    if type(v) is not float and (type(v) is not int):
        if v is None:
            raise InvalidEvent("missing field 'ts'")
        raise InvalidEvent(f"'ts' must be a number (Unix seconds), got {type(v).__name__}")
    v = float(v)
    if not MIN_TS <= v <= MAX_TS:  # also rejects NaN and infinities
        raise InvalidEvent(f"'ts' {v!r} is not a Unix time between 2000 and 2100 (seconds)")
    return v


_known_names: set[str] = set()  # names already checked: the same few recur on every event


def validate_features(raw: Any) -> dict[str, FeatureValue]:
    """A `features` object checked against the contract; booleans become "true"/"false"."""
    if raw is None:
        return {}
    if type(raw) is not dict:
        raise InvalidEvent(f"'features' must be an object, got {type(raw).__name__}")
    if len(raw) > MAX_FEATURES:
        raise InvalidEvent(f"'features' has {len(raw)} entries, at most {MAX_FEATURES} allowed")
    bools = None
    for name, value in raw.items():
        if name not in _known_names:
            if not 0 < len(name) <= MAX_FEATURE_NAME_LEN:
                raise InvalidEvent(f"feature name must have 1-{MAX_FEATURE_NAME_LEN} characters")
            if len(_known_names) < 100_000:
                _known_names.add(name)
        t = type(value)
        if t is str:
            if len(value) > MAX_STRING_VALUE_LEN:
                raise InvalidEvent(
                    f"feature {name!r} has a {len(value)}-character value, "
                    f"at most {MAX_STRING_VALUE_LEN} allowed"
                )
        elif t is float or t is int:
            if not -MAX_ABS_NUMBER <= value <= MAX_ABS_NUMBER:  # NaN fails both comparisons
                raise InvalidEvent(
                    f"feature {name!r} value {value!r} is not a finite number within ±1e12"
                )
        elif t is bool:
            bools = bools or []
            bools.append(name)
        elif value is not None:
            raise InvalidEvent(
                f"feature {name!r} must be a string, number, boolean or null, got {t.__name__}"
            )
    if bools:
        raw = dict(raw)
        for name in bools:
            raw[name] = "true" if raw[name] else "false"
    return raw


def parse_impression(d: dict[str, Any]) -> Impression:
    position = d.get("position")
    if type(position) is float and position.is_integer():
        # JSON Schema's "integer" includes 1185.0 (the OpenAPI of /v1/events says integer).
        position = int(position)
    if position is not None and (type(position) is not int or not 0 <= position <= MAX_POSITION):
        raise InvalidEvent(f"'position' must be an integer 0-{MAX_POSITION}, got {position!r}")
    model_version = d.get("model_version")
    if model_version is not None:
        t = type(model_version)
        if (t is int or (t is float and model_version.is_integer())) and (
                -MAX_INT_VERSION <= model_version <= MAX_INT_VERSION):
            # 3.0 is an integer by JSON Schema (the OpenAPI says integer), as for position.
            model_version = str(int(model_version))
        elif t is not str or len(model_version) > MAX_ID_LEN:
            raise InvalidEvent(f"'model_version' must be a string or integer (at most "
                               f"{MAX_ID_LEN} characters, or within ±2^53)")
    propensity = d.get("propensity")
    if propensity is not None:
        if type(propensity) not in (float, int) or not 0.0 < propensity <= 1.0:
            raise InvalidEvent(f"'propensity' must be a number in (0, 1], got {propensity!r}")
        propensity = float(propensity)
    return Impression(
        impression_id=_id(d, "impression_id"),
        ts=_ts(d),
        user_id=_id(d, "user_id"),
        ad_id=_id(d, "ad_id"),
        advertiser_id=_id(d, "advertiser_id"),
        features=validate_features(d.get("features")),
        position=position,
        model_version=model_version,
        propensity=propensity,
    )


def parse_click(d: dict[str, Any]) -> Click:
    return Click(impression_id=_id(d, "impression_id"), ts=_ts(d))


def parse_conversion(d: dict[str, Any]) -> Conversion:
    ctype = d.get("conversion_type", "default")
    if ctype is None:
        ctype = "default"
    if type(ctype) is not str or not 0 < len(ctype) <= MAX_CONVERSION_TYPE_LEN:
        raise InvalidEvent(
            f"'conversion_type' must be a string of 1-{MAX_CONVERSION_TYPE_LEN} characters"
        )
    return Conversion(impression_id=_id(d, "impression_id"), ts=_ts(d), conversion_type=ctype)


_PARSERS = {"impression": parse_impression, "click": parse_click, "conversion": parse_conversion}


def parse_event(d: Any, kind: str | None = None) -> Event:
    """Validate a decoded JSON value as an event; `kind` comes from the topic, else `d["type"]`."""
    if not isinstance(d, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(d).__name__}")
    if kind is None:
        kind = d.get("type")
        if kind is None:
            raise InvalidEvent("missing field 'type' (impression, click or conversion)")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise InvalidEvent(f"unknown event type {kind!r}: expected impression, click or conversion")
    return parser(d)


def loads_json(raw: bytes | bytearray | memoryview | str | None) -> Any:
    """orjson.loads with messages a sender can act on (the one JSON decoder of every entry point).

    >>> try:
    ...     loads_json(b'{"ts": NaN}')
    ... except InvalidEvent as e:
    ...     print(e.reason)
    not valid JSON: NaN and Infinity are not JSON; send a finite number or null
    """
    if raw is None:
        raise InvalidEvent("empty value (null): a Kafka tombstone or a record without a value")
    if not isinstance(raw, bytes | bytearray | memoryview | str):
        raise InvalidEvent(f"expected JSON bytes, got {type(raw).__name__}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidEvent(f"not valid JSON: {_json_error(raw, e)}") from None


def _json_error(raw: bytes | bytearray | memoryview | str, e: orjson.JSONDecodeError) -> str:
    msg = str(e)
    if "utf-8" in msg.lower() or "surrogates" in msg:
        if isinstance(raw, str):
            return "the text contains unpaired surrogates (not valid Unicode)"
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as u:
            bad = bytes(raw)[u.start]
            return f"not UTF-8: byte {u.start} (0x{bad:02x}) is not a valid UTF-8 sequence"
        return "not valid UTF-8"
    pos = e.pos if isinstance(e.pos, int) else -1
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
    for literal in ("NaN", "-Infinity", "Infinity"):
        if 0 <= pos < len(text) and text.startswith(literal, pos):
            return "NaN and Infinity are not JSON; send a finite number or null"
    return msg


def decode_event(raw: bytes | str | None, kind: str | None = None) -> Event:
    """Decode one JSON document (a file line or a Kafka value) into a validated event.

    Anything a producer can put in a value — None (a tombstone), binary, invalid UTF-8, a huge
    document — raises InvalidEvent with the reason, never another exception.
    """
    if isinstance(raw, bytes | bytearray | memoryview | str) and len(raw) > MAX_LINE_BYTES:
        raise InvalidEvent(f"event is {len(raw)} bytes, at most {MAX_LINE_BYTES} allowed")
    return parse_event(loads_json(raw), kind)


def check_not_ahead(ts: float, now: float, max_ahead_s: float) -> None:
    """Refuse an event stamped more than `max_ahead_s` after `now` (the receiver's clock)."""
    if ts > now + max_ahead_s:
        raise InvalidEvent(
            f"'ts' {ts:.3f} is {ts - now:.0f} s ahead of the receiving clock ({now:.3f}); at "
            f"most {max_ahead_s:.0f} s allowed (CTRLOOP_MAX_EVENT_AHEAD_S): check the sender's "
            "clock and that ts is in seconds, not milliseconds")


def event_type(event: Event) -> str:
    if isinstance(event, Impression):
        return "impression"
    if isinstance(event, Click):
        return "click"
    return "conversion"


def to_dict(event: Event, with_type: bool = False) -> dict[str, Any]:
    """The contract's JSON object for an event (optional fields left out when unset)."""
    if isinstance(event, Impression):
        d: dict[str, Any] = {
            "impression_id": event.impression_id,
            "ts": event.ts,
            "user_id": event.user_id,
            "ad_id": event.ad_id,
            "advertiser_id": event.advertiser_id,
            "features": event.features,
        }
        for key in ("position", "model_version", "propensity"):
            value = getattr(event, key)
            if value is not None:
                d[key] = value
    elif isinstance(event, Click):
        d = {"impression_id": event.impression_id, "ts": event.ts}
    else:
        d = {
            "impression_id": event.impression_id,
            "ts": event.ts,
            "conversion_type": event.conversion_type,
        }
    if with_type:
        d = {"type": event_type(event), **d}
    return d


def encode_event(event: Event, with_type: bool = False) -> bytes:
    return orjson.dumps(to_dict(event, with_type))


def encode_checked(event: Event, with_type: bool = False) -> bytes:
    """encode_event, refusing what decode_event would refuse for its size: every producer
    (HTTP events, logged impressions) checks its records so, and nothing is accepted that the
    trainer dead-letters."""
    return check_encoded_size(encode_event(event, with_type))


def check_encoded_size(data: bytes) -> bytes:
    """`data` (an encoded event), or InvalidEvent when decode_event would refuse its size."""
    if len(data) > MAX_LINE_BYTES:
        raise InvalidEvent(
            f"event is {len(data)} bytes encoded, at most {MAX_LINE_BYTES} allowed")
    return data
