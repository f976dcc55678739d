"""End-to-end harness: the CRD installed in the sandbox, and the operator run as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "connectionbudgets.connbudget.io.yaml"
GROUP, VERSION, PLURAL = "connbudget.io", "v1alpha1", "connectionbudgets"


@pytest.fixture(scope="session")
def crd(kube_api: kubernetes.client.ApiClient) -> None:
    """The ConnectionBudget CRD, installed from crds/ and Established."""
    ext = kubernetes.client.ApiextensionsV1Api(kube_api)
    body = yaml.safe_load(CRD.read_text())
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as e:
        if e.status != 409:
            raise
        current = ext.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established() -> bool:
        got = ext.read_custom_resource_definition(body["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in got.status.conditions or []
        )

    eventually(established, timeout=30, what="CRD Established")


@dataclass
class Operator:
    """A running ``connbudget run`` process watching one namespace."""

    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    health_port: int

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics",
            timeout=5,
        ) as r:
            return str(r.read().decode())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz",
                timeout=2,
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_operator(
    sandbox: Sandbox,
    namespace: str,
    log: Path,
    *,
    kubeconfig: str | None = None,
    standalone: bool = True,
    env: dict[str, str] | None = None,
) -> Operator:
    """Run ``connbudget run`` for ``namespace``, as the sandbox admin unless ``kubeconfig``."""
    metrics_port, health_port = free_port(), free_port()
    full_env = {
        **os.environ,
        "KUBECONFIG": kubeconfig or sandbox.kubeconfig,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    argv = [
        sys.executable,
        "-m",
        "connbudget",
        "run",
        "--namespace",
        namespace,
        "--metrics-port",
        str(metrics_port),
        "--log-format",
        "json",
        "--liveness",
        f"http://127.0.0.1:{health_port}/healthz",
    ]
    if standalone:
        argv.append("--standalone")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    op = Operator(proc=proc, log=log, metrics_port=metrics_port, health_port=health_port)
    eventually(op.healthy, timeout=30, what="operator liveness endpoint")
    return op


@pytest.fixture
def operator(sandbox: Sandbox, namespace: str, crd: None, tmp_path: Path) -> Iterator[Operator]:
    op = start_operator(sandbox, namespace, tmp_path / "operator.log")
    yield op
    op.stop()


class Budgets:
    """Create and read ConnectionBudgets, and read the Events they got."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.namespace = namespace

    def secret(self, name: str, value: str, key: str = "dsn") -> None:
        body = {"metadata": {"name": name}, "stringData": {key: value}}
        try:
            self.core.create_namespaced_secret(self.namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.replace_namespaced_secret(name, self.namespace, body)

    def create(
        self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ConnectionBudget",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": spec,
        }
        return dict(
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body
            )
        )

    def get(self, name: str) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        )

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next(
            (c for c in self.status(name).get("conditions", []) if c["type"] == type_), None
        )

    def patch(self, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, body
        )

    def events(self, reason: str | None = None) -> list[Any]:
        items = self.core.list_namespaced_event(self.namespace).items
        items = [e for e in items if e.involved_object.kind == "ConnectionBudget"]
        return [e for e in items if reason is None or e.reason == reason]

    def wait_event(self, reason: str, timeout: float = 60) -> Any:
        return eventually(
            lambda: next(iter(self.events(reason)), None),
            timeout=timeout,
            interval=0.5,
            what=f"Event {reason}",
        )


@pytest.fixture
def budgets(kube_api: kubernetes.client.ApiClient, namespace: str, crd: None) -> Budgets:
    return Budgets(kube_api, namespace)


def all_text(budgets: Budgets, name: str, op: Operator) -> str:
    """Everything the operator wrote where a user can see it: logs, Events, status, metrics."""
    events = "\n".join(f"{e.reason} {e.message}" for e in budgets.events())
    return "\n".join([op.logs(), events, json.dumps(budgets.status(name)), op.metrics()])


def wait_until(check: Any, timeout: float, what: str) -> Any:
    return eventually(check, timeout=timeout, interval=0.5, what=what)


def now() -> float:
    return time.time()


