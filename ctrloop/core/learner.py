"""Online minibatch learning with progressive validation.

`learn` scores every minibatch with the current weights *before* the gradient step, so the
returned predictions (and the metrics built from them) are honest out-of-sample estimates — the
forward pass needed for the loss gives them for free.

Embedding tables (HashEmbedding) update only the rows a minibatch touches, with Adagrad
(per-coordinate learning rates, the standard choice for online CTR since FTRL-Proximal); the few
dense parameters (field-pair weights, bias) use Adam.

Given a `LogitPosterior` (ctrloop/core/posterior.py), every minibatch learned also adds its
curvature to the posterior, from the same pre-update predictions and sample weights; the
posterior is attached to the model (`model.posterior`) so that a snapshot of the model carries
it, and it is part of the learner's checkpoint state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctrloop.core.errors import ConfigError
from ctrloop.core.metrics import ProgressiveMetrics
from ctrloop.core.models import MODELS, CTRModel
from ctrloop.core.posterior import LogitPosterior


@dataclass(frozen=True)
class LearnerConfig:
    model: str = "fwfm"
    hparams: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1024
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    l2: float = 0.0
    metrics_window: int = 100_000
    # Weight of the pairwise ranking term added to BCE (paper §6.1, "Combined-Pair"); 0 = BCE
    # alone. See `ranking_loss`.
    rank_weight: float = 0.0
    # Adagrad's initial accumulator for embedding rows (HashEmbedding.step); 0 = plain Adagrad,
    # whose first step on a row is a full `sparse_lr` whatever the gradient. 1e-6 is about the
    # square of a rare row's gradient at batch 1024: chosen on tuning seed 0 of 1e-8..1e-3,
    # held-out seeds 1-3 gave served AUC +0.0125, logloss -0.0013 (docs/benchmarks.md).
    adagrad_initial: float = 1e-6

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if not self.adagrad_initial >= 0:  # also refuses NaN
            raise ConfigError(f"adagrad_initial must be >= 0, got {self.adagrad_initial}")
        if not self.rank_weight >= 0:  # also refuses NaN
            raise ConfigError(f"rank_weight must be >= 0, got {self.rank_weight}")
        if self.sparse_lr <= 0 or self.dense_lr <= 0:
            raise ConfigError("learning rates must be > 0")
        if self.model not in MODELS:  # fail when settings are built, before outputs are opened
            raise ConfigError(f"unknown model {self.model!r}; choose one of {sorted(MODELS)}")


def ranking_loss(logits: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor | None = None,
                 tasks: torch.Tensor | None = None) -> torch.Tensor:
    """RankNet over the positive-negative pairs of a minibatch: summed over the positives, each
    positive's mean over its negatives of log(1 + exp(-(s_pos - s_neg))). Divided by the batch
    size (as the learner does), the term is on BCE's scale: a positive's gradient is about 1/2
    of BCE's while its pairs are unordered, whatever the number of negatives.

    Why (paper §6.1): with positives at 0.1-2%, BCE's gradient on a negative is its predicted
    probability, ~the base rate, and negatives barely move; the pairs add sigmoid(s_neg - s_pos)
    per positive, shared among the negatives. A sample is a positive when its (possibly soft)
    label is >= 0.5; samples of weight <= 0 (retractions) take no part and the others weigh
    their pairs; with `tasks`, only samples of one task are paired. No pair: zero.
    """
    pos = labels >= 0.5
    keep = torch.ones_like(pos) if weights is None else weights > 0
    p_idx = (pos & keep).nonzero().flatten()
    n_idx = (~pos & keep).nonzero().flatten()
    if p_idx.numel() == 0 or n_idx.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph (and the dtype) for backward
    diff = logits[p_idx, None] - logits[None, n_idx]  # [positives, negatives]
    w = torch.ones_like(diff)
    if tasks is not None:
        w = w * (tasks[p_idx, None] == tasks[None, n_idx])
    if weights is not None:
        w = w * weights[None, n_idx]
    norm = w.sum(1)  # each positive's total negative weight
    per_pos = (torch.nn.functional.softplus(-diff) * w).sum(1) / norm.clamp_min(1e-12)
    if weights is not None:
        per_pos = per_pos * weights[p_idx]
    return per_pos.sum()


class OnlineLearner:
    def __init__(self, model: CTRModel, config: LearnerConfig | None = None,
                 posterior: LogitPosterior | None = None) -> None:
        self.model = model
        self.config = config or LearnerConfig()
        self.posterior = posterior
        model.posterior = posterior
        c = self.config
        self._tables = model.hash_embeddings()
        dense = model.dense_parameters()
        self._dense_opt = torch.optim.Adam(dense, lr=c.dense_lr) if dense else None
        self._loss = torch.nn.BCEWithLogitsLoss(reduction="sum")
        self._weighted_loss = torch.nn.BCEWithLogitsLoss(reduction="none")
        self.metrics = ProgressiveMetrics(c.metrics_window)
        self.samples_seen = 0
        self.positives_seen = 0

    def learn(self, idx: np.ndarray, labels: np.ndarray,
              weights: np.ndarray | None = None,
              tasks: np.ndarray | None = None) -> np.ndarray:
        """One pass over the samples in minibatches; returns the pre-update predictions.

        `weights` (optional) scale each sample's loss: importance weights, or -1 to retract a
        sample learned before (pCVR delay corrections, ctrloop/core/delays/). Labels may be soft
        (in [0, 1]). Metrics count only samples of positive weight, as hard labels (>= 0.5).
        With a multi-task model (`model.tasks`), `tasks` gives each sample's task index (all 0
        when omitted): a sample's loss and returned prediction are its task's output only.
        """
        n = len(labels)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        x_all = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        w_all = (None if weights is None
                 else torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)))
        t_all = self._task_index(tasks, n)
        preds = np.empty(n, dtype=np.float32)
        bs = self.config.batch_size
        self.model.train()
        for start in range(0, n, bs):
            x, y = x_all[start:start + bs], y_all[start:start + bs]
            logits = self.model(x)
            if t_all is not None:
                logits = logits.gather(1, t_all[start:start + bs, None]).squeeze(1)
            # Mean over the full batch size, not this batch: a short tail batch then takes a
            # proportionally smaller step instead of an outsized one.
            w = None if w_all is None else w_all[start:start + bs]
            if w is None:
                loss = self._loss(logits, y) / bs
            else:
                loss = (self._weighted_loss(logits, y) * w).sum() / bs
            if self.config.rank_weight > 0:
                t = None if t_all is None else t_all[start:start + bs]
                loss = loss + self.config.rank_weight * ranking_loss(logits, y, w, t) / bs
            if self._dense_opt is not None:
                self._dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            for table in self._tables:
                table.step(self.config.sparse_lr, initial=self.config.adagrad_initial)
            if self._dense_opt is not None:
                self._dense_opt.step()
            p = torch.sigmoid(logits.detach())
            if self.posterior is not None:
                self.posterior.update(x, p, None if w_all is None else w_all[start:start + bs])
            preds[start:start + bs] = p.numpy()
        if weights is None:
            self.metrics.add(labels, preds)
            self.samples_seen += n
            self.positives_seen += int(np.sum(labels))
        else:
            keep = np.asarray(weights) > 0
            hard = (np.asarray(labels)[keep] >= 0.5).astype(np.float32)
            self.metrics.add(hard, preds[keep])
            self.samples_seen += int(keep.sum())
            self.positives_seen += int(hard.sum())
        return preds

    def _task_index(self, tasks: np.ndarray | None, n: int) -> torch.Tensor | None:
        k = len(self.model.tasks)
        if not k:
            if tasks is not None and np.any(np.asarray(tasks) != 0):
                raise ValueError("task indices given to a single-task model")
            return None
        if tasks is None:
            return torch.zeros(n, dtype=torch.int64)
        t = torch.from_numpy(np.ascontiguousarray(tasks, dtype=np.int64))
        if t.shape != (n,) or (n and (int(t.min()) < 0 or int(t.max()) >= k)):
            raise ValueError(f"need one task index in [0, {k}) per sample")
        return t

    @torch.inference_mode()
    def predict(self, idx: np.ndarray) -> np.ndarray:
        """P(label) per sample: [B], or [B, T] for a multi-task model."""
        if len(idx) == 0:
            k = len(self.model.tasks)
            return np.zeros((0, k) if k else 0, dtype=np.float32)
        self.model.eval()
        x = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        return torch.sigmoid(self.model(x)).numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def predict_parts(self, idx: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        """`predict` of each consecutive part of `idx` (`sizes` rows each), byte for byte, in
        one forward pass. The logits of a row do not depend on the batch around it (tested:
        tests/unit/test_lazy_ticks.py) but torch's vectorised sigmoid rounds a row by its
        position in the batch, so the sigmoid runs per part, as `predict` of that part did."""
        if len(idx) == 0:
            return [self.predict(idx) for _ in sizes]
        self.model.eval()
        logits = self.model(torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)))
        out, start = [], 0
        for n in sizes:
            out.append(torch.sigmoid(logits[start:start + n]).numpy()
                       .astype(np.float32, copy=False))
            start += n
        return out

    def state_dict(self) -> dict[str, Any]:
        """A copy: learning on afterwards does not change it (torch's state dicts alias the
        live tensors, which the in-place updates of `learn` would then rewrite)."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "accumulators": [t.accumulator for t in self._tables],
            "dense_opt": self._dense_opt.state_dict() if self._dense_opt else None,
            "samples_seen": self.samples_seen,
            "positives_seen": self.positives_seen,
            **({"posterior": self.posterior.state_dict()} if self.posterior is not None else {}),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for table, acc in zip(self._tables, state["accumulators"], strict=True):
            table.accumulator.copy_(acc)
        if self._dense_opt is not None and state.get("dense_opt") is not None:
            # torch's Optimizer.load_state_dict keeps the given tensors as its state.
            self._dense_opt.load_state_dict(copy.deepcopy(state["dense_opt"]))
        self.samples_seen = int(state["samples_seen"])
        self.positives_seen = int(state["positives_seen"])
        # A checkpoint from before the posterior leaves it fresh (prior everywhere).
        if self.posterior is not None and "posterior" in state:
            self.posterior.load_state_dict(state["posterior"])
