"""Feature spec (validation, persistence, hash, inference) and the encoder to embedding indices."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrloop.core.errors import FeatureSpecError
from ctrloop.core.events import Impression, parse_event
from ctrloop.core.features import (
    ID_FIELDS,
    NUMERIC_BUCKETS,
    NUMERIC_MAX_BIN,
    FeatureEncoder,
    FeatureSpec,
    Field,
    numeric_bin,
    part_of,
)

TS = 1767225600.0


def imp(features: dict[str, Any], user: str = "u1", ad: str = "a1", adv: str = "adv1",
        iid: str = "i1") -> Impression:
    return Impression(iid, TS, user, ad, adv, features)


SPEC = FeatureSpec((
    Field("user.age", "categorical", "user", 64),
    Field("ctx.device", "categorical", "context", 16),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS),
))


# --- spec validation ------------------------------------------------------------------------


@dataclass(frozen=True)
class BadField:
    name: str
    args: tuple[Any, ...]
    message: str


BAD_FIELDS = [
    BadField("empty name", ("", "categorical", "user", 16), "a field needs a name"),
    BadField("bad kind", ("x", "text", "user", 16), "field 'x': kind must be one of"),
    BadField("bad part", ("x", "numeric", "site", 16), "field 'x': part must be one of"),
    BadField("1 bucket", ("x", "categorical", "user", 1), "buckets must be an integer 2..2^24"),
    BadField("0 buckets", ("x", "categorical", "user", 0), "buckets must be an integer"),
    BadField("too many buckets", ("x", "categorical", "user", (1 << 24) + 1), "2..2^24"),
    BadField("float buckets", ("x", "categorical", "user", 16.0), "buckets must be an integer"),
    BadField("string buckets", ("x", "categorical", "user", "16"), "buckets must be an integer"),
]


@pytest.mark.parametrize("case", BAD_FIELDS, ids=lambda c: c.name)
def test_field_validation(case: BadField) -> None:
    with pytest.raises(FeatureSpecError, match=case.message.replace("^", r"\^")
                       .replace(".", r"\.")):
        Field(*case.args)


def test_field_bounds_are_inclusive() -> None:
    assert Field("x", "categorical", "user", 2).buckets == 2
    assert Field("x", "numeric", "ad", 1 << 24).buckets == 1 << 24


def test_spec_rejects_duplicate_names_and_empty() -> None:
    f = Field("user.age", "categorical", "user", 16)
    with pytest.raises(FeatureSpecError, match=r"duplicate field names in feature spec: \['user"):
        FeatureSpec((f, Field("ad.bid", "numeric", "ad", 8), f))
    with pytest.raises(FeatureSpecError, match="at least one field"):
        FeatureSpec(())


@dataclass(frozen=True)
class BadSpec:
    name: str
    raw: Any
    message: str


_F = {"name": "a", "kind": "categorical", "part": "user", "buckets": 8}
BAD_SPECS = [
    BadSpec("no fields key", {"version": 1}, "malformed feature spec"),
    BadSpec("fields not a list", {"fields": 5}, "malformed feature spec"),
    BadSpec("field not an object", {"fields": ["a"]}, "malformed feature spec"),
    BadSpec("field without kind", {"fields": [{"name": "a", "buckets": 8}]}, "KeyError"),
    BadSpec("non-numeric buckets", {"fields": [{**_F, "buckets": "many"}]}, "ValueError"),
    BadSpec("bad kind", {"fields": [{**_F, "kind": "embedding"}]}, "kind must be one of"),
    BadSpec("duplicates", {"fields": [_F, _F]}, "duplicate field names"),
    BadSpec("not an object", [1, 2], "malformed feature spec"),
]


@pytest.mark.parametrize("case", BAD_SPECS, ids=lambda c: c.name)
def test_from_dict_errors(case: BadSpec) -> None:
    with pytest.raises(FeatureSpecError, match=case.message):
        FeatureSpec.from_dict(case.raw)


def test_from_dict_takes_part_from_the_name_when_absent() -> None:
    spec = FeatureSpec.from_dict({"fields": [
        {"name": "user.x", "kind": "categorical", "buckets": 8},
        {"name": "ad.y", "kind": "numeric", "buckets": 8},
        {"name": "hour", "kind": "categorical", "buckets": 8},
    ]})
    assert [f.part for f in spec.fields] == ["user", "ad", "context"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FeatureSpecError, match="cannot read feature spec"):
        FeatureSpec.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FeatureSpecError, match="cannot read feature spec"):
        FeatureSpec.load(bad)


# --- persistence and hash -------------------------------------------------------------------


def test_dict_and_file_roundtrip(tmp_path: Path) -> None:
    assert FeatureSpec.from_dict(SPEC.to_dict()) == SPEC
    assert FeatureSpec.from_dict(json.loads(SPEC.to_json())) == SPEC
    path = tmp_path / "spec.json"
    SPEC.save(path)
    loaded = FeatureSpec.load(path)
    assert loaded == SPEC
    assert loaded.hash == SPEC.hash
    assert loaded.compatible_with(SPEC)


def test_hash_is_stable_across_processes() -> None:
    # Hard-coded: a change in how the hash is computed would make every stored snapshot
    # incompatible with its spec file, so it must be a deliberate, visible change.
    spec = FeatureSpec((Field("user.age", "categorical", "user", 64),
                        Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS)))
    assert spec.hash == "4cac46d1b6f18e6a"


@dataclass(frozen=True)
class Change:
    name: str
    spec: FeatureSpec


CHANGES = [
    Change("buckets", FeatureSpec((SPEC.fields[0], SPEC.fields[1],
                                   Field("ad.bid", "numeric", "ad", 64)))),
    Change("kind", FeatureSpec((SPEC.fields[0],
                                Field("ctx.device", "numeric", "context", 16), SPEC.fields[2]))),
    Change("part", FeatureSpec((Field("user.age", "categorical", "context", 64),
                                *SPEC.fields[1:]))),
    Change("name", FeatureSpec((Field("user.agegroup", "categorical", "user", 64),
                                *SPEC.fields[1:]))),
    Change("order", FeatureSpec((SPEC.fields[1], SPEC.fields[0], SPEC.fields[2]))),
    Change("one field fewer", FeatureSpec(SPEC.fields[:2])),
    Change("version", FeatureSpec(SPEC.fields, version=2)),
]


@pytest.mark.parametrize("case", CHANGES, ids=lambda c: c.name)
def test_hash_changes_with_the_spec(case: Change) -> None:
    same = FeatureSpec.from_dict(json.loads(json.dumps(SPEC.to_dict())))
    assert same.hash == SPEC.hash
    assert case.spec.hash != SPEC.hash
    assert not case.spec.compatible_with(SPEC)


def test_offsets_and_total() -> None:
    assert SPEC.offsets == (0, 64, 80)
    assert SPEC.total_buckets == 64 + 16 + NUMERIC_BUCKETS
    assert SPEC.num_fields == 3
    assert SPEC.names == ["user.age", "ctx.device", "ad.bid"]


# --- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "part"), [
    ("user.age", "user"), ("ad.bid", "ad"), ("ctx.hour", "context"), ("hour", "context"),
    ("users.x", "context"), ("adv.x", "context"), ("user", "context"),
])
def test_part_of(name: str, part: str) -> None:
    assert part_of(name) == part


INFER_IMPS = [
    imp({"user.age": "25-34", "ad.bid": 1.5, "ctx.hour": "14", "mixed": 3, "site": "s1",
         "user.n": 2}),
    imp({"user.age": "35-44", "ad.bid": 2, "ctx.hour": None, "mixed": "x", "only_null": None,
         "user.n": 7.5}),
]


def test_infer_kinds_parts_and_id_fields() -> None:
    spec = FeatureSpec.infer(INFER_IMPS)
    by_name = {f.name: f for f in spec.fields}
    assert set(by_name) == {"user.age", "ad.bid", "ctx.hour", "mixed", "site", "user.n",
                            *ID_FIELDS}
    assert by_name["user.age"].kind == "categorical"
    assert by_name["ctx.hour"].kind == "categorical"
    assert by_name["ad.bid"].kind == "numeric"
    assert by_name["ad.bid"].buckets == NUMERIC_BUCKETS
    assert by_name["user.n"].kind == "numeric"
    assert by_name["mixed"].kind == "categorical"  # numbers and strings: only categorical works
    assert [by_name[n].part for n in ("user.age", "ad.bid", "ctx.hour", "site")] == [
        "user", "ad", "context", "context"]
    for name, (_, part, buckets) in ID_FIELDS.items():
        assert by_name[name] == Field(name, "categorical", part, buckets)
    assert "only_null" not in by_name  # never seen with a value: nothing to infer from


def test_infer_order_is_deterministic() -> None:
    spec = FeatureSpec.infer(INFER_IMPS)
    reordered = [imp(dict(reversed(list(i.features.items())))) for i in reversed(INFER_IMPS)]
    assert FeatureSpec.infer(reordered) == spec
    assert FeatureSpec.infer(reordered).hash == spec.hash
    # user fields, then context, then ad; by name within a part
    parts = [f.part for f in spec.fields]
    assert parts == sorted(parts, key=["user", "context", "ad"].index)
    for part in ("user", "context", "ad"):
        names = [f.name for f in spec.fields if f.part == part]
        assert names == sorted(names)


def test_infer_keeps_ids_carried_in_features() -> None:
    spec = FeatureSpec.infer([imp({"user.id": "custom", "x": "a"})])
    assert [f.name for f in spec.fields].count("user.id") == 1


def test_infer_categorical_buckets_grow_with_cardinality() -> None:
    few = FeatureSpec.infer([imp({"c": "a"})])
    many = FeatureSpec.infer([imp({"c": str(i)}) for i in range(1000)])
    lots = FeatureSpec.infer([imp({"c": str(i)}) for i in range(10_000)])

    def buckets(s: FeatureSpec) -> int:
        return next(f.buckets for f in s.fields if f.name == "c")

    assert buckets(few) == 256
    assert buckets(many) >= 16 * 1000
    assert buckets(lots) == 1 << 16


def test_inferred_spec_roundtrips(tmp_path: Path) -> None:
    spec = FeatureSpec.infer(INFER_IMPS)
    spec.save(tmp_path / "s.json")
    assert FeatureSpec.load(tmp_path / "s.json").hash == spec.hash


# --- encoder --------------------------------------------------------------------------------


def field_range(spec: FeatureSpec, i: int) -> range:
    return range(spec.offsets[i], spec.offsets[i] + spec.fields[i].buckets)


def test_hard_coded_index_is_crc32_of_name_and_value() -> None:
    # Stable across processes and encoders (CRC32, not Python's salted hash).
    enc = FeatureEncoder(SPEC)
    row = enc.encode_features({"user.age": "25-34", "ctx.device": "ios", "ad.bid": 1.5})
    assert row[0] == 39
    assert row[0] == 1 + zlib.crc32(b"user.age=25-34") % 63
    assert row[1] == 64 + 1 + zlib.crc32(b"ctx.device=ios") % 15
    assert row[2] == 80 + numeric_bin(1.5) == 80 + 166


def test_missing_values_use_the_field_offset() -> None:
    enc = FeatureEncoder(SPEC)
    assert enc.encode_features({}) == [0, 64, 80]
    assert enc.encode_features({"user.age": None, "ctx.device": None, "ad.bid": None}) == [
        0, 64, 80]
    assert enc.unknown_features == 0


def test_unknown_names_are_counted_not_raised() -> None:
    enc = FeatureEncoder(SPEC)
    row = enc.encode_features({"user.age": "a", "new.feature": 1, "other": "x"})
    row2 = enc.encode_features({"new.feature": 2})
    assert row[1:] == [64, 80] and row2 == [0, 64, 80]
    assert enc.unknown_features == 3
    assert enc.unknown_names == {"new.feature": 2, "other": 1}
    assert enc.stats()["unknown_features"] == 3
    assert enc.stats()["unknown_names"] == {"new.feature": 2, "other": 1}


def test_string_for_numeric_field_is_a_type_mismatch() -> None:
    enc = FeatureEncoder(SPEC)
    for _ in range(2):  # also when asked twice (the cache must not hide it)
        assert enc.encode_features({"ad.bid": "1.5"})[2] == 80
    assert enc.type_mismatches == 2
    assert enc.stats()["type_mismatches"] == 2


def test_numbers_in_categorical_field_are_hashed_like_their_text() -> None:
    enc = FeatureEncoder(SPEC)
    assert enc.encode_features({"ctx.device": 14}) == enc.encode_features({"ctx.device": "14"})
    assert enc.encode_features({"ctx.device": 14.0}) == enc.encode_features({"ctx.device": 14})
    assert enc.encode_features({"ctx.device": 14.5}) == enc.encode_features(
        {"ctx.device": "14.5"})


def test_encoding_is_the_same_in_two_encoders() -> None:
    spec = FeatureSpec.infer(INFER_IMPS)
    a, b = FeatureEncoder(spec), FeatureEncoder(spec)
    values = [imp({"user.age": f"v{i}", "ad.bid": i * 0.7, "ctx.hour": str(i % 24)},
                  user=f"u{i}", ad=f"a{i % 7}") for i in range(300)]
    first = a.encode_many(values)
    b.encode_many(values[::-1])  # a different cache history
    assert np.array_equal(first, b.encode_many(values))
    assert np.array_equal(first, a.encode_many(values))  # cached answers equal fresh ones


def test_encode_many_shape_and_dtype() -> None:
    enc = FeatureEncoder(SPEC)
    out = enc.encode_many([imp({"user.age": "a"}), imp({})])
    assert out.shape == (2, 3) and out.dtype == np.int64
    empty = enc.encode_many([])
    assert empty.shape == (0, 3) and empty.dtype == np.int64


ID_SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 1 << 10),
    Field("ad.id", "categorical", "ad", 1 << 8),
    Field("ad.advertiser_id", "categorical", "ad", 1 << 6),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS),
))


def test_ids_come_from_the_top_level_unless_features_carry_them() -> None:
    enc = FeatureEncoder(ID_SPEC)
    row = enc.encode(imp({"ad.bid": 1.0}, user="u7", ad="a3", adv="adv9"))
    off = ID_SPEC.offsets
    assert row[0] == off[0] + 1 + zlib.crc32(b"user.id=u7") % ((1 << 10) - 1)
    assert row[1] == off[1] + 1 + zlib.crc32(b"ad.id=a3") % ((1 << 8) - 1)
    assert row[2] == off[2] + 1 + zlib.crc32(b"ad.advertiser_id=adv9") % ((1 << 6) - 1)
    # Features that set the id win over the top-level field.
    carried = enc.encode(imp({"user.id": "other"}, user="u7"))
    assert carried[0] == enc.encode(imp({}, user="other"))[0]
    assert carried[0] != row[0]
    # A spec without id fields ignores the top-level ids.
    assert FeatureEncoder(SPEC).encode(imp({}, user="u7")) == [0, 64, 80]


@dataclass(frozen=True)
class EncodeCase:
    name: str
    features: dict[str, Any]


ENCODE_CASES = [
    EncodeCase("typical", {"user.age": "25-34", "ctx.device": "ios", "ad.bid": 1.8}),
    EncodeCase("extreme numbers", {"ad.bid": 1e12}),
    EncodeCase("negative numbers", {"ad.bid": -1e12}),
    EncodeCase("zero", {"ad.bid": 0}),
    EncodeCase("long strings", {"user.age": "x" * 1024, "ctx.device": ""}),
    EncodeCase("unicode", {"user.age": "年齢", "ctx.device": "📱"}),
]


@pytest.mark.parametrize("case", ENCODE_CASES, ids=lambda c: c.name)
def test_indices_stay_in_their_field_range(case: EncodeCase) -> None:
    row = FeatureEncoder(SPEC).encode_features(case.features)
    for i, idx in enumerate(row):
        assert idx in field_range(SPEC, i)
        if SPEC.fields[i].name in case.features:
            assert idx != SPEC.offsets[i]  # a present value never lands in the missing bucket


values = st.one_of(st.text(max_size=50),
                   st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
                   st.integers(min_value=-10**12, max_value=10**12))


@given(st.integers(2, 400), st.sampled_from(["categorical", "numeric"]), values)
def test_any_value_lands_in_range_and_not_in_the_missing_bucket(buckets: int, kind: str,
                                                                value: Any) -> None:
    spec = FeatureSpec((Field("user.x", "categorical", "user", 7),
                        Field("f", kind, "context", buckets)))  # type: ignore[arg-type]
    enc = FeatureEncoder(spec)
    idx = enc.encode_features({"f": value})[1]
    assert idx in field_range(spec, 1)
    if kind == "categorical" or not isinstance(value, str):
        assert idx != spec.offsets[1]  # the missing bucket is for missing values only


# --- numeric bins ---------------------------------------------------------------------------

numbers = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


@given(numbers, numbers)
def test_numeric_bin_is_monotone(x: float, y: float) -> None:
    if x <= y:
        assert numeric_bin(x) <= numeric_bin(y)
    assert (numeric_bin(x) < numeric_bin(y)) <= (x < y)


@given(st.floats(min_value=0, max_value=1e12))
def test_numeric_bin_is_sign_aware(x: float) -> None:
    centre = NUMERIC_MAX_BIN + 1
    assert numeric_bin(x) >= centre >= numeric_bin(-x)
    assert numeric_bin(x) - centre == centre - numeric_bin(-x)  # |x| decides the distance
    assert numeric_bin(-x) >= 1
    assert numeric_bin(x) <= NUMERIC_BUCKETS - 1


@pytest.mark.parametrize(("x", "expected"), [
    (0, 161), (0.5, 163), (1, 165), (-1, 157), (3, 169), (-3, 153), (1e12, 320), (-1e12, 2),
    (1e15, 321), (-1e15, 1),  # beyond the contract: clamped, still not the missing bucket
])
def test_numeric_bin_values(x: float, expected: int) -> None:
    assert numeric_bin(x) == expected


def test_encoder_works_on_parsed_events() -> None:
    ev = parse_event({"type": "impression", "impression_id": "i", "ts": TS, "user_id": "u",
                      "ad_id": "a", "advertiser_id": "adv",
                      "features": {"user.age": True, "ad.bid": 2}})
    row = FeatureEncoder(SPEC).encode(ev)  # type: ignore[arg-type]
    assert row[0] == 1 + zlib.crc32(b"user.age=true") % 63
    assert row[2] == 80 + numeric_bin(2)


# --- encode_batch: B encode calls at once -----------------------------------------------------

BATCH_SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 1 << 10), Field("user.age", "categorical", "user", 64),
    Field("user.n", "numeric", "user", 40), Field("ad.id", "numeric", "ad", 16),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS), Field("ctx.x", "categorical", "context", 7),
))
batch_names = st.sampled_from(["user.id", "user.age", "user.n", "ad.id", "ad.bid", "ctx.x",
                               "unknown.a", "unknown.b"])
batch_values = st.one_of(st.none(), st.sampled_from(["a", "b", "25-34", ""]),
                         st.integers(-3, 3), st.sampled_from([0.5, 1.0, -2.0, 1e12]))
batch_imps = st.builds(
    lambda feats, user, ad: Impression("i", TS, user, ad, "adv", feats),
    st.dictionaries(batch_names, batch_values, max_size=8),
    st.sampled_from(["u1", "u2"]), st.sampled_from(["a1", "a2"]))


def assert_batch_is_encode(imps: list[Impression]) -> None:
    one, many = FeatureEncoder(BATCH_SPEC), FeatureEncoder(BATCH_SPEC)
    got = many.encode_batch(imps)
    want = np.asarray([one.encode(i) for i in imps], dtype=np.int64).reshape(
        len(imps), BATCH_SPEC.num_fields)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert many.stats() == one.stats()
    assert many.unknown_names == one.unknown_names
    as_lists = FeatureEncoder(BATCH_SPEC)
    assert as_lists.encode_rows(imps) == want.tolist()
    assert as_lists.stats() == one.stats()


@given(st.lists(batch_imps, max_size=12))
def test_encode_batch_is_encode_for_any_rows(imps: list[Impression]) -> None:
    assert_batch_is_encode(imps)


@given(st.lists(batch_names, unique=True, max_size=8), st.data())
def test_encode_batch_is_encode_for_uniform_rows(names: list[str], data: st.DataObject) -> None:
    # The column-wise path: every row has the same names in the same order.
    rows = data.draw(st.lists(st.lists(batch_values, min_size=len(names),
                                       max_size=len(names)), max_size=12))
    ids = data.draw(st.lists(st.sampled_from(["u1", "u2", "u3"]), min_size=len(rows),
                             max_size=len(rows)))
    assert_batch_is_encode([Impression("i", TS, u, "a1", "adv", dict(zip(names, r, strict=True)))
                            for u, r in zip(ids, rows, strict=True)])


def test_encode_batch_keeps_unknown_names_bounded_as_encode_does() -> None:
    imps = [Impression("i", TS, "u", "a", "adv", {f"new{k}": 1, "zz": 2, "user.age": "x"})
            for k in range(3)]
    one, many = FeatureEncoder(BATCH_SPEC), FeatureEncoder(BATCH_SPEC)
    for enc in (one, many):
        enc.unknown_names.update({f"old{k}": 1 for k in range(999)})
    for imp in imps:
        one.encode(imp)
        many.encode_batch([imp, imp])
        one.encode(imp)
    assert many.unknown_names == one.unknown_names and many.stats() == one.stats()


def test_encode_batch_of_nothing() -> None:
    assert FeatureEncoder(BATCH_SPEC).encode_batch([]).shape == (0, BATCH_SPEC.num_fields)
