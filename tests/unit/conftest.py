"""Unit-test settings."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # When a hypothesis test fails, hypothesis writes a patch with libcst, whose import warns
    # (mypy_extensions.TypedDict); with filterwarnings=error that turned every hypothesis
    # failure into a pytest INTERNALERROR instead of a readable falsifying example.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )
