"""The interface every pCTR/pCVR architecture implements, and the hashed embedding table.

A model is built from a FeatureSpec and keyword hyper-parameters only, so a snapshot (spec +
architecture name + hyper-parameters + weights) rebuilds it anywhere. Input: LongTensor [B, F] of
global embedding indices (FeatureEncoder); output: logits [B].
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ctrloop.core.features import FeatureSpec

if TYPE_CHECKING:
    from ctrloop.core.posterior import LogitPosterior

_inference_only: ContextVar[bool] = ContextVar("inference_only", default=False)


@contextlib.contextmanager
def inference_only() -> Iterator[None]:
    """Build models whose weights are about to be loaded, for serving: tables are allocated
    uninitialised and without optimizer state. Random init and the Adagrad accumulator were
    ~100 ms of a 23 MB model's ~110 ms rebuild, paid on every hot reload."""
    token = _inference_only.set(True)
    try:
        yield
    finally:
        _inference_only.reset(token)


class HashEmbedding(nn.Module):
    """An embedding table that trains only the rows a minibatch touches, with Adagrad.

    A dense optimizer over a large table makes online training tens of times slower
    (../shared/docs/measured-here.md), and torch's sparse-gradient optimizers spend most of a step
    coalescing COO gradients (measured: 3× slower than this). Here a training forward gathers the
    unique rows into a small leaf tensor; autograd fills its dense gradient; `step` applies
    per-coordinate Adagrad to those rows only.
    """

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        serving = _inference_only.get()
        w = torch.empty(num_rows, dim) if serving else torch.randn(num_rows, dim).mul_(init_std)
        self.weight = nn.Parameter(w, requires_grad=False)
        # Optimizer state lives with the table; not part of a served snapshot (persistent=False).
        acc = torch.zeros(0, dim) if serving else torch.zeros(num_rows, dim)
        self.register_buffer("accumulator", acc, persistent=False)
        self._touched: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            uniq, inverse = torch.unique(idx, return_inverse=True)
            rows = self.weight.index_select(0, uniq).requires_grad_()
            self._touched.append((uniq, rows))
            return rows[inverse]
        return F.embedding(idx, self.weight)

    @torch.no_grad()
    def step(self, lr: float, eps: float = 1e-8, initial: float = 0.0) -> None:
        """`initial`: Adagrad's initial accumulator value (TF's `initial_accumulator_value`),
        added to the denominator only, so checkpoints keep the plain sum of squares. At 0 a
        row's first update is a full `lr` step whatever its gradient's size: a rare row (a new
        ad seen twice) jumps as far on one noisy gradient as a frequent one does."""
        for uniq, rows in self._touched:
            g = rows.grad
            if g is None:
                continue
            acc = self.accumulator.index_select(0, uniq).add_(g * g)
            self.accumulator.index_copy_(0, uniq, acc)
            if initial:
                acc.add_(initial)
            self.weight.index_add_(0, uniq, g.div_(acc.sqrt_().add_(eps)).mul_(-lr))
        self._touched.clear()

    def discard(self) -> None:
        self._touched.clear()


class CTRModel(nn.Module):
    name: ClassVar[str]
    # Multi-task models (one logit per conversion type, [B, T]) name their outputs here; a
    # single-output model ([B]) leaves it empty.
    tasks: tuple[str, ...] = ()

    def __init__(self, spec: FeatureSpec, **hparams: Any) -> None:
        super().__init__()
        self.spec = spec
        self.hparams = hparams
        # The GP posterior over the logit (ctrloop/core/posterior.py) travels with the model it was
        # learned next to: snapshots carry it, and a served model exposes it. Not a module, so
        # it stays out of state_dict and old snapshots load unchanged.
        self.posterior: LogitPosterior | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def hash_embeddings(self) -> list[HashEmbedding]:
        return [m for m in self.modules() if isinstance(m, HashEmbedding)]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def embedding_tables(self) -> list[torch.Tensor]:
        """The model's embedding matrices, [total_buckets, dim] each, one per table (a model
        whose feature has several embeddings — multi-embedding, GwPFM's parts — lists each).
        Read-only views of the weights, without the columns that are not embeddings (FwFM's
        linear weight). Default: every HashEmbedding wider than one column, whole."""
        return [t.weight.detach() for t in self.hash_embeddings() if t.weight.shape[1] > 1]

    @torch.no_grad()
    def fill_unseen_rows(self, fields: Collection[str]) -> int:
        """Give every never-trained row of `fields` the mean of its field's trained rows, in
        every hashed table (linear column included); return how many rows were filled.

        Why (issue 11, docs/exploration.md "Unseen rows"): a row no sample has touched keeps
        its init (~0), while the rows of learned ads sit below it, so a never-seen ad's mean
        logit was optimistic and greedy explored by accident. With the cohort mean its served
        mean is a typical ad's (exactly, for FwFM: the logit is affine in one field's row) and
        exploration comes from the posterior variance only. Trained = the row's Adagrad
        accumulator is non-zero (it is for every row a gradient reached), so this needs the
        learning model, not a served one (no accumulator: nothing is filled). Deterministic;
        a row later trained starts from the mean it was served with."""
        spans = [(s, f.buckets) for f, s in zip(self.spec.fields, self.spec.offsets, strict=True)
                 if f.name in fields]
        filled = 0
        for table in self.hash_embeddings():
            w, acc = table.weight, table.accumulator
            if w.shape[0] != self.spec.total_buckets or acc.shape != w.shape:
                continue
            for start, n in spans:
                seen = acc[start:start + n].ne(0).any(1)
                k = int(seen.sum())
                if k == 0 or k == n:
                    continue
                rows = w[start:start + n]
                rows[~seen] = rows[seen].mean(0)
                filled += n - k
        return filled

    def field_embeddings(self) -> dict[str, list[torch.Tensor]]:
        """Per field name, that field's rows of each embedding table: [buckets, dim] each, in
        `embedding_tables()` order. For the collapse analysis (per-field singular spectra and
        Information Abundance, paper §7). Views: do not write to them."""
        out: dict[str, list[torch.Tensor]] = {}
        tables = self.embedding_tables()
        for f, start in zip(self.spec.fields, self.spec.offsets, strict=True):
            out[f.name] = [t[start:start + f.buckets] for t in tables]
        return out


def prior_logit(prior_ctr: float) -> float:
    p = min(max(prior_ctr, 1e-6), 1 - 1e-6)
    return float(torch.logit(torch.tensor(p)))
