"""The online learner: progressive validation, sparse updates, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureEncoder, FeatureSpec, Field
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.metrics import logloss
from ctrloop.core.models import MODELS, build_model

SPEC = FeatureSpec((
    Field("user.segment", "categorical", "user", 32),
    Field("ctx.noise", "categorical", "context", 32),
    Field("ad.kind", "categorical", "ad", 16),
))
NAMES = sorted(MODELS)


def learner(name: str, seed: int = 0, **config: object) -> OnlineLearner:
    torch.manual_seed(seed)
    hparams = {"dim": 4} if name == "fwfm" else {}
    cfg = LearnerConfig(model=name, hparams=hparams, **config)  # type: ignore[arg-type]
    return OnlineLearner(build_model(name, SPEC, **hparams), cfg)


def first_task(p: np.ndarray) -> np.ndarray:
    """A multi-task model predicts [B, T]; these contract tests train its first task."""
    return p[:, 0] if p.ndim == 2 else p


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CTR 40% for segment "hot" x ad kind "a", 2% otherwise; ctx.noise carries nothing."""
    rng = np.random.default_rng(seed)
    enc = FeatureEncoder(SPEC)
    seg = rng.integers(0, 4, n)
    kind = rng.integers(0, 2, n)
    noise = rng.integers(0, 50, n)
    rows = [enc.encode_features({"user.segment": "hot" if s == 0 else f"s{s}",
                                 "ctx.noise": f"n{z}", "ad.kind": "ab"[k]})
            for s, k, z in zip(seg, kind, noise, strict=True)]
    p = np.where((seg == 0) & (kind == 0), 0.4, 0.02)
    y = (rng.random(n) < p).astype(np.float32)
    return np.asarray(rows, dtype=np.int64), y


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"sparse_lr": 0}, {"dense_lr": -1.0}],
                         ids=str)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LearnerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_learns_a_simple_signal(name: str) -> None:
    x, y = synthetic(6000)
    lr = learner(name, batch_size=128, sparse_lr=0.1, dense_lr=0.01)
    preds = lr.learn(x, y)
    half = len(y) // 2
    model_ll = logloss(y[half:], preds[half:])
    constant_ll = logloss(y[half:], np.full(len(y) - half, y[half:].mean()))
    assert model_ll < 0.9 * constant_ll  # beats the best constant in hindsight, out of sample
    # The hot cell is ranked above the cold ones.
    enc = FeatureEncoder(SPEC)
    cells = [("hot", "a"), ("hot", "b"), ("s1", "a"), ("s2", "b")]
    rows = np.asarray([enc.encode_features({"user.segment": s, "ctx.noise": "n1", "ad.kind": k})
                       for s, k in cells], dtype=np.int64)
    p = first_task(lr.predict(rows))
    assert p[0] > 2 * max(p[1:]), p
    assert lr.samples_seen == len(y) and lr.positives_seen == int(y.sum())
    assert lr.metrics.report().samples == len(y)


