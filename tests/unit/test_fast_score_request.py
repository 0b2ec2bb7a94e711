"""`fast_score_request` (orjson + hand-written checks) against the pydantic path it shortcuts.

Whenever the fast path answers, pydantic must accept the same body and return an equal request
with the same value types, and `check_feature_names` must pass it; whenever it is unsure it
answers None. Bodies: the simulator's requests (which must take the fast path), generated
valid and near-valid requests, the same after random mutations (wrong types, bounds +-1,
NaN/Infinity, big integers, unknown or missing keys, duplicate keys in the raw JSON, colons and
escapes in strings), and raw junk bytes.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from ctrloop.service import schemas
from ctrloop.service.schemas import (
    HARD_MAX_CANDIDATES,
    SCORE_REQUEST,
    check_feature_names,
    fast_score_request,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.serving import score_body
from ctrloop.core.events import (
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_STRING_VALUE_LEN,
    MAX_TS,
    MIN_TS,
)

SLOW = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Lit:
    """Raw JSON text, for what Python values cannot say: NaN, 1e400, 3.0 vs 3, escapes."""

    text: str


@dataclass(frozen=True)
class Obj:
    """A JSON object as written, duplicate keys allowed."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Style:
    item_sep: str = ","
    key_sep: str = ":"
    ascii: bool = False


def encode(value: Any, style: Style | None = None) -> bytes:
    # surrogatepass: a lone surrogate becomes invalid UTF-8, which both parsers must reject
    return _enc(value, style or Style()).encode("utf-8", "surrogatepass")


def _enc(v: Any, s: Style) -> str:
    if isinstance(v, Lit):
        return v.text
    if isinstance(v, Obj | dict):
        pairs = v.pairs if isinstance(v, Obj) else tuple(v.items())
        return "{" + s.item_sep.join(
            json.dumps(k, ensure_ascii=s.ascii) + s.key_sep + _enc(x, s) for k, x in pairs) + "}"
    if isinstance(v, list):
        return "[" + s.item_sep.join(_enc(x, s) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=s.ascii)
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(v)


