"""The model registry and its snapshots attacked from outside (issue 10, D and E), against a
real redis-server: whatever an outsider writes under the service's namespace, the service keeps
answering (the model it has, or the prior), answers JSON errors with a `detail`, counts and
logs the problem once, never writes half of an admin operation, never unpickles anything, and
picks up a good version once one is published.

Most cases run the app in-process (the real RedisRegistry and Kafka sink, polls driven by the
test); one starts a real `ctrloop serve` against an already-damaged registry."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.models import CTRModel, build_model
from ctrloop.core.posterior import LogitPosterior, PosteriorConfig
from ctrloop.core.snapshot import checksum, encode_snapshot
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.registry import ModelRecord, RedisRegistry
from ctrloop.service.app import create_app
from ctrloop.service.settings import ServiceSettings

from .service_process import ServiceProcess

pytestmark = pytest.mark.integration

TOKEN = "outsider-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 256),
    Field("ad.id", "categorical", "ad", 256),
))
OTHER_SPEC = FeatureSpec((*SPEC.fields, Field("ad.category", "categorical", "ad", 32)))
REQUEST = {"user_id": "u7", "candidates": [{"ad_id": f"a{j}", "advertiser_id": f"v{j}",
                                            "bid": 1.0 + j} for j in range(4)]}
PRIOR = 0.03


def model_for(version: int, spec: FeatureSpec = SPEC, posterior: bool = True) -> CTRModel:
    g = torch.Generator().manual_seed(version)
    m = build_model("lr", spec)
    with torch.no_grad():
        m.weights.weight.copy_(torch.randn(m.weights.weight.shape, generator=g) * 0.3)
        m.bias.fill_(-3.0)
    if posterior:
        m.posterior = LogitPosterior(spec, PosteriorConfig(field_prior_var={}))
    return m.eval()


def publish_good(registry: RedisRegistry) -> int:
    v = registry.next_version()
    registry.head("pcvr").publish(v, encode_snapshot(model_for(v, posterior=False), v), {})
    registry.publish(v, encode_snapshot(model_for(v), v), {"samples_seen": v})
    return v


def poisoned(blob: bytes, key_prefix: str, value: float = float("nan")) -> bytes:
    """`blob` with one element of its first tensor named `key_prefix...` set to `value` (the
    header, and so the version and spec, unchanged)."""
    tensors = {k: t.clone() for k, t in st_load(blob).items()}
    n = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8:8 + n])["__metadata__"]
    key = next(k for k in sorted(tensors) if k.startswith(key_prefix))
    flat = tensors[key].view(-1)
    flat[flat.numel() // 2] = value
    return st_save(tensors, metadata=metadata)


class Evil:
    """Unpickling this writes `path`: proof that someone unpickled a snapshot."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.write_text, (self.path, "unpickled"))


# ---------------------------------------------------------------------------- in-process app


