"""The fault run of issue 12, short: three minutes with a fixed seed, two replicas, every fault
kind the time allows, and every invariant judged from outside the operator (tests/faults).

The 30-minute run is ``tests/bench/faults``; a failing seed replays with ``--seed``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from faults import run as fault_run
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox

SEED = (
    12  # a schedule that starts with the Secret rotation, the leader frozen and PostgreSQL stalled
)
MINUTES = 3.0


def test_a_three_minute_fault_run_breaks_no_invariant(sandbox: Sandbox, tmp_path: Path) -> None:
    report = fault_run.run(
        sandbox,
        seed=SEED,
        duration=MINUTES * 60,
        out_dir=tmp_path,
        namespace=f"faults-{secrets.token_hex(3)}",
    )
    assert report["faults_injected"] >= 4
    assert report["checked"]["lease_terms"] >= 1
    assert report["checked"]["operator_actions"] >= 1
    assert report["violations"] == [], "\n".join(
        f"{v['invariant']}: {v['evidence']}" for v in report["violations"]
    )
