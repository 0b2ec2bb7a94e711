"""Model registry: where the trainer publishes versioned snapshots and the service finds them.

Publication order (Redis): the blob and its metadata are written first, then the "current"
pointer, then a pub/sub notice. A reader that sees the pointer can always fetch the blob; a
reader that misses a notice (pub/sub is at-most-once) still finds the pointer by polling.

Versions come from an atomic counter, so they only increase, across trainer restarts too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import redis

from ctrloop.errors import RegistryError
from ctrloop.snapshot import checksum

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
    def from_json(cls, raw: str | bytes) -> ModelRecord:
        d = json.loads(raw)
        return cls(int(d["version"]), str(d["checksum"]), int(d["size"]),
                   float(d["published_at"]), dict(d.get("meta", {})))


class ModelRegistry(Protocol):
    def next_version(self) -> int: ...
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
            raise RegistryError(f"model version {version} is not in the registry") from None

    def versions(self) -> list[int]:
        return sorted(self._blobs)

    def head(self, name: str) -> InMemoryRegistry:
        """See RedisRegistry.head."""
        return self._heads.setdefault(name, InMemoryRegistry(self.keep, self._clock))

    def pin(self, version: int) -> None:
        if version not in self._blobs:
            raise RegistryError(f"cannot pin version {version}: not in the registry "
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

    def next_version(self) -> int:
        try:
            return int(self.r.incr(self._k("seq")))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None

    def publish(self, version: int, data: bytes, meta: dict[str, Any]) -> ModelRecord:
        rec = ModelRecord(version, checksum(data), len(data), time.time(), meta)
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.set(self._k("blob", version), data)
            pipe.set(self._k("record", version), rec.to_json())
            pipe.zadd(self._k("versions"), {str(version): version})
            pipe.execute()
            # The pointer only after the blob is in place; it never moves backwards.
            self.r.eval(_SET_IF_NEWER, 1, self._k("current"), version)
            self.r.publish(self.channel, rec.to_json())
            self._trim()
        except redis.RedisError as e:
            raise RegistryError(f"publishing version {version} failed: {e}") from None
        return rec

    def _trim(self) -> None:
        old = self.r.zrange(self._k("versions"), 0, -self.keep - 1)
        keep = {self.r.get(self._k("current")), self.r.get(self._k("pinned"))}
        for v in old:
            if v in keep:
                continue
            v_s = v.decode()
            self.r.delete(self._k("blob", v_s), self._k("record", v_s))
            self.r.zrem(self._k("versions"), v_s)

    def current(self) -> ModelRecord | None:
        try:
            v = self.r.get(self._k("current"))
            return None if v is None else self.record(int(v))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None

    def record(self, version: int) -> ModelRecord | None:
        try:
            raw = self.r.get(self._k("record", version))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None
        return None if raw is None else ModelRecord.from_json(raw)

    def fetch(self, version: int) -> bytes:
        """The blob, read in FETCH_CHUNK pieces: parsing one 23 MB reply holds the GIL for
        tens of milliseconds, which stalls every request a serving process has in flight;
        1 MiB pieces let them interleave (docs/benchmarks.md, reload)."""
        key = self._k("blob", version)
        try:
            size = self.r.strlen(key)
            parts, offset = [], 0
            while offset < size:
                part = self.r.getrange(key, offset, offset + FETCH_CHUNK - 1)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None
        if size == 0 or offset != size:  # missing, or trimmed while we read it
            raise RegistryError(f"model version {version} is not in the registry")
        return b"".join(parts)

    def versions(self) -> list[int]:
        try:
            return sorted(int(v) for v in self.r.zrange(self._k("versions"), 0, -1))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None

    def pin(self, version: int) -> None:
        try:
            if not self.r.exists(self._k("blob", version)):
                raise RegistryError(f"cannot pin version {version}: not in the registry "
                                    f"(available: {self.versions()})")
            self.r.set(self._k("pinned"), version)
            self.r.publish(self.channel, json.dumps({"pinned": version}))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None

    def unpin(self) -> None:
        try:
            self.r.delete(self._k("pinned"))
            self.r.publish(self.channel, json.dumps({"pinned": None}))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None

    def pinned(self) -> int | None:
        try:
            v = self.r.get(self._k("pinned"))
        except redis.RedisError as e:
            raise RegistryError(f"registry unreachable: {e}") from None
        return None if v is None else int(v)


_SET_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
