"""One request's ranking, from the model's outputs: scores, the Thompson draw, the order and the
propensities. Pure: no HTTP, no logging, no service state (the route decides whether to explore
and keeps the budget; this module only computes).

Exploring costs the numpy/torch calls more than the arithmetic (a call is 5-10 us on the request
path, where the request's other work evicts the caches; docs/exploration.md), so the explored
path reuses what the mean ranking computes anyway and asks `thompson_rank` for propensities of
the shown ranks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ctrloop.core.exploration import JointPosterior, exploration_cost, thompson_rank


@dataclass(frozen=True)
class Explore:
    """How to explore one request (the route already decided that it explores)."""

    temperature: float  # multiplies the posterior's variance for the draw
    draws: int  # posterior draws behind the propensities
    rng: torch.Generator


@dataclass(frozen=True)
class Ranking:
    """The candidates to return, best first, with what the response and the log need."""

    order: list[int]  # candidate indices, best first (the top_k when given)
    scores: list[float]  # the ranking value of each, in `order`
    # P(this ad at this rank) under the policy that ranked: 1.0 for the mean ranking; for an
    # explored one the Monte Carlo estimate, or None where no rank is shown (no top_k).
    propensities: list[float | None]
    # Explored only: sigmoid of each returned ad's sampled logit, the draw count and the cost.
    pctr_sample: list[float] | None = None
    draws: int | None = None
    cost: float | None = None

    @property
    def explored(self) -> bool:
        return self.pctr_sample is not None


def mean_scores(pctr: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """The mean model's ranking value: pCTR times its weight (bid, bid x pCVR), or pCTR."""
    return pctr if weights is None else pctr * weights


def rank(pctr: np.ndarray, weights: np.ndarray | None, top_k: int | None, *,
         explore: Explore | None = None, logit: np.ndarray | None = None,
         rows: np.ndarray | None = None, row_var: np.ndarray | None = None) -> Ranking:
    """Rank by the posterior mean, or with `explore` by one Thompson draw from the posterior
    given by `logit` [C], `rows` [C, F] and `row_var` [C, F] (all three needed then)."""
    value = mean_scores(pctr, weights)
    if explore is None:
        order = np.argsort(-value, kind="stable")[:top_k]
        # Deterministic: the ad at each rank was chosen with probability 1.
        return Ranking(order.tolist(), value[order].tolist(), [1.0] * order.shape[0])
    if logit is None or rows is None or row_var is None:
        raise ValueError("exploring needs the posterior: logit, rows and row_var")
    return _thompson(value, weights, top_k, explore, logit, rows, row_var)


def _thompson(value: np.ndarray, weights: np.ndarray | None, top_k: int | None,
              explore: Explore, logit: np.ndarray, rows: np.ndarray,
              row_var: np.ndarray) -> Ranking:
    post = JointPosterior.from_rows(logit, rows, row_var * explore.temperature)
    tr = thompson_rank(post, weights=weights, propensity_ranks=top_k or 0,
                       draws=explore.draws, rng=explore.rng)
    order = tr.order[:top_k]
    props: list[float | None] = ([None] * order.shape[0] if tr.propensities is None
                                 else tr.propensities.tolist())
    return Ranking(order.tolist(), tr.scores[order].tolist(), props,
                   pctr_sample=tr.pctr[order].tolist(), draws=tr.draws,
                   cost=exploration_cost(value, tr.order, top_k or 1))
