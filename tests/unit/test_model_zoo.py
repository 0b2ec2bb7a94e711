"""The model zoo (issue 12): each architecture's math on small cases, and every registered model
through the loop's seams (training steps, snapshots, bad hyper-parameters, field embeddings)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import NUMERIC_BUCKETS, FeatureSpec, Field
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.models import MODELS, build_model
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot, encode_snapshot

SPEC = FeatureSpec((
    Field("user.age", "categorical", "user", 16),
    Field("user.id", "categorical", "user", 64),
    Field("ctx.device", "categorical", "context", 8),
    Field("ad.id", "categorical", "ad", 32),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS),
))
NAMES = sorted(MODELS)


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(off, off + f.buckets, (n,), generator=g)
                        for off, f in zip(SPEC.offsets, SPEC.fields, strict=True)], dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_field_embeddings_are_the_fields_rows_of_each_table(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, SPEC)
    per_field = model.field_embeddings()
    assert list(per_field) == SPEC.names
    tables = model.embedding_tables()
    for f, start in zip(SPEC.fields, SPEC.offsets, strict=True):
        mats = per_field[f.name]
        assert len(mats) == len(tables)
        for m, t in zip(mats, tables, strict=True):
            assert m.shape == (f.buckets, t.shape[1])
            assert torch.equal(m, t[start:start + f.buckets])
            assert not m.requires_grad


def test_fwfm_field_embeddings_leave_out_the_linear_weight() -> None:
    torch.manual_seed(0)
    model = build_model("fwfm", SPEC, dim=4)
    (emb,) = model.field_embeddings()["ad.id"]
    assert emb.shape == (32, 4)
    off = SPEC.offsets[3]
    assert torch.equal(emb, model.table.weight[off:off + 32, 1:])


def test_stem_field_embeddings_list_shared_then_each_task() -> None:
    torch.manual_seed(0)
    model = build_model("stem", SPEC, tasks=["a", "b"], dim=4, task_dim=3)
    mats = model.field_embeddings()["user.age"]
    assert [m.shape for m in mats] == [(16, 4), (16, 3), (16, 3)]
    assert torch.equal(mats[2], model.task_table.weight[:16, 2 + 3:])
    assert build_model("lr", SPEC).field_embeddings() == {n: [] for n in SPEC.names}


# ------------------------------------------------------------------------------- the math

TINY = FeatureSpec((
    Field("user.a", "categorical", "user", 2),
    Field("ctx.b", "categorical", "context", 2),
    Field("ad.c", "categorical", "ad", 2),
))


def test_gwpfm_against_a_hand_computed_value() -> None:
    """Parts: user.a and ctx.b are part 0, ad.c part 1; groups {user.a, ctx.b} = 0, {ad.c} = 1.
    Row layout [w | e_part0 | e_part1], dim 1 per part."""
    model = build_model("gwpfm", TINY, dim=1, groups=[["user.a", "ctx.b"]], prior_ctr=0.5)
    with torch.no_grad():
        model.table.weight[0] = torch.tensor([0.1, 1.0, 2.0])  # user.a: w, e_a0, e_a1
        model.table.weight[2] = torch.tensor([0.2, 3.0, 4.0])  # ctx.b
        model.table.weight[4] = torch.tensor([-0.5, 5.0, 6.0])  # ad.c
        # r[1, 0] = 7 must go unused: a pair's weight is r[min group, max group].
        model.interaction.group_pair.copy_(torch.tensor([[0.5, 2.0], [7.0, -1.0]]))
    # (a,b): <e_a0, e_b0> r00 = 1*3*0.5 = 1.5;  (a,c): <e_a1, e_c0> r01 = 2*5*2 = 20;
    # (b,c): <e_b1, e_c0> r01 = 4*5*2 = 40;   linear 0.1 + 0.2 - 0.5 = -0.2;  bias logit(0.5) = 0
    out = model.eval()(torch.tensor([[0, 2, 4]]))
    assert out.item() == pytest.approx(61.3)
    assert model.hparams["groups"] == [["user.a", "ctx.b"]]


def test_gwpfm_with_one_part_and_a_group_per_field_is_fwfm() -> None:
    torch.manual_seed(0)
    fwfm = build_model("fwfm", SPEC, dim=4)
    gw = build_model("gwpfm", SPEC, dim=4, parts=1)
    with torch.no_grad():
        fwfm.table.weight.normal_()
        fwfm.field_pair.normal_()
        gw.table.weight.copy_(fwfm.table.weight)
        gw.interaction.group_pair.copy_(fwfm.field_pair)
    x = _batch(32)
    with torch.no_grad():
        assert torch.allclose(gw.eval()(x), fwfm.eval()(x), atol=1e-5)


def test_gwpfm_three_parts_give_three_tables() -> None:
    model = build_model("gwpfm", SPEC, dim=2, parts=3)
    assert [t.shape for t in model.embedding_tables()] == [(SPEC.total_buckets, 2)] * 3
    assert model.table.weight.shape[1] == 1 + 3 * 2


def test_projection_expert_is_a_matrix_per_field_pair() -> None:
    from ctrloop.core.models.experts import ProjectionExpert

    torch.manual_seed(0)
    ex = ProjectionExpert(TINY, dim=3, hidden=4)
    e = torch.randn(2, 3, 3)
    # Identity start: FM's element-wise sum over pairs.
    want = e[:, 0] * e[:, 1] + e[:, 0] * e[:, 2] + e[:, 1] * e[:, 2]
    assert torch.allclose(ex.interaction(e), want, atol=1e-6)
    with torch.no_grad():
        ex.proj.normal_()
    m = ex.proj  # pairs in order (0,1), (0,2), (1,2)
    want = sum((e[:, i] @ m[p]) * e[:, j] for p, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]))
    assert torch.allclose(ex.interaction(e), want, atol=1e-5)


def test_ipnn_and_dcnv2_interactions() -> None:
    from ctrloop.core.models.experts import DCNv2Expert, IPNNExpert

    torch.manual_seed(0)
    e = torch.randn(2, 3, 4)
    inner = IPNNExpert(TINY, dim=4, hidden=4).interaction(e)
    assert torch.allclose(inner[:, 12:], torch.stack([(e[:, 0] * e[:, 1]).sum(-1),
                                                      (e[:, 0] * e[:, 2]).sum(-1),
                                                      (e[:, 1] * e[:, 2]).sum(-1)], 1))
    assert torch.equal(inner[:, :12], e.flatten(1))
    dcn = DCNv2Expert(TINY, dim=4, hidden=4, layers=1)
    x0 = e.flatten(1)
    want = x0 * (x0 @ dcn.cross[0].weight.T + dcn.cross[0].bias) + x0
    assert torch.allclose(dcn.interaction(e), want, atol=1e-6)
    low = DCNv2Expert(TINY, dim=4, hidden=4, layers=3, rank=2)
    assert sum(p.numel() for p in low.cross.parameters()) == 3 * (12 * 2 + 2 * 12 + 12)


def test_experts_end_in_a_nonlinearity() -> None:
    """Without one, T tables collapse to one (paper §4.2)."""
    from ctrloop.core.models.experts import EXPERTS

    for kind, cls in EXPERTS.items():
        ex = cls(TINY, 4, 8)
        assert isinstance(ex.out[-1], torch.nn.ReLU), kind
        assert (ex(torch.randn(16, 3, 4)) >= 0).all()


# ------------------------------------------------------------- every model through the loop

def _learnable(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Labels that an interaction of user.age and ad.id decides, plus a little of ad.id alone."""
    x = _batch(n, seed=5).numpy()
    y = ((x[:, 0] + x[:, 3]) % 3 == 0).astype(np.float32)
    return x, y


