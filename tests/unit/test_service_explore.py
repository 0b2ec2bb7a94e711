"""Exploration through /v1/score (in-process, with a real posterior published in the snapshot):
Thompson-sampled ranking and its fields, seeds, propensities in the logged impressions, the
global switch, the cost and share caps, models without a posterior, and metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from service_fakes import RecordingSink
from test_service_app import SPEC, contract, make_client, publish, random_model, score_request

from ctrloop.core.errors import SnapshotError
from ctrloop.core.events import Impression, decode_event
from ctrloop.core.exploration import expected_pctr
from ctrloop.core.features import FeatureEncoder
from ctrloop.core.models import CTRModel
from ctrloop.core.posterior import LogitPosterior, PosteriorConfig
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service import scoring

NEW_AD = "a0"  # its ad.id row was never learned: wide posterior; every other row is narrow


@pytest.fixture(autouse=True)
def _single_process_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def request_rows(req: dict[str, Any], skip: str | None = None) -> torch.Tensor:
    cands = [(c["ad_id"], c["advertiser_id"], contract(c.get("features", {})))
             for c in req["candidates"] if c["ad_id"] != skip]
    return torch.from_numpy(FeatureEncoder(SPEC).encode_request(
        contract(req.get("features", {})), req["user_id"], cands))


def explorable_model(seed: int = 1, prior_var: float = 1.0) -> CTRModel:
    """A model whose posterior learned every row of `score_request()` except NEW_AD's id."""
    model = random_model(seed)
    post = LogitPosterior(SPEC, PosteriorConfig(prior_var=prior_var, field_prior_var={},
                                                scale=1.0, half_life_s=math.inf))
    rows = request_rows(score_request(), skip=NEW_AD)
    post.update(rows, torch.full((rows.shape[0],), 0.1), weights=torch.full((rows.shape[0],),
                                                                            500.0))
    model.posterior = post
    return model


def serve(registry: InMemoryRegistry, sink: RecordingSink | None, model: CTRModel | None,
          **settings: Any) -> TestClient:
    # The mechanism tests sample from the calibrated posterior (temperature 1): at the tempered
    # default the wide new ad is rarely sampled above the others in a handful of requests.
    settings.setdefault("explore_temperature", 1.0)
    client = make_client(registry, sink, **settings)
    if model is not None:
        publish(registry, model)
    return client


@pytest.fixture
def registry() -> InMemoryRegistry:
    return InMemoryRegistry()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def model() -> CTRModel:
    return explorable_model()


@pytest.fixture
def client(registry: InMemoryRegistry, sink: RecordingSink, model: CTRModel
           ) -> Iterator[TestClient]:
    with serve(registry, sink, model) as c:
        yield c


def scored(client: TestClient, **options: Any) -> dict[str, Any]:
    r = client.post("/v1/score", json=score_request(**options))
    assert r.status_code == 200, r.text
    return r.json()


def metric(client: TestClient, line_start: str) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------------------- mean ranking


def test_without_explore_the_mean_ranks_and_the_posterior_is_reported(
    client: TestClient, model: CTRModel
) -> None:
    body = scored(client, top_k=3)
    assert body["explored"] is False
    assert body["exploration"] == {"reason": "not_requested"}
    req = score_request()
    rows = request_rows(req)
    assert model.posterior is not None
    var = model.posterior.variance(rows).double().numpy()
    with torch.inference_mode():
        logit = model(rows).double().numpy()
    assert [c["ad_id"] for c in body["candidates"]] == [
        f"a{j}" for j in np.argsort(-logit, kind="stable")[:3]]
    for c in body["candidates"]:
        j = int(c["ad_id"][1:])
        assert c["propensity"] == 1.0
        assert "pctr_sample" not in c
        assert c["logit_std"] == pytest.approx(math.sqrt(var[j]), rel=1e-5)
        assert c["pctr_mean"] == pytest.approx(float(expected_pctr(logit[j], var[j])),
                                               rel=1e-5)
    stds = {c["ad_id"]: c["logit_std"] for c in scored(client)["candidates"]}
    assert stds[NEW_AD] > 0.9 and max(v for k, v in stds.items() if k != NEW_AD) < 0.4


# ---------------------------------------------------------------------------- Thompson sampling


def test_explore_ranks_by_the_sampled_score(client: TestClient) -> None:
    body = scored(client, explore=True, seed=3)
    assert body["explored"] is True
    info = body["exploration"]
    assert info["reason"] == "explored" and info["seed"] == 3 and 0.0 <= info["cost"] <= 1.0
    cands = body["candidates"]
    assert len(cands) == 6
    for c in cands:
        assert c["score"] == pytest.approx(1.0 * c["pctr_sample"], rel=1e-6)  # bid 1
        assert c["propensity"] is None  # no top_k: no shown ranks to estimate
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)


