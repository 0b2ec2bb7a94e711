"""Multi-embedding heterogeneous mixture of experts, HMoE (paper §2, §4.2; method notes §3).

    logit = b + sum_i w[x_i] + tower( sum_k g_k(h) h_k ),   h_k = expert_k(E_{t(k)}[x])

T embedding tables (`tables`: their dims); each feature looks up one embedding per table; each
expert (experts.py: gwpfm, ipnn, dcnv2, flatdnn, projection) reads one table and ends in a
non-linearity; a softmax gate over the experts' outputs weighs them; the gated sum goes through
the classifier tower (MLP). Why several tables: one table interacted with low-cardinality fields
collapses every field's embeddings into a low-dimensional subspace (the paper's dimensional
collapse); separate tables, each with its own non-linear interaction, learn different subspaces.

The linear term and the prior bias are FwFM's, and the tower's last layer starts at zero, so a
fresh model predicts `prior_ctr` everywhere (calibrated cold start) and the deep part grows from
there. All tables live in one HashEmbedding, [w | table_1 | ... | table_T]: Adagrad is per
coordinate, so that is the same optimizer as T tables, with one gather per minibatch instead of T.

Config (hyper-parameters, JSON-ready so a snapshot rebuilds the model):
    tables   [16, 16]                  dims of the embedding tables
    experts  [{"type": "gwpfm", "table": 0}, {"type": "flatdnn", "table": 0},
              {"type": "ipnn", "table": 1}]   (the paper's example); other keys of an entry are
              that expert's options, e.g. {"type": "dcnv2", "table": 1, "layers": 3, "rank": 32}
    hidden   32                        each expert's output width
    tower    [64]                      hidden layers of the classifier tower
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel, HashEmbedding, prior_logit
from ctrloop.core.models.experts import build_expert, check_int

PAPER_EXPERTS: tuple[dict[str, Any], ...] = (
    {"type": "gwpfm", "table": 0}, {"type": "flatdnn", "table": 0}, {"type": "ipnn", "table": 1})


def _expert_entries(experts: Any, num_tables: int) -> list[dict[str, Any]]:
    if not isinstance(experts, Sequence) or isinstance(experts, str) or not experts:
        raise ConfigError("hmoe experts must be a non-empty list of {\"type\", \"table\", ...}")
    out = []
    for k, entry in enumerate(experts):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ConfigError(f"hmoe expert {k}: need an object with a \"type\", got {entry!r}")
        entry = {"table": 0, **entry}
        check_int(f"hmoe expert {k}", "table", entry["table"], 0, num_tables - 1)
        out.append(entry)
    return out


class MultiEmbeddingHMoE(CTRModel):
    name = "hmoe"

    def __init__(self, spec: FeatureSpec, tables: Sequence[int] = (16, 16),
                 experts: Sequence[dict[str, Any]] = PAPER_EXPERTS, hidden: int = 32,
                 tower: Sequence[int] = (64,), init_std: float = 0.01,
                 prior_ctr: float = 0.03) -> None:
        hp = self.check_config(tables, experts, hidden, tower)
        super().__init__(spec, **hp, init_std=init_std, prior_ctr=prior_ctr)
        self._assemble(spec, **hp, init_std=init_std, prior_ctr=prior_ctr)

    @staticmethod
    def check_config(tables: Any, experts: Any, hidden: Any, tower: Any) -> dict[str, Any]:
        """The hyper-parameters as JSON-ready lists, or a ConfigError saying what is wrong."""
        if isinstance(tables, str | int) or not isinstance(tables, Sequence) or \
                not 1 <= len(tables) <= 16:
            raise ConfigError(f"hmoe tables must be a list of 1..16 dims, got {tables!r}")
        tables = [check_int("hmoe tables", "a dim", d, 1, 512) for d in tables]
        check_int("hmoe", "hidden", hidden, 1, 4096)
        if isinstance(tower, str | int) or not isinstance(tower, Sequence):
            raise ConfigError(f"hmoe tower must be a list of layer widths, got {tower!r}")
        tower = [check_int("hmoe tower", "a width", w, 1, 4096) for w in tower]
        return {"tables": tables, "experts": _expert_entries(experts, len(tables)),
                "hidden": hidden, "tower": tower}

    def _assemble(self, spec: FeatureSpec, tables: list[int], experts: list[dict[str, Any]],
                  hidden: int, tower: list[int], init_std: float, prior_ctr: float) -> None:
        self.dims = tables
        self.starts = [1 + sum(tables[:t]) for t in range(len(tables))]
        self.table = HashEmbedding(spec.total_buckets, 1 + sum(tables), init_std=init_std)
        with torch.no_grad():
            self.table.weight[:, 0] = 0.0  # the linear weights start at zero
        self.expert_tables = [int(e["table"]) for e in experts]
        self.experts = nn.ModuleList(
            build_expert(e["type"], spec, tables[e["table"]], hidden,
                         {k: v for k, v in e.items() if k not in ("type", "table")})
            for e in experts)
        self.gate = nn.Linear(hidden * len(experts), len(experts)) if len(experts) > 1 else None
        layers: list[nn.Module] = []
        width = hidden
        for w in tower:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)  # fresh model = linear part + prior: calibrated cold start
        nn.init.zeros_(last.bias)
        self.tower = nn.Sequential(*layers, last)
        self.bias = nn.Parameter(torch.tensor(prior_logit(prior_ctr)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.table(idx)  # [B, F, 1 + sum(dims)]
        h = [expert(rows[..., self.starts[t]:self.starts[t] + self.dims[t]])
             for expert, t in zip(self.experts, self.expert_tables, strict=True)]
        if self.gate is None:
            z = h[0]
        else:
            stacked = torch.stack(h, dim=1)  # [B, K, hidden]
            g = torch.softmax(self.gate(stacked.flatten(1)), dim=-1)
            z = (g.unsqueeze(-1) * stacked).sum(1)
        return self.bias + rows[..., 0].sum(1) + self.tower(z).squeeze(-1)

    def embedding_tables(self) -> list[torch.Tensor]:
        w = self.table.weight.detach()
        return [w[:, s:s + d] for s, d in zip(self.starts, self.dims, strict=True)]
