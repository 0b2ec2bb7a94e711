"""Thompson sampling from the per-row posterior (ctrloop/core/exploration.py): the joint draws have
the posterior's mean and covariance, seeded draws repeat, propensities are probabilities that
match how often the sampler really ranks each ad first, and wide posteriors get explored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrloop.core.exploration import (
    DEFAULT_DRAWS,
    DEFAULT_TEMPERATURE,
    ExplorationBudget,
    JointPosterior,
    _served_rank_share,
    expected_pctr,
    exploration_cost,
    generator,
    rank_propensities,
    rank_weights,
    thompson_rank,
)
from ctrloop.service.settings import ServiceSettings

# Rows in the encoder's layout (each column its own range): column 0 is the request's user row
# (every candidate), column 1 the advertiser (10 shared by candidates 0 and 1), column 2 the ad.
ROWS = np.array([[0, 10, 20],
                 [0, 10, 21],
                 [0, 11, 22]])
ROW_VAR = {0: 0.3, 10: 0.5, 11: 0.2, 20: 0.1, 21: 0.4, 22: 0.6}
MU = np.array([-2.0, -2.5, -1.5])


# The 0.999 quantile of chi-square with 4 degrees of freedom (scipy.stats.chi2.ppf(0.999, 4));
# scipy is not a dependency.
CHI2_999_DF4 = 18.4668

def row_var(rows: np.ndarray, table: dict[int, float]) -> np.ndarray:
    return np.vectorize(table.__getitem__, otypes=[float])(rows)


def brute_covariance(rows: np.ndarray, var: np.ndarray) -> np.ndarray:
    """The definition: Cov(f_c, f_d) = sum over rows r of A[c, r] A[d, r] v_r, where A counts
    how often candidate c uses row r."""
    uniq, inv = np.unique(rows, return_inverse=True)
    inv = inv.reshape(rows.shape)
    a = np.zeros((rows.shape[0], uniq.size))
    v = np.zeros(uniq.size)
    for c in range(rows.shape[0]):
        for f in range(rows.shape[1]):
            a[c, inv[c, f]] += 1
            v[inv[c, f]] = var[c, f]
    return a @ np.diag(v) @ a.T


def test_split_posterior_is_exactly_the_row_posterior() -> None:
    post = JointPosterior.from_rows(MU, ROWS, row_var(ROWS, ROW_VAR))
    expected = np.array([[0.3 + 0.5 + 0.1, 0.3 + 0.5, 0.3],
                         [0.3 + 0.5, 0.3 + 0.5 + 0.4, 0.3],
                         [0.3, 0.3, 0.3 + 0.2 + 0.6]])
    np.testing.assert_allclose(post.covariance(), expected, atol=1e-12)
    np.testing.assert_allclose(post.variance(), np.diag(expected), atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_split_matches_brute_force_on_random_requests(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c, fields, buckets = 12, 6, 4  # few buckets per field: many rows shared by some candidates
    rows = rng.integers(0, buckets, (c, fields)) + np.arange(fields) * 100
    rows[:, 0] = 7  # a user row every candidate has
    table = {int(r): float(rng.uniform(0.0, 1.0)) for r in np.unique(rows)}
    table[int(rows[0, 1])] = 0.0  # a known-for-sure row drops out of the draw
    var = row_var(rows, table)
    post = JointPosterior.from_rows(rng.normal(size=c), rows, var)
    np.testing.assert_allclose(post.covariance(), brute_covariance(rows, var), atol=1e-9)


def test_draws_have_the_posterior_mean_variance_and_covariance() -> None:
    post = JointPosterior.from_rows(MU, ROWS, row_var(ROWS, ROW_VAR))
    n = 200_000
    f = post.sample(n, generator(0)).double().numpy()
    cov = post.covariance()
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(f.mean(0) - MU) < 5 * se_mean)
    emp = np.cov(f, rowvar=False)
    # Standard error of a sample covariance of Gaussians: sqrt((s_cd^2 + s_cc s_dd) / n).
    se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    assert np.all(np.abs(emp - cov) < 5 * se_cov), (emp, cov)
    # Candidates 0 and 1 share the user and the advertiser: correlated more than 0 and 2.
    assert emp[0, 1] > emp[0, 2] + 10 * se_cov[0, 1]


def test_antithetic_draws_have_the_posterior_covariance() -> None:
    post = JointPosterior.from_rows(MU, ROWS, row_var(ROWS, ROW_VAR))
    n = 100_000
    f = post.sample_antithetic(n, generator(4), lead=1).double().numpy()
    assert f.shape == (n + 1, 3)
    pairs = f[1:]
    np.testing.assert_allclose(pairs.mean(0), MU, atol=1e-5)  # each pair averages to mu
    cov = post.covariance()
    se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / (n / 2))
    assert np.all(np.abs(np.cov(pairs, rowvar=False) - cov) < 5 * se_cov)
    # The lead draw is the plain draw of the same seed: independent of the pairs.
    np.testing.assert_array_equal(f[0], post.sample(1, generator(4))[0].double().numpy())


def test_zero_variance_samples_are_the_mean() -> None:
    post = JointPosterior.from_rows(MU, ROWS, np.zeros(ROWS.shape))
    f = post.sample(3, generator(1)).double().numpy()
    np.testing.assert_allclose(f, np.tile(MU, (3, 1)), atol=1e-6)
    r = thompson_rank(post, propensity_ranks=3, draws=32, rng=generator(1))
    assert r.order.tolist() == [2, 0, 1]
    assert r.propensities is not None
    np.testing.assert_allclose(r.propensities, [1.0, 1.0, 1.0])
    tied = JointPosterior.from_rows(np.zeros(3), ROWS, np.zeros(ROWS.shape))
    r = thompson_rank(tied, propensity_ranks=3, draws=8, rng=generator(1))
    assert r.order.tolist() == [0, 1, 2]  # ties go to the lower index, in every draw alike
    assert r.propensities is not None
    np.testing.assert_allclose(r.propensities, [1.0, 1.0, 1.0])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        JointPosterior.from_rows(MU[:2], ROWS, row_var(ROWS, ROW_VAR))
    with pytest.raises(ValueError, match="non-negative"):
        JointPosterior.from_rows(MU, ROWS, -np.ones(ROWS.shape))
    with pytest.raises(ValueError, match="finite"):
        JointPosterior.from_rows(MU, ROWS, np.full(ROWS.shape, np.nan))


def test_seeded_rankings_repeat_and_do_not_depend_on_the_draw_count() -> None:
    post = JointPosterior.from_rows(MU, ROWS, row_var(ROWS, ROW_VAR) * 4)
    a = thompson_rank(post, propensity_ranks=2, draws=64, rng=generator(123))
    b = thompson_rank(post, propensity_ranks=2, draws=64, rng=generator(123))
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.order, b.order)
    assert a.propensities is not None and b.propensities is not None
    np.testing.assert_array_equal(a.propensities, b.propensities)
    c = thompson_rank(post, propensity_ranks=0, rng=generator(123))
    np.testing.assert_array_equal(a.logits, c.logits)  # the ranking's draw comes first, alone
    others = {tuple(thompson_rank(post, rng=generator(s)).logits.round(6)) for s in range(20)}
    assert len(others) == 20


def test_rank_propensities_are_distributions() -> None:
    rng = np.random.default_rng(3)
    c = 40
    rows = np.stack([np.zeros(c, int), rng.integers(100, 108, c), 1000 + np.arange(c)], 1)
    var = rng.uniform(0.05, 1.0, rows.shape)
    var[:, 1] = 0.4  # one variance per advertiser row (all equal here)
    post = JointPosterior.from_rows(rng.normal(-3, 0.5, c), rows, var)
    bids = rng.uniform(0.5, 2.0, c)
    for k in (1, 3, 12):  # 12 > 8: the partial-sort path
        p = rank_propensities(post, weights=bids, ranks=k, draws=2000, rng=generator(k))
        assert p.shape == (k, c)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        assert np.all(p.sum(axis=0) <= 1.0 + 1e-12)  # an ad holds at most one rank per draw
    served = thompson_rank(post, weights=bids, propensity_ranks=3, draws=50, rng=generator(9))
    assert served.propensities is not None and served.propensities.shape == (3,)
    assert np.all(served.propensities >= 1 / 50)


def test_served_propensities_count_the_draws_that_rank_the_served_ad_there() -> None:
    """The rank-counting shortcut against sorting every draw, ties included."""
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 4, (30, 200)).astype(np.float32)  # [C, n] with many ties
    served = np.argsort(-keys[:, 0], kind="stable")[:5]
    by_sort = np.argsort(-keys, axis=0, kind="stable")[:5]  # [k, n]
    expected = (by_sort == served[:, None]).mean(axis=1)
    np.testing.assert_allclose(_served_rank_share(keys, served), expected)
    assert np.all(_served_rank_share(keys, served) >= 1 / 200)


def test_served_propensities_agree_with_the_rank_matrix() -> None:
    rng = np.random.default_rng(8)
    c = 25
    rows = np.stack([np.zeros(c, int), rng.integers(100, 105, c), 1000 + np.arange(c)], 1)
    var = np.where(rows >= 1000, rng.uniform(0.1, 1.5, rows.shape), 0.3)
    post = JointPosterior.from_rows(rng.normal(-3, 0.4, c), rows, var)
    bids = rng.uniform(0.5, 2.0, c)
    matrix = rank_propensities(post, weights=bids, ranks=3, draws=200_000, rng=generator(0))
    r = thompson_rank(post, weights=bids, propensity_ranks=3, draws=20_000, rng=generator(1))
    assert r.propensities is not None
    # Antithetic pairs: the error is at most that of 20,000 independent draws.
    np.testing.assert_allclose(r.propensities, matrix[np.arange(3), r.order[:3]], atol=0.011)


def test_propensities_match_the_samplers_rank_one_frequencies() -> None:
    """Chi-square: the rank-1 ad of 4,000 seeded rankings vs rank_propensities."""
    rows = np.array([[0, 10, 20], [0, 10, 21], [0, 11, 22], [0, 11, 23], [0, 12, 24]])
    table = {0: 0.5, 10: 0.3, 11: 0.6, 12: 0.1, 20: 0.2, 21: 0.8, 22: 0.1, 23: 1.5, 24: 0.05}
    mu = np.array([-2.0, -2.2, -1.9, -2.6, -1.8])
    bids = np.array([1.0, 1.3, 0.9, 1.1, 0.8])
    post = JointPosterior.from_rows(mu, rows, row_var(rows, table))
    p = rank_propensities(post, weights=bids, ranks=1, draws=400_000, rng=generator(0))[0]
    n = 4000
    first = [thompson_rank(post, weights=bids, rng=generator(s)).order[0]
             for s in range(1, n + 1)]
    observed = np.bincount(first, minlength=5)
    assert p.min() > 0.02  # every ad can win: the test has power everywhere
    chi2 = ((observed - n * p) ** 2 / (n * p)).sum()
    assert chi2 < CHI2_999_DF4, (observed, n * p)


def test_a_wide_posterior_is_explored_more_than_a_narrow_one_with_the_same_mean() -> None:
    # Candidate 2 is the best by the mean; 0 and 1 are equal by the mean, 0 is a new ad.
    rows = np.array([[0, 10], [0, 11], [0, 12]])
    var = np.array([[0.1, 2.0], [0.1, 0.01], [0.1, 0.01]])
    post = JointPosterior.from_rows(np.array([-3.0, -3.0, -2.5]), rows, var)
    p = rank_propensities(post, ranks=1, draws=20_000, rng=generator(5))[0]
    assert p[0] > 0.25 and p[1] < 0.01 and p[2] > 0.5


def test_bid_weighting_ranks_by_bid_times_sampled_pctr() -> None:
    post = JointPosterior.from_rows(MU, ROWS, row_var(ROWS, ROW_VAR))
    bids = np.array([3.0, 1.0, 0.5])
    r = thompson_rank(post, weights=bids, rng=generator(11))
    expected = bids / (1 + np.exp(-r.logits))
    np.testing.assert_allclose(r.scores, expected, rtol=1e-6)
    assert r.order.tolist() == np.argsort(-expected, kind="stable").tolist()


def test_rank_weights() -> None:
    bids, pcvr = np.array([1.0, 2.0]), np.array([0.5, 0.1])
    assert rank_weights("pctr", bids, pcvr) is None
    np.testing.assert_allclose(rank_weights("bid_pctr", bids), bids)
    np.testing.assert_allclose(rank_weights("bid_pctr_pcvr", bids, pcvr), [0.5, 0.2])
    with pytest.raises(ValueError):
        rank_weights("bid_pctr_pcvr", bids)


@pytest.mark.parametrize(("mu", "var"), [(-3.0, 0.0), (-3.0, 1.0), (-1.0, 4.0), (2.0, 2.0)])
def test_expected_pctr_is_the_mean_of_the_sampled_pctr(mu: float, var: float) -> None:
    z = torch.randn(400_000, generator=generator(2), dtype=torch.float64).numpy()
    exact = float(np.mean(1 / (1 + np.exp(-(mu + np.sqrt(var) * z)))))
    assert abs(float(expected_pctr(np.array(mu), np.array(var))) - exact) < 0.02


def test_exploration_cost() -> None:
    value = np.array([0.5, 0.3, 0.2, 0.0])
    assert exploration_cost(value, np.array([0, 1, 2, 3]), 2) == 0.0
    assert exploration_cost(value, np.array([2, 1, 0, 3]), 1) == pytest.approx(1 - 0.2 / 0.5)
    assert exploration_cost(value, np.array([3, 2, 1, 0]), 2) == pytest.approx(1 - 0.2 / 0.8)
    assert exploration_cost(np.zeros(3), np.array([2, 1, 0]), 1) == 0.0


def test_budget_falls_back_above_the_cost_cap_and_recovers() -> None:
    budget = ExplorationBudget(cost_cap=0.05, window=10)
    decisions = []
    for _ in range(40):
        d = budget.admit()
        decisions.append(d)
        budget.record(0.5 if d == "explored" else 0.0)  # every explored request costs 50%
        assert budget.avg_cost < 0.05 + 0.5 / 10  # overshoots by at most one request
    explored = decisions.count("explored")
    assert decisions[0] == "explored" and decisions[1] == "cost_cap"
    assert 0 < explored < 40 and explored / 40 <= 0.05 / 0.5 + 0.1
    assert ExplorationBudget(cost_cap=0.0).admit() == "cost_cap"
    uncapped = ExplorationBudget(cost_cap=1.0)
    uncapped.record(1.0)
    assert uncapped.admit() == "explored"


def test_budget_share_is_exact() -> None:
    budget = ExplorationBudget(max_share=0.25)
    decisions = [budget.admit() for _ in range(100)]
    assert decisions.count("explored") == 25
    assert decisions[:4] == ["share_cap"] * 3 + ["explored"]
    assert all(ExplorationBudget(max_share=0.0).admit() == "share_cap" for _ in range(5))


def test_service_default_draws_is_the_library_default() -> None:
    assert ServiceSettings.model_fields["explore_draws"].default == DEFAULT_DRAWS


def test_service_default_temperature_is_the_library_default() -> None:
    assert ServiceSettings.model_fields["explore_temperature"].default == DEFAULT_TEMPERATURE


@pytest.mark.parametrize("direct", [False, True])
def test_each_sign_flip_group_is_an_exact_posterior_draw(direct: bool) -> None:
    """The four sign flips (mu +- a +- b) of `flipped_draws` are each exact draws: every group
    on its own has the posterior's mean and covariance (brute force), here on a request whose
    rows are shared by some candidates, built by from_rows or directly (no split known)."""
    rng = np.random.default_rng(11)
    c, fields = 6, 4
    rows = rng.integers(0, 3, (c, fields)) + np.arange(fields) * 100
    rows[:, 0] = 7  # the request's row
    rows[:, 3] = 300 + np.arange(c)  # the ad's own row
    table = {int(r): float(rng.uniform(0.1, 1.0)) for r in np.unique(rows)}
    var = row_var(rows, table)
    post = JointPosterior.from_rows(rng.normal(size=c), rows, var)
    if direct:
        post = JointPosterior(post.mu, post.row_std, post.slots)
    cov = brute_covariance(rows, var)
    n = 40_000
    f = post.flipped_draws(4 * n, generator(2)).astype(np.float64)  # [G, C, n]
    assert f.shape[0] == 4 and f.shape[2] == n
    se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    for g in f:
        assert np.all(np.abs(g.mean(axis=1) - post.mu) < 5 * np.sqrt(np.diag(cov) / n))
        assert np.all(np.abs(np.cov(g) - cov) < 5 * se_cov)


def test_a_row_shared_across_columns_gets_no_split() -> None:
    # Row 5 in two columns: flipping the widest column's rows (5, 2, 4) alone would flip part
    # of row 5's perturbation, so a directly built posterior falls back to antithetic pairs.
    std = np.array([1.0, 1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    post = JointPosterior(np.zeros(3), std, np.array([[0, 5, 6], [1, 2, 5], [3, 4, 6]]))
    assert post.flipped_draws(8, generator(0)).shape[0] == 2
    n = 100_000
    f = post.sample_antithetic(n, generator(3)).double().numpy()
    cov = post.covariance()
    se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / (n / 2))
    assert np.all(np.abs(np.cov(f, rowvar=False) - cov) < 5 * se_cov)
