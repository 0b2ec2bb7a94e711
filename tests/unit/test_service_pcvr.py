"""The pCVR head: published next to each pCTR version, served as `pcvr`, usable for ranking."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from service_fakes import RecordingSink

from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.models import build_model
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service.app import create_app
from ctrloop.service.settings import ServiceSettings

SPEC = FeatureSpec((Field("user.id", "categorical", "user", 256),
                    Field("ad.id", "categorical", "ad", 256),
                    Field("ad.advertiser_id", "categorical", "ad", 64)))


def _model(bias: float, name: str = "lr") -> torch.nn.Module:
    m = build_model(name, SPEC)
    with torch.no_grad():
        m.bias.fill_(bias)
    return m


def _publish(registry: InMemoryRegistry, ctr_bias: float, cvr_bias: float | None) -> int:
    v = registry.next_version()
    if cvr_bias is not None:
        registry.head("pcvr").publish(v, encode_snapshot(_model(cvr_bias), v, {}), {})
    registry.publish(v, encode_snapshot(_model(ctr_bias), v, {}), {})
    return v


BODY = {"user_id": "u1", "candidates": [
    {"ad_id": "a1", "advertiser_id": "v1", "bid": 1.0},
    {"ad_id": "a2", "advertiser_id": "v2", "bid": 2.0}]}


def test_pcvr_is_served_with_its_version_and_ranks_when_asked() -> None:
    registry = InMemoryRegistry()
    app = create_app(ServiceSettings(), registry=registry, sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as c:
        _publish(registry, ctr_bias=-3.0, cvr_bias=None)
        app.state.service.reloader.check()
        r = c.post("/v1/score", json=BODY).json()
        assert all("pcvr" not in x for x in r["candidates"])
        no_cvr = c.post("/v1/score", json={**BODY, "options": {"rank_by": "bid_pctr_pcvr"}})
        assert no_cvr.status_code == 422 and "pCVR" in no_cvr.json()["detail"]

        v = _publish(registry, ctr_bias=-3.0, cvr_bias=-1.0)
        app.state.service.reloader.check()
        r = c.post("/v1/score", json={**BODY, "options": {"rank_by": "bid_pctr_pcvr"}}).json()
        assert r["model_version"] == str(v)
        expected_cvr = float(torch.sigmoid(torch.tensor(-1.0)))
        for x in r["candidates"]:
            assert abs(x["pcvr"] - expected_cvr) < 1e-6
            bid = {"a1": 1.0, "a2": 2.0}[x["ad_id"]]
            assert abs(x["score"] - bid * x["pctr"] * x["pcvr"]) < 1e-12
        assert c.get("/v1/models").json()["serving"]["pcvr"]["model"] == "lr"


def test_a_corrupt_pcvr_head_refuses_the_whole_version() -> None:
    registry = InMemoryRegistry()
    app = create_app(ServiceSettings(), registry=registry, sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app):
        good = _publish(registry, ctr_bias=-3.0, cvr_bias=-1.0)
        app.state.service.reloader.check()
        v = registry.next_version()
        data = bytearray(encode_snapshot(_model(-1.0), v, {}))
        rec = registry.head("pcvr").publish(v, bytes(data), {})
        registry.head("pcvr")._blobs[v] = bytes(data[:-10])  # corrupt after the checksum
        assert rec.version == v
        registry.publish(v, encode_snapshot(_model(-2.0), v, {}), {})
        assert not app.state.service.reloader.check()
        assert app.state.service.holder.served.version == str(good)
        assert v in app.state.service.reloader.describe()["refused_versions"]


def test_the_trainer_publishes_the_pcvr_head_before_the_model() -> None:
    from ctrloop.trainer.pipeline import Pipeline
    from ctrloop.trainer.streaming import RegistryPublisher

    registry = InMemoryRegistry()
    publisher = RegistryPublisher(registry, min_interval_s=0.0)
    version = publisher(Pipeline(SPEC), 1767225600.0)
    assert version is not None
    head = registry.head("pcvr")
    assert head.versions() == registry.versions() == [int(version)]
    record = head.record(int(version))
    assert record is not None and record.meta["head"] == "pcvr"
    assert record.published_at <= registry.current().published_at  # type: ignore[union-attr]


def _stem_head(registry: InMemoryRegistry, v: int, biases: list[float]) -> None:
    m = build_model("stem", SPEC, tasks=["signup", "purchase"], dim=4, task_dim=2)
    with torch.no_grad():
        m.bias.copy_(torch.tensor(biases))
    registry.head("pcvr").publish(v, encode_snapshot(m, v, {}),
                                  {"metrics_by_type": {"signup": {}, "purchase": {}}})


def test_pcvr_per_conversion_type() -> None:
    """A multi-task pCVR head: `pcvr` is the asked type's (default the first), `pcvr_by_type`
    gives every type, ranking by bid x pCTR x pCVR uses the asked type; unknown types are a
    422 that names the known ones."""
    registry = InMemoryRegistry()
    app = create_app(ServiceSettings(), registry=registry, sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as c:
        v = registry.next_version()
        _stem_head(registry, v, [-1.0, -4.0])
        registry.publish(v, encode_snapshot(_model(-3.0), v, {}), {})
        app.state.service.reloader.check()
        p = c.post("/v1/score", json=BODY).json()["candidates"]
        # The trained-from-scratch head: bias + small random pair terms, so compare loosely.
        for x in p:
            assert set(x["pcvr_by_type"]) == {"signup", "purchase"}
            assert x["pcvr"] == x["pcvr_by_type"]["signup"]
            assert x["pcvr_by_type"]["signup"] > 3 * x["pcvr_by_type"]["purchase"]
        r = c.post("/v1/score", json={**BODY, "options": {
            "rank_by": "bid_pctr_pcvr", "conversion_type": "purchase"}}).json()["candidates"]
        for x in r:
            assert x["pcvr"] == x["pcvr_by_type"]["purchase"]
            bid = {"a1": 1.0, "a2": 2.0}[x["ad_id"]]
            assert abs(x["score"] - bid * x["pctr"] * x["pcvr"]) < 1e-12
        bad = c.post("/v1/score", json={**BODY, "options": {"conversion_type": "lead"}})
        assert bad.status_code == 422
        assert "unknown conversion type 'lead'" in bad.json()["detail"]
        assert "signup, purchase" in bad.json()["detail"]
        served = c.get("/v1/models").json()["serving"]["pcvr"]
        assert served["model"] == "stem"
        assert served["conversion_types"] == ["signup", "purchase"]

        _publish(registry, ctr_bias=-3.0, cvr_bias=-1.0)  # back to a one-task head
        app.state.service.reloader.check()
        one = c.post("/v1/score", json={**BODY, "options": {"conversion_type": "signup"}})
        assert one.status_code == 422 and "one task" in one.json()["detail"]
        assert all("pcvr_by_type" not in x
                   for x in c.post("/v1/score", json=BODY).json()["candidates"])


def _metric(c: TestClient, line_start: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_non_finite_prediction_is_answered_with_the_prior_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 D at request time: a model that passed verification can still compute NaN
    (here a row poisoned after load, as an overflow would): the candidate gets the prior CTR
    (pCVR 0), never null, the ranking stays by value, and /metrics counts it."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = InMemoryRegistry()
    prior = 0.03
    app = create_app(ServiceSettings(prior_ctr=prior), registry=registry,
                     sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as c:
        _publish(registry, ctr_bias=-1.0, cvr_bias=-2.0)
        state = app.state.service
        assert state.reloader.check()
        served = state.holder.served
        rows = served.encoder.encode_request({}, "u1", [("a1", "v1", {}), ("a2", "v2", {})])
        a1_id_row = int(rows[0, [f.name for f in SPEC.fields].index("ad.id")])
        assert a1_id_row not in rows[1].tolist()
        with torch.no_grad():
            served.model.weights.weight[a1_id_row] = float("nan")
            served.cvr.weights.weight[a1_id_row] = float("inf")
        r = c.post("/v1/score", json={**BODY, "options": {"rank_by": "bid_pctr_pcvr"}})
        assert r.status_code == 200
        by_ad = {x["ad_id"]: x for x in r.json()["candidates"]}
        assert by_ad["a1"]["pctr"] == prior and by_ad["a1"]["pcvr"] == 0.0
        assert by_ad["a1"]["score"] == 0.0  # bid x prior x 0
        a2 = by_ad["a2"]
        assert abs(a2["pctr"] - float(torch.sigmoid(torch.tensor(-1.0)))) < 1e-6
        assert [x["ad_id"] for x in r.json()["candidates"]] == ["a2", "a1"]
        r = c.post("/v1/score", json={**BODY, "options": {"rank_by": "pctr"}}).json()
        assert [x["ad_id"] for x in r["candidates"]] == ["a2", "a1"]
        assert all(x["pctr"] is not None and x["score"] is not None for x in r["candidates"])
        assert _metric(c, 'ctrloop_nonfinite_predictions_total{output="pctr"}') == 2
        assert _metric(c, 'ctrloop_nonfinite_predictions_total{output="pcvr"}') == 2
