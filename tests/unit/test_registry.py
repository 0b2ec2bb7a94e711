"""The in-memory model registry (the Redis one runs against a real server in integration)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import pytest
import torch

from ctrloop.core.errors import RegistryError
from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.models import build_model
from ctrloop.core.snapshot import build_from_snapshot, checksum, decode_snapshot, encode_snapshot
from ctrloop.io.registry import InMemoryRegistry, ModelRecord, RegistryCorrupt


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def registry(keep: int = 3) -> InMemoryRegistry:
    return InMemoryRegistry(keep=keep, clock=FakeClock())


def test_empty_registry() -> None:
    r = registry()
    assert r.current() is None
    assert r.versions() == []
    assert r.record(1) is None
    with pytest.raises(RegistryError, match="model version 1 is not in the registry"):
        r.fetch(1)


def test_next_version_only_increases() -> None:
    r = registry()
    assert [r.next_version() for _ in range(5)] == [1, 2, 3, 4, 5]


def test_publish_current_fetch() -> None:
    r = registry()
    v = r.next_version()
    rec = r.publish(v, b"blob-1", {"learned": 10})
    assert rec == ModelRecord(1, hashlib.sha256(b"blob-1").hexdigest(), 6, 1001.0,
                              {"learned": 10})
    assert r.current() == rec
    assert r.record(1) == rec
    assert r.fetch(1) == b"blob-1"
    assert checksum(r.fetch(1)) == rec.checksum
    assert r.notices == [rec]


@dataclass(frozen=True)
class KeepCase:
    keep: int
    published: int
    versions: list[int]


KEEP_CASES = [
    KeepCase(keep=3, published=1, versions=[1]),
    KeepCase(keep=3, published=3, versions=[1, 2, 3]),
    KeepCase(keep=3, published=7, versions=[5, 6, 7]),
    KeepCase(keep=1, published=4, versions=[4]),
]


@pytest.mark.parametrize("case", KEEP_CASES, ids=lambda c: f"keep{c.keep}-n{c.published}")
def test_keeps_the_last_versions(case: KeepCase) -> None:
    r = registry(case.keep)
    for _ in range(case.published):
        v = r.next_version()
        r.publish(v, f"blob-{v}".encode(), {})
    assert r.versions() == case.versions
    cur = r.current()
    assert cur is not None and cur.version == case.published
    for v in range(1, case.published + 1):
        if v in case.versions:
            assert r.fetch(v) == f"blob-{v}".encode()
            assert r.record(v) is not None
        else:
            with pytest.raises(RegistryError):
                r.fetch(v)
            assert r.record(v) is None
    assert [n.version for n in r.notices] == list(range(1, case.published + 1))


def test_current_never_moves_back() -> None:
    # Like the Redis registry's set-if-newer pointer: a slow publisher of an older version
    # must not replace a newer model that is already current.
    r = registry(keep=3)
    v1, v2 = r.next_version(), r.next_version()
    r.publish(v2, b"two", {})
    r.publish(v1, b"one", {})
    cur = r.current()
    assert cur is not None and cur.version == v2
    assert r.fetch(cur.version) == b"two"
    assert r.versions() == [1, 2]


def test_an_old_version_published_late_never_evicts_the_current() -> None:
    r = registry(keep=2)
    for _ in range(3):
        r.next_version()
    r.publish(2, b"two", {})
    r.publish(3, b"three", {})
    r.publish(1, b"one", {})  # older than everything kept: trimmed at once
    cur = r.current()
    assert cur is not None and cur.version == 3
    assert r.fetch(3) == b"three"
    assert 3 in r.versions() and len(r.versions()) <= 2


def test_record_json_roundtrip() -> None:
    rec = ModelRecord(4, "ab" * 32, 1234, 1767225600.5, {"learned": 7, "auc": 0.75})
    assert ModelRecord.from_json(rec.to_json()) == rec
    assert ModelRecord.from_json(rec.to_json().encode()) == rec


def test_snapshot_through_the_registry() -> None:
    spec = FeatureSpec((Field("user.a", "categorical", "user", 8),
                        Field("ad.b", "categorical", "ad", 8)))
    torch.manual_seed(0)
    model = build_model("fwfm", spec, dim=4).eval()
    r = registry()
    v = r.next_version()
    rec = r.publish(v, encode_snapshot(model, v, {"note": "x"}), {"note": "x"})
    cur = r.current()
    assert cur == rec
    data = r.fetch(cur.version)
    assert checksum(data) == cur.checksum and len(data) == cur.size
    served = build_from_snapshot(decode_snapshot(data))
    x = torch.tensor([[1, 9], [3, 15]])
    with torch.no_grad():
        assert torch.equal(served(x), model(x))


GOOD_RECORD = {"version": 4, "checksum": "ab" * 32, "size": 1234,
               "published_at": 1767225600.5, "meta": {}}


@pytest.mark.parametrize(("raw", "reason"), [
    (b"abc", "is not JSON"),
    (b"\xff\xfe", "is not JSON"),
    (b"[1, 2]", "is not a JSON object"),
    (b'{"version": 4}', "lacks checksum, size, published_at"),
    (json.dumps({**GOOD_RECORD, "version": "4"}), "'version' is '4', not a positive integer"),
    (json.dumps({**GOOD_RECORD, "version": True}), "'version' is True"),
    (json.dumps({**GOOD_RECORD, "version": 0}), "'version' is 0"),
    (json.dumps({**GOOD_RECORD, "checksum": "x"}), "'checksum' is 'x', not a SHA-256"),
    (json.dumps({**GOOD_RECORD, "size": -1}), "'size' is -1"),
    (json.dumps({**GOOD_RECORD, "size": 1.5}), "'size' is 1.5"),
    (json.dumps({**GOOD_RECORD, "published_at": "now"}), "'published_at' is 'now'"),
    (json.dumps({**GOOD_RECORD, "published_at": float("nan")}), "'published_at' is nan"),
    (json.dumps({**GOOD_RECORD, "meta": "x"}), "'meta' is 'x', not an object"),
])
def test_a_malformed_record_is_registry_corrupt_with_its_reason(raw: str | bytes,
                                                                reason: str) -> None:
    """Issue 10 E: these raised JSONDecodeError/KeyError/ValueError (a 500 and a traceback
    per poll) or were silently coerced ("4" -> 4)."""
    with pytest.raises(RegistryCorrupt, match=re.escape(reason)) as e:
        ModelRecord.from_json(raw, "registry key ns:record:4")
    assert isinstance(e.value, RegistryError)
    assert str(e.value).startswith("registry key ns:record:4")
    assert ModelRecord.from_json(json.dumps(GOOD_RECORD)).version == 4
