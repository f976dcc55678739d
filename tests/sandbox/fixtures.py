"""pytest fixtures for tests that need the sandbox, and a helper to deploy workloads into it.

The session gets one sandbox: the one named by ``CONNBUDGET_SANDBOX_DIR`` (from ``sandbox env``),
or a fresh one that is torn down when the session ends. Tests only ever see this sandbox's admin
kubeconfig; any other kubeconfig in the environment is refused, and ``KUBECONFIG`` is pointed at the
sandbox's for the subprocesses tests start (kubectl, helm).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from sandbox.core import Sandbox, is_sandbox_kubeconfig
from sandbox.postgres import APP_DB, APP_ROLE

T = TypeVar("T")
LEAKY_IMAGE = "sandbox.local/leaky-app:dev"
STEADY_IMAGE = "sandbox.local/steady-app:dev"
NAMESPACE_DELETE_TIMEOUT = 90.0  # seconds; pods stop within their grace period (5 s here)


class ForeignKubeconfigError(RuntimeError):
    """A kubeconfig that the sandbox did not create was offered to the tests."""


def require_sandbox_kubeconfig(path: str) -> str:
    """Return ``path`` if it is a live sandbox's admin kubeconfig; refuse anything else."""
    if not is_sandbox_kubeconfig(path):
        raise ForeignKubeconfigError(
            f"refusing to run tests against {path}: it was not created by the connbudget sandbox "
            "(start one with `tests/sandbox/sandbox up`, or unset CONNBUDGET_SANDBOX_DIR)"
        )
    return path


def is_gone(read: Callable[..., object], *args: str) -> bool:
    """Tell whether reading an object answers 404 (other errors propagate)."""
    try:
        read(*args)
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def eventually(
    check: Callable[[], T | None], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as e:  # an API hiccup counts as "not yet"
            last_error = e
        else:
            if result:
                return result
        time.sleep(interval)
    pytest.fail(
        f"{what} not reached within {timeout:.0f}s"
        + (f" (last error: {last_error})" if last_error else "")
    )


@dataclass
class Workloads:
    """Deploys the sandbox's workload programs as Deployments and waits for them."""

    sandbox: Sandbox
    api: kubernetes.client.ApiClient

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def apps(self) -> kubernetes.client.AppsV1Api:
        return kubernetes.client.AppsV1Api(self.api)

    def deploy(
        self,
        namespace: str,
        name: str,
        *,
        image: str = LEAKY_IMAGE,
        replicas: int = 1,
        env: dict[str, str] | None = None,
        via_pooler: bool | str = False,
        labels: dict[str, str] | None = None,
        wait: bool = True,
        database_url: str | None = None,
    ) -> dict[str, Any]:
        """Create a Deployment of ``image`` whose pods get ``DATABASE_URL`` from a Secret.

        ``PGAPPNAME`` is the pod's name (a fieldRef), as the operator's attribution expects.
        ``database_url`` replaces the sandbox database's URL (for another server).
        """
        db = self.sandbox.db
        secret = f"{name}-db"
        if database_url is not None:
            url = database_url
        elif isinstance(via_pooler, str):  # a pooler pod's address
            url = db.dsn(APP_ROLE, db.app_password, 6432, APP_DB).replace(
                f"@{db.host}:", f"@{via_pooler}:"
            )
        else:
            url = db.app_pooler_dsn if via_pooler else db.app_dsn
        body = {"metadata": {"name": secret}, "stringData": {"url": url}}
        try:
            self.core.create_namespaced_secret(namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.replace_namespaced_secret(secret, namespace, body)
        pod_labels = {"app": name, **(labels or {})}
        container_env = [
            {"name": "PGAPPNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": "url"}}},
        ] + [{"name": k, "value": v} for k, v in (env or {}).items()]
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{"name": "app", "image": image, "env": container_env}],
                    },
                },
            },
        }
        self.apps.create_namespaced_deployment(namespace, deployment)
        if wait:
            self.wait_available(namespace, name, replicas)
        return deployment

    def deploy_pgbouncer(
        self, namespace: str, name: str = "pgbouncer", *, replicas: int = 1, pool_size: int = 5
    ) -> list[str]:
        """Run PgBouncer as a Deployment in front of the sandbox PostgreSQL; return pod IPs.

        Its admin console admits ``pgbouncer_admin`` and ``connbudget_monitor`` (stats).
        """
        from sandbox.postgres import BOUNCER_ADMIN, MONITOR_ROLE

        db = self.sandbox.db
        userlist = "\n".join(
            [
                f'"{APP_ROLE}" "{db.app_password}"',
                f'"{MONITOR_ROLE}" "{db.monitor_password}"',
                f'"{BOUNCER_ADMIN}" "{db.bouncer_admin_password}"',
            ]
        )
        self.core.create_namespaced_secret(
            namespace, {"metadata": {"name": f"{name}-users"}, "stringData": {"userlist": userlist}}
        )
        self.apps.create_namespaced_deployment(
            namespace,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {
                            "terminationGracePeriodSeconds": 2,
                            "containers": [
                                {
                                    "name": "pgbouncer",
                                    "image": "sandbox.local/pgbouncer:1.18",
                                    "env": [
                                        {"name": "PG_HOST", "value": db.host},
                                        {"name": "PG_PORT", "value": str(db.pg_port)},
                                        {"name": "PG_DB", "value": APP_DB},
                                        {"name": "POOL_SIZE", "value": str(pool_size)},
                                        {"name": "ADMIN_USERS", "value": BOUNCER_ADMIN},
                                        {"name": "STATS_USERS", "value": MONITOR_ROLE},
                                        {
                                            "name": "USERLIST",
                                            "valueFrom": {
                                                "secretKeyRef": {
                                                    "name": f"{name}-users",
                                                    "key": "userlist",
                                                }
                                            },
                                        },
                                    ],
                                }
                            ],
                        },
                    },
                },
            },
        )
        self.wait_available(namespace, name, replicas)
        return sorted(p.status.pod_ip for p in self.pods(namespace, f"app={name}"))

    def wait_available(self, namespace: str, name: str, replicas: int, timeout: float = 60) -> None:
        def ready() -> bool:
            d = self.apps.read_namespaced_deployment(name, namespace)
            return bool(
                (d.status.available_replicas or 0) >= replicas
                and (d.status.updated_replicas or 0) >= replicas
                and d.status.observed_generation == d.metadata.generation
            )

        eventually(ready, timeout=timeout, what=f"deployment {namespace}/{name} Available")

    def pods(self, namespace: str, selector: str) -> list[Any]:
        """Running pods matching ``selector`` that are not being deleted."""
        items = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return [
            p for p in items if p.status.phase == "Running" and not p.metadata.deletion_timestamp
        ]


