"""The Kubernetes layer against the sandbox's real API server: evictions, deletions, rollout
restarts, /scale, status and Events, and what a ServiceAccount without rights gets."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
import pytest

from connbudget.kube.api import BudgetRef, EvictionResult, Kube, KubeError, SecretProblem
from connbudget.model.spec import ObjectRef, SecretRef
from e2e.conftest import Budgets
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually, is_gone

pytestmark = pytest.mark.sandbox
DEPLOYMENT = ObjectRef(api_version="apps/v1", kind="Deployment", name="app")


@pytest.fixture
def kube(sandbox: Sandbox) -> Kube:
    return Kube(sandbox.api_client())


def pause(workloads: Workloads, namespace: str, replicas: int = 2) -> list[Any]:
    workloads.deploy(namespace, "app", image="sandbox.local/pause", replicas=replicas)
    return workloads.pods(namespace, "app=app")


def test_eviction_is_refused_for_another_pod_with_the_same_name_and_honours_dry_run(
    kube: Kube, workloads: Workloads, namespace: str
) -> None:
    pod = pause(workloads, namespace)[0]
    name, uid = pod.metadata.name, pod.metadata.uid
    assert (
        asyncio.run(kube.evict_pod(namespace, name, "not-" + uid, dry_run=False))
        is EvictionResult.GONE
    )
    assert asyncio.run(kube.evict_pod(namespace, name, uid, dry_run=True)) is EvictionResult.EVICTED
    assert not workloads.core.read_namespaced_pod(name, namespace).metadata.deletion_timestamp
    assert (
        asyncio.run(kube.evict_pod(namespace, name, uid, dry_run=False)) is EvictionResult.EVICTED
    )

    eventually(
        lambda: is_gone(workloads.core.read_namespaced_pod, name, namespace),
        timeout=30,
        what="evicted pod gone",
    )
    assert asyncio.run(kube.evict_pod(namespace, name, uid, dry_run=False)) is EvictionResult.GONE


def test_delete_and_rollout_restart(kube: Kube, workloads: Workloads, namespace: str) -> None:
    pod = pause(workloads, namespace)[0]
    assert (
        asyncio.run(kube.delete_pod(namespace, pod.metadata.name, pod.metadata.uid, dry_run=False))
        is EvictionResult.EVICTED
    )
    asyncio.run(
        kube.rollout_restart(namespace, "Deployment", "app", now=1_800_000_000, dry_run=False)
    )
    d = workloads.apps.read_namespaced_deployment("app", namespace)
    annotations = d.spec.template.metadata.annotations
    assert annotations["connbudget.io/restartedAt"] == "2027-01-15T08:00:00Z"
    with pytest.raises(KubeError):
        asyncio.run(kube.rollout_restart(namespace, "CronJob", "x", now=0, dry_run=False))


def test_scale_is_read_and_patched_through_the_subresource(
    kube: Kube, workloads: Workloads, namespace: str
) -> None:
    pause(workloads, namespace, replicas=2)
    scale = asyncio.run(kube.read_scale(namespace, DEPLOYMENT))
    assert scale.replicas == 2
    assert scale.selector == "app=app"
    asyncio.run(kube.patch_scale(namespace, DEPLOYMENT, 1, dry_run=True))
    assert workloads.apps.read_namespaced_deployment_scale("app", namespace).spec.replicas == 2
    asyncio.run(kube.patch_scale(namespace, DEPLOYMENT, 1, dry_run=False))
    assert workloads.apps.read_namespaced_deployment_scale("app", namespace).spec.replicas == 1
    with pytest.raises(KubeError) as err:
        asyncio.run(
            kube.read_scale(namespace, ObjectRef(api_version="apps/v1", kind="Nope", name="x"))
        )
    assert err.value.status == 404


def test_secrets_are_read_and_problems_named(
    kube: Kube, workloads: Workloads, namespace: str
) -> None:
    workloads.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "s"}, "stringData": {"dsn": "host=x\n"}}
    )
    assert asyncio.run(kube.read_secret_value(namespace, SecretRef(name="s"))) == "host=x"
    with pytest.raises(SecretProblem, match="has no key 'other'"):
        asyncio.run(kube.read_secret_value(namespace, SecretRef(name="s", key="other")))
    with pytest.raises(SecretProblem, match="not found"):
        asyncio.run(kube.read_secret_value(namespace, SecretRef(name="absent")))


def test_status_patches_and_events(kube: Kube, budgets: Budgets, namespace: str) -> None:
    body = budgets.create(
        "b",
        {
            "database": {"secretRef": {"name": "pg"}},
            "budget": {"maxConnections": 5},
            "selector": {"matchLabels": {"app": "x"}},
        },
    )
    asyncio.run(kube.patch_budget_status(namespace, "b", {"phase": "Pending"}))
    assert budgets.status("b")["phase"] == "Pending"
    assert budgets.get("b")["metadata"]["generation"] == 1  # status writes leave spec alone
    ref = BudgetRef(namespace=namespace, name="b", uid=body["metadata"]["uid"])
    asyncio.run(kube.post_event(ref, "Normal", "BudgetRecovered", "back to normal", now=0))
    (event,) = budgets.events("BudgetRecovered")
    assert event.message == "back to normal"
    assert event.involved_object.uid == ref.uid


def test_a_service_account_without_rights_gets_clear_errors(
    sandbox: Sandbox, kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    config = kubernetes.client.Configuration(
        host=sandbox.state["apiServer"]["server"], api_key={"BearerToken": f"Bearer {token}"}
    )
    config.ssl_ca_cert = sandbox.state["apiServer"]["caFile"]
    weak = Kube(kubernetes.client.ApiClient(config))
    with pytest.raises(SecretProblem, match="not allowed to read"):
        asyncio.run(weak.read_secret_value(namespace, SecretRef(name="any")))
    with pytest.raises(KubeError) as err:
        asyncio.run(weak.evict_pod(namespace, "p", "u", dry_run=False))
    assert err.value.status == 403

    assert token not in str(err.value)
