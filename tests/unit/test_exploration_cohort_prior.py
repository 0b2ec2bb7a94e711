"""Never-trained ad rows are served their cohort's mean (issue 11 part 5, docs/exploration.md
"Unseen rows"): a new ad's served mean logit is a typical ad's, not the optimistic 0 of an
untouched row, while the posterior variance still says it has no evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.joining import Sample
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.models import MODELS, build_model
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot
from ctrloop.trainer.heads import COHORT_PRIOR_FIELDS, CtrHead
from ctrloop.trainer.pipeline import PipelineConfig, PipelineStats

SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 64),
    Field("ctx.device", "categorical", "context", 8),
    Field("ad.advertiser_id", "categorical", "ad", 16),
    Field("ad.id", "categorical", "ad", 32),
))
AD = SPEC.names.index("ad.id")
AD_START = SPEC.offsets[AD]
TRAINED_ADS = list(range(6))  # local rows of ad.id that get samples; the rest stay unseen


def _samples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Traffic on ads 0..5 only, mostly non-clicks, so learned ad rows move below 0."""
    rng = np.random.default_rng(seed)
    cols = [rng.integers(0, f.buckets, n) + off for f, off in zip(SPEC.fields, SPEC.offsets,
                                                                    strict=True)]
    cols[AD] = rng.choice(TRAINED_ADS, n) + AD_START
    rows = np.stack(cols, axis=1).astype(np.int64)
    labels = (rng.random(n) < 0.02).astype(np.float32)
    return rows, labels


def _learn(head: CtrHead, rows: np.ndarray, labels: np.ndarray) -> None:
    """Through the head's own learn (the pipeline's tick), not the learner's."""
    head.ready = [Sample(f"i{i}", 0.0, int(y), r, 0.0)
                  for i, (r, y) in enumerate(zip(rows.tolist(), labels.tolist(), strict=True))]
    assert head.learn(0.0, lambda: None)


def _trained_head(fields: tuple[str, ...] = COHORT_PRIOR_FIELDS) -> CtrHead:
    torch.manual_seed(0)
    head = CtrHead(SPEC, PipelineConfig(), PipelineStats())
    head.cohort_prior_fields = fields
    _learn(head, *_samples(2_000))
    return head


def _with_ad(rows: torch.Tensor, local_ad: int) -> torch.Tensor:
    out = rows.clone()
    out[:, AD] = AD_START + local_ad
    return out


def test_an_unseen_ads_served_mean_is_the_cohort_mean_and_its_variance_the_prior() -> None:
    head = _trained_head()
    served = build_from_snapshot(decode_snapshot(head.snapshot(1, {})), inference=True)
    context = torch.from_numpy(_samples(50, seed=1)[0])  # 50 users × contexts
    with torch.no_grad():
        trained = torch.stack([served(_with_ad(context, a)) for a in TRAINED_ADS]).mean(0)
        unseen = served(_with_ad(context, 20))
    # The learned ads sit below 0 (mostly non-clicks): the untouched row would be optimistic.
    linear = served.table.weight[AD_START:AD_START + len(TRAINED_ADS), 0]
    assert float(linear.mean()) < -0.05
    # FwFM is affine in one field's row, so the mean row gives exactly the mean logit.
    torch.testing.assert_close(unseen, trained, atol=1e-5, rtol=0)
    post = served.posterior
    assert post is not None
    rows = _with_ad(context, 20)
    want = post.scale * float(post.prior_var[AD])  # no evidence: the prior, scale included
    np.testing.assert_allclose(post.row_variance(rows)[:, AD].numpy(), want, rtol=1e-6)
    learned = post.row_variance(_with_ad(context, 0))[:, AD]
    assert bool((learned < want).all())