def assert_same(fast: Any, ref: Any, path: str = "$") -> None:
    """Equal, and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    assert type(fast) is type(ref), (path, fast, ref)
    if isinstance(ref, dict):
        assert fast.keys() == ref.keys(), (path, fast.keys(), ref.keys())
        for k in ref:
            assert_same(fast[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        assert len(fast) == len(ref), path
        for i, (a, b) in enumerate(zip(fast, ref, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float):
        assert repr(fast) == repr(ref), (path, fast, ref)
    else:
        assert fast == ref, (path, fast, ref)


def agrees(body: bytes) -> bool:
    """Checks the fast path against pydantic on `body`; returns whether it was taken."""
    fast = fast_score_request(body)
    if fast is None:
        return False
    ref = SCORE_REQUEST.validate_json(body)  # raises if the fast path took an invalid body
    assert_same(fast, ref)
    assert check_feature_names(ref) is None
    return True


# --- the simulator's requests: the fast path's reason to exist ---------------------------

@functools.cache
def sim_body(n: int, log: bool, seed: int) -> dict[str, Any]:
    return score_body(n, log, 3, seed)


SIM_OPTIONS: list[dict[str, Any] | None] = [
    None, {"top_k": 3, "log": True}, {"top_k": 5, "log": True, "explore": True, "seed": 7},
    {"explore": False, "rank_by": "pctr"}, {"top_k": None, "seed": None, "log": False},
    {"rank_by": "bid_pctr_pcvr", "conversion_type": "purchase", "top_k": 10_000}, {},
]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 10, 100])
@pytest.mark.parametrize("options", SIM_OPTIONS)
def test_simulated_requests_take_the_fast_path(seed: int, n: int,
                                                options: dict[str, Any] | None) -> None:
    req = dict(sim_body(n, False, seed))
    if options is not None:
        req["options"] = options
    body = orjson.dumps(req)
    assert agrees(body)
    # the simulator writes keys in the schema's order, so even the order matches pydantic's
    fast, ref = fast_score_request(body), SCORE_REQUEST.validate_json(body)
    assert fast is not None
    assert list(fast) == list(ref)
    assert [list(c) for c in fast["candidates"]] == [list(c) for c in ref["candidates"]]
    # the spaced JSON of json.dumps (many clients) takes it too
    assert agrees(json.dumps(req).encode())


def test_benchmark_body_takes_the_fast_path() -> None:
    assert agrees(orjson.dumps(score_body(100, False)))
    assert agrees(orjson.dumps(score_body(100, True, 3)))


def test_schema_keys_match_the_fast_path() -> None:
    """A field added to or removed from the schema must be added to the fast path too (read
    from the JSON schema: NotRequired is lost on TypedDicts under postponed annotations)."""
    top = SCORE_REQUEST.json_schema()
    cand, opts = top["$defs"]["Candidate"], top["$defs"]["ScoreOptions"]
    assert set(top["properties"]) == schemas._REQUEST_KEYS
    assert set(top["required"]) == {"user_id", "candidates"}
    assert list(cand["properties"]) == ["ad_id", "advertiser_id", "features", "bid"]
    assert set(cand["required"]) == {"ad_id", "advertiser_id"}
    assert set(opts["properties"]) == schemas._OPTION_KEYS
    assert "required" not in opts
    assert set(opts["properties"]["rank_by"]["enum"]) == schemas._RANK_BY
    assert top["additionalProperties"] is cand["additionalProperties"] is False


# --- table: the semantics the fast path mirrors, each verified against pydantic -----------

def _req(cand: str = '{"ad_id":"a","advertiser_id":"b"}', extra: str = "") -> str:
    return '{"user_id":"u","candidates":[' + cand + "]" + extra + "}"


def _cand(extra: str) -> str:
    return _req('{"ad_id":"a","advertiser_id":"b"' + extra + "}")


def _feats(inner: str) -> str:
    return _cand(',"features":{' + inner + "}")


def _two(features_a: str, features_b: str) -> str:
    return _req('{"ad_id":"a","advertiser_id":"b","features":' + features_a + '},'
                '{"ad_id":"c","advertiser_id":"d","features":' + features_b + "}")


MANY = ",".join(f'"f{i}":{i}' for i in range(MAX_FEATURES))

# (case, body, fast path taken, pydantic accepts)
TABLE: list[tuple[str, str, bool, bool]] = [
    ("minimal", _req(), True, True),
    ("bid int becomes float", _cand(',"bid":2'), True, True),
    ("bid 1e9", _cand(',"bid":1e9'), True, True),
    ("bid 1e9 as int", _cand(',"bid":1000000000'), True, True),
    ("bid above 1e9", _cand(f',"bid":{math.nextafter(1e9, math.inf)!r}'), False, False),
    ("bid 0", _cand(',"bid":0'), False, False),
    ("bid -0.0", _cand(',"bid":-0.0'), False, False),
    ("bid tiniest", _cand(',"bid":5e-324'), True, True),
    ("bid underflows to 0", _cand(',"bid":1e-400'), False, False),
    ("bid true", _cand(',"bid":true'), False, False),
    ("bid string", _cand(',"bid":"1"'), False, False),
    ("bid null", _cand(',"bid":null'), True, True),
    ("bid NaN", _cand(',"bid":NaN'), False, False),
    ("bid Infinity", _cand(',"bid":Infinity'), False, False),
    ("bid 1e400", _cand(',"bid":1e400'), False, False),
    ("ts int becomes float", _req(extra=',"ts":1767225600'), True, True),
    ("ts below 2000", _req(extra=f',"ts":{math.nextafter(MIN_TS, 0)!r}'), False, False),
    ("ts after 2100", _req(extra=f',"ts":{math.nextafter(MAX_TS, math.inf)!r}'), False, False),
    ("ts at bounds", _req(extra=f',"ts":{MIN_TS!r}'), True, True),
    ("ts upper bound", _req(extra=f',"ts":{MAX_TS!r}'), True, True),
    ("ts null", _req(extra=',"ts":null'), True, True),
    ("ts true", _req(extra=',"ts":true'), False, False),
    ("feature true", _feats('"x":true'), True, True),
    ("feature false", _feats('"x":false'), True, True),
    ("feature 1 stays int", _feats('"x":1'), True, True),
    ("feature 1.0 stays float", _feats('"x":1.0'), True, True),
    ("feature 1E2 is a float", _feats('"x":1E2'), True, True),
    ("feature -0", _feats('"x":-0'), True, True),
    ("feature null", _feats('"x":null'), True, True),
    ("feature int at bound", _feats('"x":1000000000000'), True, True),
    ("feature int past bound", _feats('"x":1000000000001'), False, False),
    ("feature -int at bound", _feats('"x":-1000000000000'), True, True),
    ("feature float past bound", _feats('"x":1000000000000.0001'), False, False),
    ("feature u64 max", _feats('"x":18446744073709551615'), False, False),
    ("feature beyond 64 bits", _feats('"x":123456789012345678901234567890'), False, False),
    ("feature list", _feats('"x":[1]'), False, False),
    ("feature object", _feats('"x":{}'), False, False),
    ("feature string at bound", _feats(f'"x":"{"s" * MAX_STRING_VALUE_LEN}"'), True, True),
    ("feature string past bound", _feats(f'"x":"{"s" * (MAX_STRING_VALUE_LEN + 1)}"'),
     False, False),
    ("feature name empty (check_feature_names)", _feats('"":1'), False, True),
    ("feature name at bound", _feats(f'"{"n" * MAX_FEATURE_NAME_LEN}":1'), True, True),
    ("feature name past bound (check_feature_names)",
     _feats(f'"{"n" * (MAX_FEATURE_NAME_LEN + 1)}":1'), False, True),
    ("256 features", _feats(MANY), True, True),
    ("257 features", _feats(MANY + ',"g":1'), False, False),
    ("features null", _cand(',"features":null'), False, False),
    ("features [] beside {}", _two("{}", "[]"), False, False),
    ('features "" beside {}', _two("{}", '""'), False, False),
    ("features [] first", _two("[]", "{}"), False, False),
    ('features ["x"] beside {"x":1}', _two('{"x":1}', '["x"]'), False, False),
    ("all features empty", _two("{}", "{}"), True, True),
    ("mixed: string at bound", _two(f'{{"x":"{"s" * MAX_STRING_VALUE_LEN}"}}', '{"y":1}'),
     True, True),
    ("mixed: string past bound",
     _two(f'{{"x":"{"s" * (MAX_STRING_VALUE_LEN + 1)}"}}', '{"y":1}'), False, False),
    ("mixed: number past bound", _two('{"x":1e13}', '{"y":1}'), False, False),
    ("mixed: bool", _two('{"x":true,"z":1.5}', '{"y":"v","z":2}'), True, True),
    ("duplicate feature, first invalid", _feats('"x":[],"x":1'), False, False),
    ("duplicate feature, both valid", _feats('"x":2,"x":1'), False, True),
    ("duplicate feature with colons in strings", _feats('"x":[],"x":"a:b"'), False, False),
    ("duplicate id, first invalid", _req('{"ad_id":5,"advertiser_id":"b","ad_id":"z"}'),
     False, True),
    ("duplicate candidates", '{"user_id":"u","candidates":5,"candidates":[{"ad_id":"a",'
     '"advertiser_id":"b"}]}', False, True),
    ("duplicate feature, colon in the dropped value", _feats('"x":"a:b","x":"c"'), False, True),
    ("duplicate id, colons in both", _req('{"ad_id":"a:1","advertiser_id":"b","ad_id":"c:2"}'),
     False, True),
    ("colons everywhere", '{"request_id":"r:1","user_id":"u:1","features":{"u:f":"v:1",'
     '"n":1},"candidates":[{"ad_id":"a:1","advertiser_id":"b:1","features":{"a:f":"w:1"}},'
     '{"ad_id":"a:2","advertiser_id":"b:2","features":{"a:f":"w:2","x":true}}],'
     '"options":{"conversion_type":"c:1"}}', True, True),
    ("colon names, mixed", _two('{"a:b":1,"x":1}', '{"x":2}'), True, True),
    ("colon names, uniform", _two('{"a:b":1,"x":1}', '{"x":2,"a:b":"::"}'), True, True),
    ("colon in ids and values", _req('{"ad_id":"a:1","advertiser_id":"b::","features":'
                                     '{"x:y":"1:2"}}'), True, True),
    # an escaped colon is not a colon in the body: the count stays exact
    ("escaped colon", _req('{"ad_id":"a\\u003a1","advertiser_id":"b"}'), True, True),
    # ... but it would upset the recount that colons inside strings need: the slow path
    ("escaped and literal colons", _req('{"ad_id":"a\\u003a1","advertiser_id":"b:c"}'),
     False, True),
    # a dropped duplicate's colon exactly made up by an escaped one in the kept value
    ("duplicate hidden by an escaped colon", _feats('"x":[],"x":"\\u003a"'), False, False),
    ("other escapes", _req('{"ad_id":"a\\"\\\\\\/\\n","advertiser_id":"b"}'), True, True),
    ("id of 128 code points", _req('{"ad_id":"' + "😀" * MAX_ID_LEN + '","advertiser_id":"b"}'),
     True, True),
    ("id of 129 code points",
     _req('{"ad_id":"' + "😀" * (MAX_ID_LEN + 1) + '","advertiser_id":"b"}'), False, False),
    ("empty id", _req('{"ad_id":"","advertiser_id":"b"}'), False, False),
    ("int id", _req('{"ad_id":5,"advertiser_id":"b"}'), False, False),
    ("unknown candidate key", _cand(',"foo":1'), False, False),
    ("unknown top-level key", _req(extra=',"foo":1'), False, False),
    ("candidate without advertiser", _req('{"ad_id":"a"}'), False, False),
    ("candidate not an object", _req('"a"'), False, False),
    ("no candidates", '{"user_id":"u","candidates":[]}', False, False),
    ("no user", '{"candidates":[{"ad_id":"a","advertiser_id":"b"}]}', False, False),
    ("request_id null", _req(extra=',"request_id":null'), True, True),
    ("request_id empty", _req(extra=',"request_id":""'), False, False),
    ("options null", _req(extra=',"options":null'), False, False),
    ("options empty", _req(extra=',"options":{}'), True, True),
    ("top_k 3.0", _req(extra=',"options":{"top_k":3.0}'), False, False),
    ("top_k true", _req(extra=',"options":{"top_k":true}'), False, False),
    ("top_k 0", _req(extra=',"options":{"top_k":0}'), False, False),
    ("top_k at bound", _req(extra=f',"options":{{"top_k":{HARD_MAX_CANDIDATES}}}'), True, True),
    ("top_k past bound", _req(extra=f',"options":{{"top_k":{HARD_MAX_CANDIDATES + 1}}}'),
     False, False),
    ("log 1", _req(extra=',"options":{"log":1}'), False, False),
    ("log null", _req(extra=',"options":{"log":null}'), False, False),
    ("seed 2**63-1", _req(extra=f',"options":{{"seed":{2**63 - 1}}}'), True, True),
    ("seed 2**63", _req(extra=f',"options":{{"seed":{2**63}}}'), False, False),
    ("seed -1", _req(extra=',"options":{"seed":-1}'), False, False),
    ("rank_by", _req(extra=',"options":{"rank_by":"pctr"}'), True, True),
    ("rank_by wrong case", _req(extra=',"options":{"rank_by":"PCTR"}'), False, False),
    ("conversion_type at bound", _req(extra=f',"options":{{"conversion_type":"{"c" * 64}"}}'),
     True, True),
    ("conversion_type past bound",
     _req(extra=f',"options":{{"conversion_type":"{"c" * 65}"}}'), False, False),
    ("conversion_type empty", _req(extra=',"options":{"conversion_type":""}'), False, False),
    ("unknown option", _req(extra=',"options":{"topk":3}'), False, False),
    ("mixed feature names (some ads lack one)",
     _req('{"ad_id":"a","advertiser_id":"b","features":{"x":1,"y":"s"}},'
          '{"ad_id":"c","advertiser_id":"d","features":{"y":true}},'
          '{"ad_id":"e","advertiser_id":"f"}'), True, True),
    ("same sizes, different names",
     _req('{"ad_id":"a","advertiser_id":"b","features":{"x":1}},'
          '{"ad_id":"c","advertiser_id":"d","features":{"y":false}}'), True, True),
    ("mixed: empty name (check_feature_names)",
     _req('{"ad_id":"a","advertiser_id":"b","features":{"x":1}},'
          '{"ad_id":"c","advertiser_id":"d","features":{"x":1,"":2}}'), False, True),
    ("mixed: 257 features",
     _req('{"ad_id":"a","advertiser_id":"b","features":{"x":1}},'
          '{"ad_id":"c","advertiser_id":"d","features":{' + MANY + ',"g":1}}'), False, False),
    ("user features", _req(extra=',"features":{"user.age":"25-34","n":3,"t":true}'), True, True),
    ("user feature name empty (check_feature_names)", _req(extra=',"features":{"":1}'),
     False, True),
    ("user feature name past bound (check_feature_names)",
     _req(extra=f',"features":{{"{"n" * (MAX_FEATURE_NAME_LEN + 1)}":1}}'), False, True),
    ("user 256 features", _req(extra=',"features":{' + MANY + "}"), True, True),
    ("user 257 features", _req(extra=',"features":{' + MANY + ',"g":1}'), False, False),
    (f"{HARD_MAX_CANDIDATES} candidates",
     _req(",".join(['{"ad_id":"a","advertiser_id":"b"}'] * HARD_MAX_CANDIDATES)), True, True),
    (f"{HARD_MAX_CANDIDATES + 1} candidates",
     _req(",".join(['{"ad_id":"a","advertiser_id":"b"}'] * (HARD_MAX_CANDIDATES + 1))),
     False, False),
    ("whitespace", ' \t\r\n' + _req().replace(",", " , ").replace(":", " : ") + "\n", True, True),
    ("BOM", "\ufeff" + _req(), False, False),
    ("form feed", "\f" + _req(), False, False),
    ("lone surrogate", _req('{"ad_id":"\\ud800","advertiser_id":"b"}'), False, False),
    ("trailing comma", _req(extra=","), False, False),
    ("not an object", "[]", False, False),
]


@pytest.mark.parametrize(("case", "body", "fast", "valid"), TABLE, ids=[t[0] for t in TABLE])
def test_semantics_table(case: str, body: str, fast: bool, valid: bool) -> None:
    raw = body.encode()
    assert agrees(raw) is fast
    try:
        SCORE_REQUEST.validate_json(raw)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted is valid


def test_conversions_match_pydantic() -> None:
    body = _req('{"ad_id":"a","advertiser_id":"b","bid":2,"features":{"t":true,"f":false,'
                '"i":1,"x":1.0}}', ',"ts":1767225600').encode()
    fast = fast_score_request(body)
    assert fast is not None
    assert fast["ts"] == 1767225600.0 and type(fast["ts"]) is float
    cand = fast["candidates"][0]
    assert type(cand["bid"]) is float
    assert cand["features"] == {"t": "true", "f": "false", "i": 1, "x": 1.0}
    assert type(cand["features"]["i"]) is int and type(cand["features"]["x"]) is float


# --- generated requests ---------------------------------------------------------------------

def _after(x: float, direction: float) -> float:
    return math.nextafter(x, direction)


SPECIAL_LITERALS = [Lit(t) for t in (
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.0", "3.0", "1E2", "-0", "-0.0",
    "1e-400", "123456789012345678901234567890", "-9223372036854775809", "18446744073709551616",
    '"\\ud800"', '"\\u003a"', '"a\\u003ab"', '"\\u0000"', "[]", "{}", "[[[[]]]]")]
NASTY_NUMBERS = [0, 1, -1, 3, 10**12, 10**12 + 1, -(10**12), -(10**12) - 1, 2**63 - 1, 2**63,
                 2**64 - 1, HARD_MAX_CANDIDATES, HARD_MAX_CANDIDATES + 1, 1767225600,
                 0.0, -0.0, 1.0, 3.0, 1e9, _after(1e9, math.inf), 1e12, _after(1e12, math.inf),
                 -1e12, _after(-1e12, -math.inf), MIN_TS, MAX_TS, _after(MIN_TS, -math.inf),
                 _after(MAX_TS, math.inf), 5e-324, 0.38]
NASTY_STRINGS = ["", ":", "a:b", "bid_pctr", "pctr", "bid_pctr_pcvr", "PCTR", "true", "\\u",
                 "c" * 64, "c" * 65, "i" * MAX_ID_LEN, "i" * (MAX_ID_LEN + 1),
                 "s" * MAX_STRING_VALUE_LEN, "s" * (MAX_STRING_VALUE_LEN + 1),
                 "😀" * MAX_ID_LEN, "😀" * (MAX_ID_LEN + 1)]
KNOWN_KEYS = ["request_id", "user_id", "ts", "features", "candidates", "options", "ad_id",
              "advertiser_id", "bid", "explore", "seed", "top_k", "log", "rank_by",
              "conversion_type", "user.age", "ad.category", "ad.bid"]

nasty_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.sampled_from(NASTY_NUMBERS), st.floats(), st.text(max_size=8),
    st.sampled_from(NASTY_STRINGS), st.sampled_from(SPECIAL_LITERALS))
# empty containers and strings weigh more: a check that reads only sizes or keys misses them
nasty = st.one_of(
    nasty_scalars, st.sampled_from([[], {}, "", [""], {"": None}]),
    st.lists(nasty_scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), nasty_scalars, max_size=2))
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=4),
                 st.sampled_from(["", "n" * MAX_FEATURE_NAME_LEN, "n" * (MAX_FEATURE_NAME_LEN + 1),
                                  "a:b"]))
styles = st.builds(Style, st.sampled_from([",", ", ", " ,\n"]),
                   st.sampled_from([":", ": ", " :\t"]), st.booleans())


def _mutate(node: Any, data: st.DataObject, depth: int = 0) -> Any:
    """One random change somewhere in a JSON tree (dicts, lists, Obj), returned as a new tree."""
    if isinstance(node, Obj):
        node = dict(node.pairs)  # a later mutation may drop an earlier duplicate: fine
    if isinstance(node, dict):
        inner = [k for k, v in node.items() if isinstance(v, dict | list | Obj)]
        if inner and depth < 5 and data.draw(st.integers(0, 3)):
            key = data.draw(st.sampled_from(inner))
            return {**node, key: _mutate(node[key], data, depth + 1)}
        op = data.draw(st.sampled_from(["replace", "delete", "add", "duplicate", "replace"]))
        if not node or op == "add":
            return {**node, data.draw(keys): data.draw(nasty)}
        key = data.draw(st.sampled_from(list(node)))
        if op == "replace":
            return {**node, key: data.draw(nasty)}
        if op == "delete":
            return {k: v for k, v in node.items() if k != key}
        pairs = list(node.items())
        i = list(node).index(key)
        # the other value for the repeated key: before or after the original one
        pairs.insert(i + data.draw(st.integers(0, 1)), (key, data.draw(nasty)))
        return Obj(tuple(pairs))
    if isinstance(node, list):
        if node and depth < 5 and data.draw(st.integers(0, 3)):
            i = data.draw(st.integers(0, len(node) - 1))
            return [*node[:i], _mutate(node[i], data, depth + 1), *node[i + 1:]]
        op = data.draw(st.sampled_from(["replace", "delete", "append", "clear"]))
        if not node or op == "append":
            return [*node, data.draw(nasty)]
        i = data.draw(st.integers(0, len(node) - 1))
        if op == "replace":
            return [*node[:i], data.draw(nasty), *node[i + 1:]]
        if op == "delete":
            return [*node[:i], *node[i + 1:]]
        return []
    return data.draw(nasty)


def _valid_text(min_size: int, max_size: int, plain: bool) -> st.SearchStrategy[str]:
    # plain: no colons or backslashes, so nothing sends a valid body to the slow path
    alphabet = (st.characters(codec="utf-8", exclude_characters=":\\") if plain
                else st.characters())
    return st.text(alphabet, min_size=min_size, max_size=max_size)


@st.composite
def requests(draw: st.DrawFn, valid: bool = False) -> dict[str, Any]:
    """A request with every value valid, or (valid=False) each sometimes replaced by a nasty
    one; candidates usually share feature names, as an ad pool's do."""
    plain = valid

    def pick(good: st.SearchStrategy[Any]) -> Any:
        return draw(good if valid else st.one_of(good, good, good, nasty))

    ids = _valid_text(1, MAX_ID_LEN, plain)
    names = _valid_text(1, 12, plain)
    values = st.one_of(_valid_text(0, 12, plain), st.booleans(), st.none(),
                       st.integers(-(10**12), 10**12), st.floats(-1e12, 1e12))
    bids = st.one_of(st.none(), st.floats(0, 1e9, exclude_min=True), st.integers(1, 10**9))
    req: dict[str, Any] = {}
    if draw(st.booleans()):
        req["request_id"] = pick(st.one_of(st.none(), ids))
    req["user_id"] = pick(ids)
    if draw(st.booleans()):
        req["ts"] = pick(st.one_of(st.none(), st.floats(MIN_TS, MAX_TS),
                                   st.integers(int(MIN_TS), int(MAX_TS))))
    if draw(st.booleans()):
        req["features"] = pick(st.dictionaries(names, values, max_size=6))
    shared = draw(st.lists(names, max_size=5, unique=True) | st.just([]))
    cands = []
    for _ in range(draw(st.integers(1, 6))):
        cand: dict[str, Any] = {"ad_id": pick(ids), "advertiser_id": pick(ids)}
        if draw(st.integers(0, 3)):
            own = shared if draw(st.integers(0, 4)) else draw(st.lists(names, max_size=5))
            cand["features"] = pick(st.fixed_dictionaries({n: values for n in own}))
        if draw(st.integers(0, 3)):
            cand["bid"] = pick(bids)
        cands.append(cand)
    req["candidates"] = cands
    if draw(st.booleans()):
        req["options"] = pick(st.fixed_dictionaries({}, optional={
            "explore": st.booleans(), "log": st.booleans(),
            "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
            "top_k": st.one_of(st.none(), st.integers(1, HARD_MAX_CANDIDATES)),
            "rank_by": st.sampled_from(["bid_pctr", "pctr", "bid_pctr_pcvr"]),
            "conversion_type": _valid_text(1, 64, plain)}))
    return req


