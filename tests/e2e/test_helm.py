"""The Helm chart: lint, values schema, the CRD's single source, and an install on the sandbox
whose RBAC follows the watch mode (and a ServiceAccount that can do no more than it needs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from e2e.conftest import ROOT, Budgets, can_i, leak_until_remediated, operator_pod, tool
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads
from sandbox.image_build import BuiltImage
from sandbox.image_fixtures import assert_runs_in_image, operator_image

pytestmark = pytest.mark.sandbox
CHART = ROOT / "manifests" / "helm" / "connbudget"
__all__ = ["operator_image"]  # the fixture, imported for this module's tests


def helm(sandbox: Sandbox, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return tool(sandbox, "helm", *args, check=check, timeout=180)


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
def release(
    sandbox: Sandbox, crd: None, namespace: str, operator_image: BuiltImage
) -> Iterator[str]:
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
    sandbox: Sandbox,
    release: str,
    namespace: str,
    budgets: Budgets,
    workloads: Workloads,
    operator_image: BuiltImage,
) -> None:
    """The chart's Deployment runs as a pod from the built image, with the chart's RBAC
    (namespaced mode), and acts."""
    op = operator_pod(sandbox, release)
    assert_runs_in_image(op.pid, operator_image)
    assert op.uid() == 65532
    leak_until_remediated(sandbox, workloads, namespace, budgets, op)