def _bce(learner: OnlineLearner, x: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(learner.predict(x), 1e-7, 1 - 1e-7)
    p = p[:, 0] if p.ndim == 2 else p
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.mark.parametrize("name", NAMES)
def test_every_model_learns_a_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    learner = OnlineLearner(build_model(name, SPEC),
                            LearnerConfig(model=name, batch_size=64, sparse_lr=0.1,
                                          dense_lr=1e-2))
    x, y = _learnable()
    before = _bce(learner, x, y)
    for _ in range(15):
        learner.learn(x, y)
    after = _bce(learner, x, y)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_round_trips_a_snapshot_after_training(name: str) -> None:
    torch.manual_seed(0)
    learner = OnlineLearner(build_model(name, SPEC), LearnerConfig(model=name, batch_size=64))
    x, y = _learnable()
    for _ in range(3):
        learner.learn(x, y)
    want = learner.predict(x)
    snap = decode_snapshot(encode_snapshot(learner.model, version=7))
    assert snap.model_name == name and json.loads(json.dumps(snap.hparams)) == snap.hparams
    for inference in (False, True):
        served = build_from_snapshot(snap, inference=inference)
        with torch.no_grad():
            got = torch.sigmoid(served(torch.from_numpy(x))).numpy()
        assert np.array_equal(got, want)


def test_hmoe_experts_train_only_their_own_table() -> None:
    """FlatDNN on table 1 of two: table 0's columns never move, table 1's do."""
    torch.manual_seed(0)
    model = build_model("hmoe", SPEC, tables=[4, 6], experts=[{"type": "flatdnn", "table": 1}])
    learner = OnlineLearner(model, LearnerConfig(model="hmoe", batch_size=64))
    before = model.table.weight.detach().clone()
    x, y = _learnable()
    for _ in range(3):  # the tower's last layer starts at zero: step 1 moves only it and w
        learner.learn(x, y)
    moved = (model.table.weight != before).any(dim=0)
    assert moved[0] and not moved[1:5].any() and moved[5:].all()
    assert [t.shape[1] for t in model.embedding_tables()] == [4, 6]


def test_hmoe_paper_example_is_the_default() -> None:
    model = build_model("hmoe", SPEC)
    assert model.hparams["tables"] == [16, 16]
    assert [(e["type"], e["table"]) for e in model.hparams["experts"]] == [
        ("gwpfm", 0), ("flatdnn", 0), ("ipnn", 1)]
    assert len(model.field_embeddings()["ad.id"]) == 2


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("gwpfm", {"parts": 4}, "parts must be one of"),
    ("gwpfm", {"dim": 0}, "dim"),
    ("gwpfm", {"groups": [["user.nope"]]}, "no field 'user.nope'"),
    ("gwpfm", {"groups": [["user.age"], ["user.age"]]}, "in two groups"),
    ("gwpfm", {"groups": ["user.age"]}, "must be a non-empty list"),
    ("hmoe", {"tables": []}, "tables must be a list"),
    ("hmoe", {"tables": [16, 0]}, "a dim must be an integer"),
    ("hmoe", {"experts": [{"type": "dnn"}]}, "unknown expert 'dnn'"),
    ("hmoe", {"experts": [{"table": 0}]}, "need an object with a \"type\""),
    ("hmoe", {"experts": [{"type": "ipnn", "table": 2}]}, "table must be an integer 0..1"),
    ("hmoe", {"experts": [{"type": "ipnn", "depth": 2}]}, "bad options for expert 'ipnn'"),
    ("hmoe", {"experts": [{"type": "dcnv2", "rank": -1}]}, "rank"),
    ("hmoe", {"tables": [15], "experts": [{"type": "gwpfm"}]}, "divide into 2 parts"),
    ("hmoe", {"hidden": True}, "hidden must be an integer"),
    ("dcnv2", {"layers": 0}, "layers must be an integer"),
    ("ipnn", {"tower": "64"}, "tower must be a list"),
    ("flatdnn", {"tables": [8]}, "bad hyper-parameters for model 'flatdnn'"),
]


