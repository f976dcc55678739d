"""The cycle when part of what it watches does not answer (fakes, no I/O)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from connbudget.model.observations import PoolerSample
from unit.test_cycle import (
    OVER_STATUS,
    SPEC,
    WEB1,
    WEB2,
    FakeKube,
    FakeMonitor,
    leaking,
    make_deps,
    run_cycle,
)

POOLER_SPEC = {
    **SPEC,
    "pooler": {
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
        "adminSecretRef": {"name": "pgbouncer-admin"},
    },
}


def test_a_pooler_pod_that_does_not_answer_is_a_condition_and_holds_only_the_pooler() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])

    async def down(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        return PoolerSample(replicas=replicas, errors=("198.18.0.9: connection timeout expired",))

    deps = dataclasses.replace(deps, sample_poolers=down)
    out = run_cycle(deps, spec=POOLER_SPEC, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ProbeFailed")
    assert "198.18.0.9: connection timeout expired" in ready["message"]
    # The pooler's part waits (its clients are hidden): no scaling, nothing for pooled clients.
    assert not [c for c in kube.calls if c[0] == "scale"]
    # A direct leak is still held (measured before: a PgBouncer pod starting or crash-looping
    # stopped every action, direct leaks included).
    assert monitor.terminated
    assert "ProbeFailed" in {r for _, r, _ in events}


def test_a_pooler_that_answers_again_lifts_the_block() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    out = run_cycle(deps, spec=POOLER_SPEC, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert monitor.terminated


def test_a_restart_is_recorded_with_its_cooldown_before_it_is_carried_out() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    written: list[dict[str, Any]] = []

    async def write_status(status: dict[str, Any]) -> None:
        written.append(status)
        kube.calls.append(("status", status["lastAction"]["result"]))

    deps = dataclasses.replace(deps, write_status=write_status)
    out = run_cycle(deps, old_status=OVER_STATUS)
    assert kube.calls == [("status", "Started"), ("evict", "web-1")]
    (intent,) = written
    assert intent["cooldownUntil"] == out["cooldownUntil"]
    assert intent["lastAction"]["type"] == "RestartPods"
    assert intent["lastAction"]["targets"] == out["lastAction"]["targets"]
    assert out["lastAction"]["result"] == "Succeeded"


def test_no_restart_when_the_intent_cannot_be_recorded() -> None:
    from connbudget.kube.api import KubeError

    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])

    async def unreachable(status: dict[str, Any]) -> None:
        raise KubeError(503, "the API server is unavailable")

    deps = dataclasses.replace(deps, write_status=unreachable)
    with pytest.raises(KubeError):
        run_cycle(deps, old_status=OVER_STATUS)
    assert kube.calls == []
