"""The model zoo (issue 12): each architecture's math on small cases, and every registered model
through the loop's seams (training steps, snapshots, bad hyper-parameters, field embeddings)."""

from __future__ import annotations

import pytest
import torch

from ctrloop.core.features import NUMERIC_BUCKETS, FeatureSpec, Field
from ctrloop.core.models import MODELS, build_model

SPEC = FeatureSpec((
    Field("user.age", "categorical", "user", 16),
    Field("user.id", "categorical", "user", 64),
    Field("ctx.device", "categorical", "context", 8),
    Field("ad.id", "categorical", "ad", 32),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS),
))
NAMES = sorted(MODELS)


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
