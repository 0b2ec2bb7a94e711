"""Contract tests run over every architecture in ctrloop.core.models.MODELS."""

from __future__ import annotations

import pytest
import torch

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import NUMERIC_BUCKETS, FeatureSpec, Field
from ctrloop.core.models import MODELS, CTRModel, build_model
from ctrloop.core.models.base import HashEmbedding, prior_logit

SPEC = FeatureSpec((
    Field("user.age", "categorical", "user", 16),
    Field("user.id", "categorical", "user", 64),
    Field("ctx.device", "categorical", "context", 8),
    Field("ad.id", "categorical", "ad", 32),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS),
))
NAMES = sorted(MODELS)


def batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(off, off + f.buckets, (n,), generator=g)
            for off, f in zip(SPEC.offsets, SPEC.fields, strict=True)]
    return torch.stack(cols, dim=1)


def build(name: str, seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    return build_model(name, SPEC)


def test_registry_is_keyed_by_name() -> None:
    assert NAMES  # at least one model
    for name, cls in MODELS.items():
        assert cls.name == name and issubclass(cls, CTRModel)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_output_shape_and_finite(name: str, n: int) -> None:
    model = build(name).eval()
    with torch.no_grad():
        out = model(batch(n))
    # Multi-task models give one logit per task.
    assert out.shape == ((n, len(model.tasks)) if model.tasks else (n,))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_extreme_indices_are_valid(name: str) -> None:
    model = build(name).eval()
    first = torch.tensor([list(SPEC.offsets)])
    last = torch.tensor([[o + f.buckets - 1 for o, f in zip(SPEC.offsets, SPEC.fields,
                                                          strict=True)]])
    with torch.no_grad():
        assert torch.isfinite(model(torch.cat([first, last]))).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_manual_seed(name: str) -> None:
    x = batch(32)
    with torch.no_grad():
        a = build(name, seed=3).eval()(x)
        b = build(name, seed=3).eval()(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_model_predicts_its_prior(name: str) -> None:
    model = build(name).eval()
    with torch.no_grad():
        p = torch.sigmoid(model(batch(256)))
    assert p.mean().item() == pytest.approx(0.03, rel=0.05)
    torch.manual_seed(0)
    other = build_model(name, SPEC, prior_ctr=0.2).eval()
    with torch.no_grad():
        assert torch.sigmoid(other(batch(256))).mean().item() == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip(name: str) -> None:
    src = build(name, seed=1)
    with torch.no_grad():  # make the weights unlike any fresh initialisation
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dst = build(name, seed=2)
    x = batch(50)
    dst.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))
    # The rebuild recipe is the name, the spec and the recorded hyper-parameters.
    again = build_model(name, SPEC, **src.hparams)
    again.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), src(x))


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_forward_agree(name: str) -> None:
    model = build(name)
    x = batch(40)
    with torch.no_grad():
        eval_out = model.eval()(x)
    train_out = model.train()(x)  # the gather-unique-rows path used while learning
    assert torch.allclose(train_out.detach(), eval_out, rtol=1e-6, atol=1e-7)
    for table in model.hash_embeddings():
        table.discard()


@pytest.mark.parametrize("name", NAMES)
def test_has_hashed_tables_covering_the_spec(name: str) -> None:
    model = build(name)
    tables = model.hash_embeddings()
    assert tables
    for t in tables:
        assert t.weight.shape[0] == SPEC.total_buckets
        assert not t.weight.requires_grad  # trained by HashEmbedding.step, not an optimizer
    assert all(p.requires_grad for p in model.dense_parameters())
    # The optimizer state is not part of what is served.
    assert not any("accumulator" in k for k in model.state_dict())


def test_build_model_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model 'dnn'; choose one of"):
        build_model("dnn", SPEC)
    with pytest.raises(ConfigError, match="bad hyper-parameters for model 'lr'"):
        build_model("lr", SPEC, dim=8)


def test_prior_logit_is_clipped() -> None:
    assert prior_logit(0.5) == pytest.approx(0.0)
    assert torch.isfinite(torch.tensor([prior_logit(0.0), prior_logit(1.0)])).all()


