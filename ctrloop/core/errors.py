"""The exception tree of ctrloop. Domain code raises these; the edges (CLI, HTTP, Kafka adapters)
decide what a user sees.

    CtrloopError
    ├── ConfigError           bad settings or arguments; the message says what to change
    ├── InvalidEvent          an event breaks the contract (docs/events.md); `.reason` says how
    ├── FeatureSpecError      a feature spec file is malformed or incompatible
    ├── SnapshotError         a model snapshot cannot be decoded or fails verification
    ├── RegistryError         the model registry cannot be reached or is inconsistent
    └── DependencyError       Kafka or Redis cannot be reached at start; the message says what to
                              run or set
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


class DependencyError(CtrloopError):
    """A service the command needs (Kafka, Redis) cannot be reached: the CLI prints one line
    saying what to start or which setting to change, instead of a client library's traceback."""