@dataclass
class Served:
    app: FastAPI
    client: TestClient
    registry: RedisRegistry

    @property
    def state(self) -> Any:
        return self.app.state.service

    def poll(self, times: int = 3) -> None:
        """Several reloader polls, as the 2 s timer would run them."""
        for _ in range(times):
            self.state.reloader.check()

    def score(self) -> dict[str, Any]:
        r = self.client.post("/v1/score", json=REQUEST)
        assert r.status_code == 200, r.text
        body = r.json()
        for c in body["candidates"]:  # the response schema: numbers, never null
            assert isinstance(c["pctr"], float) and isinstance(c["score"], float), c
        return body

    def failures(self, reason: str) -> float:
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(f'ctrloop_model_reload_failures_total{{reason="{reason}"}} '):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def served(redis_server: RedisServer, kafka_broker: KafkaBroker, topic_prefix: str,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = RedisRegistry.from_url(redis_server.url, topic_prefix)
    settings = ServiceSettings(redis_url=redis_server.url, registry_namespace=topic_prefix,
                               kafka_bootstrap=kafka_broker.bootstrap, admin_token=TOKEN,
                               reload_poll_s=3600, prior_ctr=PRIOR)
    app = create_app(settings, registry=registry)
    with TestClient(app) as client:
        yield Served(app, client, registry)


def assert_json_error(r: Any, *statuses: int) -> str:
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


# One damaging write each, and what repairs it. `counted`: the poll sees it (the pointer or the
# record it reads); otherwise only routes that read the damaged key notice.
@dataclass(frozen=True)
class Damage:
    name: str
    damage: Callable[[RedisRegistry, int], None]
    says: str
    counted: bool = True


def _k(reg: RedisRegistry, *parts: object) -> str:
    return ":".join([reg.ns, *map(str, parts)])


DAMAGES = [
    Damage("pointer is not a number", lambda r, v: r.r.set(_k(r, "current"), "abc"),
           "holds b'abc', not a version number"),
    Damage("pointer to a missing version", lambda r, v: r.r.set(_k(r, "current"), 999),
           "points to version 999, which has no record"),
    Damage("pointer of the wrong Redis type",
           lambda r, v: (r.r.delete(_k(r, "current")), r.r.rpush(_k(r, "current"), "1")),
           "WRONGTYPE"),
    Damage("record is not JSON", lambda r, v: r.r.set(_k(r, "record", v), b"{not json\xff"),
           "is not JSON"),
    Damage("record with wrong types", lambda r, v: r.r.set(_k(r, "record", v), json.dumps(
        {"version": str(v), "checksum": 7, "size": "big", "published_at": None})),
        "'version' is '1', not a positive integer"),
    Damage("record missing fields", lambda r, v: r.r.set(_k(r, "record", v), "{}"),
           "lacks version, checksum, size, published_at"),
    Damage("versions hold a non-number",
           lambda r, v: r.r.zadd(_k(r, "versions"), {"abc": 0}), "holds b'abc'",
           counted=False),
]


@pytest.mark.parametrize("case", DAMAGES, ids=lambda d: d.name)
def test_a_damaged_registry_entry_is_survived_counted_and_repaired(served: Served,
                                                                   case: Damage) -> None:
    reg, c = served.registry, served.client
    v1 = publish_good(reg)
    served.poll(1)
    assert served.score()["model_version"] == str(v1)

    case.damage(reg, v1)
    served.poll(5)
    body = served.score()  # still serving what it had
    assert (body["model_version"], body["model_status"]) == (str(v1), "trained")
    assert served.failures("registry") == (1 if case.counted else 0)  # once, not per poll
    models = c.get("/v1/models")
    assert models.status_code == 200, models.text
    m = models.json()
    assert m["serving"]["version"] == str(v1)
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == str(v1)
    if case.counted:
        assert case.says in m["reloader"]["registry_error"]
        assert case.says in ready.json()["registry_error"]
        assert case.says in m["registry"]["error"]

    # Admin routes: JSON with a detail, never a 500, and nothing half-written.
    before = reg.r.get(_k(reg, "pinned"))
    for route in ("rollback", "unpin"):
        r = c.post(f"/v1/admin/{route}", headers=AUTH)
        if r.status_code != 200:
            assert_json_error(r, 404, 409, 503)
            assert reg.r.get(_k(reg, "pinned")) == before, route
    assert served.score()["model_version"] == str(v1)

    # Repaired: the trainer publishes a good version (for the versions set, an operator
    # removes the bad member).
    if not case.counted:
        reg.r.zrem(_k(reg, "versions"), "abc")
    v2 = publish_good(reg)
    served.poll(1)
    assert served.score()["model_version"] == str(v2)
    assert "registry_error" not in c.get("/readyz").json()
    assert "error" not in c.get("/v1/models").json()["registry"]


def test_a_damaged_pin_is_repaired_by_unpin(served: Served) -> None:
    reg, c = served.registry, served.client
    v1 = publish_good(reg)
    served.poll(1)
    reg.r.set(_k(reg, "pinned"), "x")
    v2 = publish_good(reg)
    served.poll(5)
    assert served.score()["model_version"] == str(v1)  # the operator's intent is unknown
    assert served.failures("registry") == 1
    assert "not a version number" in c.get("/readyz").json()["registry_error"]
    r = c.post("/v1/admin/unpin", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"pinned": None, "serving": str(v2), "status": "trained"}
    served.poll(1)
    assert "registry_error" not in c.get("/readyz").json()


def good_head(v: int) -> bytes:
    return encode_snapshot(model_for(v, posterior=False), v)


def publish_bad(reg: RedisRegistry, make: Callable[[int], bytes],
                head: Callable[[int], bytes] = good_head) -> int:
    """A version whose bytes (`make(v)`, its pCVR head's `head(v)`) are published as
    RedisRegistry.publish does, so the checksum matches them."""
    v = reg.next_version()
    reg.head("pcvr").publish(v, head(v), {})
    reg.publish(v, make(v), {})
    return v


def good_model(v: int) -> bytes:
    return encode_snapshot(model_for(v), v)


# case -> (the model's bytes, the pCVR head's bytes, what the refusal says); `sentinel` is the
# file an unpickled payload would write.
def bad_snapshot(case: str, sentinel: Path) -> tuple[Callable[[int], bytes],
                                                    Callable[[int], bytes], str]:
    evil = pickle.dumps(Evil(sentinel))
    return {
        "nan in the model table": (lambda v: poisoned(good_model(v), "weights"), good_head,
                                   "tensor 'weights.weight' holds 1 non-finite"),
        "inf in the model bias": (lambda v: poisoned(good_model(v), "bias", float("inf")),
                                  good_head, "tensor 'bias' holds 1 non-finite"),
        "nan in the posterior": (lambda v: poisoned(good_model(v), "posterior."), good_head,
                                 "tensor 'posterior.evidence' holds 1 non-finite"),
        "nan in the pcvr head": (good_model, lambda v: poisoned(good_head(v), "weights"),
                                 "pCVR head: version"),
        "pickle": (lambda v: evil, good_head, "snapshot"),
        "pickle as the pcvr head": (good_model, lambda v: evil, "pCVR head"),
        "wrong feature spec": (lambda v: encode_snapshot(model_for(v, OTHER_SPEC), v),
                               good_head, "differs from the served spec"),
    }[case]


@pytest.mark.parametrize("case", [
    "bad checksum", "nan in the model table", "inf in the model bias", "nan in the posterior",
    "nan in the pcvr head", "pickle", "pickle as the pcvr head", "wrong feature spec"])
def test_a_bad_snapshot_is_refused_once_and_never_served(served: Served, case: str,
                                                         tmp_path: Path) -> None:
    reg, c = served.registry, served.client
    sentinel = tmp_path / "unpickled.txt"
    good = publish_good(reg)
    served.poll(1)
    if case == "bad checksum":
        v = reg.next_version()
        blob = encode_snapshot(model_for(v), v)
        record = ModelRecord(v, checksum(blob), len(blob), time.time(), {})
        flipped = bytearray(blob)
        flipped[-5] ^= 0xFF
        reg.r.set(_k(reg, "blob", v), bytes(flipped))
        reg.r.set(_k(reg, "record", v), record.to_json())
        reg.r.zadd(_k(reg, "versions"), {str(v): v})
        reg.r.set(_k(reg, "current"), v)
        says = "checksum mismatch"
    else:
        make, head, says = bad_snapshot(case, sentinel)
        v = publish_bad(reg, make, head)
    served.poll(5)
    body = served.score()
    assert body["model_version"] == str(good)
    assert served.failures("invalid") == 1  # refused once, not every poll
    reloader = c.get("/v1/models").json()["reloader"]
    assert v in reloader["refused_versions"]
    assert says in reloader["last_error"]

    # An operator's pin of it: 409 with a detail, and no pin written.
    r = c.post("/v1/admin/pin", json={"version": v}, headers=AUTH)
    detail = assert_json_error(r, 409)
    assert f"version {v} was not pinned" in detail and says in detail
    assert reg.pinned() is None
    assert served.score()["model_version"] == str(good)
    assert not sentinel.exists()  # nothing was ever unpickled

    # The next good version is served.
    v2 = publish_good(reg)
    served.poll(1)
    assert served.score()["model_version"] == str(v2)
    assert not sentinel.exists()


def test_rollback_onto_a_refused_version_writes_no_pin(served: Served) -> None:
    """Issue 10 E: a rollback that failed had already written the pin."""
    reg, c = served.registry, served.client
    bad = publish_bad(reg, lambda v: poisoned(encode_snapshot(model_for(v), v), "weights"))
    good = publish_good(reg)
    served.poll(1)
    assert served.score()["model_version"] == str(good)
    r = c.post("/v1/admin/rollback", headers=AUTH)
    detail = assert_json_error(r, 409)
    assert f"version {bad} was not pinned" in detail
    assert "could not be loaded here: None" not in detail
    assert reg.pinned() is None
    assert served.score()["model_status"] == "trained"


# ---------------------------------------------------------------------------- a real process


def test_serve_starts_on_a_damaged_registry_serves_the_prior_and_recovers(
        redis_server: RedisServer, kafka_broker: KafkaBroker, topic_prefix: str,
        tmp_path: Path) -> None:
    """Issue 10 E: `ctrloop serve` exited "Application startup failed" when the registry's
    pointer was damaged (a crash loop under Kubernetes). It starts, serves the prior, says
    why in /readyz, and loads the first good version published."""
    reg = RedisRegistry.from_url(redis_server.url, topic_prefix)
    reg.r.set(_k(reg, "current"), "abc")
    env = {"CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_REGISTRY_NAMESPACE": topic_prefix,
           "CTRLOOP_KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "CTRLOOP_RELOAD_POLL_S": "0.5",
           "CTRLOOP_TOPIC_IMPRESSIONS": f"{topic_prefix}imp", "CTRLOOP_PRIOR_CTR": str(PRIOR)}
    with ServiceProcess(env, tmp_path) as service:
        with httpx.Client(base_url=service.url, timeout=10.0) as http:
            ready = http.get("/readyz")
            assert ready.status_code == 200, ready.text
            body = ready.json()
            assert (body["model_status"], body["registry_reachable"]) == ("prior", True)
            assert "holds b'abc', not a version number" in body["registry_error"]
            scored = http.post("/v1/score", json=REQUEST).json()
            assert scored["model_status"] == "prior"
            assert {c["pctr"] for c in scored["candidates"]} == {PRIOR}
            models = http.get("/v1/models")
            assert models.status_code == 200 and "error" in models.json()["registry"]
            time.sleep(1.5)  # three polls: still one failure counted, one log line
            assert service.metric("ctrloop_model_reload_failures_total",
                                  'reason="registry"') == 1
            v = publish_good(reg)
            deadline = time.monotonic() + 15
            while http.post("/v1/score", json=REQUEST).json()["model_version"] != str(v):
                assert time.monotonic() < deadline, service.log_tail()
                time.sleep(0.1)
            assert "registry_error" not in http.get("/readyz").json()
        log = service.log_tail(200_000)
    assert log.count("model registry is damaged") == 1, log
    assert "Traceback" not in log, log
