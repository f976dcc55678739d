"""Attribution never pins a backend on the wrong pod: other namespaces, spoofed names, IP reuse."""

from __future__ import annotations

import dataclasses

from connbudget.handlers import reconciler as reconciler_module
from connbudget.handlers.reconciler import Reconciler
from connbudget.model.actions import TerminateBackends
from connbudget.model.observations import BackendGroup, PodInfo, PoolerClient
from connbudget.model.spec import AttributionMode
from connbudget.policy import attribution, usage
from connbudget.policy.plan import Level
from connbudget.probe.postgres import MonitorPool
from connbudget.report.metrics import Metrics
from unit.builders import NOW, NS, idle_group, pod, run, sample, spec

PROD_WEB0 = pod("web-0", "10.0.0.1", namespace="prod")
STAGING_WEB0 = pod("web-0", "10.0.1.5", namespace="staging")


def attribute(index: attribution.PodIndex, group: BackendGroup) -> attribution.Attributed:
    (got,) = attribution.attribute_backends(
        groups=[group],
        index=index,
        mode=AttributionMode.AUTO,
    )
    return got


def pod_body(p: PodInfo, **status: object) -> dict[str, object]:
    """A pod as the watch delivers it (``status``: fields that replace the defaults)."""
    stamp = "2027-01-15T07:00:00Z"  # an hour before NOW
    return {
        "metadata": {
            "namespace": p.namespace,
            "name": p.name,
            "uid": p.uid,
            "labels": dict(p.labels),
            "creationTimestamp": stamp,
        },
        "status": {"podIP": p.ip, "phase": "Running", "startTime": stamp, **status},
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
    index = attribution.PodIndex.build([PROD_WEB0, other], namespace="prod", all_namespaces=True)
    assert attribute(index, spoofed).pod is None
    # Watching every namespace, an address no pod has is no pod's (a proxy, NAT): the name tells.
    unknown = dataclasses.replace(spoofed, client_addr="192.0.2.7")
    assert attribute(index, unknown).pod == PROD_WEB0


def test_watching_some_namespaces_a_name_from_an_unknown_address_is_not_believed() -> None:
    # The operator watches prod only: 10.0.1.5 may be staging/web-0, which sends "web-0" too.
    reconciler = Reconciler(
        kube=None,  # type: ignore[arg-type]
        monitors=MonitorPool(),
        metrics=Metrics(),
        all_namespaces=False,
    )
    reconciler.on_pod("ADDED", pod_body(PROD_WEB0))
    index = reconciler.pods.index("prod")
    got = attribute(index, idle_group(STAGING_WEB0, [500.0] * 3, start_age=60))
    assert (got.pod, got.via) == (None, attribution.Via.NONE)
    # The same, built by hand (an index that does not say it sees every namespace).
    strict = attribution.PodIndex.build([PROD_WEB0], namespace="prod")
    assert attribute(strict, idle_group(STAGING_WEB0, [500.0], start_age=60)).pod is None


def test_watching_some_namespaces_a_name_from_its_pods_node_address_is_believed() -> None:
    # A database outside the cluster sees the node's address (SNAT): the pod's hostIP.
    web = dataclasses.replace(PROD_WEB0, host_ips=("192.168.1.10",))
    elsewhere = pod("web-1", "10.0.0.2", namespace="prod")
    on_node = dataclasses.replace(idle_group(web, [10.0], start_age=60), client_addr="192.168.1.10")
    index = attribution.PodIndex.build([web, elsewhere], namespace="prod")
    assert attribute(index, on_node).pod == web
    assert attribute(index, on_node).via is attribution.Via.APPLICATION_NAME
    # A pod on another node cannot come from this node's address, whatever its name.
    other_node = dataclasses.replace(on_node, application_name="web-1")
    assert attribute(index, other_node).pod is None


def test_a_finished_pod_keeps_no_claim_on_its_address() -> None:
    # A Job's pod Succeeded an hour ago and still reports its podIP; the address was reused.
    done = dataclasses.replace(
        pod("report-28x", "10.0.0.7", namespace="prod", app="report", age=7200),
        phase="Succeeded",
    )
    failed = dataclasses.replace(done, name="report-29x", uid="uid-report-29x", phase="Failed")
    web = pod("web-3", "10.0.0.7", namespace="prod", age=600)
    group = dataclasses.replace(idle_group(web, [5.0], start_age=60), application_name="")
    index = attribution.PodIndex.build([done, failed, web], namespace="prod")
    got = attribute(index, group)
    assert (got.pod, got.via) == (web, attribution.Via.CLIENT_ADDR)
    # Nor is a finished pod named by its application_name: its processes are gone.
    named = dataclasses.replace(group, client_addr="192.0.2.7", application_name="report-28x")
    everywhere = attribution.PodIndex.build([done, web], namespace="prod", all_namespaces=True)
    assert attribute(everywhere, named).pod is None


def test_a_finished_pod_from_the_watch_keeps_no_claim_on_its_address() -> None:
    reconciler = Reconciler(kube=None, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    old = pod("report-28x", "10.0.0.7", namespace="prod", app="report")
    reconciler.on_pod("MODIFIED", pod_body(old, phase="Succeeded"))
    web = pod("web-3", "10.0.0.7", namespace="prod", age=600)
    reconciler.on_pod("ADDED", pod_body(web))
    group = dataclasses.replace(idle_group(web, [5.0], start_age=60), application_name="")
    got = attribute(reconciler.pods.index("prod"), group)
    assert got.pod is not None
    assert (got.pod.name, got.via) == ("web-3", attribution.Via.CLIENT_ADDR)


def test_every_address_of_a_dual_stack_pod_is_its_own() -> None:
    reconciler = Reconciler(kube=None, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    dual = pod_body(PROD_WEB0, podIPs=[{"ip": "10.0.0.1"}, {"ip": "fd00:10::1"}])
    reconciler.on_pod("ADDED", dual)
    v6 = dataclasses.replace(
        idle_group(PROD_WEB0, [5.0], start_age=60), client_addr="fd00:10::1", application_name=""
    )
    got = attribute(reconciler.pods.index("prod"), v6)
    assert got.pod is not None
    assert (got.pod.name, got.via) == ("web-0", attribution.Via.CLIENT_ADDR)
    # A client the pooler lists by its IPv6 address is the pod's too.
    client = PoolerClient(addr="fd00:10::1", user="app", database="app", state="active")
    got_clients = attribution.attribute_pooler_clients(
        clients=[client], index=reconciler.pods.index("prod")
    )
    assert got_clients == {"web-0": [client]}


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


def test_a_pod_a_relist_no_longer_lists_is_dropped_at_once() -> None:
    """A watch that expired (410 Gone) is listed again: a pod deleted meanwhile is gone at once,
    not at the next periodic resync (2 minutes later)."""
    import asyncio

    ghost = pod("web-1", "10.0.0.2", namespace="prod")
    kube = ListingKube({PROD_WEB0.uid})  # the API server no longer has web-1
    reconciler = Reconciler(kube=kube, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    for p in (PROD_WEB0, ghost):
        reconciler.on_pod("ADDED", pod_body(p))

    async def relist() -> set[str]:
        reconciler.lead()
        try:
            await asyncio.sleep(0)
            reconciler.on_pod(None, pod_body(PROD_WEB0))  # the re-list delivers what exists
            await asyncio.sleep(3 * reconciler_module.RELIST_SETTLE_SECONDS)
            return {p.name for p in reconciler.pods.pods["prod"].values()}
        finally:
            await reconciler.close()

    assert asyncio.run(relist()) == {"web-0"}
    assert "10.0.0.2" not in reconciler.pods.index("prod").by_ip


def test_backends_no_pod_can_be_told_at_a_governed_address_count_under_scope_selected() -> None:
    """hostNetwork pods share the node's address; backends from it without an application_name
    are no pod's for sure. Under scope Selected they may be the governed pod's own: counted (as
    unattributed, so the level sees the database filling), never acted on."""
    s = spec(budget__scope="Selected", budget__maxConnections=10)
    web = pod("web-0", "192.168.1.10")  # governed, hostNetwork
    agent = pod("agent-x", "192.168.1.10", app="agent", owner="agent")  # same node, not governed
    mine = idle_group(web, [5.0, 5.0])
    nobodys = dataclasses.replace(
        idle_group(web, [900.0] * 12, start_age=1200),
        application_name="",
        backends=tuple((90_000 + i, 900.0, NOW - 1200) for i in range(12)),
    )
    elsewhere = dataclasses.replace(nobodys, client_addr="10.9.9.9")  # no governed pod there
    smp = sample([mine, nobodys, elsewhere])
    index = attribution.PodIndex.build([web, agent], namespace=NS)
    got = attribution.attribute_backends(groups=smp.groups, index=index, mode=AttributionMode.AUTO)
    u = usage.compute_usage(spec=s, namespace=NS, sample=smp, attributed=got)
    assert (u.connections, u.unattributed) == (2 + 12, 12)
    decision = run(s, [web, agent], [mine, nobodys, elsewhere])
    assert decision.level is Level.OVER
    terminated = {
        b.pid for a in decision.actions if isinstance(a, TerminateBackends) for b in a.backends
    }
    assert not terminated & {pid for pid, _, _ in nobodys.backends}
