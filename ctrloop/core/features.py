"""Feature spec (which fields, how encoded) and the encoder from impressions to embedding indices.

The spec is one typed object that travels with every model snapshot (FuxiCTR's persisted feature
map, torchrec's typed configs): the trainer encodes with it, the service refuses a model whose
spec it cannot serve. Each field owns a contiguous range of rows in one embedding table; index 0
of each range is the field's "missing" bucket.

>>> spec = FeatureSpec((Field("user.age", "categorical", "user", 64),
...                     Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS)))
>>> enc = FeatureEncoder(spec)
>>> row = enc.encode_features({"user.age": "25-34", "ad.bid": 1.5, "other": 1})
>>> row[0] == row[0] % 64 and 64 <= row[1] < 64 + NUMERIC_BUCKETS, enc.unknown_features
(True, 1)
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctrloop.core.batch import uniform_columns
from ctrloop.core.errors import FeatureSpecError
from ctrloop.core.events import FeatureValue, Impression

Kind = Literal["categorical", "numeric"]
Part = Literal["user", "context", "ad"]
KINDS: tuple[str, ...] = ("categorical", "numeric")
PARTS: tuple[str, ...] = ("user", "context", "ad")

# Signed log bins: round(4*log2(1+|x|)) is at most 160 for |x| <= 1e12 (the contract's bound),
# so a numeric field has 2*160+1 bins plus the missing bucket and needs no hashing at all.
NUMERIC_RESOLUTION = 4.0
NUMERIC_MAX_BIN = 160
NUMERIC_BUCKETS = 2 * NUMERIC_MAX_BIN + 2

# Ids at the top level of an impression become these categorical fields (docs/events.md).
ID_FIELDS: dict[str, tuple[str, Part, int]] = {
    "user.id": ("user_id", "user", 1 << 18),
    "ad.id": ("ad_id", "ad", 1 << 16),
    "ad.advertiser_id": ("advertiser_id", "ad", 1 << 12),
}
_CACHE_LIMIT = 1 << 18


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    part: Part
    buckets: int

    def __post_init__(self) -> None:
        if not self.name:
            raise FeatureSpecError("a field needs a name")
        if self.kind not in KINDS:
            raise FeatureSpecError(f"field {self.name!r}: kind must be one of {KINDS}")
        if self.part not in PARTS:
            raise FeatureSpecError(f"field {self.name!r}: part must be one of {PARTS}")
        if not isinstance(self.buckets, int) or not 2 <= self.buckets <= 1 << 24:
            raise FeatureSpecError(f"field {self.name!r}: buckets must be an integer 2..2^24")


def part_of(name: str) -> Part:
    if name.startswith("user."):
        return "user"
    if name.startswith("ad."):
        return "ad"
    return "context"


@dataclass(frozen=True)
class FeatureSpec:
    fields: tuple[Field, ...]
    version: int = 1

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if not names:
            raise FeatureSpecError("a feature spec needs at least one field")
        dupes = [n for n, c in Counter(names).items() if c > 1]
        if dupes:
            raise FeatureSpecError(f"duplicate field names in feature spec: {dupes}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for f in self.fields:
            out.append(acc)
            acc += f.buckets
        return tuple(out)

    @property
    def total_buckets(self) -> int:
        return self.offsets[-1] + self.fields[-1].buckets

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fields": [
                {"name": f.name, "kind": f.kind, "part": f.part, "buckets": f.buckets}
                for f in self.fields
            ],
        }

    @cached_property
    def hash(self) -> str:
        """Content hash: two specs with the same hash encode every event identically."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        try:
            fields = tuple(
                Field(str(f["name"]), f["kind"], f.get("part") or part_of(f["name"]),
                      int(f["buckets"]))
                for f in d["fields"]
            )
            return cls(fields=fields, version=int(d.get("version", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise FeatureSpecError(
                f"malformed feature spec ({type(e).__name__}: {e}); expected "
                '{"version": 1, "fields": [{"name", "kind", "part", "buckets"}, ...]}'
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureSpec:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise FeatureSpecError(f"cannot read feature spec {path}: {e}") from None

    def compatible_with(self, other: FeatureSpec) -> bool:
        return self.hash == other.hash

    @classmethod
    def infer(cls, impressions: Iterable[Impression]) -> FeatureSpec:
        """Strings → categorical, numbers → numeric; buckets ~16× the distinct values seen."""
        kinds: dict[str, set[str]] = {}
        distinct: dict[str, set[Any]] = {}
        for imp in impressions:
            for name, value in imp.features.items():
                if value is None:
                    continue
                kinds.setdefault(name, set()).add("categorical" if isinstance(value, str)
                                                  else "numeric")
                seen = distinct.setdefault(name, set())
                if len(seen) < 4096:
                    seen.add(value)
        fields = [Field(name, "categorical", part, buckets)
                  for name, (_, part, buckets) in ID_FIELDS.items() if name not in kinds]
        for name in kinds:
            # A field seen with both strings and numbers can only be encoded as categorical.
            kind: Kind = "numeric" if kinds[name] == {"numeric"} else "categorical"
            if kind == "numeric":
                buckets = NUMERIC_BUCKETS
            else:
                buckets = min(1 << 16, max(256, 1 << (16 * len(distinct[name])).bit_length()))
            fields.append(Field(name, kind, part_of(name), buckets))
        order = {p: i for i, p in enumerate(PARTS)}
        fields.sort(key=lambda f: (order[f.part], f.name))
        return cls(tuple(fields))


def numeric_bin(x: float) -> int:
    """Bucket of a number within a numeric field's range: 1..NUMERIC_BUCKETS-1 (0 = missing)."""
    b = round(NUMERIC_RESOLUTION * math.log2(1.0 + abs(x)))
    if b > NUMERIC_MAX_BIN:
        b = NUMERIC_MAX_BIN
    return NUMERIC_MAX_BIN + 1 + (b if x >= 0 else -b)


def _categorical_key(value: FeatureValue) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class FeatureEncoder:
    """Impression → one global embedding index per field (a list of ints, spec order).

    Categorical values are hashed with CRC32 of "name=value" — stable across processes, unlike
    Python's salted `hash` — and cached per field, since ad traffic repeats values constantly.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._slot = {f.name: i for i, f in enumerate(spec.fields)}
        self._numeric = [f.kind == "numeric" for f in spec.fields]
        self._offsets = spec.offsets
        self._buckets = [f.buckets for f in spec.fields]
        self._prefix = [(f.name + "=").encode() for f in spec.fields]
        self._caches: list[dict[FeatureValue, int]] = [{} for _ in spec.fields]
        self._missing_row = list(spec.offsets)
        self._id_slots = [(self._slot[name], attr) for name, (attr, _, _) in ID_FIELDS.items()
                          if name in self._slot]
        self._id_columns = frozenset(i for i, _ in self._id_slots)
        self.unknown_features = 0
        self.unknown_names: Counter[str] = Counter()
        self.type_mismatches = 0

    def _index(self, i: int, value: FeatureValue) -> int:
        cache = self._caches[i]
        idx = cache.get(value)
        if idx is not None:
            return idx
        if self._numeric[i]:
            if isinstance(value, str):
                self.type_mismatches += 1
                return self._offsets[i]
            # Bins are 1..NUMERIC_BUCKETS-1; a field with fewer buckets folds them onto
            # 1..buckets-1, never onto 0 (the missing bucket).
            idx = self._offsets[i] + 1 + (numeric_bin(float(value)) - 1) % (self._buckets[i] - 1)
        else:
            h = zlib.crc32(_categorical_key(value).encode(), zlib.crc32(self._prefix[i]))
            idx = self._offsets[i] + 1 + h % (self._buckets[i] - 1)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()  # bounded memory; values recur, so the cache refills with the hot ones
        cache[value] = idx
        return idx

    def encode_features(self, features: Mapping[str, FeatureValue]) -> list[int]:
        row = self._missing_row.copy()
        slot = self._slot
        caches = self._caches
        for name, value in features.items():
            i = slot.get(name)
            if i is None:
                self._unknown(name)
            elif value is not None:
                idx = caches[i].get(value)  # inlined fast path of _index
                row[i] = idx if idx is not None else self._index(i, value)
        return row

    def _unknown(self, name: str) -> None:
        self.unknown_features += 1
        if len(self.unknown_names) < 1000 or name in self.unknown_names:
            self.unknown_names[name] += 1

    def encode(self, imp: Impression) -> list[int]:
        row = self.encode_features(imp.features)
        offsets, caches = self._offsets, self._caches
        for i, attr in self._id_slots:
            if row[i] == offsets[i]:  # features may carry the id themselves
                value = getattr(imp, attr)
                idx = caches[i].get(value)
                row[i] = idx if idx is not None else self._index(i, value)
        return row

    def encode_request(self, shared: Mapping[str, FeatureValue], user_id: str,
                       candidates: Iterable[tuple[str, str, Mapping[str, FeatureValue]]]
                       ) -> np.ndarray:
        """Rows [N, F] for one scoring request: the shared (user, context) features are encoded
        once, each candidate's (ad_id, advertiser_id, features) on top.

        Row j equals `encode` of the impression the service logs for candidate j — features
        `{**shared, **candidate features}` plus the three ids — so training sees exactly the
        indices that were served (tests/unit/test_features.py checks this).
        """
        cands = candidates if isinstance(candidates, list) else list(candidates)
        if not cands:
            return np.zeros((0, self.spec.num_fields), dtype=np.int64)
        base = self.encode_features(shared)
        rows = self._encode_columns(base, user_id, cands)
        return rows if rows is not None else self._encode_rows(base, user_id, cands)

    def _encode_columns(self, base: list[int], user_id: str,
                        cands: list[tuple[str, str, Mapping[str, FeatureValue]]]
                        ) -> np.ndarray | None:
        """`encode_request` column by column, for the usual request: every candidate has the
        same feature names, all in the spec and none an id field, and the shared features
        carry no ad id. Then each column the candidates set is one C-level pass of cache
        lookups, and only those columns are converted to int64: converting every row's ints
        was ~40% of `_encode_rows` (100 candidates, 18 fields). None when it does not apply."""
        slot, offsets = self._slot, self._offsets
        names = cands[0][2].keys()
        columns: list[int] = []
        for name in names:
            i = slot.get(name)
            if i is None or i in self._id_columns:
                return None  # unknown names are counted, ids filled: the general path
            columns.append(i)
        feats = [c[2] for c in cands]
        # The same number of names as the first candidate, and each of its names (KeyError
        # otherwise): the same names.
        if sum(map(len, feats)) != len(columns) * len(cands):
            return None
        try:
            values = [list(map(itemgetter(name), feats)) for name in names]
        except KeyError:
            return None
        if any(attr != "user_id" and base[i] != offsets[i] for i, attr in self._id_slots):
            return None  # the shared features set an ad's id: the general path
        # Checked first, looked up after: a fallback must not count a type mismatch twice.
        row = base.copy()
        for i, attr in self._id_slots:
            if attr == "user_id":
                if row[i] == offsets[i]:
                    row[i] = self._column(i, [user_id])[0]
            else:
                columns.append(i)
                values.append([c[0] if attr == "ad_id" else c[1] for c in cands])
        out = np.empty((len(cands), len(row)), dtype=np.int64)
        out[:] = np.asarray(row, dtype=np.int64)
        for i, vals in zip(columns, values, strict=True):
            out[:, i] = self._column(i, vals)
        return out

    def _column(self, i: int, values: list[Any]) -> list[int]:
        """Field i's index of each value; a null is the missing bucket (it overrides a shared
        value)."""
        idx: list[Any] = list(map(self._caches[i].get, values))  # None: not cached yet
        if None in idx:
            for j, value in enumerate(values):
                if idx[j] is None:
                    idx[j] = self._offsets[i] if value is None else self._index(i, value)
        return idx

    def _encode_rows(self, base: list[int], user_id: str,
                     cands: list[tuple[str, str, Mapping[str, FeatureValue]]]) -> np.ndarray:
        """`encode_request` candidate by candidate: any names, nulls, unknowns, ids."""
        slot, caches, offsets = self._slot, self._caches, self._offsets
        id_slots = self._id_slots
        ids = {"user_id": user_id}
        rows = []
        for ad_id, advertiser_id, features in cands:
            row = base.copy()
            for name, value in features.items():
                i = slot.get(name)
                if i is None:
                    self._unknown(name)
                elif value is None:
                    row[i] = offsets[i]  # the candidate's null overrides a shared value
                else:
                    idx = caches[i].get(value)
                    row[i] = idx if idx is not None else self._index(i, value)
            ids["ad_id"], ids["advertiser_id"] = ad_id, advertiser_id
            for i, attr in id_slots:
                if row[i] == offsets[i]:
                    value = ids[attr]
                    idx = caches[i].get(value)
                    row[i] = idx if idx is not None else self._index(i, value)
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def encode_batch(self, imps: Sequence[Impression]) -> np.ndarray:
        """[B, F] int64 whose row b is `encode(imps[b])`, counting the same stats."""
        if not imps:
            return np.zeros((0, self.spec.num_fields), dtype=np.int64)
        return np.asarray(self.encode_rows(imps), dtype=np.int64)

    def encode_rows(self, imps: Sequence[Impression]) -> list[list[int]]:
        """`[encode(imp) for imp in imps]`, counting the same stats, column by column.

        Impressions are grouped by their feature names (a producer sends one or a few
        layouts), and each group is encoded column by column: each field is one C-level pass
        of cache lookups over its values, Python runs only for values not cached yet, and
        the rows are the columns transposed by zip, made of the cache's own int objects (a
        numpy round trip allocated every int again). The indices are those of `encode` for
        any impression whose features hold no bools (decode_event turns them into strings):
        `encode` itself maps True and 1 to whichever the field's cache saw first.
        """
        feats = list(map(attrgetter("features"), imps))
        groups = _layouts(feats) if feats and set(map(type, feats)) == {dict} else None
        if groups is None or not self._count_unknown(groups):
            return [self.encode(imp) for imp in imps]
        if len(groups) == 1:
            return self._encode_layout(groups[0][0], feats, imps)
        out: list[list[int]] = [[]] * len(imps)
        for names, rows in groups:
            encoded = self._encode_layout(names, [feats[b] for b in rows],
                                          [imps[b] for b in rows])
            for b, row in zip(rows, encoded, strict=True):
                out[b] = row
        return out

    def _encode_layout(self, names: tuple[str, ...], feats: list[dict[str, Any]],
                       imps: Sequence[Impression]) -> list[list[int]]:
        """Rows of impressions whose features all have these names in this order."""
        n = len(feats)
        columns = uniform_columns(feats)
        assert columns is not None  # one layout
        cols: list[list[int]] = [[off] * n for off in self._offsets]
        carried: set[int] = set()
        for name, values in zip(names, columns[1], strict=True):
            i = self._slot.get(name)
            if i is not None:
                carried.add(i)
                cols[i] = self._lookup(i, values, skip_none=True)
        for i, attr in self._id_slots:
            ids = list(map(attrgetter(attr), imps))
            if i not in carried:
                cols[i] = self._lookup(i, ids, skip_none=False)
            elif self._offsets[i] in cols[i]:  # some rows' features left the id missing
                col, off = cols[i], self._offsets[i]
                missing = [b for b in range(n) if col[b] == off]
                for b, idx in zip(missing, self._lookup(i, [ids[b] for b in missing],
                                                        skip_none=False), strict=True):
                    col[b] = idx
        return list(map(list, zip(*cols, strict=True)))

    def _lookup(self, i: int, values: list[Any], skip_none: bool) -> list[int]:
        """Field i's index of each value (`_index` for the ones not cached); a null is the
        missing bucket when `skip_none` (a feature), else `_index`'s (an id, as `encode`)."""
        cache = self._caches[i]
        if skip_none:
            cache.pop(None, None)  # only a null *id* is ever cached (as "None", like encode)
        idx: list[Any] = list(map(cache.get, values))
        if None in idx:
            for j, value in enumerate(values):
                if idx[j] is None:
                    idx[j] = (self._offsets[i] if value is None and skip_none
                              else self._index(i, value))
        return idx

    def _count_unknown(self, groups: list[tuple[tuple[str, ...], list[int]]]) -> bool:
        """Count the unknown names of every row as `encode` would, or False (nothing counted)
        when the order of rows could matter: `unknown_names` keeps at most 1000 names, the
        first seen, so a batch that may fill it goes row by row."""
        counts: Counter[str] = Counter()
        for names, rows in groups:
            for name in names:
                if name not in self._slot:
                    counts[name] += len(rows)
        new = sum(1 for name in counts if name not in self.unknown_names)
        if new and len(self.unknown_names) + new > 1000:
            return False
        self.unknown_features += sum(counts.values())
        self.unknown_names.update(counts)
        return True

    def encode_many(self, imps: Iterable[Impression]) -> np.ndarray:
        rows = [self.encode(imp) for imp in imps]
        if not rows:
            return np.zeros((0, self.spec.num_fields), dtype=np.int64)
        return np.asarray(rows, dtype=np.int64)

    def stats(self) -> dict[str, Any]:
        return {
            "unknown_features": self.unknown_features,
            "unknown_names": dict(self.unknown_names.most_common(20)),
            "type_mismatches": self.type_mismatches,
        }


def _layouts(feats: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], list[int]]]:
    """(names, rows) per distinct feature layout (names in order), in first-seen order."""
    shapes = list(map(tuple, feats))
    if shapes.count(shapes[0]) == len(shapes):  # C-level: the usual single layout
        return [(shapes[0], list(range(len(shapes))))]
    groups: dict[tuple[str, ...], list[int]] = {}
    for b, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(b)
    return list(groups.items())
