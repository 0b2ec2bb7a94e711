"""Thompson sampling from a per-row Gaussian posterior of the CTR logit, and the propensities
of the rankings it produces (paper §6.4; docs/exploration.md).

The posterior (ctrloop/core/posterior.py) is additive over embedding rows and diagonal:

    f(x) = mu(x) + sum_f w[row_f(x)],   w[r] ~ N(0, v[r]) independent per row r.

Two candidates that share a row (the same advertiser, category, or the request's own user and
context rows) therefore share that row's perturbation, and one draw of the request's ranking
draws each distinct row once (`JointPosterior`). For a 100-candidate request of the simulator
(18 fields) that is ~200 normals per draw; the user and context rows, which every candidate
has, are folded into one. They do not reorder candidates ranked by pCTR, but they do move
bid x pCTR rankings (sigmoid is not scale-free), so they are drawn.

Random numbers come from a `torch.Generator` (its vectorised normal fill measured ~3x faster
than numpy's per draw here); seeded per request when a seed is given, so the same request,
model and seed give the same ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_DRAWS",
    "ExplorationBudget",
    "JointPosterior",
    "RankBy",
    "ThompsonRanking",
    "expected_pctr",
    "exploration_cost",
    "generator",
    "rank_propensities",
    "rank_weights",
    "thompson_rank",
]

RankBy = Literal["bid_pctr", "pctr", "bid_pctr_pcvr"]
# Monte Carlo draws per propensity estimate (antithetic pairs). Measured on 100 candidates,
# top 3 (docs/exploration.md): mean absolute error 0.013 at 128 draws against 0.020 at 64 and
# 0.009 at 256, while 64 -> 128 added ~7% to the handler's CPU and 128 -> 256 ~19% more.
DEFAULT_DRAWS = 128
# Thompson sampling draws from the posterior with its variance multiplied by this. The
# published posterior is calibrated for *intervals* (90% cover ~92% of true rates,
# docs/exploration.md), but sampling from it explores too much here: in the bandit loop
# (benchmarks/exploration.py, docs/benchmarks.md) temperature 1 lost ~30% more regret than
# greedy. Tempering the sampling variance is the remedy Chapelle & Li (2011) found for display
# ads. 0.025 was the best of the values tried; the service setting overrides it.
DEFAULT_TEMPERATURE = 0.025
# Above this many ranks, one partial sort beats repeated argmax over the draws.
_ARGMAX_RANKS = 8


def generator(seed: int | None = None) -> torch.Generator:
    """A generator seeded with `seed`, or from the OS's entropy when None."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def rank_weights(rank_by: RankBy, bids: np.ndarray | None = None,
                 pcvr: np.ndarray | None = None) -> np.ndarray | None:
    """What multiplies sigmoid(f) in the ranking score; None means rank by pCTR itself.

    `bid_pctr`: bid x pCTR (bids default to 1); `bid_pctr_pcvr`: bid x pCTR x pCVR, where pCVR
    is a point estimate (the posterior is over the CTR logit only).
    """
    if rank_by == "pctr":
        return None
    w = None if bids is None else np.asarray(bids, dtype=np.float64)
    if rank_by == "bid_pctr_pcvr":
        if pcvr is None:
            raise ValueError("rank_by bid_pctr_pcvr needs pcvr")
        p = np.asarray(pcvr, dtype=np.float64)
        w = p if w is None else w * p
    return w


