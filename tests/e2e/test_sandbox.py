"""The sandbox is real: Deployments run as processes, PostgreSQL sees them, evictions obey PDBs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import kubernetes
import psycopg
import pytest
from kubernetes.client.rest import ApiException

from sandbox.core import Sandbox
from sandbox.fixtures import (
    ForeignKubeconfigError,
    Workloads,
    eventually,
    is_gone,
    require_sandbox_kubeconfig,
)
from sandbox.network import LOOPBACK, NETNS, list_netns, netns_available

pytestmark = pytest.mark.sandbox


def backends_by_app(dsn: str) -> dict[str, list[tuple[str | None, str]]]:
    """Map application_name to [(client_addr, state)] of client backends (as the monitor sees)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, host(client_addr), state FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
    out: dict[str, list[tuple[str | None, str]]] = {}
    for app, addr, state in rows:
        out.setdefault(app, []).append((addr, state))
    return out


def evict(core: kubernetes.client.CoreV1Api, namespace: str, pod: str) -> int:
    """POST an Eviction; return the HTTP status (201 evicted, 429 refused by a PDB)."""
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
    }
    try:
        core.create_namespaced_pod_eviction(pod, namespace, body)
    except ApiException as e:
        return int(e.status)
    return 201


def test_leaky_deployment_runs_and_its_connections_are_attributed_to_its_pods(
    sandbox: Sandbox, workloads: Workloads, namespace: str, pg_dsn: str
) -> None:
    workloads.deploy(namespace, "leaky", replicas=3, env={"LEAK_RATE": "5", "LEAK_MAX": "4"})
    pods = workloads.pods(namespace, "app=leaky")
    assert len(pods) == 3
    by_name = {p.metadata.name: p.status.pod_ip for p in pods}

    def all_leaked() -> dict[str, list[tuple[str | None, str]]] | None:
        seen = backends_by_app(pg_dsn)
        return seen if all(len(seen.get(n, [])) == 4 for n in by_name) else None

    seen = eventually(all_leaked, timeout=30, what="4 leaked connections per pod")
    for name, ip in by_name.items():
        states = {state for _, state in seen[name]}
        assert states == {"idle"}
        if sandbox.network.mode == NETNS:
            # Each pod has its own network namespace: PostgreSQL sees the pod IP.
            assert {addr for addr, _ in seen[name]} == {ip}
    if sandbox.network.mode == NETNS:
        assert len(set(by_name.values())) == 3
    print(f"network mode: {sandbox.network.mode}")