def test_seeded_requests_repeat_and_seeds_differ(client: TestClient) -> None:
    def ranking(seed: int) -> list[tuple[str, float, float]]:
        body = scored(client, explore=True, seed=seed, top_k=3)
        return [(c["ad_id"], c["pctr_sample"], c["propensity"]) for c in body["candidates"]]

    assert ranking(11) == ranking(11)
    samples = {tuple(x[1] for x in ranking(s)) for s in range(8)}
    assert len(samples) == 8


def test_the_new_ad_is_explored(client: TestClient) -> None:
    """NEW_AD's wide posterior wins the top slot under some seeds, and its propensity there
    says how often."""
    tops = [scored(client, explore=True, seed=s, top_k=1)["candidates"][0] for s in range(40)]
    new = [c for c in tops if c["ad_id"] == NEW_AD]
    greedy = scored(client, top_k=1)["candidates"][0]["ad_id"]
    assert greedy != NEW_AD and 0 < len(new) < 40
    # The estimated P(new ad first) is about its frequency among the 40 seeds.
    p = np.mean([c["propensity"] for c in new])
    assert abs(p - len(new) / 40) < 0.25


def test_explored_propensities_are_logged_with_the_impressions(
    client: TestClient, sink: RecordingSink
) -> None:
    body = scored(client, explore=True, seed=5, top_k=3, log=True)
    assert body["explored"] is True and body["logged"] is True
    assert body["exploration"]["draws"] == client.app.state.service.settings.explore_draws  # type: ignore[attr-defined]
    assert len(sink.logged) == 3
    for item, (_, _, value) in zip(body["candidates"], sink.logged, strict=True):
        imp = decode_event(value, "impression")
        assert isinstance(imp, Impression)
        assert imp.position == item["rank"]
        assert imp.propensity == item["propensity"]
        assert 1 / body["exploration"]["draws"] <= imp.propensity <= 1.0
    assert any(c["propensity"] < 1.0 for c in body["candidates"])


def test_rank_by_pctr_explores_on_pctr(client: TestClient) -> None:
    body = scored(client, explore=True, seed=2, rank_by="pctr")
    for c in body["candidates"]:
        assert c["score"] == pytest.approx(c["pctr_sample"], rel=1e-6)


def test_seed_must_be_a_non_negative_integer(client: TestClient) -> None:
    for bad in (-1, "7", True, 1.5, 2**63):
        r = client.post("/v1/score", json=score_request(explore=True, seed=bad))
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"][0]["loc"][:2] == ["options", "seed"]


# ---------------------------------------------------------------------------- controls


def test_global_switch_off_ranks_by_the_mean(registry: InMemoryRegistry, sink: RecordingSink,
                                             model: CTRModel) -> None:
    with serve(registry, sink, model, explore=False) as c:
        body = scored(c, explore=True, seed=1, top_k=2, log=True)
        assert body["explored"] is False
        assert body["exploration"] == {"reason": "disabled"}
        assert all(x["propensity"] == 1.0 for x in body["candidates"])
        assert all(decode_event(v, "impression").propensity == 1.0  # type: ignore[union-attr]
                   for _, _, v in sink.logged)
        assert metric(c, 'ctrloop_explore_decisions_total{decision="disabled"}') == 1.0


def test_cost_cap_falls_back_to_the_mean(registry: InMemoryRegistry, sink: RecordingSink,
                                         model: CTRModel) -> None:
    with serve(registry, sink, model, explore_cost_cap=1e-6) as c:
        reasons = []
        for seed in range(30):
            body = scored(c, explore=True, seed=seed, top_k=1)
            reasons.append(body["exploration"]["reason"])
            if body["exploration"].get("cost", 0.0) > 0:
                break
        assert reasons[-1] == "explored", "no seed explored at a cost"
        after = scored(c, explore=True, seed=0, top_k=1)
        assert after["explored"] is False
        assert after["exploration"] == {"reason": "cost_cap"}
        assert after["candidates"][0]["propensity"] == 1.0
        assert "pctr_sample" not in after["candidates"][0]
        assert metric(c, 'ctrloop_explore_decisions_total{decision="cost_cap"}') == 1.0
        assert metric(c, "ctrloop_explore_cost_count") == len(reasons)
        assert metric(c, "ctrloop_explore_cost_running_avg") > 1e-6