bases = st.one_of(
    requests(),
    st.builds(sim_body, st.sampled_from([1, 3, 20]), st.booleans(), st.integers(1, 3)),
)


@SLOW
@given(base=bases, data=st.data(), style=styles)
def test_mutated_requests_agree_with_pydantic(base: dict[str, Any], data: st.DataObject,
                                              style: Style) -> None:
    tree: Any = base
    for _ in range(data.draw(st.integers(0, 3))):
        tree = _mutate(tree, data)
    agrees(encode(tree, style))


# Per field, the values just inside and just outside its bounds, and the wrong types pydantic's
# strict mode turns away; a mutation picks its target evenly among all of a request's values,
# so every field is hit often enough for a one-sided check to show.
_IDS = ["", "i", "i" * MAX_ID_LEN, "i" * (MAX_ID_LEN + 1), "😀" * MAX_ID_LEN,
        "😀" * (MAX_ID_LEN + 1), "a:b", "\\u003a"]
NEAR: dict[str, list[Any]] = {
    "ad_id": _IDS, "advertiser_id": _IDS, "user_id": _IDS, "request_id": [*_IDS, None],
    "bid": [None, 0, 0.0, -0.0, 5e-324, 1.0, 2, 1e9, _after(1e9, math.inf), 10**9, 10**9 + 1,
            -1.0, Lit("1e-400"), Lit("1E2"), True],
    "ts": [None, MIN_TS, _after(MIN_TS, 0), MAX_TS, _after(MAX_TS, math.inf), int(MIN_TS),
           int(MIN_TS) - 1, int(MAX_TS), int(MAX_TS) + 1, True],
    "top_k": [None, 0, 1, HARD_MAX_CANDIDATES, HARD_MAX_CANDIDATES + 1, Lit("3.0"), -1, True],
    "seed": [None, 0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, Lit("7.0"), True],
    "explore": [True, False, 0, 1, "true", None], "log": [True, False, 0, 1, "true", None],
    "rank_by": ["bid_pctr", "pctr", "bid_pctr_pcvr", "PCTR", "", "pctr ", None],
    "conversion_type": ["", "c", "c" * 64, "c" * 65, "😀" * 64, "😀" * 65, None],
    "feature": [10**12, 10**12 + 1, -(10**12), -(10**12) - 1, 1e12, _after(1e12, math.inf),
                -1e12, _after(-1e12, -math.inf), "s" * MAX_STRING_VALUE_LEN,
                "s" * (MAX_STRING_VALUE_LEN + 1), "😀" * MAX_STRING_VALUE_LEN,
                "😀" * (MAX_STRING_VALUE_LEN + 1), True, False, None, Lit("1.0"), Lit("-0"), ""],
}
WRONG_TYPES = [True, False, None, 0, 1, 1.5, "", "x", [], {}, ["x"], {"x": 1}, [{}], Lit("NaN"),
               Lit("1e400"), Lit("123456789012345678901234567890")]