def sandbox_fixture() -> Iterator[Sandbox]:
    existing = os.environ.get("CONNBUDGET_SANDBOX_DIR")
    if existing:
        sb = Sandbox(Path(existing))
        require_sandbox_kubeconfig(sb.kubeconfig)
        owned = False
    else:
        sb = Sandbox.up(owner_pid=os.getpid(), progress=lambda m: print(f"sandbox: {m}"))
        owned = True
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "PATH")}
    os.environ["KUBECONFIG"] = require_sandbox_kubeconfig(sb.kubeconfig)
    os.environ["PATH"] = f"{sb.bin_dir}:{os.environ.get('PATH', '')}"
    try:
        yield sb
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if owned:
            sb.down()


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """The session's sandbox (control plane, kubelet, PostgreSQL, PgBouncer)."""
    yield from sandbox_fixture()


@pytest.fixture(scope="session")
def kubeconfig(sandbox: Sandbox) -> str:
    """Path of the sandbox's admin kubeconfig."""
    return require_sandbox_kubeconfig(sandbox.kubeconfig)


@pytest.fixture(scope="session")
def kube_api(sandbox: Sandbox) -> kubernetes.client.ApiClient:
    """A Kubernetes API client for the sandbox's admin."""
    require_sandbox_kubeconfig(sandbox.kubeconfig)
    return sandbox.api_client()


@pytest.fixture(scope="session")
def pg_dsn(sandbox: Sandbox) -> str:
    """DSN of the sandbox PostgreSQL's monitoring role (``pg_monitor``, ``pg_signal_backend``)."""
    return sandbox.db.monitor_dsn


@pytest.fixture(scope="session")
def pgbouncer_dsn(sandbox: Sandbox) -> str:
    """DSN of the sandbox PgBouncer's admin console."""
    return sandbox.db.bouncer_admin_dsn


@pytest.fixture(scope="session")
def workloads(sandbox: Sandbox, kube_api: kubernetes.client.ApiClient) -> Workloads:
    """Helper that deploys the leaky and the well-behaved apps."""
    return Workloads(sandbox=sandbox, api=kube_api)


@pytest.fixture
def namespace(kube_api: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace, deleted after the test (without waiting for it to go)."""
    core = kubernetes.client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    # The ServiceAccount admission plugin rejects pods until the namespace's default SA exists.
    eventually(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as e:
        if e.status != 404:
            raise

    # Wait until it is gone, so that its pods' connections do not spill into the next test.
    eventually(
        lambda: is_gone(core.read_namespace, name),
        timeout=NAMESPACE_DELETE_TIMEOUT,
        interval=0.25,
        what=f"namespace {name} gone",
    )
