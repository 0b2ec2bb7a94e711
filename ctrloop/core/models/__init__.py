"""Architectures by name. A new one subclasses CTRModel and is added to MODELS.

    fwfm      FwFM, the default (fwfm.py)             lr      logistic regression (lr.py)
    stem      multi-task FwFM for pCVR (stem.py)      gwpfm   part-aware group-weighted FM
    hmoe      multi-embedding heterogeneous mixture of experts (multi_embedding.py, experts.py)
    dcnv2, ipnn, flatdnn   one expert on one table (single.py)

Hyper-parameters are keyword arguments (`--model-params` JSON in the CLI), recorded in
`model.hparams` so a snapshot rebuilds the model; a bad one is a ConfigError.
"""

from __future__ import annotations

import inspect
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


def model_parameters(name: str) -> set[str]:
    """The hyper-parameter names model `name` accepts (ConfigError for an unknown model)."""
    cls = MODELS.get(name)
    if cls is None:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return set(inspect.signature(cls.__init__).parameters) - {"self", "spec"}


def check_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Fail fast on what can be checked without a feature spec: the model exists and takes
    every named hyper-parameter. Values are checked when the model is built."""
    unknown = sorted(set(hparams) - model_parameters(name))
    if unknown:
        raise ConfigError(f"model {name!r} has no hyper-parameter(s) {unknown}; it takes "
                          f"{sorted(model_parameters(name))}")


__all__ = ["IPNN", "MODELS", "CTRModel", "DCNv2", "FlatDNN", "FwFM", "GwPFM",
           "LogisticRegression", "MultiEmbeddingHMoE", "StemFwFM", "build_model",
           "check_hparams", "model_parameters"]
