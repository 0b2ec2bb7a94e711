"""Logistic regression on hashed features: the plain baseline every CTR model must beat."""

from __future__ import annotations

import torch
from torch import nn

from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel, HashEmbedding, prior_logit


class LogisticRegression(CTRModel):
    name = "lr"

    def __init__(self, spec: FeatureSpec, prior_ctr: float = 0.03) -> None:
        super().__init__(spec, prior_ctr=prior_ctr)
        self.weights = HashEmbedding(spec.total_buckets, 1, init_std=0.0)
        self.bias = nn.Parameter(torch.tensor(prior_logit(prior_ctr)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weights(idx).squeeze(-1).sum(1) + self.bias

    def embedding_tables(self) -> list[torch.Tensor]:
        return []  # one linear weight per feature: nothing to analyse as an embedding
