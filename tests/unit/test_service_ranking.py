"""service/ranking.py: the pure ranking the /v1/score route calls (no HTTP, no state)."""

from __future__ import annotations

import numpy as np
import pytest

from ctrloop.core.exploration import JointPosterior, exploration_cost, generator, thompson_rank
from ctrloop.service.ranking import Explore, rank

PCTR = np.array([0.02, 0.05, 0.01, 0.04])
BIDS = np.array([3.0, 1.0, 1.0, 2.0])
ROWS = np.array([[0, 10, 20], [0, 10, 21], [0, 11, 22], [0, 11, 23]])
VAR = np.array([[0.1, 0.3, 0.5], [0.1, 0.3, 0.2], [0.1, 0.6, 1.5], [0.1, 0.6, 0.4]])
LOGIT = np.log(PCTR / (1 - PCTR))


def test_the_mean_ranking_is_by_score_with_propensity_one() -> None:
    r = rank(PCTR, BIDS, None)
    assert r.order == [3, 0, 1, 2]  # bid x pCTR: 0.06, 0.05, 0.01, 0.08
    assert r.scores == sorted(r.scores, reverse=True)
    assert r.scores == (PCTR * BIDS)[r.order].tolist()
    assert r.propensities == [1.0] * 4 and not r.explored and r.cost is None


def test_top_k_and_rank_by_pctr() -> None:
    r = rank(PCTR, None, 2)
    assert r.order == [1, 3] and r.scores == [0.05, 0.04] and r.propensities == [1.0, 1.0]


def test_ties_keep_the_request_order() -> None:
    assert rank(np.full(4, 0.03), None, None).order == [0, 1, 2, 3]


def test_exploring_needs_the_posterior() -> None:
    with pytest.raises(ValueError, match="posterior"):
        rank(PCTR, BIDS, 2, explore=Explore(1.0, 64, generator(1)))


def test_an_explored_ranking_is_thompson_rank_of_the_tempered_posterior() -> None:
    temperature = 0.5
    r = rank(PCTR, BIDS, 2, explore=Explore(temperature, 64, generator(7)), logit=LOGIT,
             rows=ROWS, row_var=VAR)
    post = JointPosterior.from_rows(LOGIT, ROWS, VAR * temperature)
    tr = thompson_rank(post, weights=BIDS, propensity_ranks=2, draws=64, rng=generator(7))
    assert r.explored and r.draws == 64
    assert r.order == tr.order[:2].tolist()
    assert r.scores == tr.scores[tr.order[:2]].tolist()
    assert tr.propensities is not None and r.propensities == tr.propensities.tolist()
    assert r.pctr_sample == pytest.approx((r.scores / BIDS[r.order]).tolist())
    assert r.cost == exploration_cost(PCTR * BIDS, tr.order, 2)


def test_an_explored_ranking_without_top_k_has_no_propensities() -> None:
    r = rank(PCTR, None, None, explore=Explore(1.0, 64, generator(3)), logit=LOGIT, rows=ROWS,
             row_var=VAR)
    assert len(r.order) == 4 and r.propensities == [None] * 4 and r.explored
