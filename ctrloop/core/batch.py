"""Columnar micro-batches: decode and validate many events at once, with decode_event's results.

Why: per event, `decode_event` spends most of its time in Python checks of each field and of
each feature value. Here a batch is checked column by column with C-level passes (map, set,
min, max, set.issuperset), so the per-value Python cost is gone. The bulk checks are only ever
used to *accept*: a line they cannot vouch for (not JSON, a bool feature, an integer
model_version, anything odd) goes to `decode_event` itself. So the accepted events and every
reject reason are decode_event's by construction; rejects are rare, so the fallback is cheap.

>>> b = decode_batch([b'{"type":"click","impression_id":"a","ts":1767225600}', b"{oops"])
>>> b.events, b.indices, [i for i, _ in b.rejects]
([Click(impression_id='a', ts=1767225600.0)], [0], [1])
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from typing import Any

import orjson

from ctrloop.core.errors import InvalidEvent
from ctrloop.core.events import (
    MAX_CONVERSION_TYPE_LEN,
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_LINE_BYTES,
    MAX_POSITION,
    MAX_STRING_VALUE_LEN,
    MAX_TS,
    MIN_TS,
    Click,
    Conversion,
    Event,
    Impression,
    decode_event,
)

Raw = bytes | bytearray | memoryview | str | None
_NUMBERS = frozenset((int, float))
_VALUE_TYPES = frozenset((str, int, float, type(None)))
_MAX_ABS_NUMBER = 1e12
_SEEN_LIMIT = 1 << 20
# Feature names and values already proven valid: the same few recur on every event, so most
# batches are vouched for by one C-level `issuperset`. Only valid ones are ever added, and a
# set answers by equality, so a value equal to a valid one is valid too (bools, which equal
# 1 and 0 but are converted by decode_event, never get this far).
_valid_names: set[str] = set()
_valid_values: set[Any] = {None}


@dataclass(slots=True)
class DecodedBatch:
    """The valid events of a batch in input order, each with its index in the input, and the
    rejects as (index, reason) with decode_event's reason."""

    events: list[Event] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)


def decode_batch(raws: Sequence[Raw], kind: str | None = None) -> DecodedBatch:
    """`decode_event` over `raws` (file lines or Kafka values; `kind` as decode_event's: the
    topic's event type, else each document's "type"), event for event the same."""
    out: list[Event | None] = [None] * len(raws)
    slow: list[int] = []  # rows for decode_event
    rows, docs = _load(raws, slow)
    for ev_kind, (group_rows, group_docs) in _by_kind(rows, docs, kind, slow).items():
        events, bad = _BUILDERS[ev_kind](group_docs)
        if bad:
            slow.extend(group_rows[j] for j in bad)
            group_rows = [r for j, r in enumerate(group_rows) if j not in bad]
        for r, ev in zip(group_rows, events, strict=True):
            out[r] = ev
    rejects = []
    for r in sorted(slow):
        try:
            out[r] = decode_event(raws[r], kind)  # type: ignore[arg-type]
        except InvalidEvent as e:
            rejects.append((r, e.reason))
    batch = DecodedBatch(rejects=rejects)
    batch.indices = [r for r, ev in enumerate(out) if ev is not None]
    batch.events = [out[r] for r in batch.indices]  # type: ignore[misc]
    return batch


def _load(raws: Sequence[Raw], slow: list[int]) -> tuple[list[int], list[dict[str, Any]]]:
    """orjson-decoded JSON objects and their rows; every other row goes to `slow`."""
    types = set(map(type, raws))
    if types <= {bytes, str} and max(map(len, raws), default=0) <= MAX_LINE_BYTES:
        rows: list[int] = list(range(len(raws)))
    else:
        rows = [r for r, raw in enumerate(raws)
                if type(raw) in (bytes, str) and len(raw) <= MAX_LINE_BYTES]  # type: ignore
        slow.extend(sorted(set(range(len(raws))) - set(rows)))
    try:
        docs = list(map(orjson.loads, [raws[r] for r in rows]))  # type: ignore[arg-type]
    except orjson.JSONDecodeError:
        docs, rows = _load_each(raws, rows, slow)
    if set(map(type, docs)) != {dict} and docs:
        keep = [j for j, d in enumerate(docs) if type(d) is dict]
        slow.extend(r for j, r in enumerate(rows) if type(docs[j]) is not dict)
        rows, docs = [rows[j] for j in keep], [docs[j] for j in keep]
    return rows, docs


def _load_each(raws: Sequence[Raw], rows: list[int], slow: list[int]
               ) -> tuple[list[Any], list[int]]:
    """Line by line, after a batch with a line that is not JSON (rare)."""
    docs, ok = [], []
    for r in rows:
        try:
            docs.append(orjson.loads(raws[r]))  # type: ignore[arg-type]
            ok.append(r)
        except orjson.JSONDecodeError:
            slow.append(r)
    return docs, ok