NEAR_NAMES = ["", "n", "n" * MAX_FEATURE_NAME_LEN, "n" * (MAX_FEATURE_NAME_LEN + 1),
              "😀" * MAX_FEATURE_NAME_LEN, "😀" * (MAX_FEATURE_NAME_LEN + 1), "a:b", *KNOWN_KEYS]


def _value_paths(node: Any, field: str = "", path: tuple[Any, ...] = ()
                 ) -> list[tuple[tuple[Any, ...], str]]:
    """Every value below `node`, with the field it fills ("feature" inside features)."""
    found: list[tuple[tuple[Any, ...], str]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        f = (("feature" if field == "features" else key) if isinstance(node, dict)
             else field + "[]")
        found.append(((*path, key), f))
        if isinstance(value, dict | list):
            found += _value_paths(value, f, (*path, key))
    return found


def _near(field: str) -> st.SearchStrategy[Any]:
    wrong = st.sampled_from(WRONG_TYPES)
    if field in NEAR:
        return st.one_of(st.sampled_from(NEAR[field]), st.sampled_from(NEAR[field]), wrong,
                         nasty)
    return st.one_of(wrong, nasty)


def _near_mutation(tree: Any, data: st.DataObject) -> tuple[Any, bool]:
    """One change at an evenly chosen place; returns the tree and whether it still is plain
    dicts and lists (a duplicate key makes it an Obj, after which nothing is changed)."""
    op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "rename",
                                    "duplicate"]))
    if op == "replace":
        path, field = data.draw(st.sampled_from(_value_paths(tree)))
        return _replaced(tree, path, data.draw(_near(field))), True
    dicts = [()] + [p for p, _ in _value_paths(tree) if isinstance(_get(tree, p), dict)]
    path = data.draw(st.sampled_from(dicts))
    node = _get(tree, path)
    if op == "add" or not node:
        return _replaced(tree, path, {**node, data.draw(st.sampled_from(NEAR_NAMES)):
                                      data.draw(_near("feature"))}), True
    key = data.draw(st.sampled_from(list(node)))
    field = "feature" if path and path[-1] == "features" else key
    if op == "delete":
        return _replaced(tree, path, {k: v for k, v in node.items() if k != key}), True
    if op == "rename":
        new = data.draw(st.sampled_from(NEAR_NAMES))
        return _replaced(tree, path, {new if k == key else k: v for k, v in node.items()}), True
    pairs = list(node.items())
    pairs.insert(list(node).index(key) + data.draw(st.integers(0, 1)),
                 (key, data.draw(_near(field))))
    return _replaced(tree, path, Obj(tuple(pairs))), False


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


