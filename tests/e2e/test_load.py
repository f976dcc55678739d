"""Load, short: 200 ConnectionBudgets, 500 pods, 1,000 client backends, one minute.

The same code as the benchmark's load and soak (``tests/bench/footprint.py``), which runs it for ten
minutes and also checks that memory stays flat; here, a minute is enough to check that every budget
keeps its poll cadence and that nothing fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import Kube, Server
from bench.footprint import LOAD_BACKENDS, LOAD_BUDGETS, PODS, Fleet, load_soak
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture
def big_server(sandbox: Sandbox) -> Iterator[Server]:
    """A PostgreSQL of its own in the sandbox, with room for 1,000 client backends."""
    server = Server.start(sandbox, f"load-{uuid.uuid4().hex[:6]}", max_connections=1100)
    yield server
    server.stop()


def test_two_hundred_budgets_keep_their_cadence_under_load_without_errors(
    sandbox: Sandbox, crd: None, big_server: Server, tmp_path: Path
) -> None:
    kube = Kube(sandbox)
    fleet = Fleet(kube=kube, server=big_server)
    fleet.create()
    try:
        result = load_soak(
            sandbox, kube, fleet, minutes=1.0, out_dir=tmp_path, baseline_seconds=10.0
        )
    finally:
        fleet.delete()
    assert result["budgets"] == LOAD_BUDGETS
    assert result["pods"] == PODS
    assert result["backends"] >= LOAD_BACKENDS
    assert result["backends_at_end"] >= LOAD_BACKENDS
    assert result["touch_errors"] == 0
    assert result["cadence_kept"], result["segments"]
    assert result["probe_errors"] == 0
    assert result["warnings"] == 0, result["warning_samples"]
    assert result["actions"] == 0  # every budget is within its budget: nothing to do