def _by_kind(rows: list[int], docs: list[dict[str, Any]], kind: str | None, slow: list[int]
             ) -> dict[str, tuple[list[int], list[dict[str, Any]]]]:
    """Rows grouped by event type; a row with no known type goes to `slow` (for its reason)."""
    if kind is not None:
        if type(kind) is str and kind in _BUILDERS:
            return {kind: (rows, docs)} if rows else {}
        slow.extend(rows)
        return {}
    kinds = _column(docs, "type")
    groups = {}
    for k in _BUILDERS:
        # compress + map: the split costs no Python per row.
        mask = list(map(operator.eq, kinds, repeat(k)))
        if True in mask:
            groups[k] = (list(compress(rows, mask)), list(compress(docs, mask)))
    if sum(len(g[0]) for g in groups.values()) < len(rows):
        known = {r for g in groups.values() for r in g[0]}
        slow.extend(r for r in rows if r not in known)
    return groups


# --- column checks: each adds the positions it cannot vouch for to `bad` -------------------


def _column(docs: list[dict[str, Any]], key: str) -> list[Any]:
    return list(map(dict.get, docs, repeat(key)))


def _check(col: list[Any], bulk_ok: Callable[[list[Any]], bool],
           row_ok: Callable[[Any], bool], bad: set[int]) -> None:
    """C-level `bulk_ok` on the whole column; row by row only when it fails (rare)."""
    if not bulk_ok(col):
        bad.update(j for j, v in enumerate(col) if not row_ok(v))


def _ids_bulk(col: list[Any]) -> bool:
    return (set(map(type, col)) == {str} and min(map(len, col)) > 0
            and max(map(len, col)) <= MAX_ID_LEN)


def _id_row(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID_LEN


def _ts_bulk(col: list[Any]) -> bool:
    return set(map(type, col)) <= _NUMBERS and min(col) >= MIN_TS and max(col) <= MAX_TS


def _ts_row(v: Any) -> bool:
    return type(v) in _NUMBERS and MIN_TS <= v <= MAX_TS


def _position_row(v: Any) -> bool:
    return v is None or (type(v) is int and 0 <= v <= MAX_POSITION)


def _position_bulk(col: list[Any]) -> bool:
    types = set(map(type, col))
    if types == {type(None)}:
        return True
    return types == {int} and min(col) >= 0 and max(col) <= MAX_POSITION


def _model_version_row(v: Any) -> bool:
    # An integer version becomes a string in decode_event: left to it.
    return v is None or (type(v) is str and len(v) <= MAX_ID_LEN)


def _propensity_row(v: Any) -> bool:
    # An integer (1) becomes a float in decode_event: left to it.
    return v is None or (type(v) is float and 0.0 < v <= 1.0)


def _conversion_type_row(v: Any) -> bool:
    return v is None or (type(v) is str and 0 < len(v) <= MAX_CONVERSION_TYPE_LEN)


def _model_version_bulk(col: list[Any]) -> bool:
    types = set(map(type, col))
    return types == {type(None)} or (types == {str} and max(map(len, col)) <= MAX_ID_LEN)


def _propensity_bulk(col: list[Any]) -> bool:
    types = set(map(type, col))
    return types == {type(None)} or (types == {float} and min(col) > 0.0 and max(col) <= 1.0)


def _conversion_type_bulk(col: list[Any]) -> bool:
    types = set(map(type, col))
    return types == {type(None)} or (types == {str} and min(map(len, col)) > 0
                                      and max(map(len, col)) <= MAX_CONVERSION_TYPE_LEN)


def _features_bad(col: list[Any], bad: set[int]) -> None:
    """Rows whose `features` decode_event would change or refuse: not a dict (null becomes
    {}), too many entries, a bool (becomes a string) or an invalid name or value."""
    if set(map(type, col)) != {dict} or max(map(len, col)) > MAX_FEATURES:
        bad.update(j for j, f in enumerate(col)
                   if type(f) is not dict or len(f) > MAX_FEATURES)
    feats = [f for j, f in enumerate(col) if j not in bad] if bad else col
    columns = uniform_columns(feats)
    if columns is not None and _uniform_ok(*columns):
        return
    learned = False  # new names or values: some may be invalid, so check the rows after
    if not _valid_names.issuperset(chain.from_iterable(feats)):
        _learn(set(chain.from_iterable(feats)) - _valid_names, _valid_names, _name_ok)
        learned = True
    values = list(chain.from_iterable(map(dict.values, feats)))
    if not set(map(type, values)) <= _VALUE_TYPES:  # bools, lists, objects: decode_event's
        bad.update(j for j, f in enumerate(col)
                   if j not in bad and not set(map(type, f.values())) <= _VALUE_TYPES)
        feats = [f for j, f in enumerate(col) if j not in bad]
        values = list(chain.from_iterable(map(dict.values, feats)))
    if not _valid_values.issuperset(values):
        _learn(set(values) - _valid_values, _valid_values, _value_ok)
        learned = True
    if learned and not (_valid_values.issuperset(values)
                        and _valid_names.issuperset(chain.from_iterable(feats))):
        bad.update(j for j, f in enumerate(col) if j not in bad and not (
            _valid_names.issuperset(f) and _valid_values.issuperset(f.values())))


def uniform_columns(feats: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]] | None:
    """(names, one list of values per name) when every dict has the same names in the same
    order (a producer's usual output), else None.

    Column k is a slice of the flattened values, so no per-value Python runs; the names are
    compared as one list (orjson reuses the key objects, so that is mostly identity checks).
    """
    if not feats:
        return None
    first = feats[0]
    width = len(first)
    if min(map(len, feats)) != width or max(map(len, feats)) != width:
        return None
    names = list(first)
    if list(chain.from_iterable(feats)) != names * len(feats):
        return None
    values = list(chain.from_iterable(map(dict.values, feats)))
    return names, [values[k::width] for k in range(width)]


