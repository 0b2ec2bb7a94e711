"""The scoring service's HTTP API in-process (TestClient), with an in-memory registry and a
sink that records what it is given: ranking, impression logging, cold start, hot reload,
admin routes, health and metrics, body limits and the /v1/events contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient
from service_fakes import RecordingSink

from ctrloop.core.events import Impression, decode_event
from ctrloop.core.features import NUMERIC_BUCKETS, FeatureEncoder, FeatureSpec, Field
from ctrloop.core.models import CTRModel, build_model
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service.app import create_app
from ctrloop.service.settings import ServiceSettings

TOKEN = "s3cret-admin-token"

SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 1024),
    Field("user.age", "categorical", "user", 64),
    Field("user.premium", "categorical", "user", 16),
    Field("user.sessions_7d", "numeric", "user", NUMERIC_BUCKETS),
    Field("ctx.device", "categorical", "context", 16),
    Field("ad.id", "categorical", "ad", 1024),
    Field("ad.advertiser_id", "categorical", "ad", 256),
    Field("ad.category", "categorical", "ad", 64),
))


def random_model(seed: int, spec: FeatureSpec = SPEC) -> CTRModel:
    torch.manual_seed(seed)
    model = build_model("fwfm", spec, dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def publish(registry: InMemoryRegistry, model: CTRModel) -> int:
    v = registry.next_version()
    registry.publish(v, encode_snapshot(model, v, {"samples_seen": 1000 * v}),
                     {"samples_seen": 1000 * v})
    return v


def contract(features: dict[str, Any]) -> dict[str, Any]:
    """Booleans as the event contract has them: the strings "true" and "false"."""
    return {k: ("true" if v is True else "false" if v is False else v)
            for k, v in features.items()}


def expected_pctr(model: CTRModel, req: dict[str, Any]) -> np.ndarray:
    cands = [(c["ad_id"], c["advertiser_id"], contract(c.get("features", {})))
             for c in req["candidates"]]
    rows = FeatureEncoder(model.spec).encode_request(contract(req.get("features", {})),
                                                     req["user_id"], cands)
    with torch.inference_mode():
        return torch.sigmoid(model(torch.from_numpy(rows))).double().numpy()


def score_request(n: int = 6, **options: Any) -> dict[str, Any]:
    return {
        "request_id": "req-1",
        "user_id": "u42",
        "ts": 1767225600.0,
        "features": {"user.age": "25-34", "user.premium": True, "user.sessions_7d": 12,
                     "ctx.device": "ios"},
        "candidates": [
            {"ad_id": f"a{j}", "advertiser_id": f"adv{j % 3}",
             "features": {"ad.category": ["games", "travel", "news"][j % 3]}}
            for j in range(n)
        ],
        "options": options,
    }


@pytest.fixture(autouse=True)
def _single_process_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    # /metrics reads every worker's files when this is set (ctrloop serve --workers N).
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


@pytest.fixture
def registry() -> InMemoryRegistry:
    return InMemoryRegistry()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


def make_client(registry: InMemoryRegistry, sink: RecordingSink | None,
                **overrides: Any) -> TestClient:
    settings = ServiceSettings(reload_poll_s=3600, **overrides)
    for key, value in overrides.items():  # unknown keys are ignored silently (extra="ignore")
        assert getattr(settings, key) == value, key
    return TestClient(create_app(settings, registry=registry, sink=sink))  # type: ignore[arg-type]


@pytest.fixture
def client(registry: InMemoryRegistry, sink: RecordingSink) -> Iterator[TestClient]:
    with make_client(registry, sink, admin_token=TOKEN, max_candidates=50,
                     max_body_bytes=64 * 1024, retry_after_s=7) as c:
        yield c


def reload(client: TestClient) -> bool:
    return bool(client.app.state.service.reloader.check())  # type: ignore[attr-defined]


@pytest.fixture
def trained(client: TestClient, registry: InMemoryRegistry) -> CTRModel:
    """Version 1 published and loaded."""
    model = random_model(1)
    publish(registry, model)
    assert reload(client)
    return model


# ---------------------------------------------------------------------------- ranking


def test_ranks_by_bid_times_pctr(client: TestClient, trained: CTRModel) -> None:
    req = score_request()
    pctr = expected_pctr(trained, req)
    assert len(set(pctr.round(6).tolist())) == len(pctr)  # distinct, so the order is defined
    # bid = 1/pctr² makes bid×pCTR = 1/pCTR: the bid ranking is the pCTR ranking reversed.
    for c, p in zip(req["candidates"], pctr, strict=True):
        c["bid"] = float(1.0 / p**2)
    r = client.post("/v1/score", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "req-1"
    assert body["model_version"] == "1"
    assert body["model_status"] == "trained"
    assert body["logged"] is False
    got = [c["ad_id"] for c in body["candidates"]]
    assert got == [f"a{j}" for j in np.argsort(pctr)]  # lowest pCTR first
    for c in body["candidates"]:
        j = int(c["ad_id"][1:])
        assert c["pctr"] == pytest.approx(pctr[j], rel=1e-6)
        assert c["score"] == pytest.approx(req["candidates"][j]["bid"] * pctr[j], rel=1e-6)
        assert c["propensity"] == 1.0
        assert c.get("impression_id") is None  # only with options.log
    assert [c["rank"] for c in body["candidates"]] == list(range(1, 7))


def test_ranks_by_pctr_ignoring_bids(client: TestClient, trained: CTRModel) -> None:
    req = score_request(rank_by="pctr")
    pctr = expected_pctr(trained, req)
    for c, p in zip(req["candidates"], pctr, strict=True):
        c["bid"] = float(1.0 / p**2)
    body = client.post("/v1/score", json=req).json()
    assert [c["ad_id"] for c in body["candidates"]] == [f"a{j}" for j in np.argsort(-pctr)]
    for c in body["candidates"]:
        assert c["score"] == c["pctr"]


def test_missing_bid_ranks_as_bid_one(client: TestClient, trained: CTRModel) -> None:
    req = score_request()
    pctr = expected_pctr(trained, req)
    low = int(np.argmin(pctr))
    req["candidates"][low]["bid"] = float(2.0 / pctr[low])  # score 2 > any pCTR
    body = client.post("/v1/score", json=req).json()
    assert body["candidates"][0]["ad_id"] == f"a{low}"
    rest = [c["ad_id"] for c in body["candidates"][1:]]
    assert rest == [f"a{j}" for j in np.argsort(-pctr) if j != low]


def test_top_k_returns_the_k_best(client: TestClient, trained: CTRModel) -> None:
    req = score_request(top_k=2, rank_by="pctr")
    pctr = expected_pctr(trained, req)
    body = client.post("/v1/score", json=req).json()
    assert [c["ad_id"] for c in body["candidates"]] == [f"a{j}" for j in np.argsort(-pctr)[:2]]
    req["options"]["top_k"] = 100  # more than there are
    assert len(client.post("/v1/score", json=req).json()["candidates"]) == 6


# ---------------------------------------------------------------------------- logging


def test_log_writes_one_impression_per_shown_ad_with_the_scored_features(
    client: TestClient, trained: CTRModel, sink: RecordingSink
) -> None:
    req = score_request(top_k=3, log=True)
    # A candidate feature overrides the request's; a candidate null blanks a shared value.
    req["candidates"][0]["features"]["ctx.device"] = "android"
    req["candidates"][1]["features"]["user.age"] = None
    req["candidates"][2]["features"]["ad.new"] = False  # not in the spec: logged anyway
    for c in req["candidates"][:3]:
        c["bid"] = 100.0  # these three are the top_k, so they are logged
    served = client.app.state.service.holder.served  # type: ignore[attr-defined]
    scored: list[torch.Tensor] = []  # the index rows the served model was called with
    hook = served.model.register_forward_pre_hook(lambda _, args: scored.append(args[0]))
    try:
        r = client.post("/v1/score", json=req)
    finally:
        hook.remove()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["logged"] is True
    assert len(sink.logged) == 3
    (scored_rows,) = scored
    assert scored_rows.shape == (6, SPEC.num_fields)
    encoder = FeatureEncoder(SPEC)
    for item, (topic, key, value) in zip(body["candidates"], sink.logged, strict=True):
        assert topic == "impressions"
        assert key == item["impression_id"].encode()
        imp = decode_event(value, "impression")
        assert isinstance(imp, Impression)
        j = int(item["ad_id"][1:])
        cand = req["candidates"][j]
        assert imp.features == contract({**req["features"], **cand["features"]})
        assert imp.features["user.premium"] == "true"
        assert imp.impression_id == item["impression_id"]
        assert (imp.user_id, imp.ad_id, imp.advertiser_id) == ("u42", cand["ad_id"],
                                                               cand["advertiser_id"])
        assert imp.ts == 1767225600.0
        assert imp.position == item["rank"]
        assert imp.model_version == "1" == body["model_version"]
        assert imp.propensity == item["propensity"] == 1.0
        assert orjson.loads(value)["request_id"] == "req-1"
        # What the trainer will encode is exactly what was scored.
        assert encoder.encode(imp) == scored_rows[j].tolist()
        with torch.inference_mode():
            p = torch.sigmoid(trained(torch.tensor([encoder.encode(imp)]))).item()
        assert item["pctr"] == pytest.approx(p, rel=1e-5)
    assert sorted(c["ad_id"] for c in body["candidates"]) == ["a0", "a1", "a2"]
    assert len({k for _, k, _ in sink.logged}) == 3


def test_booleans_are_scored_as_the_strings_true_and_false(
    client: TestClient, trained: CTRModel
) -> None:
    as_bool = score_request()
    as_str = score_request()
    as_str["features"]["user.premium"] = "true"
    b = client.post("/v1/score", json=as_bool).json()["candidates"]
    s = client.post("/v1/score", json=as_str).json()["candidates"]
    assert [(c["ad_id"], c["pctr"]) for c in b] == [(c["ad_id"], c["pctr"]) for c in s]
    as_false = score_request()
    as_false["features"]["user.premium"] = False
    f = client.post("/v1/score", json=as_false).json()["candidates"]
    assert [c["pctr"] for c in f] != [c["pctr"] for c in b]


def test_log_needs_top_k(client: TestClient, sink: RecordingSink) -> None:
    r = client.post("/v1/score", json=score_request(log=True))
    assert r.status_code == 422
    assert "top_k" in r.json()["detail"]
    assert sink.logged == []


def test_log_refused_when_impression_logging_is_off(
    registry: InMemoryRegistry, sink: RecordingSink
) -> None:
    with make_client(registry, sink, log_impressions=False) as c:
        r = c.post("/v1/score", json=score_request(top_k=1, log=True))
        assert r.status_code == 422
        assert "CTRLOOP_LOG_IMPRESSIONS" in r.json()["detail"]
        assert c.post("/v1/score", json=score_request(top_k=1)).status_code == 200
    assert sink.logged == []


def test_log_without_a_sink_says_not_logged(registry: InMemoryRegistry,
                                           sink: RecordingSink) -> None:
    app = create_app(ServiceSettings(reload_poll_s=3600), registry=registry,
                     sink=sink)  # type: ignore[arg-type]
    app.state.service.sink = None
    with TestClient(app) as c:
        body = c.post("/v1/score", json=score_request(top_k=2, log=True)).json()
        assert body["logged"] is False
        # No ids for impressions nobody logged: a click reported with one would never match.
        assert not any("impression_id" in item for item in body["candidates"])


# ---------------------------------------------------------------------------- models


def test_cold_start_serves_the_prior(registry: InMemoryRegistry, sink: RecordingSink) -> None:
    with make_client(registry, sink, prior_ctr=0.05) as c:
        req = score_request(top_k=3, log=True)
        for j, cand in enumerate(req["candidates"]):
            cand["bid"] = 1.0 + j
        body = c.post("/v1/score", json=req).json()
        assert body["model_status"] == "prior"
        assert body["model_version"] == "prior"
        assert [x["pctr"] for x in body["candidates"]] == [0.05] * 3
        assert [x["ad_id"] for x in body["candidates"]] == ["a5", "a4", "a3"]  # by bid
        assert [x["score"] for x in body["candidates"]] == pytest.approx([0.3, 0.25, 0.2])
        imp = decode_event(sink.logged[0][2], "impression")
        assert isinstance(imp, Impression) and imp.model_version == "prior"
        ready = c.get("/readyz").json()
        assert ready["model_status"] == "prior"
        assert ready["model_version"] == "prior"
        models = c.get("/v1/models").json()
        assert models["serving"]["version"] == "prior"
        assert models["serving"]["prior_ctr"] == 0.05
        assert models["registry"] == {"current": None, "pinned": None, "versions": []}


def test_responses_name_each_newly_published_version(
    client: TestClient, registry: InMemoryRegistry
) -> None:
    req = score_request(rank_by="pctr")
    assert client.post("/v1/score", json=req).json()["model_version"] == "prior"
    for seed in (1, 2, 3):
        model = random_model(seed)
        v = publish(registry, model)
        assert client.post("/v1/score", json=req).json()["model_version"] != str(v)
        assert reload(client)
        assert not reload(client)  # nothing new
        body = client.post("/v1/score", json=req).json()
        assert body["model_version"] == str(v)
        assert body["model_status"] == "trained"
        pctr = expected_pctr(model, req)
        got = {c["ad_id"]: c["pctr"] for c in body["candidates"]}
        assert got == {f"a{j}": pytest.approx(p, rel=1e-6) for j, p in enumerate(pctr)}


def test_the_first_model_fixes_the_spec(client: TestClient, registry: InMemoryRegistry,
                                        trained: CTRModel) -> None:
    other = FeatureSpec((*SPEC.fields, Field("ctx.hour", "categorical", "context", 32)))
    publish(registry, random_model(2, other))
    assert not reload(client)
    assert client.post("/v1/score", json=score_request()).json()["model_version"] == "1"
    models = client.get("/v1/models").json()
    assert models["reloader"]["refused_versions"] == [2]
    assert "differs from the served spec" in models["reloader"]["last_error"]


def test_models_route(client: TestClient, registry: InMemoryRegistry) -> None:
    for seed in (1, 2):
        publish(registry, random_model(seed))
    reload(client)
    body = client.get("/v1/models").json()
    serving = body["serving"]
    assert serving["version"] == "2"
    assert serving["status"] == "trained"
    assert serving["model"] == "fwfm"
    assert serving["spec_hash"] == SPEC.hash
    assert serving["samples_seen"] == 2000
    assert serving["checksum"] == registry.record(2).checksum  # type: ignore[union-attr]
    assert body["registry"] == {"current": 2, "pinned": None, "versions": [1, 2]}
    assert body["reloader"]["reloads"] == 1
    assert body["reloader"]["registry_reachable"] is True


# ---------------------------------------------------------------------------- admin


def test_admin_is_disabled_without_a_token(registry: InMemoryRegistry,
                                           sink: RecordingSink) -> None:
    publish(registry, random_model(1))
    with make_client(registry, sink) as c:
        for route in ("pin", "unpin", "rollback"):
            r = c.post(f"/v1/admin/{route}", json={"version": 1},
                       headers={"Authorization": "Bearer anything-at-all"})
            assert r.status_code == 403, route
            assert "CTRLOOP_ADMIN_TOKEN" in r.json()["detail"]
    assert registry.pinned() is None


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-123", TOKEN, f"Basic {TOKEN}",
                                  f"Bearer {TOKEN}x"])
def test_admin_refuses_a_wrong_token(client: TestClient, registry: InMemoryRegistry,
                                     trained: CTRModel, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    for route in ("pin", "unpin", "rollback"):
        r = client.post(f"/v1/admin/{route}", json={"version": 1}, headers=headers)
        assert r.status_code == 401, route
        assert r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["detail"]
    assert registry.pinned() is None


def test_pin_rollback_unpin(client: TestClient, registry: InMemoryRegistry) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for seed in (1, 2, 3):
        publish(registry, random_model(seed))
    reload(client)
    req = score_request()

    r = client.post("/v1/admin/pin", json={"version": 1}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"pinned": 1, "serving": "1", "status": "pinned"}
    assert registry.pinned() == 1
    body = client.post("/v1/score", json=req).json()
    assert (body["model_version"], body["model_status"]) == ("1", "pinned")
    publish(registry, random_model(4))  # ignored while pinned
    assert not reload(client)
    assert client.post("/v1/score", json=req).json()["model_version"] == "1"
    assert client.get("/v1/models").json()["registry"]["pinned"] == 1

    r = client.post("/v1/admin/unpin", headers=auth)
    assert r.status_code == 200
    assert r.json() == {"pinned": None, "serving": "4", "status": "trained"}
    assert registry.pinned() is None

    r = client.post("/v1/admin/rollback", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"pinned": 3, "serving": "3", "status": "pinned"}
    r = client.post("/v1/admin/rollback", headers=auth)
    assert r.json() == {"pinned": 2, "serving": "2", "status": "pinned"}
    body = client.post("/v1/score", json=req).json()
    assert (body["model_version"], body["model_status"]) == ("2", "pinned")

    r = client.post("/v1/admin/pin", json={"version": 99}, headers=auth)
    assert r.status_code == 404
    assert "99" in r.json()["detail"]
    for bad in ({"version": 0}, {"version": "x"}, {}, {"version": 1, "extra": 1}):
        assert client.post("/v1/admin/pin", json=bad, headers=auth).status_code == 422, bad
    r = client.post("/v1/admin/pin", content=b"{not json", headers=auth)
    assert r.status_code == 400
    assert registry.pinned() == 2


def test_rollback_with_nothing_older_is_a_conflict(client: TestClient,
                                                   trained: CTRModel) -> None:
    r = client.post("/v1/admin/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409
    assert "no version older than 1" in r.json()["detail"]


def test_pin_of_a_version_that_fails_verification_is_a_conflict(
    client: TestClient, registry: InMemoryRegistry, trained: CTRModel
) -> None:
    v = registry.next_version()
    registry.publish(v, b"not a snapshot", {})
    r = client.post("/v1/admin/pin", json={"version": v},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409
    detail = r.json()["detail"]  # ErrorBody, as the schema says (issue 10: it had no detail)
    assert detail.startswith(f"version {v} was not pinned: it cannot be served (")
    assert "snapshot is truncated" in detail and "still serving 1" in detail
    assert registry.pinned() is None  # verified before the pin is written: nothing half-done
    assert client.post("/v1/score", json=score_request()).json()["model_version"] == "1"


# ---------------------------------------------------------------------------- health, metrics


def test_healthz_and_readyz(registry: InMemoryRegistry, sink: RecordingSink) -> None:
    c = make_client(registry, sink)
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")  # lifespan not run: not started
    assert r.status_code == 503
    assert r.json()["ready"] is False
    with c:
        r = c.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {"ready": True, "model_version": "prior", "model_status": "prior",
                            "registry_reachable": True, "impressions_queued": 0,
                            "kafka": "connected"}
        assert c.get("/healthz").json() == {"status": "ok"}
    assert sink.closed  # shutdown closes the sink


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_metrics(client: TestClient, registry: InMemoryRegistry, sink: RecordingSink) -> None:
    publish(registry, random_model(1))
    v = registry.next_version()
    registry.publish(v, b"garbage", {})
    publish(registry, random_model(3))
    reload(client)  # version 3 loads: 2 is never the target
    v4 = registry.next_version()
    registry.publish(v4, b"garbage", {})
    reload(client)  # refused
    for _ in range(3):
        assert client.post("/v1/score", json=score_request(top_k=2, log=True)).status_code == 200
    assert client.post("/v1/score", json={"user_id": "u"}).status_code == 422
    assert client.post("/v1/events", json={"events": [
        {"type": "click", "impression_id": "i", "ts": 1767225600.0}]}).status_code == 202
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, 'ctrloop_requests_total{route="/v1/score",status="2xx"}') == 3
    assert metric(text, 'ctrloop_requests_total{route="/v1/score",status="4xx"}') == 1
    assert metric(text, 'ctrloop_requests_total{route="/v1/score",status="5xx"}') == 0
    assert metric(text, 'ctrloop_requests_total{route="/v1/events",status="2xx"}') == 1
    assert metric(text, "ctrloop_candidates_scored_total") == 18
    assert metric(text, 'ctrloop_score_requests_by_status_total{model_status="trained"}') == 3
    assert metric(text, "ctrloop_model_version") == 3
    assert metric(text, "ctrloop_model_reloads_total") == 1
    assert metric(text, 'ctrloop_model_reload_failures_total{reason="invalid"}') == 1
    assert metric(text, "ctrloop_model_samples_seen") == 3000
    assert metric(text, 'ctrloop_events_produced_total{type="click"}') == 1
    assert metric(text, 'ctrloop_request_seconds_count{route="/v1/score"}') == 4  # 4xx too


# ---------------------------------------------------------------------------- limits


def test_body_over_the_limit_is_413_with_content_length(client: TestClient,
                                                        sink: RecordingSink) -> None:
    req = score_request(top_k=1, log=True)
    req["candidates"] = req["candidates"] * 200
    body = orjson.dumps(req)
    assert len(body) > 64 * 1024
    for path in ("/v1/score", "/v1/events"):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert "65536 bytes" in r.json()["detail"]
    assert sink.logged == [] and sink.produced == []


def test_body_over_the_limit_is_413_when_chunked(client: TestClient,
                                                 sink: RecordingSink) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u", "features": {"ctx.blob": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}, "candidates": [{"ad_id": "a", "advertiser_id": "b"}]}'

    for path in ("/v1/score", "/v1/events"):
        r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        assert "exceeds 65536 bytes" in r.json()["detail"]
    assert sink.logged == [] and sink.produced == []


def test_chunked_body_under_the_limit_is_served(client: TestClient) -> None:
    data = orjson.dumps(score_request(top_k=1))

    def chunks() -> Iterator[bytes]:
        for k in range(0, len(data), 50):
            yield data[k:k + 50]

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["candidates"]) == 1


def test_too_many_candidates(client: TestClient) -> None:
    r = client.post("/v1/score", json=score_request(n=51))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "51 candidates" in detail
    assert "at most 50" in detail
    assert "CTRLOOP_MAX_CANDIDATES" in detail
    assert client.post("/v1/score", json=score_request(n=50)).status_code == 200


def test_schema_errors_name_the_field(client: TestClient) -> None:
    req = score_request()
    req["candidates"][2]["features"]["ad.category"] = {"nested": 1}
    r = client.post("/v1/score", json=req)
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["candidates", 2, "features", "ad.category"]
    assert "finite number within ±1e12" in err["msg"]
    r = client.post("/v1/score", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["detail"]


# ---------------------------------------------------------------------------- /v1/events

CLICK = {"type": "click", "impression_id": "i1", "ts": 1767225612.5}
CONVERSION = {"type": "conversion", "impression_id": "i1", "ts": 1767229800.0,
              "conversion_type": "purchase"}
IMPRESSION = {"type": "impression", "impression_id": "i2", "ts": 1767225600.0, "user_id": "u",
              "ad_id": "a", "advertiser_id": "adv", "features": {"user.premium": True}}


def test_events_accepted(client: TestClient, sink: RecordingSink) -> None:
    events = [CLICK, CONVERSION, IMPRESSION, {**CLICK, "impression_id": "i3"}]
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 4, "by_type": {"click": 2, "conversion": 1,
                                                   "impression": 1}}
    topics = [t for t, _, _ in sink.produced]
    assert topics == ["clicks", "conversions", "impressions", "clicks"]
    assert [k for _, k, _ in sink.produced] == [b"i1", b"i1", b"i2", b"i3"]
    imp = decode_event(sink.produced[2][2], "impression")
    assert isinstance(imp, Impression)
    assert imp.features == {"user.premium": "true"}
    conv = orjson.loads(sink.produced[1][2])
    assert conv == {"impression_id": "i1", "ts": 1767229800.0, "conversion_type": "purchase"}


def test_invalid_events_name_their_indexes_and_nothing_is_produced(
    client: TestClient, sink: RecordingSink
) -> None:
    events = [CLICK, {**CLICK, "ts": "soon"}, CONVERSION, {"type": "view"}, [1],
              {**IMPRESSION, "position": -1}]
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert [e["index"] for e in detail["errors"]] == [1, 3, 4, 5]
    assert "'ts' must be a number" in detail["errors"][0]["reason"]
    assert "unknown event type 'view'" in detail["errors"][1]["reason"]
    assert "4 of 6 events are invalid" in detail["message"]
    assert sink.produced == []


@pytest.mark.parametrize("body", [{}, {"events": []}, {"events": {}}, [CLICK],
                                  {"events": [CLICK], "more": 1}])
def test_events_body_shape(client: TestClient, sink: RecordingSink, body: Any) -> None:
    r = client.post("/v1/events", json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], str)
    assert sink.produced == []


def test_too_many_events(registry: InMemoryRegistry, sink: RecordingSink) -> None:
    with make_client(registry, sink, max_events_per_request=3) as c:
        r = c.post("/v1/events", json={"events": [CLICK] * 4})
        assert r.status_code == 422
        assert "send 1-3 per request" in r.json()["detail"]
        assert c.post("/v1/events", json={"events": [CLICK] * 3}).status_code == 202
    assert len(sink.produced) == 3


def test_events_503_when_kafka_is_unavailable(client: TestClient, sink: RecordingSink) -> None:
    sink.down = True
    r = client.post("/v1/events", json={"events": [CLICK, CONVERSION]})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert "unreachable" in r.json()["detail"]
    assert "retry it after 7 s" in r.json()["detail"]
    assert sink.produced == []
    sink.down = False
    r = client.post("/v1/events", json={"events": [CLICK, CONVERSION]})
    assert r.status_code == 202
    assert len(sink.produced) == 2
    text = client.get("/metrics").text
    assert metric(text, "ctrloop_events_unavailable_total") == 1
    assert metric(text, 'ctrloop_requests_total{route="/v1/events",status="2xx"}') == 1