def tool(
    sandbox: Sandbox,
    name: str,
    *args: str,
    check: bool = True,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run one of the sandbox's binaries (kubectl, helm) as its admin; fail the test on an error
    unless ``check=False``."""
    res = subprocess.run(
        [str(sandbox.bin_dir / name), "--kubeconfig", sandbox.kubeconfig, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert res.returncode == 0, f"{name} {' '.join(args)}: {res.stderr}"
    return res


def kubectl(
    sandbox: Sandbox, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return tool(sandbox, "kubectl", *args, check=check, stdin=stdin)


def can_i(sandbox: Sandbox, sa: str, verb: str, resource: str, namespace: str) -> bool:
    """Ask the API server whether ServiceAccount user ``sa`` may ``verb`` ``resource``.

    ``resource`` may name a subresource: ``pods/eviction``, ``deployments.apps/scale``.
    """
    resource, _, sub = resource.partition("/")
    extra = ["--subresource", sub] if sub else []
    res = subprocess.run(
        [
            str(sandbox.bin_dir / "kubectl"),
            "--kubeconfig",
            sandbox.kubeconfig,
            "auth",
            "can-i",
            verb,
            resource,
            *extra,
            "-n",
            namespace,
            "--as",
            sa,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return res.stdout.strip() == "yes"


@dataclass
class OperatorPod:
    """The operator as installed by the manifests or the chart: a pod the sandbox's kubelet runs
    from the image ``ghcr.io/connbudget/connbudget`` (the built image's root filesystem when a
    test loads it, else the package installed here)."""

    sandbox: Sandbox
    namespace: str
    name: str
    ip: str
    pid: int

    def logs(self) -> str:
        return self.sandbox.pod_log(self.namespace, self.name, "operator")

    def uid(self) -> int:
        """The real user ID the operator's process runs as."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
        raise AssertionError(f"no Uid line for pid {self.pid}")

    def mount_options(self) -> dict[str, set[str]]:
        """Mount point → options, as the operator's process sees its filesystem."""
        found: dict[str, set[str]] = {}
        for line in Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            found[fields[4]] = set(fields[5].split(","))
        return found

    def get(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.ip}:{port}{path}", timeout=5) as r:
            return str(r.read().decode())


def operator_pod(sandbox: Sandbox, namespace: str, timeout: float = 60) -> OperatorPod:
    """Wait until the operator Deployment's pod runs and answers on its liveness endpoint."""
    core = kubernetes.client.CoreV1Api(sandbox.api_client())

    def running() -> Any:
        pods = core.list_namespaced_pod(
            namespace, label_selector="app.kubernetes.io/name=connbudget"
        ).items
        live = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
        return live[0] if len(live) == 1 else None

    pod = eventually(running, timeout=timeout, what=f"the operator pod running in {namespace}")
    ip = str(pod.status.pod_ip)

    def process() -> int | None:
        for pid, cmdline in sandbox.processes().items():
            # `python -m connbudget run` here, `/usr/local/bin/connbudget run` from the image.
            if "connbudget run" in cmdline:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"HOSTNAME={pod.metadata.name}".encode() in env:
                    return pid
        return None

    pid = eventually(process, timeout=timeout, what="the operator pod's process")
    op = OperatorPod(sandbox, namespace, str(pod.metadata.name), ip, pid)

    def healthy() -> bool:
        try:
            op.get(8080, "/healthz")
        except OSError:
            return False
        return True

    eventually(healthy, timeout=timeout, what=f"the operator pod's liveness endpoint on {ip}:8080")
    return op


def leak_until_remediated(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, op: OperatorPod
) -> None:
    """Start two leaky apps under a tight budget, one leaving its connections idle (terminating
    them is the remedy) and one idle in a transaction (restarting is); wait until the installed
    operator terminates backends and evicts a pod, with no RBAC refusal and no password in its
    log."""
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    tier = {"tier": "leaky"}
    workloads.deploy(namespace, "leaky-idle", env={"LEAK_RATE": "3", "LEAK_MAX": "20"}, labels=tier)
    workloads.deploy(
        namespace,
        "leaky",
        env={"LEAK_RATE": "3", "LEAK_MAX": "20", "IN_TRANSACTION": "1"},
        labels=tier,
    )
    budgets.create(
        "leaky",
        {
            "database": {"secretRef": {"name": "pg-monitor"}},
            "budget": {"maxConnections": 8},
            "selector": {"matchLabels": tier},
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
