"""Interaction experts of the multi-embedding mixture (paper §2, §4; method notes §3).

Each expert reads one embedding table's rows of a minibatch, [B, F, D], and returns [B, hidden]:
interaction -> LayerNorm -> one linear layer -> ReLU. The non-linearity is what makes several
embedding tables worth having: without it the experts' sum is linear in each table and T tables
collapse to one (paper §4.2). The multi-embedding authors' code normalises with batch norm and
adds dropout; here LayerNorm and no dropout, because a served row's score must not depend on the
other rows of its batch or on a random draw (tests/unit/test_lazy_ticks.py asserts that of
every model; the learner's progressive metrics score with the training forward).

    gwpfm       GwPFM's element-wise pair sum (gwpfm.py), the table split into P parts
    ipnn        inner products of every field pair, beside the flat embeddings (IPNN)
    dcnv2       DCN V2 cross layers x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, full or low rank
    flatdnn     the flat concatenated embeddings
    projection  sum_{i<j} (e_i M_{F(i)F(j)}) ⊙ e_j, a matrix per field pair (FmFM, §4.4)

An expert's options come from its config entry (multi_embedding.py); unknown options and bad
values are ConfigErrors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.gwpfm import GwPFMInteraction, check_parts


def check_int(where: str, name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{where}: {name} must be an integer {lo}..{hi}, got {v!r}")
    return v


class Expert(nn.Module):
    """interaction(e) -> [B, width]; then LayerNorm, Linear(width, hidden), ReLU."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU())

    def interaction(self, e: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.out(self.interaction(e))


class GwPFMExpert(Expert):
    def __init__(self, spec: FeatureSpec, dim: int, hidden: int, parts: int = 2,
                 groups: list[list[str]] | None = None) -> None:
        p = check_parts(parts)
        if dim % p:
            raise ConfigError(f"expert gwpfm: its table's dim {dim} must divide into {p} parts")
        super().__init__(dim // p, hidden)
        self.pairs = GwPFMInteraction(spec, dim // p, p, groups)

    def interaction(self, e: torch.Tensor) -> torch.Tensor:
        return self.pairs(e)


class IPNNExpert(Expert):
    def __init__(self, spec: FeatureSpec, dim: int, hidden: int) -> None:
        f = spec.num_fields
        super().__init__(f * dim + f * (f - 1) // 2, hidden)
        ii, jj = torch.triu_indices(f, f, offset=1)
        self.register_buffer("upper", ii * f + jj, persistent=False)  # flat Gram positions

    def interaction(self, e: torch.Tensor) -> torch.Tensor:
        # One Gram matrix and a column gather: per-pair gathers of e cost ~3x more backward.
        gram = torch.bmm(e, e.transpose(1, 2)).flatten(1)
        inner = gram.index_select(1, self.upper)  # [B, pairs]
        return torch.cat([e.flatten(1), inner], dim=1)


class DCNv2Expert(Expert):
    def __init__(self, spec: FeatureSpec, dim: int, hidden: int, layers: int = 2,
                 rank: int = 0) -> None:
        width = spec.num_fields * dim
        check_int("expert dcnv2", "layers", layers, 1, 8)
        check_int("expert dcnv2", "rank (0: full rank)", rank, 0, width)
        super().__init__(width, hidden)
        # Low rank (DCN V2's mixture-free low-rank cross): W = U V, 2 r D parameters, not D².
        self.cross = nn.ModuleList(
            nn.Linear(width, width) if rank == 0 else
            nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))
            for _ in range(layers))

    def interaction(self, e: torch.Tensor) -> torch.Tensor:
        x0 = x = e.flatten(1)
        for layer in self.cross:
            x = x0 * layer(x) + x
        return x


class FlatDNNExpert(Expert):
    def __init__(self, spec: FeatureSpec, dim: int, hidden: int) -> None:
        super().__init__(spec.num_fields * dim, hidden)

    def interaction(self, e: torch.Tensor) -> torch.Tensor:
        return e.flatten(1)


class ProjectionExpert(Expert):
    def __init__(self, spec: FeatureSpec, dim: int, hidden: int) -> None:
        super().__init__(dim, hidden)
        f = spec.num_fields
        ii, jj = torch.triu_indices(f, f, offset=1)
        self.register_buffer("ii", ii, persistent=False)
        self.register_buffer("jj", jj, persistent=False)
        # Identity start: the expert begins as FM's element-wise pair sum and learns from there.
        self.proj = nn.Parameter(torch.eye(dim).repeat(len(ii), 1, 1))  # [pairs, D, D]

    def interaction(self, e: torch.Tensor) -> torch.Tensor:
        # index_select: its backward is an index_add, much cheaper than advanced indexing's.
        left = torch.einsum("bpd,pde->bpe", e.index_select(1, self.ii), self.proj)
        return (left * e.index_select(1, self.jj)).sum(1)


EXPERTS: dict[str, Callable[..., Expert]] = {
    "gwpfm": GwPFMExpert, "ipnn": IPNNExpert, "dcnv2": DCNv2Expert,
    "flatdnn": FlatDNNExpert, "projection": ProjectionExpert,
}


def build_expert(kind: str, spec: FeatureSpec, dim: int, hidden: int,
                 options: dict[str, Any]) -> Expert:
    cls = EXPERTS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown expert {kind!r}; choose one of {sorted(EXPERTS)}")
    try:
        return cls(spec, dim, hidden, **options)
    except TypeError as e:
        raise ConfigError(f"bad options for expert {kind!r}: {e}") from None