valid_bases = st.one_of(requests(valid=True),
                        st.builds(sim_body, st.sampled_from([1, 3]), st.booleans(),
                                  st.integers(1, 3)))


@SLOW
@given(base=valid_bases, data=st.data(), style=styles)
def test_near_valid_requests_agree_with_pydantic(base: dict[str, Any], data: st.DataObject,
                                                 style: Style) -> None:
    """A valid request with one or two changes at evenly chosen places: a value just past a
    bound or of a wrong type, a key removed, added, renamed or repeated."""
    tree: Any = base
    for _ in range(data.draw(st.integers(1, 2))):
        tree, plain = _near_mutation(tree, data)
        if not plain:
            break
    agrees(encode(tree, style))


EXHAUSTIVE_BASES: dict[str, dict[str, Any]] = {
    "every field": {
        "request_id": "r1", "user_id": "u1", "ts": 1767225600.5,
        "features": {"user.age": "25-34", "user.n": 3, "user.x": 0.5, "user.b": True,
                     "user.z": None},
        "candidates": [
            {"ad_id": "a1", "advertiser_id": "v1", "bid": 1.5,
             "features": {"ad.c": "games", "ad.x": 0.25, "ad.n": 7, "ad.b": False, "ad.z": None}},
            {"ad_id": "a2", "advertiser_id": "v2", "bid": 0.5,
             "features": {"ad.c": "travel", "ad.x": -2.0, "ad.n": -7, "ad.b": True, "ad.z": None}},
        ],
        "options": {"explore": True, "seed": 7, "top_k": 2, "log": True, "rank_by": "pctr",
                    "conversion_type": "purchase"},
    },
    "mixed shapes": {
        "user_id": "u2",
        "candidates": [
            {"ad_id": "a1", "advertiser_id": "v1", "features": {"ad.c": "x", "ad.n": 1}},
            {"ad_id": "a2", "advertiser_id": "v2", "bid": None, "features": {"ad.c": "y"}},
            {"ad_id": "a3", "advertiser_id": "v3", "bid": 3},
            {"ad_id": "a4", "advertiser_id": "v4", "features": {}},
        ],
    },
    "colons, uniform": {
        "request_id": "r:1", "user_id": "u:1", "features": {"u:a": "v:1", "u:n": 2},
        "candidates": [
            {"ad_id": "a:1", "advertiser_id": "b:1", "features": {"a:x": "w:1", "n": 1}},
            {"ad_id": "a:2", "advertiser_id": "b:2", "features": {"a:x": "w::2", "n": 2}},
        ],
        "options": {"conversion_type": "c:1"},
    },
    "colons, mixed": {
        "user_id": "u:1",
        "candidates": [
            {"ad_id": "a:1", "advertiser_id": "b:1", "features": {"a:x": "w:1", "n": 1}},
            {"ad_id": "a:2", "advertiser_id": "b:2", "features": {"a:y": "w::2"}},
        ],
    },
    "empty features": {
        "user_id": "u3", "features": {},
        "candidates": [{"ad_id": "a1", "advertiser_id": "v1", "features": {}},
                       {"ad_id": "a2", "advertiser_id": "v2", "features": {}}],
        "options": {},
    },
}


