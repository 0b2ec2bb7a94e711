"""Hot reload of `ctrloop serve --workers 2` against a real redis-server, under load.

Every published version has its own weights and bias, so the pCTR of one fixed request names
the version that computed it: a response from a half-loaded or mixed model would not match the
pCTR of the version it names. Then a corrupt snapshot (its bytes do not match the recorded
checksum) and an incompatible one (another feature spec) are published: both are refused and
the previous version keeps serving."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import torch

from ctrloop.core.features import FeatureEncoder, FeatureSpec, Field
from ctrloop.core.models import CTRModel, build_model
from ctrloop.core.snapshot import build_from_snapshot, checksum, decode_snapshot, encode_snapshot
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.registry import ModelRecord, RedisRegistry

from .service_process import ServiceProcess

pytestmark = pytest.mark.integration

SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 256),
    Field("user.age", "categorical", "user", 32),
    Field("ctx.device", "categorical", "context", 16),
    Field("ad.id", "categorical", "ad", 256),
    Field("ad.advertiser_id", "categorical", "ad", 64),
))
OTHER_SPEC = FeatureSpec((*SPEC.fields, Field("ad.category", "categorical", "ad", 32)))
REQUEST = {
    "user_id": "u7",
    "features": {"user.age": "25-34", "ctx.device": "ios"},
    "candidates": [{"ad_id": f"a{j}", "advertiser_id": f"adv{j}"} for j in range(3)],
    "options": {"rank_by": "pctr"},
}
VERSIONS = 25
PUBLISH_EVERY_S = 0.4
THREADS = 3


def model_for(version: int, spec: FeatureSpec = SPEC) -> CTRModel:
    """Logistic regression whose weights and bias both depend on the version."""
    g = torch.Generator().manual_seed(version)
    m = build_model("lr", spec)
    with torch.no_grad():
        m.weights.weight.copy_(torch.randn(m.weights.weight.shape, generator=g) * 0.3)
        m.bias.fill_(-3.5 + 0.02 * version)
    return m.eval()


def pctr_of(blob: bytes) -> tuple[float, ...]:
    """What the service computes for REQUEST with this snapshot (ServedModel.pctr's steps)."""
    model = build_from_snapshot(decode_snapshot(blob))
    cands = [(c["ad_id"], c["advertiser_id"], {}) for c in REQUEST["candidates"]]
    rows = FeatureEncoder(model.spec).encode_request(REQUEST["features"], REQUEST["user_id"],
                                                     cands)
    with torch.inference_mode():
        return tuple(torch.sigmoid(model(torch.from_numpy(rows))).double().numpy().tolist())


@dataclass
class Answer:
    sent: float
    received: float
    worker: str
    version: str
    pctr: tuple[float, ...]


class Load:
    """Threads posting REQUEST continuously, each on fresh connections (so both workers get
    traffic), recording every answer and every failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]

    def _run(self) -> None:
        body = orjson.dumps(REQUEST)
        with httpx.Client(base_url=self.url, timeout=10.0,
                          headers={"Connection": "close", "content-type": "application/json"}
                          ) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post("/v1/score", content=body)
                except httpx.HTTPError as e:
                    with self._lock:
                        self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                received = time.monotonic()
                if r.status_code != 200:
                    with self._lock:
                        self.failures.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                doc = r.json()
                by_ad = {c["ad_id"]: c["pctr"] for c in doc["candidates"]}
                pctr = tuple(by_ad[c["ad_id"]] for c in REQUEST["candidates"])
                with self._lock:
                    self.answers.append(Answer(sent, received, r.headers["x-ctrloop-worker"],
                                               doc["model_version"], pctr))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def latest(self) -> dict[str, str]:
        """Worker → the version of its most recent answer."""
        with self._lock:
            out: dict[str, str] = {}
            for a in sorted(self.answers, key=lambda a: a.received):
                out[a.worker] = a.version
            return out

    def since(self, t: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.sent >= t]


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             service: ServiceProcess | None = None) -> float:
    """Poll `condition()` until true; the seconds it took."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            log = f"\nservice log:\n{service.log_tail()}" if service else ""
            raise AssertionError(f"not within {timeout} s: {what}{log}")
        time.sleep(0.02)
    return time.monotonic() - t0


def publish_raw(registry: RedisRegistry, version: int, blob: bytes, record: ModelRecord) -> None:
    """Publish as RedisRegistry.publish does (blob and record, versions set, pointer, notice)
    but with a record of our choosing: a blob corrupted after its checksum was taken."""
    r, ns = registry.r, registry.ns
    r.set(f"{ns}:blob:{version}", blob)
    r.set(f"{ns}:record:{version}", record.to_json())
    r.zadd(f"{ns}:versions", {str(version): version})
    r.set(f"{ns}:current", version)
    r.publish(registry.channel, record.to_json())


def test_hot_reload_under_load_and_refused_snapshots(
    kafka_broker: KafkaBroker, redis_server: RedisServer, topic_prefix: str, tmp_path: Path
) -> None:
    registry = RedisRegistry.from_url(redis_server.url, topic_prefix)
    expected: dict[str, tuple[float, ...]] = {}

    def publish(version_model: int | None = None) -> str:
        v = registry.next_version()
        blob = encode_snapshot(model_for(v if version_model is None else version_model), v)
        registry.publish(v, blob, {"samples_seen": v})
        expected[str(v)] = pctr_of(blob)
        return str(v)

    first = publish()
    # The key layout publish_raw relies on (RedisRegistry's docstring).
    assert registry.r.exists(f"{topic_prefix}:blob:{first}", f"{topic_prefix}:record:{first}") == 2

    env = {"CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_REGISTRY_NAMESPACE": topic_prefix,
           "CTRLOOP_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,  # nothing is logged here
           "CTRLOOP_RELOAD_POLL_S": "1", "CTRLOOP_TOPIC_IMPRESSIONS": f"{topic_prefix}imp"}
    with ServiceProcess(env, tmp_path, workers=2) as service:
        load = Load(service.url)
        load.start()
        try:
            wait_for(lambda: set(load.latest().values()) == {first}
                     and len(load.latest()) == 2, 30, "both workers serving version 1", service)
            published_at: dict[str, float] = {}
            for _ in range(VERSIONS):
                time.sleep(PUBLISH_EVERY_S)
                v = publish()
                published_at[v] = time.monotonic()
            last = v
            took = wait_for(lambda: set(load.latest().values()) == {last}, 10,
                            f"every worker serving version {last}", service)
            assert took < 5.0, f"the last version took {took:.1f} s to be served everywhere"

            # ---- a corrupt blob: its bytes do not match the checksum in its record
            good = last
            t_bad = time.monotonic()
            v_corrupt = registry.next_version()
            blob = encode_snapshot(model_for(v_corrupt), v_corrupt)
            corrupt = bytearray(blob)
            corrupt[-5] ^= 0xFF  # a weight byte: still a well-formed safetensors file
            publish_raw(registry, v_corrupt, bytes(corrupt),
                        ModelRecord(v_corrupt, checksum(blob), len(blob), time.time(), {}))
            wait_for(lambda: service.metric("ctrloop_model_reload_failures_total",
                                            'reason="invalid"') >= 2, 15,
                     "both workers refusing the corrupt snapshot", service)

            # ---- a snapshot of another feature spec
            v_other = registry.next_version()
            registry.publish(v_other, encode_snapshot(model_for(v_other, OTHER_SPEC), v_other),
                             {})
            wait_for(lambda: service.metric("ctrloop_model_reload_failures_total",
                                            'reason="invalid"') >= 4, 15,
                     "both workers refusing the incompatible snapshot", service)
            time.sleep(1.5)  # a poll or two more: still refused, not retried
            t_end = time.monotonic()
        finally:
            load.stop()

        assert service.metric("ctrloop_model_reload_failures_total", 'reason="invalid"') == 4
        workers_seen: set[str] = set()
        for _ in range(20):  # fresh connections: see both workers' reloaders
            r = httpx.get(f"{service.url}/v1/models", headers={"Connection": "close"})
            body = r.json()
            assert body["serving"]["version"] == good
            assert body["registry"]["current"] == v_other
            assert body["reloader"]["refused_versions"] == [v_corrupt, v_other]
            assert "differs from the served spec" in body["reloader"]["last_error"]
            assert body["reloader"]["reload_failures"] == {"invalid": 2}
            workers_seen.add(r.headers.get("x-ctrloop-worker", "?"))
        assert service.metric("ctrloop_model_version") == int(good)

    # ---- what every answer said
    answers = load.answers
    workers = {a.worker for a in answers}
    # uvicorn replaces a worker that misses its 5 s health check (a starved machine): say so.
    assert len(workers) == 2, f"worker processes {workers}:\n{service.log_tail()}"
    assert load.failures == [], load.failures[:5]
    assert len(answers) > 200, f"only {len(answers)} answers under load"
    for a in answers:
        assert a.version in expected, a
        assert a.pctr == expected[a.version], (a, expected[a.version])
    distinct = {v: p for v, p in expected.items()}
    assert len(set(distinct.values())) == len(distinct)  # every version is recognisable
    served_versions = {a.version for a in answers}
    assert len(served_versions) >= VERSIONS // 2, sorted(served_versions, key=int)

    # Per worker the version never decreases: an answer received before another was sent
    # was computed first, so its version must not be higher.
    by_worker: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        by_worker[a.worker].append(a)
    for worker, items in by_worker.items():
        by_received = sorted(items, key=lambda a: a.received)
        k, highest = 0, 0
        for a in sorted(items, key=lambda a: a.sent):
            while k < len(by_received) and by_received[k].received < a.sent:
                highest = max(highest, int(by_received[k].version))
                k += 1
            assert int(a.version) >= highest, f"worker {worker} went back to {a.version} " \
                                              f"after serving {highest}"

    # After the refusals every answer still came from the last good version.
    after = [a for a in answers if t_bad <= a.sent <= t_end]
    assert after, "no answers after the bad snapshots"
    assert {a.version for a in after} == {good}
