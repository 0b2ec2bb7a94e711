"""The exception tree of ctrloop. Domain code raises these; the edges (CLI, HTTP, Kafka adapters)
decide what a user sees.

    CtrloopError
    ├── ConfigError           bad settings or arguments; the message says what to change
    ├── InvalidEvent          an event breaks the contract (docs/events.md); `.reason` says how
    ├── FeatureSpecError      a feature spec file is malformed or incompatible
    ├── SnapshotError         a model snapshot cannot be decoded or fails verification
    └── RegistryError         the model registry cannot be reached or is inconsistent
"""

from __future__ import annotations


class CtrloopError(Exception):
    """Base class of every error ctrloop raises on purpose."""


class ConfigError(CtrloopError):
    pass


class InvalidEvent(CtrloopError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FeatureSpecError(CtrloopError):
    pass


class SnapshotError(CtrloopError):
    pass


class RegistryError(CtrloopError):
    pass