def test_share_cap_explores_that_share(registry: InMemoryRegistry, sink: RecordingSink,
                                       model: CTRModel) -> None:
    with serve(registry, sink, model, explore_max_share=0.5, explore_cost_cap=1.0) as c:
        reasons = [scored(c, explore=True, top_k=1)["exploration"]["reason"] for _ in range(6)]
        assert reasons == ["share_cap", "explored"] * 3
        not_asked = scored(c, top_k=1)["exploration"]["reason"]
        assert not_asked == "not_requested"  # does not use up the share
        assert metric(c, 'ctrloop_explore_decisions_total{decision="explored"}') == 3.0


def test_no_posterior_no_exploration(registry: InMemoryRegistry, sink: RecordingSink) -> None:
    with serve(registry, sink, None) as c:  # the prior
        body = scored(c, explore=True, top_k=2)
        assert body["model_status"] == "prior"
        assert body["explored"] is False
        assert body["exploration"] == {"reason": "no_posterior"}
        assert all("logit_std" not in x and x["propensity"] == 1.0 for x in body["candidates"])
    with serve(registry, sink, random_model(2)) as c:  # a model published without one
        body = scored(c, explore=True, top_k=2)
        assert body["model_status"] == "trained"
        assert body["exploration"] == {"reason": "no_posterior"}
        assert all("pctr_mean" not in x for x in body["candidates"])


def test_openapi_documents_the_exploration_fields(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    options = schemas["ScoreOptions"]["properties"]
    assert {"explore", "seed"} <= set(options)
    cand = schemas["ScoredCandidate"]["properties"]
    assert {"pctr_mean", "logit_std", "pctr_sample", "propensity"} <= set(cand)
    reasons = schemas["Exploration"]["properties"]["reason"]["enum"]
    assert set(reasons) == {"explored", "not_requested", "disabled", "no_posterior",
                            "cost_cap", "share_cap"}
    for example in schemas["ScoreRequest"]["examples"]:
        assert client.post("/v1/score", json=example).status_code == 200


# ---------------------------------------------------------------------------- verification


class _BadPosterior:
    def row_variance(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.ones(rows.shape)
        out[0, 0] = float("nan")
        return out


def test_a_posterior_with_bad_variances_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(3)
    real_build = scoring.build_from_snapshot

    def build(snap: Any, inference: bool = False) -> CTRModel:
        m = real_build(snap, inference=inference)
        m.posterior = _BadPosterior()  # type: ignore[assignment]
        return m

    monkeypatch.setattr(scoring, "build_from_snapshot", build)
    registry = InMemoryRegistry()
    v = publish(registry, model)
    record = registry.record(v)
    assert record is not None
    with pytest.raises(SnapshotError, match="posterior"):
        scoring.load_verified(registry.fetch(v), record, None, "trained", 0.03)


def test_snapshot_round_trip_keeps_the_posterior(model: CTRModel) -> None:
    from ctrloop.core.snapshot import checksum
    from ctrloop.io.registry import ModelRecord

    data = encode_snapshot(model, 1, {})
    record = ModelRecord(1, checksum(data), len(data), 0.0, {})
    served = scoring.load_verified(data, record, None, "trained", 0.03)
    assert served.posterior is not None
    rows = request_rows(score_request())
    assert model.posterior is not None
    torch.testing.assert_close(served.posterior.row_variance(rows),
                               model.posterior.row_variance(rows))


def test_temperature_scales_the_sampling_variance_not_the_reported_std(
        registry: InMemoryRegistry, sink: RecordingSink, model: CTRModel) -> None:
    def new_ad_first_share(temperature: float) -> tuple[float, list[float]]:
        with serve(registry, sink, model, explore_temperature=temperature) as c:
            bodies = [scored(c, explore=True, seed=s, rank_by="pctr") for s in range(60)]
        first = [next(x for x in b["candidates"] if x["rank"] == 1)["ad_id"] for b in bodies]
        stds = [x["logit_std"] for x in bodies[0]["candidates"]]
        return first.count(NEW_AD) / len(first), stds

    hot, hot_std = new_ad_first_share(1.0)
    cold, cold_std = new_ad_first_share(1e-6)
    assert hot_std == cold_std  # the reported posterior is the calibrated one either way
    assert hot > 0.1
    with serve(registry, sink, model, explore=False) as c:
        mean_first = next(x for x in scored(c, rank_by="pctr")["candidates"]
                          if x["rank"] == 1)["ad_id"]
    # At a vanishing temperature every sample ranks like the mean.
    assert cold == float(mean_first == NEW_AD)
