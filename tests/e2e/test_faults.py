"""Faults of the database side, end to end: the operator runs, a leak runs, something breaks.

After each fault: no duplicate or runaway action, no healthy pod touched, status tells the truth,
and the operator recovers by itself. The sandbox's PostgreSQL is shared by the whole session, so
every test puts back what it broke (server started, password restored) even when it fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from e2e.conftest import Budgets, Operator, start_operator, wait_until
from e2e.reliability import (
    PartitionProxy,
    actions,
    assert_no_secret,
    backends,
    budget_spec,
    pod_names,
    ready,
)
from sandbox import postgres
from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads
from sandbox.postgres import MONITOR_ROLE

pytestmark = pytest.mark.sandbox

OUTAGE_SECONDS = 5  # a restart: the server is down this long
PARTITION_SECONDS = 60  # the "unreachable for a minute"
# Recovery bound: the probe's reconnect backoff doubles up to 30 s, plus a connect timeout (5 s)
# and a poll; the operator must be back within this without help.
RECOVERY_TIMEOUT = 45.0
# The cycle must notice a dead network within the statement timeout (5 s) plus slack.
NOTICE_TIMEOUT = 20.0


def ready_is(budgets: Budgets, name: str, want: str, timeout: float) -> float:
    """Wait until Ready is ``want``; return how long it took."""
    t0 = time.monotonic()
    wait_until(lambda: ready(budgets, name) == want, timeout, f"Ready {want}")
    return time.monotonic() - t0


def event_count(budgets: Budgets, reason: str) -> int:
    """Occurrences of Events with ``reason`` (a repeated Event counts each time)."""
    return sum(int(e.count or 1) for e in budgets.events(reason))


@pytest.fixture
def op(sandbox: Sandbox, namespace: str, budgets: Budgets, tmp_path: Path) -> Iterator[Operator]:
    running = start_operator(sandbox, namespace, tmp_path / "operator.log")
    yield running
    running.stop()


def deploy_steady(workloads: Workloads, namespace: str) -> set[str]:
    """A well-behaved app outside every selector: it must never be touched."""
    workloads.deploy(
        namespace,
        "steady",
        image=STEADY_IMAGE,
        replicas=1,
        env={"POOL_SIZE": "2", "QUERY_INTERVAL": "0.5", "RECONNECT": "1"},
    )
    return pod_names(workloads, namespace, "app=steady")


def test_postgres_restarted_in_the_middle_of_an_episode(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: Operator
) -> None:
    db = sandbox.db
    budgets.secret("pg-monitor", db.monitor_dsn)
    steady = deploy_steady(workloads, namespace)
    workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "3", "LEAK_MAX": "200"})
    leaky = pod_names(workloads, namespace, "app=leaky")
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 12},
            remediation={
                "steps": ["TerminateIdle", "RestartPods"],
                "breachSeconds": 1,
                "cooldownSeconds": 300,
                "terminateIdle": {"minIdleSeconds": 1},
                "restartPods": {"minPodAgeSeconds": 0},
            },
        ),
    )
    budgets.wait_event("IdleConnectionsTerminated", timeout=60)

    postgres.stop_postgres(sandbox.state_dir)
    try:
        ready_is(budgets, "leaky", "False:DatabaseUnreachable", NOTICE_TIMEOUT)
        reachable = budgets.condition("leaky", "DatabaseReachable")
        assert reachable is not None
        assert reachable["status"] == "False"
        assert budgets.status("leaky")["phase"] == "Degraded"
        acted = len(actions(op))
        time.sleep(OUTAGE_SECONDS)
        assert len(actions(op)) == acted  # nothing is done blind
    finally:
        postgres.start_postgres(sandbox.state_dir, db)

    took = ready_is(budgets, "leaky", "True:ProbeSucceeded", RECOVERY_TIMEOUT)
    # The leak goes on after the restart (the pods reconnect), and the operator acts on it again.
    wait_until(lambda: len(actions(op)) > acted, 60, "an action after the restart")
    time.sleep(3)  # a few more cycles
    # At most one restart in the cooldown, whatever the outage did to the operator's memory.
    assert event_count(budgets, "PodEvicted") <= 1
    assert pod_names(workloads, namespace, "app=steady") == steady
    assert len(leaky - pod_names(workloads, namespace, "app=leaky")) <= 1
    # One monitoring connection, not one per reconnect attempt.
    assert sum(backends(db.monitor_dsn, "connbudget-probe").values()) == 1
    metrics = op.metrics()
    assert 'connbudget_probe_errors_total{budget="leaky",namespace=' in metrics
    assert "connbudget_monitor_connections 1.0" in metrics
    assert op.proc.poll() is None
    print(f"recovered {took:.1f}s after PostgreSQL came back")


def test_postgres_unreachable_for_a_minute(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: Operator
) -> None:
    db = sandbox.db
    proxy = PartitionProxy(db.host, db.pg_port)
    try:
        # The operator reaches PostgreSQL through the proxy; the app goes straight to it.
        budgets.secret(
            "pg-monitor",
            db.monitor_dsn.replace(f"@{db.host}:{db.pg_port}/", f"@127.0.0.1:{proxy.port}/"),
        )
        steady = deploy_steady(workloads, namespace)
        workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "1", "LEAK_MAX": "60"})
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
        ready_is(budgets, "leaky", "True:ProbeSucceeded", 30)

        proxy.cut()
        cut_at = time.monotonic()
        noticed = ready_is(budgets, "leaky", "False:DatabaseUnreachable", NOTICE_TIMEOUT)
        acted = len(actions(op))
        idle_killed = event_count(budgets, "IdleConnectionsTerminated")
        time.sleep(max(0.0, PARTITION_SECONDS - (time.monotonic() - cut_at)))
        assert ready(budgets, "leaky") == "False:DatabaseUnreachable"
        assert len(actions(op)) == acted
        assert event_count(budgets, "IdleConnectionsTerminated") == idle_killed
        assert op.healthy()  # the operator itself stays alive and answering

        proxy.heal()
        took = ready_is(budgets, "leaky", "True:ProbeSucceeded", RECOVERY_TIMEOUT)
        budgets.wait_event("IdleConnectionsTerminated", timeout=30)
        wait_until(
            lambda: event_count(budgets, "IdleConnectionsTerminated") > idle_killed,
            30,
            "acting again after the partition",
        )
        assert pod_names(workloads, namespace, "app=steady") == steady
        assert op.proc.poll() is None
        print(f"noticed the partition in {noticed:.1f}s, recovered {took:.1f}s after it healed")
    finally:
        proxy.close()


def test_the_monitoring_password_rotated_then_the_secret_fixed(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: Operator
) -> None:
    db = sandbox.db
    rotated = "Rot4ted-" + db.monitor_password[::-1]
    budgets.secret("pg-monitor", db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "2", "LEAK_MAX": "8"})
    budgets.create("leaky", budget_spec("leaky", budget={"maxConnections": 50}))
    ready_is(budgets, "leaky", "True:ProbeSucceeded", 30)

    def set_password(password: str) -> None:
        with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
            su.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(MONITOR_ROLE), sql.Literal(password)
                )
            )

    def drop_monitor_connection() -> int:
        with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
            rows = su.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'connbudget-probe'"
            ).fetchall()
        return len(rows)

    set_password(rotated)
    try:
        # The open connection was authenticated before: it goes on working.
        time.sleep(3)
        assert ready(budgets, "leaky") == "True:ProbeSucceeded"
        # Any reconnect (a failover, a restart, a network blip) now fails with the old password.
        assert drop_monitor_connection() == 1
        ready_is(budgets, "leaky", "False:AuthenticationFailed", NOTICE_TIMEOUT)
        budgets.wait_event("ProbeFailed", timeout=10)
        failed_at = time.monotonic()
        budgets.secret("pg-monitor", db.dsn(MONITOR_ROLE, rotated, db.pg_port, "app"))
        ready_is(budgets, "leaky", "True:ProbeSucceeded", RECOVERY_TIMEOUT)
        print(f"recovered {time.monotonic() - failed_at:.1f}s after the Secret was fixed")
    finally:
        set_password(db.monitor_password)
    assert not actions(op)  # the budget was never breached: nothing to do, nothing done
    assert_no_secret(budgets, ["leaky"], op, [rotated, db.monitor_password])
