"""Awkward pods, end to end: a PodDisruptionBudget that blocks every eviction, a selector over
several workloads, a pod already terminating, and a new pod that got a dead pod's IP.

Both tests need pods with their own addresses (netns mode). Connections that outlive their pod
are opened from the pod's network namespace by a process of the test (``clients_at``).
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.conftest import Budgets, Operator, wait_until
from e2e.reliability import (
    actions,
    alive_backends,
    budget_spec,
    clients_at,
    deploy_steady,
    pod_names,
)
from sandbox.core import Sandbox
from sandbox.fixtures import LEAKY_IMAGE, Workloads
from sandbox.network import NETNS

pytestmark = pytest.mark.sandbox

HOLD_FINALIZER = "test.connbudget.io/hold"  # keeps a deleted pod Terminating
COOLDOWN_SECONDS = 4
IP_REUSE_GAP_SECONDS = 5
WATCH_SECONDS = 14  # how long the blocked operator is watched for runaway retries


@pytest.fixture(autouse=True)
def _netns(sandbox: Sandbox) -> None:
    if sandbox.network.mode != NETNS:
        pytest.skip("pods need their own addresses (netns mode)")


def bare_pod(
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    name: str,
    labels: dict[str, str],
    finalizers: list[str] | None = None,
) -> str:
    """A pod that holds no connection of its own (a leaky app with LEAK_MAX 0); return its IP."""
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {
                "name": name,
                "labels": labels,
                "finalizers": finalizers or [],
            },
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "app",
                        "image": LEAKY_IMAGE,
                        "env": [{"name": "LEAK_MAX", "value": "0"}],
                    }
                ],
            },
        },
    )

    def running() -> str | None:
        pod = core.read_namespaced_pod(name, namespace)
        return (
            str(pod.status.pod_ip) if pod.status.phase == "Running" and pod.status.pod_ip else None
        )

    return str(wait_until(running, 60, f"pod {name} running"))


def pg_log(sandbox: Sandbox) -> Path:
    return sandbox.state_dir / "logs" / "postgres.log"


def terminated_by_admin(sandbox: Sandbox, since: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` PostgreSQL logged as ended by pg_terminate_backend after ``since``."""
    with pg_log(sandbox).open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [p for p in pids if f"[{p}] FATAL:  terminating connection due to administrator" in text]


def owners(budgets: Budgets, name: str) -> dict[str, dict[str, Any]]:
    usage = budgets.status(name).get("usage") or {}
    return {o["owner"]: o for o in usage.get("byOwner", [])}


def test_a_pdb_blocking_every_eviction_over_several_workloads_and_a_terminating_pod(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    steady = deploy_steady(workloads, namespace)
    tier = {"tier": "web"}
    # Leaks that go on (each opens connections while its old ones sit unused, for 10 s): a pod
    # that opens a few and stops is a pool warming up, not a leak.
    leak = {"LEAK_RATE": "2", "LEAK_MAX": "20"}
    workloads.deploy(namespace, "web-a", replicas=2, labels=tier, env=leak)
    workloads.deploy(namespace, "web-b", replicas=1, labels=tier, env=leak)
    # The worst pod of all, but already on its way out: never a target.
    old_ip = bare_pod(core, namespace, "web-old", {**tier, "app": "web-old"}, [HOLD_FINALIZER])
    kubernetes.client.PolicyV1Api(kube_api).create_namespaced_pod_disruption_budget(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": tier}},
        },
    )
    try:
        check_blocked(sandbox, workloads, namespace, budgets, operator, core, old_ip, steady)
    finally:
        # Let the namespace go.
        core.patch_namespaced_pod("web-old", namespace, {"metadata": {"finalizers": None}})