def test_eviction_honours_the_pdb_and_the_replacement_gets_a_new_process(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    pg_dsn: str,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    policy = kubernetes.client.PolicyV1Api(kube_api)
    workloads.deploy(namespace, "leaky", replicas=3, env={"LEAK_RATE": "10", "LEAK_MAX": "3"})
    policy.create_namespaced_pod_disruption_budget(
        namespace,
        {
            "metadata": {"name": "leaky"},
            "spec": {"minAvailable": 3, "selector": {"matchLabels": {"app": "leaky"}}},
        },
    )
    eventually(
        lambda: (
            policy.read_namespaced_pod_disruption_budget("leaky", namespace).status.current_healthy
            == 3
        ),
        timeout=30,
        what="PDB status computed",
    )
    victim = workloads.pods(namespace, "app=leaky")[0].metadata.name
    eventually(
        lambda: len(backends_by_app(pg_dsn).get(victim, [])) == 3,
        timeout=30,
        what="victim's connections",
    )

    assert evict(core, namespace, victim) == 429

    policy.patch_namespaced_pod_disruption_budget("leaky", namespace, {"spec": {"minAvailable": 2}})
    eventually(
        lambda: (
            policy.read_namespaced_pod_disruption_budget(
                "leaky", namespace
            ).status.disruptions_allowed
            == 1
        ),
        timeout=30,
        what="PDB allows one disruption",
    )
    # The pods before the eviction: a replacement may be Running before we look again.
    known = {p.metadata.name for p in workloads.pods(namespace, "app=leaky")}
    assert evict(core, namespace, victim) == 201

    # The pod's process ends, so its backends leave pg_stat_activity within seconds.
    eventually(
        lambda: victim not in backends_by_app(pg_dsn),
        timeout=15,
        what="evicted pod's backends gone",
    )
    log = sandbox.state_dir / "pods" / namespace / victim / "app.log"
    assert '"event": "stopped"' in log.read_text(), "the pod's process got SIGTERM and exited"

    def replacement() -> str | None:
        names = {p.metadata.name for p in workloads.pods(namespace, "app=leaky")}
        return next(iter(names - known), None) if len(names) == 3 else None

    new_pod = eventually(replacement, timeout=30, what="ReplicaSet replacement pod")
    eventually(
        lambda: len(backends_by_app(pg_dsn).get(new_pod, [])) == 3,
        timeout=30,
        what="replacement pod's own connections",
    )


def test_pod_env_resolves_field_refs_and_the_pod_reaches_pgbouncer(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    pgbouncer_dsn: str,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "envcheck", "labels": {"team": "blue"}},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "sandbox.local/pause",
                        "command": ["sh", "-c", "echo $(POD) $NS $IP $TEAM; exec sleep infinity"],
                        "env": [
                            {
                                "name": "POD",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                            },
                            {
                                "name": "NS",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                            },
                            {
                                "name": "IP",
                                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                            },
                            {
                                "name": "TEAM",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}},
                            },
                        ],
                    }
                ]
            },
        },
    )
    log = sandbox.state_dir / "pods" / namespace / "envcheck" / "main.log"
    line = eventually(
        lambda: log.exists() and log.read_text().strip(), timeout=30, what="pod output"
    )
    pod = core.read_namespaced_pod("envcheck", namespace)
    assert line == f"envcheck {namespace} {pod.status.pod_ip} blue"
    assert pod.status.phase == "Running"
    assert all(c.ready for c in pod.status.container_statuses)

    # A leaky app behind PgBouncer: the admin console shows each client at its pod's address.
    workloads.deploy(
        namespace, "pooled", replicas=2, via_pooler=True, env={"LEAK_RATE": "10", "LEAK_MAX": "2"}
    )
    ips = {p.status.pod_ip for p in workloads.pods(namespace, "app=pooled")}

    def clients() -> set[str] | None:
        with psycopg.connect(
            pgbouncer_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.execute("SHOW CLIENTS")
            cols = [d.name for d in cur.description or []]
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        found = [r for r in rows if r["database"] == "app" and r["user"] == "app"]
        return {r["addr"] for r in found} if len(found) == 4 else None

    addrs = eventually(clients, timeout=30, what="4 pooled clients in SHOW CLIENTS")
    if sandbox.network.mode == NETNS:
        assert addrs == ips


def test_an_unmapped_image_leaves_the_pod_pending_with_a_reason(
    namespace: str, kube_api: kubernetes.client.ApiClient
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "nope"},
            "spec": {"containers": [{"name": "main", "image": "example.invalid/unknown:1"}]},
        },
    )

    def reason() -> str | None:
        pod = core.read_namespaced_pod("nope", namespace)
        conds = {c.type: c for c in pod.status.conditions or []}
        return conds["Ready"].reason if "Ready" in conds else None

    assert eventually(reason, timeout=30, what="Ready condition") == "ImageNotMapped"
    assert core.read_namespaced_pod("nope", namespace).status.phase == "Pending"


