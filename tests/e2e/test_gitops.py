"""GitOps: Flux's health rules (kstatus, built from sigs.k8s.io/cli-utils) and the Argo CD health
check read the statuses the operator writes, and re-applying Git's manifests after a remediation
is a server-side-apply no-op (the operator owns status and the pooler's replicas, nothing Git
manages)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from e2e.conftest import Budgets, Operator, kubectl
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.network import NETNS
from sandbox.postgres import BOUNCER_ADMIN
from unit.argocd import health as argocd_health

pytestmark = pytest.mark.sandbox
GITOPS = "kustomize-controller"  # Flux's field manager; Argo CD's is "argocd-controller"


def kstatus(sandbox: Sandbox, namespace: str) -> dict[str, dict[str, str]]:
    """name → {"status", "message"} for every ConnectionBudget, as Flux's health check sees it."""
    listed = kubectl(sandbox, "get", "connectionbudgets", "-n", namespace, "-o", "json").stdout
    res = subprocess.run(
        [str(sandbox.bin_dir / "kstatus")],
        input=listed,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    return {r["name"]: {"status": r["status"], "message": r["message"]} for r in rows}


def test_flux_health_checks_read_the_operators_status(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(namespace, "steady", replicas=1, image="sandbox.local/steady-app:dev")
    selector = {"matchLabels": {"app": "steady"}}
    budgets.create(
        "healthy",
        {
            "database": {"secretRef": {"name": "pg-monitor"}},
            "budget": {"maxConnections": 50},
            "selector": selector,
            "pollSeconds": 1,
        },
    )
    budgets.create(
        "no-secret",
        {
            "database": {"secretRef": {"name": "not-there"}},
            "budget": {"maxConnections": 50},
            "selector": selector,
            "pollSeconds": 1,
        },
    )

    def verdicts() -> dict[str, dict[str, str]] | None:
        v = kstatus(sandbox, namespace)
        done = (
            v.get("healthy", {}).get("status") == "Current"
            and v.get("no-secret", {}).get("status") == "Failed"
        )
        return v if done else None

    v = eventually(verdicts, timeout=45, interval=1, what="kstatus Current and Failed")
    assert "not-there" in v["no-secret"]["message"]  # Flux shows what to fix
    # Argo CD's health check, shipped in manifests/gitops, on the same live objects.
    assert argocd_health(budgets.get("healthy"))[0] == "Healthy"
    state, message = argocd_health(budgets.get("no-secret"))
    assert state == "Degraded"
    assert "not-there" in message

    # A spec the operator has not seen yet is in progress, not healthy.
    operator.stop()
    budgets.patch("healthy", {"spec": {"budget": {"maxConnections": 40}}})
    assert kstatus(sandbox, namespace)["healthy"]["status"] == "InProgress"
    assert argocd_health(budgets.get("healthy"))[0] == "Progressing"


def _manifest(obj: dict[str, Any]) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


def test_reapplying_git_manifests_after_a_remediation_is_a_no_op(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    if sandbox.network.mode != NETNS:
        pytest.skip("pooler pods need their own addresses (netns mode)")
    db = sandbox.db
    admin_dsn = db.dsn(BOUNCER_ADMIN, db.bouncer_admin_password, 6432, "pgbouncer")
    secrets = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": {"dsn": dsn},
        }
        for name, dsn in [
            ("pg-monitor", db.monitor_dsn),
            # The host is a placeholder: the operator asks each pooler pod at its own address.
            ("pgbouncer-admin", admin_dsn.replace(f"@{db.host}:", "@pooler:")),
        ]
    ]
    budget = {
        "apiVersion": "connbudget.io/v1alpha1",
        "kind": "ConnectionBudget",
        "metadata": {"name": "leaky", "namespace": namespace},
        "spec": {
            "database": {"secretRef": {"name": "pg-monitor"}},
            "budget": {"maxConnections": 4},
            "selector": {"matchLabels": {"app": "leaky"}},
            "pollSeconds": 1,
            "remediation": {"steps": ["ScalePooler"], "breachSeconds": 1, "cooldownSeconds": 60},
            "pooler": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
                "minReplicas": 1,
                "maxReplicas": 2,
                "serverConnectionsPerReplica": 5,
                "adminSecretRef": {"name": "pgbouncer-admin"},
            },
        },
    }
    git = "---\n".join(_manifest(o) for o in [*secrets, budget])
    apply = ("apply", "--server-side", f"--field-manager={GITOPS}", "-f", "-")
    kubectl(sandbox, *apply, stdin=git)

    ips = workloads.deploy_pgbouncer(namespace, replicas=2, pool_size=5)
    # Git also holds the pooler's Deployment: adopt it as Flux does (forcing ownership once).
    deployed = json.loads(
        kubectl(sandbox, "get", "deployment", "pgbouncer", "-n", namespace, "-o", "json").stdout
    )
    pooler: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "pgbouncer", "namespace": namespace, "labels": {"app": "pgbouncer"}},
        "spec": {k: deployed["spec"][k] for k in ("replicas", "selector", "template")},
    }
    kubectl(sandbox, *apply, "--force-conflicts", stdin=_manifest(pooler))
    workloads.deploy(
        namespace, "leaky", replicas=1, via_pooler=ips[0], env={"LEAK_RATE": "5", "LEAK_MAX": "8"}
    )
    budgets.wait_event("PoolerScaled", timeout=60)
    before = budgets.get("leaky")

    # Re-applying the budget and its Secrets changes nothing: no conflict, same resourceVersion.
    kubectl(sandbox, *apply, stdin=git)
    after = budgets.get("leaky")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    owners = {(m["manager"], m.get("subresource", "")) for m in after["metadata"]["managedFields"]}
    assert ("connbudget", "status") in owners
    assert {o for o in owners if o[0] == "connbudget"} == {("connbudget", "status")}

    # The pooler's replicas are the operator's now: with replicas in Git the apply conflicts
    # (hence ignoreDifferences for Argo CD, and no replicas in Git for Flux) ...
    conflict = kubectl(sandbox, *apply, stdin=_manifest(pooler), check=False)
    assert conflict.returncode != 0
    assert "conflict" in conflict.stderr.lower()
    assert ".spec.replicas" in conflict.stderr
    assert '"connbudget"' in conflict.stderr
    # ... and without them it is a no-op that leaves the operator's choice in place.
    del pooler["spec"]["replicas"]
    rv = json.loads(
        kubectl(sandbox, "get", "deployment", "pgbouncer", "-n", namespace, "-o", "json").stdout
    )["metadata"]["resourceVersion"]
    kubectl(sandbox, *apply, stdin=_manifest(pooler))
    now = json.loads(
        kubectl(sandbox, "get", "deployment", "pgbouncer", "-n", namespace, "-o", "json").stdout
    )
    assert now["spec"]["replicas"] == 1
    assert now["metadata"]["resourceVersion"] == rv
