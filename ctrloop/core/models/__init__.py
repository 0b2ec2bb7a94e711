"""Architectures by name. A new one subclasses CTRModel and is added to MODELS."""

from __future__ import annotations

from typing import Any

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel
from ctrloop.core.models.fwfm import FwFM
from ctrloop.core.models.gwpfm import GwPFM
from ctrloop.core.models.lr import LogisticRegression
from ctrloop.core.models.multi_embedding import MultiEmbeddingHMoE
from ctrloop.core.models.single import IPNN, DCNv2, FlatDNN
from ctrloop.core.models.stem import StemFwFM

MODELS: dict[str, type[CTRModel]] = {m.name: m for m in (
    FwFM, LogisticRegression, StemFwFM, GwPFM, MultiEmbeddingHMoE, DCNv2, IPNN, FlatDNN)}


def build_model(name: str, spec: FeatureSpec, **hparams: Any) -> CTRModel:
    cls = MODELS.get(name)
    if cls is None:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return cls(spec, **hparams)
    except TypeError as e:
        raise ConfigError(f"bad hyper-parameters for model {name!r}: {e}") from None


__all__ = ["IPNN", "MODELS", "CTRModel", "DCNv2", "FlatDNN", "FwFM", "GwPFM",
           "LogisticRegression", "MultiEmbeddingHMoE", "StemFwFM", "build_model"]