def test_kubectl_and_helm_work_against_the_api_server(
    sandbox: Sandbox, namespace: str, tmp_path: Path
) -> None:
    env = {
        "PATH": f"{sandbox.bin_dir}:/usr/bin:/bin",
        "KUBECONFIG": sandbox.kubeconfig,
        "HOME": str(tmp_path),
    }

    def run(*argv: str) -> str:
        res = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"
        return res.stdout

    version = json.loads(run("kubectl", "version", "-o", "json"))
    assert (
        version["clientVersion"]["gitVersion"]
        == version["serverVersion"]["gitVersion"]
        == "v1.36.3"
    )
    assert "sandbox-node" in run("kubectl", "get", "nodes")

    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tiny\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )

    def greeting() -> str:
        out = run("kubectl", "-n", namespace, "get", "configmap", "tiny", "-o", "json")
        return str(json.loads(out)["data"]["greeting"])

    run("helm", "install", "tiny", str(chart), "-n", namespace, "--wait", "--timeout", "60s")
    assert greeting() == "hello"
    run("helm", "upgrade", "tiny", str(chart), "-n", namespace, "--set", "greeting=bye")
    assert greeting() == "bye"
    assert "tiny" in run("helm", "list", "-n", namespace, "-q")
    run("helm", "uninstall", "tiny", "-n", namespace, "--wait")
    res = subprocess.run(
        ["kubectl", "-n", namespace, "get", "configmap", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0
    assert "NotFound" in res.stderr


def test_deleting_a_namespace_with_running_pods_completes(
    workloads: Workloads, kube_api: kubernetes.client.ApiClient
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": "doomed"}})
    eventually(lambda: core.read_namespaced_service_account("default", "doomed"), timeout=30)
    workloads.deploy("doomed", "steady", image="sandbox.local/steady-app:dev", replicas=2)
    core.delete_namespace("doomed")

    eventually(
        lambda: is_gone(core.read_namespace, "doomed"),
        timeout=90,
        interval=0.5,
        what="namespace deleted",
    )


@pytest.mark.parametrize("mode", [NETNS, LOOPBACK])
def test_a_second_sandbox_attributes_pods_and_tears_down_without_leftovers(mode: str) -> None:
    # A second, small sandbox in each network mode: run pods, check what PostgreSQL sees, tear it
    # down, and look for any process, namespace, link or folder left behind.
    if mode == NETNS and not netns_available():
        pytest.skip("this machine does not let the sandbox create network namespaces")
    second = Sandbox.up(
        max_connections=20, owner_pid=os.getpid(), network=mode, progress=lambda _: None
    )
    try:
        assert second.network.mode == mode
        wl = Workloads(sandbox=second, api=second.api_client())
        wl.deploy("default", "leaky", replicas=2, env={"LEAK_RATE": "5", "LEAK_MAX": "2"})
        pods = {p.metadata.name: p.status.pod_ip for p in wl.pods("default", "app=leaky")}

        def all_connected() -> dict[str, list[tuple[str | None, str]]] | None:
            b = backends_by_app(second.db.monitor_dsn)
            return b if all(len(b.get(n, [])) == 2 for n in pods) else None

        seen = eventually(all_connected, timeout=30, what="2 connections per pod")
        for name, ip in pods.items():
            expected = ip if mode == NETNS else "127.0.0.1"
            assert {addr for addr, _ in seen[name]} == {expected}
        assert second.leftovers() != []  # it is really up
        netns = [n for n in list_netns() if n.startswith(f"cb{second.network.index}-")]
        assert len(netns) == (2 if mode == NETNS else 0)
    finally:
        second.down()
    assert second.leftovers() == []
    assert not second.state_dir.exists()


def test_the_guard_refuses_a_kubeconfig_the_sandbox_did_not_create(
    tmp_path: Path, kubeconfig: str
) -> None:
    foreign = tmp_path / "admin.kubeconfig"
    foreign.write_text(Path(kubeconfig).read_text())  # same content, not the sandbox's file
    with pytest.raises(ForeignKubeconfigError):
        require_sandbox_kubeconfig(str(foreign))
    with pytest.raises(ForeignKubeconfigError):
        require_sandbox_kubeconfig(str(Path.home() / ".kube" / "config"))
    assert require_sandbox_kubeconfig(kubeconfig) == kubeconfig
