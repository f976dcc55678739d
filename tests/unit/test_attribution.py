"""Attribution never pins a backend on the wrong pod: other namespaces, spoofed names, IP reuse."""

from __future__ import annotations

import dataclasses

from connbudget.handlers.reconciler import Reconciler
from connbudget.model.observations import BackendGroup, PodInfo, PoolerClient
from connbudget.model.spec import AttributionMode
from connbudget.policy import attribution
from connbudget.probe.postgres import MonitorPool
from connbudget.report.metrics import Metrics
from unit.builders import NOW, idle_group, pod

PROD_WEB0 = pod("web-0", "10.0.0.1", namespace="prod")
STAGING_WEB0 = pod("web-0", "10.0.1.5", namespace="staging")


def attribute(index: attribution.PodIndex, group: BackendGroup) -> attribution.Attributed:
    (got,) = attribution.attribute_backends(
        groups=[group],
        index=index,
        mode=AttributionMode.AUTO,
    )
    return got


def pod_body(p: PodInfo) -> dict[str, object]:
    """A pod as the watch delivers it."""
    stamp = "2027-01-15T07:00:00Z"  # an hour before NOW
    return {
        "metadata": {
            "namespace": p.namespace,
            "name": p.name,
            "uid": p.uid,
            "labels": dict(p.labels),
            "creationTimestamp": stamp,
        },
        "status": {"podIP": p.ip, "phase": "Running", "startTime": stamp},
    }


def test_a_pod_of_another_namespace_with_the_same_name_is_never_blamed_here() -> None:
    # staging/web-0's app sends its hostname, "web-0", as application_name.
    reconciler = Reconciler(kube=None, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    for p in (PROD_WEB0, STAGING_WEB0):
        reconciler.on_pod("ADDED", pod_body(p))
    index = reconciler.pods.index("prod")
    got = attribute(index, idle_group(STAGING_WEB0, [500.0] * 3, start_age=60))
    assert got.pod is not None
    assert (got.pod.namespace, got.pod.name) == ("staging", "web-0")
    assert got.via is attribution.Via.CLIENT_ADDR


def test_a_name_never_wins_over_the_address_of_another_pod() -> None:
    other = pod("intruder", "10.0.0.9", app="other", age=30)
    # A backend older than the pod now at its address (a dead pod's), naming a governed pod.
    spoofed = dataclasses.replace(
        idle_group(other, [100.0] * 2, start_age=300), application_name="web-0"
    )
    index = attribution.PodIndex.build([PROD_WEB0, other], namespace="prod")
    assert attribute(index, spoofed).pod is None
    # From an address no pod has (a proxy, NAT), the name still tells.
    unknown = dataclasses.replace(spoofed, client_addr="192.0.2.7")
    assert attribute(index, unknown).pod == PROD_WEB0


def test_a_name_never_names_a_pod_younger_than_the_backend() -> None:
    young = pod("web-0", "10.0.0.1", namespace="prod", age=30)
    old_backend = dataclasses.replace(
        idle_group(young, [100.0], start_age=300), client_addr="192.0.2.7"
    )
    index = attribution.PodIndex.build([young], namespace="prod")
    assert attribute(index, old_backend).pod is None


def test_pgbouncer_clients_older_than_the_pod_at_their_address_are_nobodys() -> None:
    new = pod("web-new", "10.0.0.1", age=30)  # took the address of a pod that died
    index = attribution.PodIndex.build([new], namespace="shop")
    old = PoolerClient(
        addr="10.0.0.1", user="app", database="app", state="active", connected_at=NOW - 300
    )
    fresh = dataclasses.replace(old, connected_at=NOW - 5)
    got = attribution.attribute_pooler_clients(clients=[old, fresh], index=index)
    assert got == {"web-new": [fresh]}


def test_pgbouncer_clients_of_another_namespace_are_not_counted_here() -> None:
    index = attribution.PodIndex.build([PROD_WEB0, STAGING_WEB0], namespace="prod")
    client = PoolerClient(
        addr=STAGING_WEB0.ip, user="app", database="app", state="active", application_name="web-0"
    )
    assert attribution.attribute_pooler_clients(clients=[client], index=index) == {}


class ListingKube:
    """Answers a pod LIST with what the API server has."""

    def __init__(self, uids: set[str]) -> None:
        self.uids = uids

    async def list_pods(self, namespace: str) -> list[dict[str, object]]:
        return [{"metadata": {"uid": u}} for u in sorted(self.uids)]


def test_pods_the_watch_missed_deleting_are_dropped_on_resync() -> None:
    import asyncio

    clock = [100.0]
    kube = ListingKube({PROD_WEB0.uid})
    reconciler = Reconciler(
        kube=kube,  # type: ignore[arg-type]
        monitors=MonitorPool(),
        metrics=Metrics(),
        monotonic=lambda: clock[0],
    )
    ghost = pod("web-1", "10.0.0.2", namespace="prod")
    for p in (PROD_WEB0, ghost):
        reconciler.on_pod(None, pod_body(p))  # as a (re-)list delivers them
    clock[0] = 200.0
    assert asyncio.run(reconciler.pods.resync()) == ["prod/web-1"]
    assert {p.name for p in reconciler.pods.pods["prod"].values()} == {"web-0"}
    assert "10.0.0.2" not in reconciler.pods.index("prod").by_ip


def test_a_pod_the_watch_told_of_during_the_list_is_kept() -> None:
    import asyncio

    clock = [100.0]
    kube = ListingKube(set())  # listed before the pod was created
    reconciler = Reconciler(
        kube=kube,  # type: ignore[arg-type]
        monitors=MonitorPool(),
        metrics=Metrics(),
        monotonic=lambda: clock[0],
    )
    original = kube.list_pods

    async def list_then_add(namespace: str) -> list[dict[str, object]]:
        listed = await original(namespace)
        clock[0] += 1
        reconciler.on_pod("ADDED", pod_body(PROD_WEB0))  # the watch delivers it meanwhile
        return listed

    kube.list_pods = list_then_add  # type: ignore[method-assign]
    reconciler.pods.pods["prod"] = {}
    assert asyncio.run(reconciler.pods.resync()) == []
    assert [p.name for p in reconciler.pods.pods["prod"].values()] == ["web-0"]
