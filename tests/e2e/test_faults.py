"""Faults of the database side, end to end: the operator runs, a leak runs, something breaks.

After each fault: no duplicate or runaway action, no healthy pod touched, status tells the truth,
and the operator recovers by itself. The sandbox's PostgreSQL is shared by the whole session, so
every test puts back what it broke (server started, password restored) even when it fails.
"""

from __future__ import annotations

import os
import signal
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
    deploy_steady,
    planted_secrets,
    pod_names,
    ready,
    refresh_pids,
)
from sandbox import postgres, procs
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads
from sandbox.network import NETNS
from sandbox.postgres import MONITOR_ROLE

pytestmark = pytest.mark.sandbox

OUTAGE_SECONDS = 5  # a restart: the server is down this long
PARTITION_SECONDS = 60  # the issue's "unreachable for a minute"
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
        refresh_pids(sandbox)

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
    assert_no_secret(budgets, ["leaky"], op, planted_secrets(sandbox))
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
        assert_no_secret(budgets, ["leaky"], op, planted_secrets(sandbox))
        print(f"noticed the partition in {noticed:.1f}s, recovered {took:.1f}s after it healed")
    finally:
        proxy.close()


def test_the_monitoring_password_rotated_then_the_secret_fixed(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: Operator
) -> None:
    db = sandbox.db
    rotated = "Rot4ted-" + db.monitor_password[::-1]
    budgets.secret("pg-monitor", db.monitor_dsn)
    # Four idle connections, far below the budget: too few to be a leak, nothing to do.
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "2", "LEAK_MAX": "4"})
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
    assert_no_secret(budgets, ["leaky"], op, [rotated, *planted_secrets(sandbox)])


def probe_backend(sandbox: Sandbox) -> tuple[int, float] | None:
    """(pid, backend_start) of the operator's monitoring connection, seen by the superuser."""
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
        rows = su.execute(
            "SELECT pid, extract(epoch FROM backend_start)::float8 FROM pg_stat_activity "
            "WHERE application_name = 'connbudget-probe'"
        ).fetchall()
    return (int(rows[0][0]), float(rows[0][1])) if len(rows) == 1 else None


def test_a_full_database_is_still_seen_and_acted_on(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: Operator
) -> None:
    db = sandbox.db
    budgets.secret("pg-monitor", db.monitor_dsn)
    steady = deploy_steady(workloads, namespace)
    # Paused while the leak fills the server: the operator watches, but lets it fill.
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 30},
            remediation={
                "steps": ["TerminateIdle"],
                "breachSeconds": 0,
                "terminateIdle": {"minIdleSeconds": 1, "maxPerCycle": 50},
            },
        ),
        annotations={"connbudget.io/paused": "true"},
    )
    wait_until(lambda: probe_backend(sandbox), 30, "the monitoring connection open")
    monitor = probe_backend(sandbox)
    workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "20", "LEAK_MAX": "80"})

    def full() -> bool:
        try:
            psycopg.connect(db.app_dsn, connect_timeout=5).close()
        except psycopg.OperationalError as e:
            return "too many clients" in str(e) or "reserved" in str(e)
        return False

    wait_until(full, 60, "the server full (max_connections reached)")
    # Full, and still seen: usage near max_connections, probed after the server filled up.
    wait_until(
        lambda: (
            budgets.status("leaky").get("usage", {}).get("connections", 0)
            >= db.max_connections - 10
        ),
        15,
        "usage of the full server reported",
    )
    assert ready(budgets, "leaky") == "True:ProbeSucceeded"

    budgets.patch("leaky", {"metadata": {"annotations": {"connbudget.io/paused": None}}})
    event = budgets.wait_event("IdleConnectionsTerminated", timeout=30)
    assert "idle backends of leaky-" in event.message
    # The same monitoring backend throughout: the operator was never locked out, never reconnected.
    assert probe_backend(sandbox) == monitor
    assert "connbudget_monitor_connections 1.0" in op.metrics()
    assert pod_names(workloads, namespace, "app=steady") == steady
    steady_pod = next(iter(steady))
    log = (sandbox.state_dir / "pods" / namespace / steady_pod / "app.log").read_text()
    assert "query_failed" not in log  # the steady app's connections were never cut
    assert_no_secret(budgets, ["leaky"], op, planted_secrets(sandbox))


def pgbouncer_pid(sandbox: Sandbox, pod: str) -> int:
    """The pid of the pgbouncer process running in sandbox pod ``pod``."""
    pid = procs.pgbouncer_pid(sandbox.tag, pod)
    if pid is None:
        raise LookupError(f"no pgbouncer process in pod {pod}")
    return pid


def test_pgbouncer_down(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: Operator
) -> None:
    if sandbox.network.mode != NETNS:
        pytest.skip("pooler pods need their own addresses (netns mode)")
    from sandbox.postgres import BOUNCER_ADMIN

    db = sandbox.db
    budgets.secret("pg-monitor", db.monitor_dsn)
    budgets.secret(
        "pgbouncer-admin",
        db.dsn(BOUNCER_ADMIN, db.bouncer_admin_password, 6432, "pgbouncer"),
    )
    (pooler_ip,) = workloads.deploy_pgbouncer(namespace, pool_size=30)
    (pooler_pod,) = pod_names(workloads, namespace, "app=pgbouncer")
    workloads.deploy(
        namespace,
        "leaky",
        replicas=1,
        via_pooler=pooler_ip,
        env={"LEAK_RATE": "2", "LEAK_MAX": "6"},
    )
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 50},
            remediation={"breachSeconds": 1, "cooldownSeconds": 60},
            pooler={
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
                "minReplicas": 1,
                "maxReplicas": 2,
                "serverConnectionsPerReplica": 30,
                "adminSecretRef": {"name": "pgbouncer-admin"},
            },
        ),
    )
    ready_is(budgets, "leaky", "True:ProbeSucceeded", 30)
    wait_until(
        lambda: budgets.status("leaky").get("pooler", {}).get("serverConnections", 0) > 0,
        30,
        "the pooler's server connections seen",
    )

    pid = pgbouncer_pid(sandbox, pooler_pod)
    os.kill(pid, signal.SIGSTOP)  # hung: accepts connections, never answers
    try:
        ready_is(budgets, "leaky", "False:ProbeFailed", NOTICE_TIMEOUT)
        cond = budgets.condition("leaky", "Ready")
        assert cond is not None
        assert "pooler probe failed" in cond["message"], cond
        assert pooler_ip in cond["message"], cond
        acted = len(actions(op))
        time.sleep(OUTAGE_SECONDS)
        assert len(actions(op)) == acted  # nothing done on half the picture
        assert ready(budgets, "leaky") == "False:ProbeFailed"
    finally:
        os.kill(pid, signal.SIGCONT)
    ready_is(budgets, "leaky", "True:ProbeSucceeded", RECOVERY_TIMEOUT)
    # Clients queued while it was stopped may be waiting now: scaling up within maxReplicas is
    # a fair answer, once; the pooler pod itself is never restarted.
    assert len(budgets.events("PoolerScaled")) <= 1
    assert pooler_pod in pod_names(workloads, namespace, "app=pgbouncer")
    assert op.proc.poll() is None
    assert_no_secret(budgets, ["leaky"], op, planted_secrets(sandbox))
