"""Trainer checkpoints on local disk: model + optimizer + joiner state + Kafka offsets, atomically.

Order of a checkpoint (quix-streams' "flush state, then commit offsets"): write everything to a
temporary file, fsync, rename over the previous checkpoint, and only then commit the offsets to
Kafka. The offsets inside the checkpoint are the authority on restart — Kafka's committed offsets
are for lag monitoring and may trail them by one checkpoint — so model, join state and input
position always match: every event affects the model exactly once across a crash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ctrloop.core.errors import ConfigError

CHECKPOINT_FORMAT = 1
FILENAME = "checkpoint.pt"


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = directory / (FILENAME + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    path = directory / FILENAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); move it away to "
            "start from scratch (the trainer then re-reads Kafka from committed offsets)"
        ) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint {path} has format {state.get('format')!r}, "
                          f"expected {CHECKPOINT_FORMAT}")
    return state
