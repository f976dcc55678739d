"""Faults of the Kubernetes side, end to end: the API server restarts, the operator dies between
acting and reporting, two replicas run at once.

After each: no duplicate or runaway action, no healthy pod touched, status tells the truth, the
operator recovers by itself.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import psycopg
import pytest

from e2e.conftest import Budgets, Operator, start_operator, wait_until
from e2e.reliability import (
    StatusGate,
    actions,
    assert_no_secret,
    budget_spec,
    deploy_steady,
    planted_secrets,
    pod_names,
    ready,
    restart_apiserver,
)
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads

pytestmark = pytest.mark.sandbox

APISERVER_DOWN_SECONDS = 5
# A dead leader's Lease expires 15 s after the others last saw it renewed; they try every 2 s
# (kube.lease).
TAKEOVER_TIMEOUT = 40.0
RESTART_ONCE = {
    "steps": ["RestartPods"],
    "breachSeconds": 1,
    "cooldownSeconds": 300,  # longer than any test: a second restart would be a duplicate
    "terminateIdle": {"minIdleSeconds": 1},
    "restartPods": {"minPodAgeSeconds": 0},
}


def leading(op: Operator) -> bool:
    """What the replica's liveness endpoint says about leading."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=2) as r:
            return bool(json.loads(r.read()).get("leading"))
    except OSError:
        return False


def probe_backends(sandbox: Sandbox) -> list[int]:
    """Pids of the operators' monitoring connections (every replica's)."""
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
        rows = su.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'connbudget-probe'"
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def evictions(budgets: Budgets) -> int:
    return sum(int(e.count or 1) for e in budgets.events("PodEvicted"))


def test_the_operator_killed_between_acting_and_reporting_does_not_restart_twice(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    kube_api: kubernetes.client.ApiClient,
    tmp_path: Path,
) -> None:
    gate = StatusGate(kube_api, namespace, tmp_path / "gate")
    first: Operator | None = None
    second: Operator | None = None
    try:
        budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
        steady = deploy_steady(workloads, namespace)
        workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "3", "LEAK_MAX": "30"})
        leaky = pod_names(workloads, namespace, "app=leaky")
        # Hold the status write that reports the finished restart, then lose it.
        gate.arm(type="RestartPods", result="Succeeded")
        first = start_operator(sandbox, namespace, tmp_path / "operator-1.log")
        budgets.create(
            "leaky",
            budget_spec("leaky", budget={"maxConnections": 8}, remediation=RESTART_ONCE),
        )
        assert gate.held.wait(60), "no restart was reported"
        first.stop(signal.SIGKILL)  # the pod is evicted; the report of it never lands
        gate.release()
        budgets.wait_event("PodEvicted", timeout=10)
        st = budgets.status("leaky")
        # What survived is the intent, written before acting: the action and its cooldown.
        assert st["lastAction"]["type"] == "RestartPods"
        assert st["lastAction"]["result"] == "Started"
        assert st["cooldownUntil"]
        cooldown = st["cooldownUntil"]

        second = start_operator(sandbox, namespace, tmp_path / "operator-2.log")
        probed = st.get("lastProbeTime")
        wait_until(
            lambda: budgets.status("leaky").get("lastProbeTime") != probed,
            30,
            "the new operator probing",
        )
        wait_until(
            lambda: "Cooldown" in json.dumps(budgets.status("leaky").get("remediation")),
            30,
            "the new operator waiting for the cooldown",
        )
        time.sleep(5)  # several more cycles, still over budget
        assert evictions(budgets) == 1
        assert budgets.status("leaky")["cooldownUntil"] == cooldown
        assert len(leaky - pod_names(workloads, namespace, "app=leaky")) == 1
        assert pod_names(workloads, namespace, "app=steady") == steady
        assert not [a for a in actions(second) if a.get("action") == "RestartPods"]
        for replica in (first, second):
            assert_no_secret(budgets, ["leaky"], replica, planted_secrets(sandbox))
    finally:
        for maybe in (first, second):
            if maybe is not None:
                maybe.stop()
        gate.close()


def test_the_operator_killed_between_deciding_and_acting_restarts_once_after(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    kube_api: kubernetes.client.ApiClient,
    tmp_path: Path,
) -> None:
    gate = StatusGate(kube_api, namespace, tmp_path / "gate")
    first: Operator | None = None
    second: Operator | None = None
    try:
        budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
        workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "3", "LEAK_MAX": "30"})
        leaky = pod_names(workloads, namespace, "app=leaky")
        # Hold the write of the decision itself: the operator dies before it acts.
        gate.arm(type="RestartPods", result="Started")
        first = start_operator(sandbox, namespace, tmp_path / "operator-1.log")
        budgets.create(
            "leaky",
            budget_spec("leaky", budget={"maxConnections": 8}, remediation=RESTART_ONCE),
        )
        assert gate.held.wait(60), "no restart was decided"
        first.stop(signal.SIGKILL)
        gate.release()
        time.sleep(2)
        assert evictions(budgets) == 0  # nothing was done: it could not be recorded first
        assert pod_names(workloads, namespace, "app=leaky") == leaky

        second = start_operator(sandbox, namespace, tmp_path / "operator-2.log")
        budgets.wait_event("PodEvicted", timeout=60)
        wait_until(
            lambda: "Cooldown" in json.dumps(budgets.status("leaky").get("remediation")),
            30,
            "the new operator waiting for the cooldown",
        )
        time.sleep(3)
        assert evictions(budgets) == 1
        assert budgets.status("leaky")["lastAction"]["result"] == "Succeeded"
        assert len(leaky - pod_names(workloads, namespace, "app=leaky")) == 1
    finally:
        for maybe in (first, second):
            if maybe is not None:
                maybe.stop()
        gate.close()