@pytest.mark.parametrize(("name", "hp", "message"), BAD, ids=lambda c: str(c))
def test_bad_hyper_parameters_are_config_errors(name: str, hp: dict[str, Any],
                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(name, SPEC, **hp)


# ----------------------------------------------------------------- settings and the CLI

def test_model_params_reach_the_learner(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrloop.trainer.settings import LearningSettings

    for key in [k for k in __import__("os").environ if k.startswith("CTRLOOP_")]:
        monkeypatch.delenv(key)
    s = LearningSettings(model="hmoe", model_params='{"tables": [8], "experts": '
                         '[{"type": "dcnv2", "layers": 1}]}')
    assert s.pipeline_config().learner.hparams == {"tables": [8], "experts": [
        {"type": "dcnv2", "layers": 1}]}
    assert LearningSettings().pipeline_config().learner.hparams == {"dim": 16}  # as before
    assert LearningSettings(model="gwpfm").pipeline_config().learner.hparams == {}
    assert LearningSettings(model="gwpfm", dim=4).pipeline_config().learner.hparams == {"dim": 4}
    monkeypatch.setenv("CTRLOOP_MODEL_PARAMS", '{"layers": 3}')
    monkeypatch.setenv("CTRLOOP_MODEL", "dcnv2")
    assert LearningSettings().pipeline_config().learner.hparams == {"layers": 3}


@pytest.mark.parametrize(("params", "message"), [
    ("{tables: 1}", "not valid JSON"),
    ("[16, 16]", "must be a JSON object"),
    ('{"tabels": [16]}', "model 'hmoe' has no hyper-parameter(s) ['tabels']"),
])
def test_bad_model_params_fail_when_settings_are_built(params: str, message: str) -> None:
    from ctrloop.trainer.settings import LearningSettings

    with pytest.raises(ValueError, match=re.escape(message)):
        LearningSettings(model="hmoe", model_params=params)


def test_dim_given_twice_is_refused() -> None:
    from ctrloop.trainer.settings import LearningSettings

    with pytest.raises(ValueError, match="dim given twice"):
        LearningSettings(model="gwpfm", dim=4, model_params='{"dim": 8}')


def test_replay_runs_with_a_zoo_model(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.cli import main

    events, truth = tmp_path / "e.jsonl", tmp_path / "t.jsonl"
    assert main(["simulate", "--impressions", "600", "--rate", "50", "--seed", "2",
                 "--events-out", str(events), "--truth-out", str(truth)]) == 0
    pred = tmp_path / "p.jsonl"
    rc = main(["replay", "--events", str(events), "--predictions-out", str(pred),
               "--click-window", "5", "--allowed-lateness", "1", "--model", "hmoe",
               "--model-params", '{"tables": [4, 4], "experts": [{"type": "gwpfm"}, '
               '{"type": "ipnn", "table": 1}], "hidden": 8, "tower": [8]}'])
    assert rc == 0
    rows = [json.loads(x) for x in pred.read_bytes().splitlines()]
    assert len(rows) == 600 and all(0 < r["pctr"] < 1 for r in rows)
    capsys.readouterr()
    rc = main(["replay", "--events", str(events), "--predictions-out", str(pred),
               "--model", "hmoe", "--model-params", '{"tables": [4], "experts": '
               '[{"type": "ipnn", "table": 1}]}'])
    assert rc == 2 and "table must be an integer 0..0" in capsys.readouterr().err


ZOO = ["gwpfm", "hmoe", "dcnv2", "ipnn", "flatdnn"]


@pytest.mark.parametrize("name", ZOO)
def test_the_service_serves_a_zoo_model_with_its_posterior(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Published, hot-loaded and scored: the pCTRs are the model's own, and exploration draws
    from the (architecture-independent) GP posterior."""
    from fastapi.testclient import TestClient
    from service_fakes import RecordingSink

    from ctrloop.core.features import FeatureEncoder
    from ctrloop.core.posterior import LogitPosterior, PosteriorConfig
    from ctrloop.io.registry import InMemoryRegistry
    from ctrloop.service.app import create_app
    from ctrloop.service.settings import ServiceSettings

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    torch.manual_seed(0)
    posterior = LogitPosterior(SPEC, PosteriorConfig())
    learner = OnlineLearner(build_model(name, SPEC), LearnerConfig(model=name, batch_size=64),
                            posterior)
    x, y = _learnable()
    for _ in range(3):
        learner.learn(x, y)
    registry = InMemoryRegistry()
    registry.publish(1, encode_snapshot(learner.model, 1), {})
    req = {"request_id": "r", "user_id": "u1", "ts": 1767225600.0,
           "features": {"user.age": "25-34", "ctx.device": "ios"},
           "candidates": [{"ad_id": f"a{j}", "advertiser_id": "adv", "features": {"ad.bid": j}}
                          for j in range(8)]}
    rows = FeatureEncoder(SPEC).encode_request(
        req["features"], req["user_id"],
        [(c["ad_id"], c["advertiser_id"], c["features"]) for c in req["candidates"]])
    want = learner.predict(rows)
    app = create_app(ServiceSettings(reload_poll_s=3600, explore_temperature=1.0),
                     registry=registry, sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as client:
        client.app.state.service.reloader.check()  # type: ignore[attr-defined]
        body = client.post("/v1/score", json={**req, "options": {"rank_by": "pctr"}}).json()
        got = {c["ad_id"]: c["pctr"] for c in body["candidates"]}
        assert body["model_version"] == "1"
        assert [got[f"a{j}"] for j in range(8)] == pytest.approx(want.tolist(), rel=1e-6)
        explored = client.post("/v1/score", json={**req, "options": {"explore": True,
                                                                      "seed": 1}}).json()
        assert explored["explored"] is True


# ------------------------------------------------------------------------- ranking loss

def test_ranking_loss_is_ranknet_over_positive_negative_pairs() -> None:
    from ctrloop.core.learner import ranking_loss

    def sp(d: float) -> float:
        return math.log1p(math.exp(-d))

    s = torch.tensor([2.0, 0.0, 1.0, 3.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.6])  # 0.6: a soft label counts as a positive
    # per positive, the mean over negatives 1 and 2 of softplus(-(s_pos - s_neg)); summed
    want = (sp(2.0) + sp(1.0)) / 2 + (sp(3.0) + sp(2.0)) / 2
    assert ranking_loss(s, y).item() == pytest.approx(want)
    # Weight <= 0 (a retraction) leaves a sample out; other weights weigh its pairs.
    w = torch.tensor([1.0, 1.0, -1.0, 3.0])
    assert ranking_loss(s, y, w).item() == pytest.approx(sp(2.0) + 3 * sp(3.0))
    # Tasks: only pairs within a task.
    t = torch.tensor([0, 0, 1, 1])
    assert ranking_loss(s, y, None, t).item() == pytest.approx(sp(2.0) + sp(2.0))
    assert ranking_loss(s, torch.zeros(4)).item() == 0.0  # no positive, no pair


def test_ranking_loss_enlarges_the_gradients_on_negatives() -> None:
    """Sparse positives: BCE's gradient on a negative is p/B, ~the base rate over the batch;
    the ranking term adds sigmoid(s_neg - s_pos)/(negatives B) per positive (paper §6.1)."""
    from ctrloop.core.learner import ranking_loss

    g = torch.Generator().manual_seed(0)
    n = 1000
    y = (torch.arange(n) % 100 == 0).float()  # 1% positives
    base = torch.logit(torch.tensor(0.01)) + 0.3 * torch.randn(n, generator=g)

    def grads(rank_weight: float) -> torch.Tensor:
        s = base.clone().requires_grad_()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s, y, reduction="sum") / n
        if rank_weight:
            loss = loss + rank_weight * ranking_loss(s, y) / n
        loss.backward()
        assert s.grad is not None
        return s.grad

    bce, combined = grads(0.0), grads(1.0)
    neg = y == 0
    assert (bce[neg] > 0).all() and (combined[neg] > bce[neg]).all()
    assert combined[neg].mean() > 1.3 * bce[neg].mean()
    assert (combined[~neg] < bce[~neg]).all()  # positives pushed up harder too


def test_rank_weight_zero_is_todays_learner_and_positive_changes_learning() -> None:
    x, y = _learnable()

    def run(rank_weight: float) -> np.ndarray:
        torch.manual_seed(0)
        learner = OnlineLearner(build_model("fwfm", SPEC, dim=4),
                                LearnerConfig(batch_size=64, rank_weight=rank_weight))
        for _ in range(3):
            learner.learn(x, y)
        return learner.predict(x)

    torch.manual_seed(0)
    default = OnlineLearner(build_model("fwfm", SPEC, dim=4), LearnerConfig(batch_size=64))
    for _ in range(3):
        default.learn(x, y)
    assert np.array_equal(run(0.0), default.predict(x))
    assert not np.array_equal(run(0.5), default.predict(x))
    with pytest.raises(ConfigError, match="rank_weight"):
        LearnerConfig(rank_weight=-1.0)


def test_rank_loss_weight_setting_reaches_the_learner() -> None:
    from ctrloop.trainer.settings import LearningSettings

    assert LearningSettings(rank_loss_weight=0.3).pipeline_config().learner.rank_weight == 0.3
    assert LearningSettings().pipeline_config().learner.rank_weight == 0.0
    with pytest.raises(ValueError, match="rank_loss_weight"):
        LearningSettings(rank_loss_weight=-1)


def test_hmoe_with_every_expert_kind_learns_and_round_trips() -> None:
    torch.manual_seed(0)
    experts = [{"type": "gwpfm", "table": 0, "parts": 3, "groups": [["user.age", "user.id"]]},
               {"type": "ipnn", "table": 1}, {"type": "dcnv2", "table": 1, "layers": 1,
                                              "rank": 4},
               {"type": "flatdnn", "table": 2}, {"type": "projection", "table": 2}]
    model = build_model("hmoe", SPEC, tables=[6, 4, 4], experts=experts, hidden=8, tower=[8])
    learner = OnlineLearner(model, LearnerConfig(model="hmoe", batch_size=64, sparse_lr=0.1,
                                                 dense_lr=1e-2))
    x, y = _learnable()
    before = _bce(learner, x, y)
    for _ in range(15):
        learner.learn(x, y)
    assert _bce(learner, x, y) < 0.8 * before
    served = build_from_snapshot(decode_snapshot(encode_snapshot(model, 1)), inference=True)
    with torch.no_grad():
        got = torch.sigmoid(served(torch.from_numpy(x))).numpy()
    assert np.array_equal(got, learner.predict(x))
