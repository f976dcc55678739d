"""The Helm chart: lint, values schema, the CRD's single source, and an install on the sandbox
whose RBAC follows the watch mode (and a ServiceAccount that can do no more than it needs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from e2e.conftest import ROOT, Budgets, can_i, operator_pod
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads

pytestmark = pytest.mark.sandbox
CHART = ROOT / "manifests" / "helm" / "connbudget"


def helm(sandbox: Sandbox, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [str(sandbox.bin_dir / "helm"), "--kubeconfig", sandbox.kubeconfig, *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if check:
        assert res.returncode == 0, f"helm {' '.join(args)}: {res.stderr}"
    return res


def can(sandbox: Sandbox, verb: str, resource: str, namespace: str, sa: str) -> bool:
    return can_i(sandbox, sa, verb, resource, namespace)


def test_the_charts_crd_is_the_one_in_crds() -> None:
    chart_crd = CHART / "crds" / "connectionbudgets.connbudget.io.yaml"
    assert chart_crd.read_bytes() == (ROOT / "crds" / chart_crd.name).read_bytes()


def test_helm_lint_and_the_values_schema(sandbox: Sandbox) -> None:
    helm(sandbox, "lint", str(CHART), "--strict")
    helm(
        sandbox,
        "lint",
        str(CHART),
        "--strict",
        "--set",
        "watchNamespaces={a,b}",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
    )
    bad = helm(
        sandbox,
        "template",
        "x",
        str(CHART),
        "--kube-version",
        "1.36.0",
        "--set",
        "logFormat=xml",
        check=False,
    )
    assert bad.returncode != 0
    assert "logFormat" in bad.stderr
    typo = helm(
        sandbox,
        "template",
        "x",
        str(CHART),
        "--kube-version",
        "1.36.0",
        "--set",
        "watchNamespace=a",
        check=False,
    )
    assert typo.returncode != 0


@pytest.fixture
def release(sandbox: Sandbox, crd: None, namespace: str) -> Iterator[str]:
    ns = f"{namespace}-op"
    helm(
        sandbox,
        "install",
        "cb",
        str(CHART),
        "-n",
        ns,
        "--create-namespace",
        "--set",
        f"watchNamespaces={{{namespace}}}",
    )
    yield ns
    helm(sandbox, "uninstall", "cb", "-n", ns, "--wait", check=False)
    subprocess.run(
        [
            str(sandbox.bin_dir / "kubectl"),
            "--kubeconfig",
            sandbox.kubeconfig,
            "delete",
            "namespace",
            ns,
            "--wait=false",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_a_namespaced_install_gets_rights_only_where_it_watches(
    sandbox: Sandbox, release: str, namespace: str, budgets: Budgets
) -> None:
    sa = f"system:serviceaccount:{release}:cb"
    assert can(sandbox, "get", "secrets", namespace, sa)
    assert can(sandbox, "create", "pods/eviction", namespace, sa)
    assert not can(sandbox, "get", "secrets", "default", sa)
    assert not can(sandbox, "list", "pods", "default", sa)
    assert not can(sandbox, "delete", "pods", namespace, sa)
    assert not can(sandbox, "create", "pods/exec", namespace, sa)
    assert not can(
        sandbox, "update", "customresourcedefinitions.apiextensions.k8s.io", namespace, sa
    )

    # A budget survives upgrades and the uninstall.
    budgets.create(
        "kept",
        {
            "database": {"secretRef": {"name": "pg"}},
            "budget": {"maxConnections": 5},
            "selector": {"matchLabels": {"app": "x"}},
        },
    )
    helm(
        sandbox,
        "upgrade",
        "cb",
        str(CHART),
        "-n",
        release,
        "--reuse-values",
        "--set",
        "rbac.deletePods=true",
    )
    assert can(sandbox, "delete", "pods", namespace, sa)  # asked for, now granted
    helm(sandbox, "uninstall", "cb", "-n", release, "--wait")
    assert budgets.get("kept")["metadata"]["name"] == "kept"
    assert not can(sandbox, "get", "secrets", namespace, sa)


def test_the_charts_operator_pod_remediates_a_leak_where_it_watches(
    sandbox: Sandbox, release: str, namespace: str, budgets: Budgets, workloads: Workloads
) -> None:
    """The chart's Deployment runs as a pod with the chart's RBAC (namespaced mode) and acts."""
    op = operator_pod(sandbox, release)
    assert op.uid() == 65532
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "3", "LEAK_MAX": "20"})
    budgets.create(
        "leaky",
        {
            "database": {"secretRef": {"name": "pg-monitor"}},
            "budget": {"maxConnections": 8},
            "selector": {"matchLabels": {"app": "leaky"}},
            "pollSeconds": 1,
            "remediation": {
                "breachSeconds": 1,
                "cooldownSeconds": 60,
                "terminateIdle": {"minIdleSeconds": 1},
                "restartPods": {"minPodAgeSeconds": 0},
            },
        },
    )
    budgets.wait_event("IdleConnectionsTerminated", timeout=90)
    budgets.wait_event("PodEvicted", timeout=90)
    status = budgets.status("leaky")
    assert status["lastAction"]["type"] in ("TerminateIdle", "RestartPods")
    assert status["observedGeneration"] == budgets.get("leaky")["metadata"]["generation"]
    logs = op.logs()
    assert "Forbidden" not in logs, logs[-2000:]
    assert sandbox.db.monitor_password not in logs