def test_two_replicas_one_acts_and_the_other_takes_over_when_it_dies(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, tmp_path: Path
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    steady = deploy_steady(workloads, namespace)
    workloads.deploy(namespace, "leaky", replicas=3, env={"LEAK_RATE": "3", "LEAK_MAX": "200"})
    leaky = pod_names(workloads, namespace, "app=leaky")
    ops = [
        start_operator(sandbox, namespace, tmp_path / f"replica-{i}.log", standalone=False)
        for i in range(2)
    ]
    try:
        budgets.create(
            "leaky",
            budget_spec(
                "leaky",
                budget={"maxConnections": 12},
                # 9 connections a second, abandoned after 3 s idle: about 30 held, more than
                # terminations can bring within 12, so a pod is restarted as well.
                remediation={
                    **RESTART_ONCE,
                    "steps": ["TerminateIdle", "RestartPods"],
                    "terminateIdle": {"minIdleSeconds": 3},
                },
            ),
        )
        leader = wait_until(
            lambda: next((op for op in ops if leading(op)), None), 30, "a leader elected"
        )
        follower = next(op for op in ops if op is not leader)
        budgets.wait_event("PodEvicted", timeout=60)
        time.sleep(3)
        assert actions(leader)
        assert not actions(follower)  # it watches, it never acts
        assert not leading(follower)
        assert evictions(budgets) == 1
        # The standby holds its own monitoring connection: on taking over it needs no new one,
        # though nobody acts on the leak while the Lease runs out and the server may fill up.
        wait_until(lambda: len(probe_backends(sandbox)) == 2, 30, "one connection per replica")
        standby = set(probe_backends(sandbox))

        leader.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: leading(follower), TAKEOVER_TIMEOUT, "the follower taking over")
        took = time.monotonic() - killed_at
        wait_until(lambda: actions(follower), 30, "the new leader acting")
        assert set(probe_backends(sandbox)) <= standby
        time.sleep(3)
        # The new leader reads the cooldown from status: no second restart.
        assert evictions(budgets) == 1
        assert not [a for a in actions(follower) if a.get("action") == "RestartPods"]
        assert len(leaky - pod_names(workloads, namespace, "app=leaky")) == 1
        assert pod_names(workloads, namespace, "app=steady") == steady
        lease = kubernetes.client.CoordinationV1Api(budgets.core.api_client).read_namespaced_lease(
            "connbudget-operator", namespace
        )
        assert lease.spec.lease_transitions >= 1
        for op in ops:
            assert_no_secret(budgets, ["leaky"], op, planted_secrets(sandbox))
        print(f"the follower took over {took:.1f}s after the leader was killed")
    finally:
        for op in ops:
            op.stop()


def test_kube_apiserver_restarted_while_the_operator_runs(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, tmp_path: Path
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    steady = deploy_steady(workloads, namespace)
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "3", "LEAK_MAX": "200"})
    op = start_operator(sandbox, namespace, tmp_path / "operator.log", standalone=False)
    try:
        budgets.create(
            "leaky",
            budget_spec(
                "leaky",
                budget={"maxConnections": 10},
                remediation={
                    "steps": ["TerminateIdle"],
                    "breachSeconds": 0,
                    "terminateIdle": {"minIdleSeconds": 1},
                },
            ),
        )
        budgets.wait_event("IdleConnectionsTerminated", timeout=60)
        # The watches come back: a change made after the restart is seen (paused, then not).
        t0 = time.monotonic()
        restart_apiserver(sandbox, APISERVER_DOWN_SECONDS)
        print(f"API server restarted in {time.monotonic() - t0:.1f}s")
        assert op.proc.poll() is None

        # Right after a start the API server may still answer 503 for custom resources.
        def pause() -> bool:
            budgets.patch("leaky", {"metadata": {"annotations": {"connbudget.io/paused": "true"}}})
            return True

        wait_until(pause, 30, "the budget patched")
        wait_until(lambda: budgets.status("leaky").get("phase") == "Paused", 60, "Paused seen")
        print(f"pause seen {time.monotonic() - t0:.1f}s after the restart began")
        paused_at = len(actions(op))
        time.sleep(3)
        assert len(actions(op)) == paused_at
        before = {e.metadata.name: e.count for e in budgets.events("IdleConnectionsTerminated")}
        budgets.patch("leaky", {"metadata": {"annotations": {"connbudget.io/paused": None}}})

        def acted_again() -> bool:
            now: dict[str, Any] = {
                e.metadata.name: e.count for e in budgets.events("IdleConnectionsTerminated")
            }
            return now != before

        wait_until(acted_again, 60, "acting again after the restart")
        print(f"acting again {time.monotonic() - t0:.1f}s after the restart began")
        assert ready(budgets, "leaky") == "True:ProbeSucceeded"
        assert leading(op)
        assert pod_names(workloads, namespace, "app=steady") == steady
        assert_no_secret(budgets, ["leaky"], op, planted_secrets(sandbox))
    finally:
        op.stop()
