"""Simulated ad world with a known true CTR, and the logged event streams it produces."""

from ctrloop.sim.stream import generate, parsed_events, uniform_policy, write_files
from ctrloop.sim.world import (
    CONVERSION_MIXES,
    Ad,
    Advertiser,
    Context,
    Conversion,
    ConversionType,
    Request,
    RequestBatch,
    World,
    WorldConfig,
    feature_table,
)

__all__ = [
    "CONVERSION_MIXES",
    "Ad",
    "Advertiser",
    "Context",
    "Conversion",
    "ConversionType",
    "Request",
    "RequestBatch",
    "World",
    "WorldConfig",
    "feature_table",
    "generate",
    "parsed_events",
    "uniform_policy",
    "write_files",
]