def check_blocked(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    core: kubernetes.client.CoreV1Api,
    old_ip: str,
    steady: set[str],
) -> None:
    tier = {"tier": "web"}
    with clients_at(sandbox, old_ip, 15, "web-old") as old_backends:
        core.delete_namespaced_pod("web-old", namespace)
        wait_until(
            lambda: core.read_namespaced_pod("web-old", namespace).metadata.deletion_timestamp,
            30,
            "web-old terminating",
        )
        pods = pod_names(workloads, namespace, "tier=web")
        assert len(pods) == 3
        budgets.create(
            "web",
            budget_spec(
                "web",
                selector={"matchLabels": tier},
                budget={"maxConnections": 10},
                remediation={
                    "steps": ["RestartPods"],
                    "breachSeconds": 1,
                    "cooldownSeconds": COOLDOWN_SECONDS,
                    "restartPods": {"minPodAgeSeconds": 0, "maxPodsPerCycle": 3},
                },
            ),
        )
        first = budgets.wait_event("RestartBlocked", timeout=60)
        started = time.monotonic()
        time.sleep(WATCH_SECONDS)
        elapsed = time.monotonic() - started

        blocked = [a for a in actions(operator) if a.get("action") == "RestartPods"]
        # Retried after each cooldown, never in a loop; never bypassed.
        per_pod = collections.Counter(
            a["detail"].split("eviction of pod ")[1].split()[0] for a in blocked
        )
        assert per_pod
        assert max(per_pod.values()) <= 2 + elapsed / COOLDOWN_SECONDS, per_pod
        assert {a["result"] for a in blocked} == {"Blocked"}
        assert not budgets.events("PodEvicted")
        assert not budgets.events("PodDeleted")
        assert all("web-old" not in a["detail"] for a in blocked)
        assert "web-old" not in first.message
        # Every pod is still there: both workloads, the terminating pod, the steady app.
        assert pod_names(workloads, namespace, "tier=web") == pods
        assert pod_names(workloads, namespace, "app=steady") == steady
        assert alive_backends(sandbox, old_backends) == 15
        # Each workload is accounted for on its own.
        seen = owners(budgets, "web")
        assert {"Deployment/web-a", "Deployment/web-b"} <= set(seen)
        assert seen["Deployment/web-a"]["pods"] == 2
        assert budgets.status("web")["lastAction"]["result"] == "Blocked"


def test_a_new_pod_with_a_dead_pods_ip_is_not_blamed_for_its_backends(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    ghost_ip = bare_pod(core, namespace, "ghost", {"app": "ghost"})
    log_start = pg_log(sandbox).stat().st_size
    with clients_at(sandbox, ghost_ip, 12, "ghost-client") as ghosts:
        # The pod dies; its connections stay open on the server (its node went away, say).
        core.delete_namespaced_pod("ghost", namespace)
        wait_until(
            lambda: (
                "ghost" not in {p.metadata.name for p in core.list_namespaced_pod(namespace).items}
            ),
            30,
            "the ghost pod gone",
        )
        # The new pod starts well after the old backends did: more than the clock-skew tolerance
        # (2 s) plus the second that startTime's precision may cost.
        time.sleep(IP_REUSE_GAP_SECONDS)
        # A leak that goes on (a pod that opens a few and stops is a pool warming up).
        workloads.deploy(namespace, "web", replicas=1, env={"LEAK_RATE": "4", "LEAK_MAX": "20"})
        (web,) = workloads.pods(namespace, "app=web")
        # The kubelet gives the lowest free address: the dead pod's.
        assert web.status.pod_ip == ghost_ip
        budgets.create(
            "web",
            budget_spec(
                "web",
                budget={"maxConnections": 8},
                remediation={
                    "steps": ["TerminateIdle"],
                    "breachSeconds": 0,
                    "terminateIdle": {"minIdleSeconds": 1},
                },
            ),
        )
        event = budgets.wait_event("IdleConnectionsTerminated", timeout=60)
        time.sleep(3)
        # The old backends share the address but predate the pod: nobody's, never terminated.
        # (Some may have been reset when the new pod came up on their address: its kernel answers
        # the server's packets for connections it never made. Those are the server's doing.)
        assert not terminated_by_admin(sandbox, log_start, ghosts)
        left = alive_backends(sandbox, ghosts)
        assert left >= 1, "inconclusive: every old backend was reset before the operator looked"
        seen = owners(budgets, "web")
        assert seen.get("Deployment/web", {}).get("connections", 0) <= 20
        assert budgets.status("web")["usage"]["unattributed"] >= left
        assert f"idle backends of {web.metadata.name}" in event.message
        for a in actions(operator):
            assert "ghost" not in json.dumps(a)
