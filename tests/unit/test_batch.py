"""Columnar micro-batches (ctrloop/core/batch.py): event for event what decode_event says."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrloop.core.batch import DecodedBatch, decode_batch, uniform_columns
from ctrloop.core.errors import InvalidEvent
from ctrloop.core.events import MAX_TS, MIN_TS, decode_event, encode_event
from tests.unit.test_events import BAD_EVENTS, BAD_LINES, GOOD_EVENTS, events


def per_event(raws: list[Any], kind: str | None = None) -> DecodedBatch:
    """The reference: decode_event line by line."""
    out = DecodedBatch()
    for i, raw in enumerate(raws):
        try:
            ev = decode_event(raw, kind)
        except InvalidEvent as e:
            out.rejects.append((i, e.reason))
        else:
            out.events.append(ev)
            out.indices.append(i)
    return out


def assert_same(raws: list[Any], kind: str | None = None) -> DecodedBatch:
    got, want = decode_batch(raws, kind), per_event(raws, kind)
    assert got.indices == want.indices
    assert got.rejects == want.rejects
    assert got.events == want.events
    # Same types too (== on dataclasses would not tell 1 from 1.0 in a ts).
    assert [type(e.ts) for e in got.events] == [float] * len(got.events)
    return got


HOSTILE: list[Any] = (
    [orjson.dumps(b.event) for b in BAD_EVENTS]
    + [b.line for b in BAD_LINES]
    + [orjson.dumps(g.event) for g in GOOD_EVENTS]
    + [None, 5, bytearray(b'{"type":"click","impression_id":"a","ts":1767225600}'),
       memoryview(b'{"type":"click","impression_id":"b","ts":1767225600}'),
       '{"type":"click","impression_id":"s","ts":1767225600}', "\ud800", b"\xff\xfe",
       b'{"type":"click","impression_id":"a","ts":1767225600}\n', b"\n", b"",
       b'{"type":["click"],"impression_id":"a","ts":1767225600}',
       b'{"type":"impression","impression_id":"a","ts":1767225600,"user_id":"u","ad_id":"a",'
       b'"advertiser_id":"v","features":{"x":true,"y":null},"position":1.0,'
       b'"model_version":3,"propensity":1}',
       b'{"type":"impression","impression_id":"a","ts":1767225600,"user_id":"u","ad_id":"a",'
       b'"advertiser_id":"v","features":null}',
       b'{"type":"conversion","impression_id":"a","ts":1767225600,"conversion_type":null}',
       b'{"type":"click","impression_id":"a","ts":1767225600,"ts":"dup"}'])


def test_hostile_inputs_alone_and_mixed() -> None:
    for raw in HOSTILE:
        assert_same([raw])
    assert_same(HOSTILE)
    assert_same(HOSTILE[::-1])


def test_kind_argument() -> None:
    for kind in ("click", "impression", "conversion", "views"):
        assert_same(HOSTILE, kind)


def test_empty_batch() -> None:
    assert decode_batch([]) == DecodedBatch()


def test_one_bad_event_does_not_spoil_its_batch() -> None:
    good = [encode_event(e, with_type=True) for e in _stream(50)]
    batch = assert_same([*good[:20], HOSTILE[0], *good[20:]])
    assert len(batch.events) == len(good) and [r for r, _ in batch.rejects] == [20]


def _stream(n: int) -> list[Any]:
    from ctrloop.core.events import Click, Impression
    out: list[Any] = []
    for i in range(n):
        ts = 1767225600.0 + i
        out.append(Impression(f"r{i}", ts, f"u{i % 7}", f"a{i % 5}", "adv1",
                              {"user.age": "25-34", "ad.bid": 0.5 + i, "ctx.hour": str(i % 24)},
                              position=1, propensity=0.5))
        if i % 3 == 0:
            out.append(Click(f"r{i}", ts + 2))
    return out


# Values near each rule's edges, so that random events are valid and invalid in every way.
edge_values = st.sampled_from([
    None, True, False, 0, 1, -1, 1.0, 0.5, 1e12, -1e12, 1e12 + 1, 10**12 + 1, 2**63, 1e300,
    "", "x", "x" * 1024, "x" * 1025, [], {}, [1], {"a": 1}, MIN_TS, MAX_TS, MIN_TS - 1,
    MAX_TS + 1, 10_000, 10_001, 2**53, 2**53 + 1, 3.0, "17", "x" * 128, "x" * 129,
    "x" * 64, "x" * 65])
field_names = st.sampled_from(["type", "impression_id", "ts", "user_id", "ad_id",
                               "advertiser_id", "features", "position", "model_version",
                               "propensity", "conversion_type"])
feature_names = st.sampled_from(["a", "b", "user.age", "", "n" * 128, "n" * 129])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid event with a few fields replaced, dropped or added."""
    d = orjson.loads(encode_event(draw(events), with_type=True))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(field_names)
        action = draw(st.sampled_from(["set", "drop", "feature"]))
        if action == "set":
            d[key] = draw(edge_values)
        elif action == "drop":
            d.pop(key, None)
        elif isinstance(d.get("features"), dict):
            d["features"][draw(feature_names)] = draw(edge_values)
    return orjson.dumps(d)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(mutated(), events.map(lambda e: encode_event(e, with_type=True)),
                          st.sampled_from(HOSTILE)), max_size=40))
def test_batch_is_decode_event_event_for_event(raws: list[Any]) -> None:
    assert_same(raws)


@settings(max_examples=100, deadline=None)
@given(st.lists(mutated(), max_size=20), st.sampled_from(["impression", "click", None]))
def test_batch_with_kind_is_decode_event(raws: list[Any], kind: str | None) -> None:
    assert_same(raws, kind)


def test_uniform_columns() -> None:
    assert uniform_columns([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]) == (
        ["a", "b"], [[1, 2], ["x", "y"]])
    assert uniform_columns([{"a": 1, "b": "x"}, {"b": "y", "a": 2}]) is None
    assert uniform_columns([{"a": 1}, {"a": 2, "b": "y"}]) is None
    assert uniform_columns([]) is None