@pytest.mark.parametrize("name", NAMES)
def test_learn_returns_predictions_made_before_each_update(name: str) -> None:
    x, y = synthetic(12, seed=1)
    y[:] = 1.0  # large gradients, so a leak of the update would show
    a = learner(name, batch_size=4)
    b = learner(name, batch_size=4)  # same seed: the same initial weights
    expected = []
    for start in range(0, 12, 4):
        expected.append(first_task(b.predict(x[start:start + 4])))
        b.learn(x[start:start + 4], y[start:start + 4])
    got = a.learn(x, y)
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=1e-5)
    # ... and the weights did move: predicting again now gives something else.
    assert not np.allclose(first_task(a.predict(x[:4])), expected[0], rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_single_batch_learn_equals_predict_before(name: str) -> None:
    x, y = synthetic(64, seed=2)
    lr = learner(name, batch_size=64)
    before = first_task(lr.predict(x))
    np.testing.assert_allclose(lr.learn(x, y), before, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_only_touched_embedding_rows_change(name: str) -> None:
    x, y = synthetic(40, seed=3)
    lr = learner(name, batch_size=64)
    lr.learn(*synthetic(40, seed=4))  # warm the dense optimiser too
    tables = lr.model.hash_embeddings()
    before = [t.weight.detach().clone() for t in tables]
    acc_before = [t.accumulator.clone() for t in tables]
    lr.learn(x, y)
    touched = set(np.unique(x).tolist())
    for t, w, acc in zip(tables, before, acc_before, strict=True):
        changed = set((t.weight != w).any(dim=1).nonzero().flatten().tolist())
        assert changed == touched
        acc_changed = set((t.accumulator != acc).any(dim=1).nonzero().flatten().tolist())
        assert acc_changed == touched


@pytest.mark.parametrize("name", NAMES)
def test_empty_inputs(name: str) -> None:
    lr = learner(name)
    empty = np.zeros((0, SPEC.num_fields), dtype=np.int64)
    assert lr.learn(empty, np.zeros(0)).shape == (0,)
    assert lr.predict(empty).shape == ((0, 1) if name == "stem" else (0,))
    assert lr.samples_seen == 0


def _state_bytes(state: dict[str, object]) -> dict[str, object]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("through_file", [False, True], ids=["in-memory", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_roundtrip_continues_identically(name: str, through_file: bool) -> None:
    x, y = synthetic(600, seed=5)
    a = learner(name, batch_size=50)
    a.learn(x[:300], y[:300])
    state = a.state_dict()
    if through_file:
        state = _state_bytes(state)
    preds_a = a.learn(x[300:], y[300:])  # the original keeps going after the checkpoint

    b = learner(name, seed=99, batch_size=50)  # other initial weights, overwritten by the load
    b.load_state_dict(state)
    assert b.samples_seen == 300 and b.positives_seen == int(y[:300].sum())
    preds_b = b.learn(x[300:], y[300:])
    np.testing.assert_array_equal(preds_b, preds_a)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                           strict=True):
        assert torch.equal(va, vb), k
    assert a.samples_seen == b.samples_seen == 600


@pytest.mark.parametrize("name", NAMES)
def test_one_checkpoint_restored_twice_gives_independent_learners(name: str) -> None:
    x, y = synthetic(200, seed=6)
    a = learner(name, batch_size=50)
    a.learn(x[:100], y[:100])
    state = a.state_dict()
    b, c = learner(name, seed=1, batch_size=50), learner(name, seed=2, batch_size=50)
    b.load_state_dict(state)
    c.load_state_dict(state)
    pb = b.learn(x[100:], y[100:])
    pc = c.learn(x[100:], y[100:])
    np.testing.assert_array_equal(pb, pc)


def test_unknown_model_fails_when_configured() -> None:
    with pytest.raises(ConfigError, match="unknown model 'dnn'; choose one of"):
        LearnerConfig(model="dnn")


def test_multi_task_learns_each_task_from_its_own_samples() -> None:
    """Two tasks with opposite signals: each output follows its own task's labels."""
    torch.manual_seed(0)
    hp = {"tasks": ["signup", "purchase"], "dim": 4, "task_dim": 2}
    lr = OnlineLearner(build_model("stem", SPEC, **hp),
                       LearnerConfig(model="stem", hparams=hp, batch_size=128, sparse_lr=0.1,
                                     dense_lr=0.01))
    x, y = synthetic(8000, seed=4)
    tasks = np.arange(len(y)) % 2
    y = np.where(tasks == 1, 1.0 - y, y).astype(np.float32)  # purchase: the opposite signal
    preds = lr.learn(x, y, tasks=tasks)
    assert preds.shape == (len(y),)
    enc = FeatureEncoder(SPEC)
    hot = np.asarray([enc.encode_features({"user.segment": "hot", "ctx.noise": "n1",
                                           "ad.kind": "a"}),
                      enc.encode_features({"user.segment": "s1", "ctx.noise": "n1",
                                           "ad.kind": "b"})], dtype=np.int64)
    p = lr.predict(hot)
    assert p.shape == (2, 2)
    assert p[0, 0] > 2 * p[1, 0]  # signup: the hot cell converts (40% vs 2%)
    assert p[0, 1] < p[1, 1] - 0.02  # purchase: it converts less (60% vs 98%)
    # Pre-update predictions are those of the sample's own task.
    x2, y2 = synthetic(8, seed=5)
    t2 = np.array([0, 1] * 4)
    before = lr.predict(x2)[np.arange(8), t2]
    np.testing.assert_allclose(lr.learn(x2, y2, tasks=t2), before, rtol=1e-5)


def test_task_indices_are_checked() -> None:
    x, y = synthetic(4)
    with pytest.raises(ValueError, match="single-task"):
        learner("fwfm").learn(x, y, tasks=np.array([0, 1, 0, 0]))
    torch.manual_seed(0)
    hp = {"tasks": ["a", "b"], "dim": 4}
    mt = OnlineLearner(build_model("stem", SPEC, **hp), LearnerConfig(model="stem", hparams=hp))
    with pytest.raises(ValueError, match="task index"):
        mt.learn(x, y, tasks=np.array([0, 2, 0, 0]))


def test_adagrad_initial_accumulator_damps_a_rows_first_step() -> None:
    """Plain Adagrad moves a row by the full learning rate on its first gradient, however small
    that gradient is; an initial accumulator makes the first step proportional to it."""
    from ctrloop.core.models.base import HashEmbedding

    def first_step(initial: float, scale: float) -> float:
        table = HashEmbedding(4, 2, init_std=0.0)
        rows = table(torch.tensor([1]))
        (rows.sum() * scale).backward()
        table.step(0.05, initial=initial)
        return float(table.weight[1, 0])

    assert first_step(0.0, 1e-3) == pytest.approx(-0.05, rel=1e-4)
    assert first_step(0.0, 1e-6) == pytest.approx(-0.05, rel=1e-2)  # tiny gradient, full step
    small, large = first_step(1e-4, 1e-3), first_step(1e-4, 1e-1)
    assert abs(small) < 0.01 and abs(large) > 0.04  # proportional to the gradient's size
    table = HashEmbedding(4, 2)
    table(torch.tensor([1])).sum().backward()
    table.step(0.05, initial=1e-4)
    assert float(table.accumulator[1, 0]) == pytest.approx(1.0)  # checkpoints keep the plain sum


def test_adagrad_initial_must_be_non_negative() -> None:
    with pytest.raises(ConfigError, match="adagrad_initial"):
        LearnerConfig(adagrad_initial=-1.0)
