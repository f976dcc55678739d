"""Security: the least database role, TLS verified against a CA from the Secret, no secret shown.

The sandbox PostgreSQL serves TLS for this module only (turned on by reload, off again after), with
a certificate signed by a self-signed CA made for the purpose.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from e2e.conftest import Budgets, start_operator, wait_until
from e2e.reliability import assert_no_secret, budget_spec, planted_secrets, ready
from sandbox import postgres, tls
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads
from sandbox.postgres import MONITOR_ROLE

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def tls_ca(sandbox: Sandbox) -> Iterator[Path]:
    """The CA that signed the sandbox PostgreSQL's certificate, while TLS is on."""
    ca = postgres.enable_tls(sandbox.state_dir, sandbox.db)
    try:
        yield ca
    finally:
        postgres.disable_tls(sandbox.db)


def test_the_monitoring_role_has_pg_monitor_and_pg_signal_backend_and_nothing_more(
    sandbox: Sandbox,
) -> None:
    # Every end-to-end test runs the operator with this role: what it proves, it proves with it.
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
        row = su.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = %s",
            (MONITOR_ROLE,),
        ).fetchone()
        granted = su.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
            (MONITOR_ROLE,),
        ).fetchall()
        owns = su.execute(
            "SELECT count(*) FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
            "WHERE r.rolname = %s",
            (MONITOR_ROLE,),
        ).fetchone()
    assert row == (False, False, False, False, False)
    assert {g for (g,) in granted} == {"pg_monitor", "pg_signal_backend"}
    assert owns == (0,)


def test_tls_verify_full_with_the_ca_from_the_secret(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    tls_ca: Path,
    tmp_path: Path,
) -> None:
    db = sandbox.db
    dsn = f"{db.monitor_dsn}?sslmode=verify-full"
    budgets.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "pg-monitor"},
            "stringData": {"dsn": dsn, "ca.crt": tls_ca.read_text()},
        },
    )
    other_ca, _ = tls.make_ca(tmp_path / "other", "not-the-server-ca", days=1)
    budgets.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "pg-wrong-ca"},
            # No sslmode: a CA given means verify-full, so the wrong CA must fail.
            "stringData": {"dsn": db.monitor_dsn, "ca.crt": other_ca.read_text()},
        },
    )
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "4", "LEAK_MAX": "12"})
    private_tmp = tmp_path / "operator-tmp"
    private_tmp.mkdir()
    op = start_operator(
        sandbox, namespace, tmp_path / "operator.log", env={"TMPDIR": str(private_tmp)}
    )
    try:
        budgets.create(
            "wrong-ca",
            budget_spec(
                "leaky",
                database={"secretRef": {"name": "pg-wrong-ca", "caKey": "ca.crt"}},
                budget={"maxConnections": 4},
                remediation={"breachSeconds": 0, "terminateIdle": {"minIdleSeconds": 1}},
            ),
        )
        budgets.create(
            "tls",
            budget_spec(
                "leaky",
                database={"secretRef": {"name": "pg-monitor", "caKey": "ca.crt"}},
                budget={"maxConnections": 4},
                remediation={
                    "steps": ["TerminateIdle"],
                    "breachSeconds": 0,
                    "terminateIdle": {"minIdleSeconds": 1},
                },
            ),
        )
        event = budgets.wait_event("IdleConnectionsTerminated", timeout=60)
        assert "idle backends of leaky-" in event.message
        assert ready(budgets, "tls") == "True:ProbeSucceeded"
        wait_until(
            lambda: ready(budgets, "wrong-ca") == "False:DatabaseUnreachable",
            30,
            "the wrong CA refused",
        )
        cond = budgets.condition("wrong-ca", "Ready")
        assert cond is not None
        assert "certificate verify failed" in cond["message"]
        # The operator's one connection is TLS, verified against the CA from the Secret.
        with psycopg.connect(db.superuser_dsn, autocommit=True) as su:
            probes = su.execute(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid "
                "WHERE a.application_name = 'connbudget-probe'"
            ).fetchall()
        assert probes == [(True,)]
        # The CA went to a private file for each connection attempt, removed right after.
        assert list(private_tmp.glob("connbudget-ca-*")) == []
        assert op.proc.poll() is None
        assert_no_secret(budgets, ["tls", "wrong-ca"], op, [dsn, *planted_secrets(sandbox)])
    finally:
        op.stop()