def expected_pctr(mu: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """E[sigmoid(f)] for f ~ N(mu, variance), by the probit approximation (MacKay 1992):
    sigmoid(mu / sqrt(1 + pi variance / 8)); within ~0.02 of the exact integral. Wide
    posteriors pull it toward 0.5: a new ad's expected CTR exceeds sigmoid(mu) when mu < 0."""
    return 1.0 / (1.0 + np.exp(-mu / np.sqrt(1.0 + math.pi * variance / 8.0)))


@dataclass(frozen=True)
class JointPosterior:
    """The joint Gaussian posterior of one request's candidate logits, ready to sample.

    One perturbation per distinct row: f_c = mu_c + sum_j e[slots[c, j]], e[u] ~ N(0,
    row_std[u]^2) independent, so Cov(f_c, f_d) = the sum of row_std^2 over the rows c and d
    share. The rows every candidate has (the request's user and context columns) are folded
    into one pseudo-row, the last: they move every candidate alike, so one normal draws them
    all.

    A draw is one `embedding_bag` over the candidates' slots. In the service the cost of an
    explored request was the number of library calls (each 5-10 us there, where the request's
    other work evicts the caches) more than the arithmetic; docs/exploration.md has the
    measurements behind this layout.
    """

    mu: np.ndarray  # [C] posterior mean of the logit
    row_std: np.ndarray  # [U + 1] std of each distinct row; the last: the common pseudo-row
    slots: np.ndarray  # [C, S] int64: the rows (indices into row_std) candidate c adds up
    _t: tuple[torch.Tensor, ...] = field(repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if not self._t:
            slots = torch.from_numpy(np.ascontiguousarray(self.slots, dtype=np.int64))
            c, s = slots.shape
            object.__setattr__(self, "_t", (
                torch.from_numpy(np.asarray(self.mu, dtype=np.float32)).unsqueeze(1),
                torch.from_numpy(np.asarray(self.row_std, dtype=np.float32)).unsqueeze(1),
                # The bags as 1-D indices plus offsets: what embedding_bag builds from a 2-D
                # input on every call otherwise.
                slots.reshape(-1), torch.arange(0, c * s, max(s, 1))))

    @classmethod
    def from_rows(cls, mu: np.ndarray, rows: np.ndarray, row_var: np.ndarray
                  ) -> JointPosterior:
        """`rows` [C, F]: embedding rows per candidate (FeatureEncoder.encode_request);
        `row_var` [C, F]: each slot's row variance (equal wherever the row is equal).

        A column whose row is the same for every candidate is folded into the common
        pseudo-row without looking for its row in other columns: the encoder gives every
        field its own range of rows, so a row never appears in two columns.
        """
        mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        rows = np.asarray(rows)
        var = np.asarray(row_var, dtype=np.float64)
        c, f = rows.shape
        if mu.shape != (c,) or var.shape != (c, f):
            raise ValueError(f"shapes differ: mu {mu.shape}, rows {rows.shape}, "
                             f"row_var {var.shape}")
        if c == 0:
            return cls(mu, np.zeros(1), np.zeros((0, 1), dtype=np.int64))
        if not (math.isfinite(float(var.sum())) and var.min() >= 0):
            raise ValueError("row variances must be finite and non-negative")
        same = (rows == rows[0]).all(axis=0)
        other = ~same
        # torch.unique: one C++ call, ~1/3 cheaper than np.unique's several passes here.
        uniq, inv_t = torch.unique(torch.from_numpy(rows[:, other]), return_inverse=True)
        inv = inv_t.numpy()
        u = int(uniq.shape[0])
        std = np.empty(u + 1)
        std[inv.reshape(-1)] = var[:, other].reshape(-1)  # equal rows carry equal variances
        std[u] = var[0, same].sum()
        np.sqrt(std, out=std)
        slots = np.empty((c, int(other.sum()) + 1), dtype=np.int64)
        slots[:, :-1] = inv.reshape(c, -1)
        slots[:, -1] = u
        return cls(mu, std, slots)

    @property
    def n_candidates(self) -> int:
        return int(self.mu.shape[0])

    def incidence(self) -> np.ndarray:
        """[U + 1, C]: how many times row u enters candidate c."""
        c = self.n_candidates
        a = np.zeros((self.row_std.size, c))
        np.add.at(a, (self.slots, np.arange(c)[:, None]), 1.0)
        return a

    def variance(self) -> np.ndarray:
        """Marginal variance of each candidate's logit."""
        return (self.row_std ** 2) @ self.incidence() ** 2

    def covariance(self) -> np.ndarray:
        """[C, C] covariance of the candidates' logits (for checks; sampling never forms it)."""
        a = self.incidence()
        return a.T @ (a * (self.row_std ** 2)[:, None])

    def _noise(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randn((self.row_std.size, n), generator=rng)

    def _perturbation(self, z: torch.Tensor) -> torch.Tensor:
        """[C, n]: each candidate's logit minus its mean, from standard normals z [U + 1, n]."""
        return F.embedding_bag(self._t[2], z.mul_(self._t[1]), self._t[3], mode="sum")

    def draws(self, n: int, rng: torch.Generator, lead: int = 0) -> torch.Tensor:
        """[C, lead + n] float32 logit draws, one column per draw: `lead` independent draws
        (from their own call on `rng`), then n in antithetic pairs (mu + e, mu - e).

        Each draw is exactly distributed, and a pair costs one set of random numbers (the
        largest cost of a draw). An ad's chance of a rank rises with its own perturbation
        and falls with its rivals', so a pair's indicators are negatively correlated and
        Monte Carlo estimates get more accurate, not less (docs/exploration.md).
        """
        h = (n + 1) // 2
        if lead and h:
            z = torch.cat([self._noise(lead, rng), self._noise(h, rng)], dim=1)
        else:
            z = self._noise(lead + h, rng)
        mu = self._t[0]
        e = self._perturbation(z)
        if not h:
            return e.add_(mu)
        # Written in place of a concatenation plus a slice: two fewer [C, n] copies.
        out = torch.empty((e.shape[0], lead + n))
        torch.add(mu, e, out=out[:, :lead + h])
        torch.sub(mu, e[:, lead:lead + n - h], out=out[:, lead + h:])
        return out

    def sample(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """[n, C] float32 independent draws of the candidates' logits."""
        return self._perturbation(self._noise(n, rng)).add_(self._t[0]).T

    def sample_antithetic(self, n: int, rng: torch.Generator, lead: int = 0) -> torch.Tensor:
        """[lead + n, C]: `draws` with one row per draw."""
        return self.draws(n, rng, lead).T


def _keys(f: torch.Tensor, weights: np.ndarray | None) -> np.ndarray:
    """Ranking keys of logit draws [C, n]: f itself for pCTR (sigmoid is monotone), else
    weight x sigmoid(f) (torch's sigmoid: no overflow warnings at extreme logits)."""
    if weights is None:
        return f.numpy()
    w = torch.from_numpy(np.asarray(weights, dtype=np.float32)).unsqueeze(1)
    return torch.sigmoid(f).mul_(w).numpy()


def _top(keys: np.ndarray, k: int) -> np.ndarray:
    """[k, n]: per draw (column of `keys` [C, n]), the indices of the k largest, best first."""
    c = keys.shape[0]
    if k == 1:
        return keys.argmax(axis=0)[None, :]
    if k >= c:
        return np.argsort(-keys, axis=0, kind="stable")
    part = np.argpartition(-keys, k - 1, axis=0)[:k]
    best = np.argsort(-np.take_along_axis(keys, part, axis=0), axis=0, kind="stable")
    return np.take_along_axis(part, best, axis=0)


def rank_propensities(post: JointPosterior, *, weights: np.ndarray | None = None,
                      ranks: int = 1, draws: int = DEFAULT_DRAWS,
                      rng: torch.Generator | None = None) -> np.ndarray:
    """[ranks, C]: Monte Carlo estimate over `draws` posterior draws of P(candidate c is at
    rank r+1) when ranking by the sampled score. Each row sums to 1 over candidates."""
    if draws < 1:
        raise ValueError("draws must be at least 1")
    c = post.n_candidates
    ranks = min(ranks, c)
    if ranks < 1:
        return np.zeros((0, c))
    top = _top(_keys(post.draws(draws, rng or generator()), weights), ranks)
    flat = (top + (np.arange(ranks) * c)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=ranks * c).reshape(ranks, c) / draws


def _served_rank_share(keys: np.ndarray, served: np.ndarray) -> np.ndarray:
    """[k]: the share of draws (columns of `keys` [C, n]) that put served[r] at rank r.

    Takes the best of each draw k times (argmax: ties to the lower index, as in the served
    ranking's stable sort); measured 20% faster in the service than counting, for each
    served ad, the ads above it ([k, C, n] comparisons). Past 8 ranks, a partial sort.
    """
    k = served.shape[0]
    if k > _ARGMAX_RANKS:
        return (_top(keys, k) == served[:, None]).mean(axis=1)
    kt = np.array(keys.T)  # [n, C], a copy to overwrite
    n = kt.shape[0]
    at = np.arange(n)
    out = np.empty(k)
    for r in range(k):
        best = kt.argmax(axis=1)
        out[r] = np.count_nonzero(best == served[r]) / n
        if r + 1 < k:  # the last rank's bests need no removing
            kt[at, best] = -np.inf
    return out


@dataclass(frozen=True)
class ThompsonRanking:
    logits: np.ndarray  # [C] the sampled logit of each candidate (the draw that ranked)
    scores: np.ndarray  # [C] its ranking score: weight x sigmoid(logit), or sigmoid(logit)
    order: np.ndarray  # [C] candidate indices, best first by `scores`
    # [k] P(order[r] at rank r+1), estimated over `draws` draws, the ranking's own included
    # (so at least 1/draws); None when no ranks were asked for.
    propensities: np.ndarray | None
    draws: int
    pctr: np.ndarray  # [C] sigmoid of `logits`: the sampled click probabilities


def thompson_rank(post: JointPosterior, *, weights: np.ndarray | None = None,
                  propensity_ranks: int = 0, draws: int = DEFAULT_DRAWS,
                  rng: torch.Generator | None = None) -> ThompsonRanking:
    """Rank candidates by one joint posterior draw; with `propensity_ranks` = k > 0, also
    estimate, for r = 1..k, the probability that the ad it put at rank r is there, from
    `draws` draws.

    The ranking's draw comes first and alone from `rng`, so a seeded ranking does not depend
    on `draws` or k. It is also one of the `draws` propensity draws: the served ad's estimated
    propensity is then at least 1/draws (never 0, which inverse-propensity weights cannot
    use), at the price of a bias of at most (1 - p)/draws upward.
    """
    rng = rng or generator()
    c = post.n_candidates
    k = min(propensity_ranks, c)
    m = max(draws, 1) if k > 0 else 1
    f = post.draws(m - 1, rng, lead=1)
    keys = _keys(f, weights)
    order = np.argsort(-keys[:, 0], kind="stable")
    props = _served_rank_share(keys, order[:k]) if k > 0 else None
    logits = f[:, 0].double()
    pctr = torch.sigmoid(logits).numpy()
    scores = pctr if weights is None else pctr * weights
    return ThompsonRanking(logits.numpy(), scores, order, props, m, pctr)


def exploration_cost(mean_scores: np.ndarray, served: np.ndarray, k: int) -> float:
    """1 - (mean-model score of the served top k) / (that of the greedy top k): the share of
    expected value (by the model's own mean) given up by showing the explored ranking."""
    k = min(k, mean_scores.shape[0])
    if k <= 0:
        return 0.0
    best = float(np.sort(mean_scores)[::-1][:k].sum())
    if best <= 0:
        return 0.0
    return max(0.0, 1.0 - float(mean_scores[served[:k]].sum()) / best)


@dataclass
class ExplorationBudget:
    """Which eligible requests may explore: a cap on the running average cost, and on the share.

    `avg_cost` is an exponential moving average over the last ~`window` eligible requests
    (those that asked to explore and had a posterior), each counting its exploration cost, or
    0 when it was ranked by the mean. While it is at or above `cost_cap` eligible requests fall
    back to the mean ranking, which pulls the average back under the cap: the long-run cost of
    exploration stays near the cap. `max_share` admits that share of eligible requests
    deterministically (a credit accumulator), not by coin flips, so tests and traffic see it
    exactly.
    """

    cost_cap: float = 1.0
    max_share: float = 1.0
    window: int = 1000
    avg_cost: float = 0.0
    _credit: float = 0.0

    def admit(self) -> Literal["explored", "cost_cap", "share_cap"]:
        """Whether the next eligible request may explore, or why not."""
        if self.cost_cap < 1.0 and self.avg_cost >= self.cost_cap:
            return "cost_cap"
        self._credit = min(self._credit + self.max_share, 1.0)
        if self._credit < 1.0 - 1e-9:
            return "share_cap"
        self._credit -= 1.0
        return "explored"

    def record(self, cost: float) -> None:
        """Count one eligible request's cost (0 when it did not explore)."""
        self.avg_cost += (cost - self.avg_cost) / self.window

