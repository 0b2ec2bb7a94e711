"""Model registry: where the trainer publishes versioned snapshots and the service finds them.

Publication order (Redis): the blob and its metadata are written first, then the "current"
pointer, then a pub/sub notice. A reader that sees the pointer can always fetch the blob; a
reader that misses a notice (pub/sub is at-most-once) still finds the pointer by polling.

Versions come from an atomic counter, so they only increase, across trainer restarts too.

Every read says what went wrong as a RegistryError: VersionNotFound (not kept), RegistryCorrupt
(an entry someone damaged: the message names the key, the flaw and the repair), or the registry
being unreachable. Nothing read from Redis is unpickled; records are JSON, blobs safetensors.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import redis

from ctrloop.core.errors import RegistryError
from ctrloop.core.snapshot import checksum

FETCH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelRecord:
    version: int
    checksum: str
    size: int
    published_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes, key: str = "record") -> ModelRecord:
        """Parse a stored record; RegistryCorrupt naming `key` and the flaw if it is not one.

        Types are checked, not coerced: int("7") would accept a record a careless writer
        produced and hide the corruption until a later, stranger failure."""
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise RegistryCorrupt(f"{key} is not JSON ({e})") from None
        if not isinstance(d, dict):
            raise RegistryCorrupt(f"{key} is not a JSON object")
        missing = [k for k in ("version", "checksum", "size", "published_at") if k not in d]
        if missing:
            raise RegistryCorrupt(f"{key} lacks {', '.join(missing)}")
        checks = (
            ("version", _is_int(d["version"]) and d["version"] >= 1, "a positive integer"),
            ("checksum", isinstance(d["checksum"], str) and _SHA256.fullmatch(d["checksum"])
             is not None, "a SHA-256 hex digest"),
            ("size", _is_int(d["size"]) and d["size"] >= 0, "a non-negative integer"),
            ("published_at", _is_number(d["published_at"]), "a finite number"),
            ("meta", isinstance(d.get("meta", {}), dict), "an object"),
        )
        for name, ok, what in checks:
            if not ok:
                raise RegistryCorrupt(f"{key}: '{name}' is {d[name]!r}, not {what}")
        return cls(d["version"], d["checksum"], d["size"], float(d["published_at"]),
                   dict(d.get("meta", {})))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v)))


_SHA256 = re.compile(r"[0-9a-f]{64}")

# Appended to every corruption message: what an operator can do about it.
_FIX = ("; publish a new version (the trainer does on its next snapshot) or repair the key "
        "with redis-cli")


class VersionNotFound(RegistryError):
    """The asked version is not (or no longer) kept in the registry."""


class RegistryCorrupt(RegistryError):
    """A registry entry exists but is malformed (not a version number, not a record, the wrong
    Redis type, a pointer to a version with no record). Unlike an unreachable registry this
    does not heal by retrying: someone has to publish or repair."""


class ModelRegistry(Protocol):
    """Versioned snapshots of the main model (pCTR) and, under `head(name)`, of every other
    head published with the same version (a bundle: pCTR with its posterior, pCVR, ...)."""

    def next_version(self) -> int: ...
    def head(self, name: str) -> ModelRegistry: ...
    def publish(self, version: int, data: bytes, meta: dict[str, Any]) -> ModelRecord: ...
    def current(self) -> ModelRecord | None: ...
    def record(self, version: int) -> ModelRecord | None: ...
    def fetch(self, version: int) -> bytes: ...
    def versions(self) -> list[int]: ...
    def pin(self, version: int) -> None: ...
    def unpin(self) -> None: ...
    def pinned(self) -> int | None: ...


class InMemoryRegistry:
    """For unit tests and single-process replay; keeps the last `keep` blobs."""

    def __init__(self, keep: int = 5, clock: Callable[[], float] = time.time) -> None:
        self.keep = keep
        self._clock = clock
        self._seq = 0
        self._blobs: dict[int, bytes] = {}
        self._records: dict[int, ModelRecord] = {}
        self._current: int | None = None
        self._pinned: int | None = None
        self._heads: dict[str, InMemoryRegistry] = {}
        self.notices: list[ModelRecord] = []

    def next_version(self) -> int:
        self._seq += 1
        return self._seq

    def publish(self, version: int, data: bytes, meta: dict[str, Any]) -> ModelRecord:
        rec = ModelRecord(version, checksum(data), len(data), self._clock(), meta)
        self._blobs[version] = data
        self._records[version] = rec
        if self._current is None or version > self._current:  # never backwards, as in Redis
            self._current = version
        self.notices.append(rec)
        for old in sorted(self._blobs)[:-self.keep]:
            if old in (self._current, self._pinned):
                continue
            del self._blobs[old]
            del self._records[old]
        return rec

    def current(self) -> ModelRecord | None:
        return None if self._current is None else self._records[self._current]

    def record(self, version: int) -> ModelRecord | None:
        return self._records.get(version)

    def fetch(self, version: int) -> bytes:
        try:
            return self._blobs[version]
        except KeyError:
            raise VersionNotFound(f"model version {version} is not in the registry") from None

    def versions(self) -> list[int]:
        return sorted(self._blobs)

    def head(self, name: str) -> InMemoryRegistry:
        """See RedisRegistry.head."""
        return self._heads.setdefault(name, InMemoryRegistry(self.keep, self._clock))

    def pin(self, version: int) -> None:
        if version not in self._blobs:
            raise VersionNotFound(f"cannot pin version {version}: not in the registry "
                                  f"(available: {self.versions()})")
        self._pinned = version

    def unpin(self) -> None:
        self._pinned = None

    def pinned(self) -> int | None:
        return self._pinned


class RedisRegistry:
    """Keys under `namespace`: seq, current, pinned, blob:V, record:V, versions (sorted set);
    channel `<namespace>:published` carries each new record as JSON, and `{"pinned": V|null}`
    when an operator pins or unpins. A pin is shared by every service process: they all serve
    the pinned version instead of `current` until it is removed."""

    def __init__(self, client: redis.Redis, namespace: str = "ctrloop", keep: int = 5) -> None:
        self.r = client
        self.ns = namespace
        self.keep = keep
        self.channel = f"{namespace}:published"

    @classmethod
    def from_url(cls, url: str, namespace: str = "ctrloop", keep: int = 5) -> RedisRegistry:
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5),
                   namespace, keep)

    def head(self, name: str) -> RedisRegistry:
        """The registry of a model head published next to each version (e.g. "pcvr"): same
        server, namespace `<namespace>:<name>`, same version numbers as the main model."""
        return RedisRegistry(self.r, f"{self.ns}:{name}", self.keep)

    def _k(self, *parts: object) -> str:
        return ":".join([self.ns, *map(str, parts)])

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Redis errors as RegistryError: a key of the wrong Redis type (WRONGTYPE) is
        corruption; another error reply (READONLY, NOPERM, OOM) is the server refusing; anything
        else means it could not be reached."""
        try:
            yield
        except redis.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise RegistryCorrupt(f"{what} failed: {e}{_FIX}") from None
            raise RegistryError(f"{what} failed: the registry refused it: {e}") from None
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None

    def _version_at(self, key: str, raw: bytes | None) -> int | None:
        """A stored version number (pointer or sorted-set member), or RegistryCorrupt."""
        if raw is None:
            return None
        try:
            v = int(raw)
        except ValueError:
            v = 0
        if v < 1 or str(v).encode() != raw.strip():
            raise RegistryCorrupt(f"registry key {self._k(key)} holds {raw[:40]!r}, not a "
                                  f"version number{_FIX}")
        return v

    def next_version(self) -> int:
        with self._io(f"INCR {self._k('seq')}"):
            return int(self.r.incr(self._k("seq")))

    def publish(self, version: int, data: bytes, meta: dict[str, Any]) -> ModelRecord:
        rec = ModelRecord(version, checksum(data), len(data), time.time(), meta)
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.set(self._k("blob", version), data)
            pipe.set(self._k("record", version), rec.to_json())
            pipe.zadd(self._k("versions"), {str(version): version})
            pipe.execute()
            # The pointer only after the blob is in place; it never moves backwards.
            self.r.eval(_SET_IF_NEWER, 1, self._k("current"), version, self._k("record", ""))
            self.r.publish(self.channel, rec.to_json())
            self._trim()
        except redis.RedisError as e:
            raise RegistryError(f"publishing version {version} failed: {e}") from None
        return rec

    def _trim(self) -> None:
        try:
            old = self.r.zrange(self._k("versions"), 0, -self.keep - 1)
            keep = {self.r.get(self._k("current")), self.r.get(self._k("pinned"))}
        except redis.ResponseError:
            return  # a damaged key of the wrong type: keep everything rather than guess a pin
        for v in old:
            if v in keep:
                continue
            v_s = v.decode()
            self.r.delete(self._k("blob", v_s), self._k("record", v_s))
            self.r.zrem(self._k("versions"), v_s)

    def current(self) -> ModelRecord | None:
        with self._io(f"reading {self._k('current')}"):
            raw = self.r.get(self._k("current"))
        v = self._version_at("current", raw)
        if v is None:
            return None
        rec = self.record(v)
        if rec is None:
            # Publication writes the record before the pointer and trimming keeps the
            # current version, so this is never a race: the registry was damaged.
            raise RegistryCorrupt(f"{self._k('current')} points to version {v}, which has no "
                                  f"record{_FIX}")
        return rec

    def record(self, version: int) -> ModelRecord | None:
        key = self._k("record", version)
        with self._io(f"reading {key}"):
            raw = self.r.get(key)
        if raw is None:
            return None
        try:
            rec = ModelRecord.from_json(raw, f"registry key {key}")
        except RegistryCorrupt as e:
            raise RegistryCorrupt(f"{e}{_FIX}") from None
        if rec.version != version:
            raise RegistryCorrupt(f"registry key {key} holds the record of version "
                                  f"{rec.version}{_FIX}")
        return rec

    def fetch(self, version: int) -> bytes:
        """The blob, read in FETCH_CHUNK pieces: parsing one 23 MB reply holds the GIL for
        tens of milliseconds, which stalls every request a serving process has in flight;
        1 MiB pieces let them interleave (docs/benchmarks.md, reload)."""
        key = self._k("blob", version)
        with self._io(f"reading {key}"):
            size = self.r.strlen(key)
            parts, offset = [], 0
            while offset < size:
                part = self.r.getrange(key, offset, offset + FETCH_CHUNK - 1)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
        if size == 0 or offset != size:  # missing, or trimmed while we read it
            raise VersionNotFound(f"model version {version} is not in the registry")
        return b"".join(parts)

    def versions(self) -> list[int]:
        key = "versions"
        with self._io(f"reading {self._k(key)}"):
            raw = self.r.zrange(self._k(key), 0, -1)
        return sorted(v for m in raw if (v := self._version_at(key, m)) is not None)

    def pin(self, version: int) -> None:
        with self._io(f"pinning version {version}"):
            if not self.r.exists(self._k("blob", version)):
                raise VersionNotFound(f"cannot pin version {version}: not in the registry "
                                      f"(available: {self.versions()})")
            self.r.set(self._k("pinned"), version)
            self.r.publish(self.channel, json.dumps({"pinned": version}))

    def unpin(self) -> None:
        with self._io("unpinning"):
            self.r.delete(self._k("pinned"))
            self.r.publish(self.channel, json.dumps({"pinned": None}))

    def pinned(self) -> int | None:
        with self._io(f"reading {self._k('pinned')}"):
            raw = self.r.get(self._k("pinned"))
        return self._version_at("pinned", raw)


# A pointer that is not a number, not even a string, or names a version without a record (a
# damaged registry) is overwritten: publishing a new version is how an operator repairs it, so
# it must not fail on, or be held back by, the damage it repairs. pcall: GET on a key of
# another Redis type returns an error table instead of raising. ARGV[2]: the record key prefix.
_SET_IF_NEWER = """
local got = redis.pcall('GET', KEYS[1])
local cur = type(got) == 'string' and tonumber(got) or nil
if (not cur) or cur < tonumber(ARGV[1])
    or redis.call('EXISTS', ARGV[2] .. got) == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
