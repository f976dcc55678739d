"""The kustomize install on the sandbox: it applies, its pod passes the restricted Pod Security
level, its RBAC is minimal (kubectl auth can-i), and sufficient (the operator, running from the
image built from this checkout with the ServiceAccount's own token, remediates a leak and takes
the leader Lease)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.conftest import ROOT, Budgets, can_i, kubectl, leak_until_remediated, operator_pod
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.image_build import BuiltImage
from sandbox.image_fixtures import assert_runs_in_image, operator_image
from sandbox.kubelet import SERVICE_ACCOUNT_DIR

pytestmark = pytest.mark.sandbox
SA = "system:serviceaccount:connbudget-system:connbudget"


def test_the_samples_pass_check_and_the_api_server(
    sandbox: Sandbox, crd: None, namespace: str
) -> None:
    samples = sorted(str(p) for p in (ROOT / "manifests" / "samples").glob("*.yaml"))
    assert len(samples) == 3
    res = subprocess.run(
        [sys.executable, "-m", "connbudget", "check", *samples],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    for sample in samples:
        kubectl(sandbox, "apply", "--dry-run=server", "-n", namespace, "-f", sample)


__all__ = ["operator_image"]  # the fixture, imported for this module's tests


@pytest.fixture(scope="module")
def installed(sandbox: Sandbox, crd: None, operator_image: BuiltImage) -> Iterator[None]:
    kubectl(sandbox, "apply", "-k", str(ROOT / "manifests"))
    yield None
    kubectl(sandbox, "delete", "-k", str(ROOT / "manifests"), "--timeout=90s", check=False)


def test_the_install_is_least_privilege(sandbox: Sandbox, installed: None, namespace: str) -> None:
    def can(verb: str, resource: str, ns: str = namespace) -> bool:
        return can_i(sandbox, SA, verb, resource, ns)

    allowed = [
        ("get", "secrets"),
        ("list", "pods"),
        ("watch", "pods"),
        ("create", "pods/eviction"),
        ("patch", "connectionbudgets.connbudget.io/status"),
        ("watch", "connectionbudgets.connbudget.io"),
        ("create", "events"),
        ("patch", "events"),
        ("patch", "deployments.apps/scale"),
        ("get", "statefulsets.apps/scale"),
        ("list", "horizontalpodautoscalers.autoscaling"),
        ("get", "deployments.apps"),
        ("watch", "namespaces"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    refused = [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("create", "pods/exec"),
        ("delete", "pods"),
        ("patch", "connectionbudgets.connbudget.io"),
        ("delete", "connectionbudgets.connbudget.io"),
        ("patch", "deployments.apps"),
        ("update", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "pods"),
        ("get", "configmaps"),
        ("patch", "pods/status"),
        ("delete", "events"),
        ("patch", "horizontalpodautoscalers.autoscaling"),
    ]
    assert [a for a in allowed if not can(*a)] == []
    assert [r for r in refused if can(*r)] == []
    # The Lease only in its own namespace.
    assert can("update", "leases.coordination.k8s.io", "connbudget-system")
    assert not can("update", "leases.coordination.k8s.io", namespace)
    # The operator's pod is admitted under the restricted Pod Security level.
    pods = json.loads(
        kubectl(sandbox, "get", "pods", "-n", "connbudget-system", "-o", "json").stdout
    )
    eventually(
        lambda: json.loads(
            kubectl(sandbox, "get", "pods", "-n", "connbudget-system", "-o", "json").stdout
        )["items"],
        timeout=30,
        what="the operator's pod created (restricted Pod Security admitted it)",
    )
    del pods


def test_the_installed_operator_pod_remediates_a_leak(
    sandbox: Sandbox,
    installed: object,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator_image: BuiltImage,
) -> None:
    """The Deployment's own pod, from the built image: non-root, in-cluster ServiceAccount token,
    enough RBAC."""
    op = operator_pod(sandbox, "connbudget-system")
    assert_runs_in_image(op.pid, operator_image)
    assert op.uid() == 65532  # runAsUser from the Deployment's securityContext
    environ = Path(f"/proc/{op.pid}/environ").read_bytes()
    assert b"KUBECONFIG=" not in environ  # so it logged in with the in-pod token
    # /var/run is a symlink to /run: through /proc/PID/root an absolute link would resolve in our
    # own mount namespace, so take the real path.
    token_dir = Path(f"/proc/{op.pid}/root" + SERVICE_ACCOUNT_DIR.removeprefix("/var"))
    assert (token_dir / "namespace").read_text() == "connbudget-system"
    token = (token_dir / "token").read_text()
    mounts = op.mount_options()
    assert "ro" in mounts["/"]  # readOnlyRootFilesystem
    assert "rw" in mounts["/tmp"]  # noqa: S108 (the emptyDir, where a CA from a Secret goes)
    assert "ro" in mounts[SERVICE_ACCOUNT_DIR.removeprefix("/var")]  # as a kubelet projects it
    hosts = Path(f"/proc/{op.pid}/root/etc/hosts").read_text()
    assert f"{op.ip}\t{op.name}" in hosts

    leak_until_remediated(sandbox, workloads, namespace, budgets, op)
    lease = json.loads(
        kubectl(
            sandbox, "get", "lease", "connbudget-operator", "-n", "connbudget-system", "-o", "json"
        ).stdout
    )
    assert lease["spec"]["holderIdentity"].startswith(op.name)
    assert "connbudget_actions_total{" in op.get(9090, "/metrics")
    assert token not in op.logs()