def test_hash_embedding_steps_only_touched_rows() -> None:
    torch.manual_seed(0)
    table = HashEmbedding(20, 3, init_std=0.1).train()
    before = table.weight.detach().clone()
    idx = torch.tensor([[2, 5], [5, 7]])
    out = table(idx)
    out.sum().backward()
    table.step(lr=0.1)
    changed = (table.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 5, 7]
    # Adagrad: the first step moves every coordinate by -lr * sign(grad); grad is 1 per use.
    assert torch.allclose(table.weight[5] - before[5], torch.full((3,), -0.1))
    assert torch.allclose(table.accumulator[5], torch.full((3,), 4.0))  # 2 uses: grad 2
    assert table.accumulator[[0, 1, 3]].abs().sum() == 0


def test_hash_embedding_eval_records_nothing() -> None:
    table = HashEmbedding(10, 2).eval()
    before = table.weight.clone()
    table(torch.tensor([[1, 2]]))
    table.step(lr=1.0)
    assert torch.equal(table.weight, before)


def _stem(tasks: tuple[str, ...] = ("signup", "purchase"), **hp: object) -> CTRModel:
    torch.manual_seed(0)
    model = build_model("stem", SPEC, tasks=list(tasks), **hp)
    with torch.no_grad():  # non-zero linear weights, so every gradient path is exercised
        for table in model.hash_embeddings():
            table.weight.add_(torch.randn_like(table.weight) * 0.1)
    return model


def test_stem_task_specific_backward() -> None:
    """A task's loss moves the shared rows and its own specific rows, never another task's
    (STEM's "all forward, task-specific backward")."""
    model = _stem(task_dim=3).train()
    x = batch(16)
    out = model(x)
    assert out.shape == (16, 2)
    out[:, 1].sum().backward()  # only the second task ("purchase") has a loss
    (shared_rows,) = [r for _, r in model.table._touched]
    (spec_rows,) = [r for _, r in model.task_table._touched]
    assert shared_rows.grad is not None and shared_rows.grad.abs().sum() > 0
    g = spec_rows.grad.reshape(spec_rows.shape[0], -1)
    t, d = 2, 3
    # columns: w_signup, w_purchase, e_signup (3), e_purchase (3)
    assert g[:, 0].abs().sum() == 0 and g[:, t:t + d].abs().sum() == 0
    assert g[:, 1].abs().sum() > 0 and g[:, t + d:].abs().sum() > 0
    assert model.field_pair.grad[0].abs().sum() == 0 and model.field_pair.grad[1].abs().sum() > 0
    assert model.bias.grad[0] == 0 and model.bias.grad[1] != 0
    for table in model.hash_embeddings():
        table.discard()


def test_stem_every_task_sees_every_task_forward() -> None:
    """Changing signup's specific embedding changes purchase's logit (all forward)."""
    model = _stem(task_dim=2).eval()
    x = batch(8)
    with torch.no_grad():
        before = model(x).clone()
        model.task_table.weight[:, 2:4] += 0.5  # e_signup only
        after = model(x)
    assert not torch.allclose(before[:, 1], after[:, 1])


def test_stem_task_dim_zero_is_shared_only_and_priors_per_task() -> None:
    model = _stem(task_dim=0)
    assert model.task_table.weight.shape[1] == 2  # a linear weight per task, nothing else
    torch.manual_seed(0)
    fresh = build_model("stem", SPEC, tasks=["a", "b"], prior_ctr=[0.1, 0.01]).eval()
    with torch.no_grad():
        p = torch.sigmoid(fresh(batch(256))).mean(0)
    assert p[0].item() == pytest.approx(0.1, rel=0.05)
    assert p[1].item() == pytest.approx(0.01, rel=0.05)
    assert fresh.tasks == ("a", "b") and fresh.hparams["tasks"] == ["a", "b"]


@pytest.mark.parametrize("hp", [{"tasks": []}, {"tasks": ["a", "a"]}, {"task_dim": -1},
                                {"tasks": ["a", "b"], "prior_ctr": [0.1]}])
def test_stem_bad_hyper_parameters(hp: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="stem"):
        build_model("stem", SPEC, **hp)