def _uniform_ok(names: list[str], columns: list[list[Any]]) -> bool:
    """Every name and value valid, checked per column: strings by length, numbers by range;
    a mixed or odd column (bools, nulls among numbers) is left to the general check."""
    if not all(map(_name_ok, names)):
        return False
    for col in columns:
        types = set(map(type, col))
        if types == {str}:
            if max(map(len, col)) > MAX_STRING_VALUE_LEN:
                return False
        elif types <= _NUMBERS:
            if not (min(col) >= -_MAX_ABS_NUMBER and max(col) <= _MAX_ABS_NUMBER):
                return False
        elif types != {type(None)}:
            return False
    return True


def _learn(new: set[Any], known: set[Any], ok: Callable[[Any], bool]) -> None:
    if len(known) + len(new) > _SEEN_LIMIT:
        known.clear()  # bounded memory; the recurring ones come back at once
        known.update(v for v in (None,) if ok(v))  # None: a valid value, not a valid name
    known.update(v for v in new if ok(v))


def _name_ok(name: Any) -> bool:
    return type(name) is str and 0 < len(name) <= MAX_FEATURE_NAME_LEN


def _value_ok(v: Any) -> bool:
    t = type(v)
    if t is str:
        return len(v) <= MAX_STRING_VALUE_LEN
    if t is int or t is float:
        return -_MAX_ABS_NUMBER <= v <= _MAX_ABS_NUMBER
    return v is None


# --- builders: the events of the rows the checks vouch for ---------------------------------


def _keep(cols: list[list[Any]], bad: set[int]) -> list[list[Any]]:
    if not bad:
        return cols
    return [[v for j, v in enumerate(c) if j not in bad] for c in cols]


def _impressions(docs: list[dict[str, Any]]) -> tuple[list[Event], set[int]]:
    bad: set[int] = set()
    ids = [_column(docs, k) for k in ("impression_id", "user_id", "ad_id", "advertiser_id")]
    for col in ids:
        _check(col, _ids_bulk, _id_row, bad)
    ts = _column(docs, "ts")
    _check(ts, _ts_bulk, _ts_row, bad)
    feats = _column(docs, "features")
    _features_bad(feats, bad)
    position, version, propensity = (_column(docs, k) for k in
                                     ("position", "model_version", "propensity"))
    _check(position, _position_bulk, _position_row, bad)
    _check(version, _model_version_bulk, _model_version_row, bad)
    _check(propensity, _propensity_bulk, _propensity_row, bad)
    iid, uid, aid, adv, ts, feats, position, version, propensity = _keep(
        [*ids, ts, feats, position, version, propensity], bad)
    events = list(map(Impression, iid, map(float, ts), uid, aid, adv, feats, position,
                      version, propensity))
    return events, bad  # type: ignore[return-value]


def _clicks(docs: list[dict[str, Any]]) -> tuple[list[Event], set[int]]:
    bad: set[int] = set()
    iid, ts = _column(docs, "impression_id"), _column(docs, "ts")
    _check(iid, _ids_bulk, _id_row, bad)
    _check(ts, _ts_bulk, _ts_row, bad)
    iid, ts = _keep([iid, ts], bad)
    return list(map(Click, iid, map(float, ts))), bad  # type: ignore[arg-type]


def _conversions(docs: list[dict[str, Any]]) -> tuple[list[Event], set[int]]:
    bad: set[int] = set()
    iid, ts, ctype = (_column(docs, k) for k in ("impression_id", "ts", "conversion_type"))
    _check(iid, _ids_bulk, _id_row, bad)
    _check(ts, _ts_bulk, _ts_row, bad)
    _check(ctype, _conversion_type_bulk, _conversion_type_row, bad)
    iid, ts, ctype = _keep([iid, ts, ctype], bad)
    ctype = ["default" if c is None else c for c in ctype]
    return list(map(Conversion, iid, map(float, ts), ctype)), bad  # type: ignore[arg-type]


_BUILDERS: dict[str, Callable[[list[dict[str, Any]]], tuple[list[Event], set[int]]]] = {
    "impression": _impressions, "click": _clicks, "conversion": _conversions}
