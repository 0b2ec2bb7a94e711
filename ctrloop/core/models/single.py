"""One expert on one embedding table, alone: the standalone dcnv2, ipnn and flatdnn models.

The same pieces as the multi-embedding mixture (multi_embedding.py) with T=1 and one expert:
linear part + prior bias, the expert (interaction -> LayerNorm -> Linear -> ReLU), the classifier
tower whose last layer starts at zero. So each is the single-embedding baseline the mixture is
measured against, with the same cold start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel
from ctrloop.core.models.multi_embedding import MultiEmbeddingHMoE


class SingleExpert(MultiEmbeddingHMoE):
    expert: str = ""

    def __init__(self, spec: FeatureSpec, dim: int, hidden: int, tower: Sequence[int],
                 init_std: float, prior_ctr: float, **options: Any) -> None:
        hp = self.check_config([dim], [{"type": self.expert, "table": 0, **options}], hidden,
                               tower)
        if not isinstance(init_std, int | float) or not isinstance(prior_ctr, int | float):
            raise ConfigError(f"{self.name}: init_std and prior_ctr must be numbers")
        CTRModel.__init__(self, spec, dim=dim, **options, hidden=hidden, tower=hp["tower"],
                          init_std=init_std, prior_ctr=prior_ctr)
        self._assemble(spec, **hp, init_std=init_std, prior_ctr=prior_ctr)


class DCNv2(SingleExpert):
    """DCN V2 (Wang et al., WWW 2021), stacked: cross layers, then the MLP tower."""

    name = "dcnv2"
    expert = "dcnv2"

    def __init__(self, spec: FeatureSpec, dim: int = 16, layers: int = 2, rank: int = 0,
                 hidden: int = 64, tower: Sequence[int] = (64,), init_std: float = 0.01,
                 prior_ctr: float = 0.03) -> None:
        super().__init__(spec, dim, hidden, tower, init_std, prior_ctr, layers=layers,
                         rank=rank)


class IPNN(SingleExpert):
    """IPNN (Qu et al., ICDM 2016): pairwise inner products beside the embeddings, into an MLP."""

    name = "ipnn"
    expert = "ipnn"

    def __init__(self, spec: FeatureSpec, dim: int = 16, hidden: int = 64,
                 tower: Sequence[int] = (64,), init_std: float = 0.01,
                 prior_ctr: float = 0.03) -> None:
        super().__init__(spec, dim, hidden, tower, init_std, prior_ctr)


class FlatDNN(SingleExpert):
    """An MLP over the concatenated embeddings (the plain deep baseline)."""

    name = "flatdnn"
    expert = "flatdnn"

    def __init__(self, spec: FeatureSpec, dim: int = 16, hidden: int = 64,
                 tower: Sequence[int] = (64,), init_std: float = 0.01,
                 prior_ctr: float = 0.03) -> None:
        super().__init__(spec, dim, hidden, tower, init_std, prior_ctr)