def test_the_fill_leaves_trained_rows_and_other_fields_alone() -> None:
    off = _trained_head(fields=())
    on = _trained_head()
    before = off.learner.model.table.weight
    after = on.learner.model.table.weight
    head = on
    ad = slice(AD_START, AD_START + SPEC.fields[AD].buckets)
    seen = head.learner.model.table.accumulator[ad].ne(0).any(1)
    assert int(seen.sum()) == len(TRAINED_ADS)
    # Two trainings agree to float rounding (index_add_ order), not bit for bit.
    torch.testing.assert_close(after[ad][seen], before[ad][seen], atol=1e-6, rtol=0)
    outside = torch.ones(SPEC.total_buckets, dtype=torch.bool)
    outside[ad] = False
    torch.testing.assert_close(after[outside], before[outside], atol=1e-6, rtol=0)
    assert not torch.equal(after[ad][~seen], before[ad][~seen])
    # Deterministic and idempotent: filling again writes the same values; publishing is pure.
    again = after.clone()
    assert head.learner.model.fill_unseen_rows(COHORT_PRIOR_FIELDS) > 0
    head.snapshot(2, {})
    torch.testing.assert_close(head.learner.model.table.weight, again, atol=0, rtol=0)
    assert COHORT_PRIOR_FIELDS == ("ad.id",)


def test_off_by_default_an_unseen_ad_keeps_its_optimistic_init() -> None:
    assert CtrHead(SPEC, PipelineConfig(), PipelineStats()).cohort_prior_fields == ()
    head = _trained_head(fields=())
    w = head.learner.model.table.weight
    assert float(w[AD_START + 20, 0]) == 0.0  # FwFM's linear weights start at 0
    assert float(w[AD_START:AD_START + len(TRAINED_ADS), 0].mean()) < -0.05


def test_a_row_first_trained_after_a_fill_starts_from_the_cohort_mean() -> None:
    head = _trained_head()
    model = head.learner.model
    mean = model.table.weight[AD_START + 20].clone()
    rows, _ = _samples(1)
    rows[:, AD] = AD_START + 20
    _learn(head, rows, np.zeros(1, np.float32))
    moved = model.table.weight[AD_START + 20] - mean
    # One Adagrad step from the mean: each coordinate moves by at most the learning rate.
    assert float(moved.abs().max()) <= head.learner.config.sparse_lr + 1e-6
    assert float(moved[0]) < 0  # a non-click lowers the linear weight from the mean


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_architecture_fills_unseen_rows_with_the_mean_of_trained_rows(name: str) -> None:
    torch.manual_seed(0)
    learner = OnlineLearner(build_model(name, SPEC), LearnerConfig(model=name, batch_size=256))
    rows, labels = _samples(512)
    learner.learn(rows, labels)
    model = learner.model
    filled = model.fill_unseen_rows(["ad.id"])
    ad = slice(AD_START, AD_START + SPEC.fields[AD].buckets)
    full = [t for t in model.hash_embeddings() if t.weight.shape[0] == SPEC.total_buckets]
    assert full, "every zoo model hashes its features into a total_buckets table"
    assert filled == len(full) * (SPEC.fields[AD].buckets - len(TRAINED_ADS))
    for t in full:
        seen = t.accumulator[ad].ne(0).any(1)
        w = t.weight[ad]
        torch.testing.assert_close(w[~seen], w[seen].mean(0).expand_as(w[~seen]))
    with torch.no_grad():
        out = model(torch.from_numpy(rows[:8]))
    assert bool(torch.isfinite(out).all())


def test_a_served_model_has_no_accumulator_and_is_left_alone() -> None:
    head = _trained_head()
    served = build_from_snapshot(decode_snapshot(head.snapshot(1, {})), inference=True)
    before = served.table.weight.clone()
    assert served.fill_unseen_rows(["ad.id"]) == 0
    torch.testing.assert_close(served.table.weight, before, atol=0, rtol=0)


def test_a_field_with_no_trained_row_keeps_its_init() -> None:
    torch.manual_seed(0)
    learner = OnlineLearner(build_model("fwfm", SPEC), LearnerConfig(batch_size=256))
    before = learner.model.table.weight.clone()
    assert learner.model.fill_unseen_rows(["ad.id", "no.such_field"]) == 0
    torch.testing.assert_close(learner.model.table.weight, before, atol=0, rtol=0)
