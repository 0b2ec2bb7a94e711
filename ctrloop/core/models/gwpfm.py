"""Group-weighted part-aware factorization machine, GwPFM (paper §4.3; method notes §3).

    logit = b + sum_i w[x_i] + sum_{i<j} <e_{i,P(j)}, e_{j,P(i)}> r_{G(i),G(j)}

Fields fall into P parts (default 2: user and context fields vs ad fields, from each spec
field's `part`); every feature has one embedding per part and, when it meets a field of part p,
interacts through its part-p embedding, so a user field's embedding for ad fields is free of what
it learned for other user fields. Fields fall into G groups with one learnable weight per group
pair (default: one group per field, FwFM's field-pair weights). P=1 with one group per field is
FwFM.

`GwPFMInteraction` computes the element-wise form sum_{i<j} (e_{i,P(j)} ⊙ e_{j,P(i)}) r: the
standalone model sums it to a scalar, the multi-embedding expert (experts.py) feeds the vector to
its MLP layer. The linear weight is column 0 of the table, as in FwFM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel, HashEmbedding, prior_logit

# Spec part -> GwPFM part index, by the number of parts.
PART_MAPS: dict[int, dict[str, int]] = {
    1: {"user": 0, "context": 0, "ad": 0},
    2: {"user": 0, "context": 0, "ad": 1},  # production's split: user/context vs ad
    3: {"user": 0, "context": 1, "ad": 2},
}


def field_groups(spec: FeatureSpec, groups: Sequence[Sequence[str]] | None) -> list[int]:
    """Group index per field: the named groups first, then one group per unnamed field."""
    names = spec.names
    out = [-1] * len(names)
    for g, members in enumerate(check_groups(groups) or []):
        for m in members:
            if m not in names:
                raise ConfigError(f"gwpfm groups: no field {m!r} in the feature spec")
            if out[names.index(m)] != -1:
                raise ConfigError(f"gwpfm groups: field {m!r} is in two groups")
            out[names.index(m)] = g
    nxt = len(groups or [])
    for i, g in enumerate(out):
        if g == -1:
            out[i], nxt = nxt, nxt + 1
    return out


def check_groups(groups: Any) -> list[list[str]] | None:
    """Groups as JSON-ready lists of field names (None: one group per field)."""
    if groups is None:
        return None
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ConfigError(f"gwpfm groups must be a list of lists of field names, got {groups!r}")
    for g, members in enumerate(groups):
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ConfigError(f"gwpfm groups: group {g} must be a non-empty list of field names")
    return [[str(m) for m in members] for members in groups]


def check_parts(parts: Any) -> int:
    if isinstance(parts, bool) or parts not in PART_MAPS:
        raise ConfigError(f"gwpfm parts must be one of {sorted(PART_MAPS)}, got {parts!r}")
    return int(parts)


class GwPFMInteraction(nn.Module):
    """[B, F, P*d] (each feature's P part embeddings side by side) -> [B, d].

    As one matrix product instead of a gather per pair (the gathers' backward was most of a
    step): with E the [F*P, d] stack of every (feature, part) embedding, the pair sum is
    sum_rows E ⊙ (M E), where M[(i,q),(j,p)] = W_ij [q = P(j)] [p = P(i)] and W_ij is the group
    weight r_{G(i)G(j)} for i < j, else 0.
    """

    def __init__(self, spec: FeatureSpec, part_dim: int, parts: int = 2,
                 groups: Sequence[Sequence[str]] | None = None) -> None:
        super().__init__()
        self.parts, self.part_dim = check_parts(parts), part_dim
        part = torch.tensor([PART_MAPS[self.parts][f.part] for f in spec.fields])
        group = torch.tensor(field_groups(spec, groups))
        g = int(group.max()) + 1
        self.group_pair = nn.Parameter(torch.ones(g, g))
        f = spec.num_fields
        lo = torch.minimum(group[:, None], group[None, :])  # symmetric: r_{G(i)G(j)} = r_{G(j)G(i)}
        hi = torch.maximum(group[:, None], group[None, :])
        self.register_buffer("g_lo", lo, persistent=False)
        self.register_buffer("g_hi", hi, persistent=False)
        self.register_buffer("upper", torch.triu(torch.ones(f, f), diagonal=1), persistent=False)
        onehot = torch.nn.functional.one_hot(part, self.parts).float()  # [F, P]
        self.register_buffer("onehot", onehot, persistent=False)

    def pair_matrix(self) -> torch.Tensor:
        """M, [F*P, F*P], rows (i, q) and columns (j, p) in the order of E's rows."""
        w = self.group_pair[self.g_lo, self.g_hi] * self.upper  # [F, F]
        m = torch.einsum("ij,jq,ip->iqjp", w, self.onehot, self.onehot)
        n = w.shape[0] * self.parts
        return m.reshape(n, n)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        b = e.shape[0]
        stack = e.reshape(b, -1, self.part_dim)  # [B, F*P, d], row i*P + p
        return (stack * torch.matmul(self.pair_matrix(), stack)).sum(1)


class GwPFM(CTRModel):
    name = "gwpfm"

    def __init__(self, spec: FeatureSpec, dim: int = 8, parts: int = 2,
                 groups: list[list[str]] | None = None, init_std: float = 0.01,
                 prior_ctr: float = 0.03) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 512:
            raise ConfigError(f"gwpfm dim (per part) must be an integer 1..512, got {dim!r}")
        groups = check_groups(groups)
        super().__init__(spec, dim=dim, parts=parts, groups=groups, init_std=init_std,
                         prior_ctr=prior_ctr)
        self.interaction = GwPFMInteraction(spec, dim, parts, groups)
        p = self.interaction.parts
        self.table = HashEmbedding(spec.total_buckets, 1 + p * dim, init_std=init_std)
        with torch.no_grad():
            self.table.weight[:, 0] = 0.0  # the linear weights start at zero
        self.bias = nn.Parameter(torch.tensor(prior_logit(prior_ctr)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.table(idx)  # [B, F, 1 + P*d]
        return self.bias + rows[..., 0].sum(1) + self.interaction(rows[..., 1:]).sum(-1)

    def embedding_tables(self) -> list[torch.Tensor]:
        w, d = self.table.weight.detach(), self.interaction.part_dim
        return [w[:, 1 + k * d:1 + (k + 1) * d] for k in range(self.interaction.parts)]
