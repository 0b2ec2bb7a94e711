"""Field-weighted factorization machine plus a linear part (Pan et al., WWW 2018; notes §3).

logit = b + sum_i w[x_i] + sum_{i<j} r_{F(i),F(j)} <v_i, v_j>

One embedding per feature and one learnable weight per field pair: about 4% of FFM's parameters
at comparable AUC. The linear weight is stored as column 0 of the embedding table, so a step
gathers and updates one table instead of two; the pairwise term is one batched Gram matrix masked
to the upper triangle instead of F²/2 small products.
"""

from __future__ import annotations

import torch
from torch import nn

from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel, HashEmbedding, prior_logit


class FwFM(CTRModel):
    name = "fwfm"

    def __init__(self, spec: FeatureSpec, dim: int = 16, init_std: float = 0.01,
                 prior_ctr: float = 0.03) -> None:
        super().__init__(spec, dim=dim, init_std=init_std, prior_ctr=prior_ctr)
        f = spec.num_fields
        self.table = HashEmbedding(spec.total_buckets, dim + 1, init_std=init_std)
        with torch.no_grad():
            self.table.weight[:, 0] = 0.0  # the linear weights start at zero
        self.bias = nn.Parameter(torch.tensor(prior_logit(prior_ctr)))
        self.field_pair = nn.Parameter(torch.ones(f, f))
        self.register_buffer("upper", torch.triu(torch.ones(f, f), diagonal=1), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.table(idx)  # [B, F, 1 + D]
        linear, v = rows[..., 0], rows[..., 1:]
        gram = torch.bmm(v, v.transpose(1, 2))  # [B, F, F]
        pairs = (gram * (self.field_pair * self.upper)).sum((1, 2))
        return self.bias + linear.sum(1) + pairs

    def embedding_tables(self) -> list[torch.Tensor]:
        return [self.table.weight.detach()[:, 1:]]  # column 0 is the linear weight