def _single_changes(base: dict[str, Any]) -> list[Any]:
    """Every one-place change of `base`: each value swapped for each of its field's near values
    and the wrong types; each key removed, renamed, repeated; a key added to each object."""
    out: list[Any] = []
    paths = _value_paths(base)
    for path, field in paths:
        for value in [*NEAR.get(field, []), *WRONG_TYPES]:
            out.append(_replaced(base, path, value))
    for path in [(), *(p for p, _ in paths if isinstance(_get(base, p), dict))]:
        node = _get(base, path)
        for name in NEAR_NAMES:
            out.append(_replaced(base, path, {**node, name: 1}))
        for key in node:
            field = "feature" if path and path[-1] == "features" else key
            out.append(_replaced(base, path, {k: v for k, v in node.items() if k != key}))
            for name in NEAR_NAMES:
                out.append(_replaced(base, path, {name if k == key else k: v
                                                  for k, v in node.items()}))
            i = list(node).index(key)
            for value in [*NEAR.get(field, []), *WRONG_TYPES]:
                for at in (i, i + 1):
                    pairs = list(node.items())
                    pairs.insert(at, (key, value))
                    out.append(_replaced(base, path, Obj(tuple(pairs))))
    return out


@pytest.mark.parametrize("name", list(EXHAUSTIVE_BASES))
def test_every_single_change_agrees_with_pydantic(name: str) -> None:
    """Exhaustive where random generation would be thin: every field just inside and just
    outside its bounds and of each wrong type, at every place of a few small requests."""
    base = EXHAUSTIVE_BASES[name]
    assert agrees(encode(base))
    taken = sum(agrees(encode(tree)) for tree in _single_changes(base))
    assert taken > 0  # some changes keep the request valid, and those take the fast path


