"""Fixtures of the observability tests: the sandbox's helm binary (built once by tests/setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.core import build_binaries


@pytest.fixture(scope="session")
def helm() -> Path:
    return build_binaries(print) / "helm"