def _container_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    found = []
    for key, value in items:
        if isinstance(value, dict | list):
            found += [(*path, key), *_container_paths(value, (*path, key))]
    return found


def _replaced(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replaced(node[head], rest, value)}
    return [*node[:head], _replaced(node[head], rest, value), *node[head + 1:]]


@SLOW
@given(base=valid_bases, data=st.data(), style=styles)
def test_swapped_containers_agree_with_pydantic(base: dict[str, Any], data: st.DataObject,
                                                style: Style) -> None:
    """A valid request with one object or array (any, chosen evenly) swapped for another
    shape: a check that reads only sizes or keys would take these."""
    paths = _container_paths(base)
    path = data.draw(st.sampled_from(paths))
    swap = data.draw(st.sampled_from([[], {}, "", 0, None, [{}], {"": None}, ["x"], "xy",
                                      {"x": []}, [[]]]) | nasty)
    agrees(encode(_replaced(base, path, swap), style))


@SLOW
@given(req=requests(valid=True), style=styles)
def test_valid_requests_take_the_fast_path(req: dict[str, Any], style: Style) -> None:
    # ASCII escapes (\u...) only matter when strings hold colons, which these do not
    assert agrees(encode(req, style))


@SLOW
@given(junk=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda b, i, x: b[:i] + x + b[i + 1:],
              st.sampled_from([encode(sim_body(1, True, 1)), _req().encode(),
                               _feats('"x":true,"y":1.5').encode()]),
              st.integers(0, 200), st.binary(max_size=3))))
def test_junk_bytes_agree_with_pydantic(junk: bytes) -> None:
    agrees(junk)


@SLOW
@given(text=st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?",
                          fullmatch=True))
def test_number_parsing_matches_pydantic(text: str) -> None:
    """orjson and pydantic's parser must read every number to the same float or int."""
    agrees(_feats(f'"x":{text}').encode())
    agrees(_cand(f',"bid":{text}').encode())
