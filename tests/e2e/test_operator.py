"""The operator end to end on the sandbox: real API server, real PostgreSQL, pods as processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from e2e.conftest import Budgets, Operator, all_text, start_operator, wait_until
from e2e.reliability import backends, budget_spec
from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads
from sandbox.network import NETNS

pytestmark = pytest.mark.sandbox


def pod_names(workloads: Workloads, namespace: str, app: str) -> set[str]:
    return {p.metadata.name for p in workloads.pods(namespace, f"app={app}")}


def test_idle_leaked_backends_are_terminated_and_the_steady_app_is_untouched(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    db = sandbox.db
    budgets.secret("pg-monitor", db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "3", "LEAK_MAX": "40"})
    workloads.deploy(
        namespace,
        "steady",
        image=STEADY_IMAGE,
        replicas=1,
        env={"POOL_SIZE": "2", "QUERY_INTERVAL": "0.5", "RECONNECT": "0"},
    )
    before = pod_names(workloads, namespace, "leaky")
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            remediation={
                "steps": ["TerminateIdle"],
                "breachSeconds": 2,
                "terminateIdle": {"minIdleSeconds": 2},
            },
            leakDetection={"idleSeconds": 30},
        ),
    )

    event = budgets.wait_event("IdleConnectionsTerminated", timeout=60)
    assert "idle backends of leaky-" in event.message
    # The guard rail holds: for 10 s the server never fills, though the leak goes on.
    usable = db.max_connections - 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert sum(backends(db.monitor_dsn, "").values()) < usable
        time.sleep(0.5)
    st = budgets.status("leaky")
    assert st["usage"]["budget"] == 20
    assert st["lastAction"]["type"] == "TerminateIdle"
    assert st["lastAction"]["dryRun"] is False
    assert {o["owner"] for o in st["usage"]["byOwner"]} >= {"Deployment/leaky", "Deployment/steady"}
    ready = budgets.condition("leaky", "Ready")
    assert ready is not None
    assert ready["status"] == "True"
    # Only TerminateIdle was allowed: the leaky pods are the same pods.
    assert pod_names(workloads, namespace, "leaky") == before
    assert not budgets.events("PodEvicted")
    # The steady app's connections (outside the selector) were never touched.
    steady_pod = next(iter(pod_names(workloads, namespace, "steady")))
    log = (sandbox.state_dir / "pods" / namespace / steady_pod / "app.log").read_text()
    assert "query_failed" not in log
    metrics = operator.metrics()
    assert 'connbudget_actions_total{action="TerminateIdle",budget="leaky"' in metrics
    assert "connbudget_probe_duration_seconds_bucket" in metrics
    assert "connbudget_monitor_connections 1.0" in metrics


def test_restarts_go_through_the_eviction_api_and_a_pdb_blocks_them(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    policy = kubernetes.client.PolicyV1Api(kube_api)
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "2", "LEAK_MAX": "20"})
    policy.create_namespaced_pod_disruption_budget(
        namespace,
        {
            "metadata": {"name": "leaky"},
            "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "leaky"}}},
        },
    )
    before = pod_names(workloads, namespace, "leaky")
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 8},
            remediation={
                "steps": ["RestartPods"],
                "breachSeconds": 1,
                "cooldownSeconds": 5,
                "terminateIdle": {"minIdleSeconds": 1},
                "restartPods": {"minPodAgeSeconds": 0},
            },
        ),
    )

    blocked = budgets.wait_event("RestartBlocked", timeout=60)
    assert "PodDisruptionBudget" in blocked.message
    assert budgets.status("leaky")["lastAction"]["result"] == "Blocked"
    assert pod_names(workloads, namespace, "leaky") == before

    policy.patch_namespaced_pod_disruption_budget("leaky", namespace, {"spec": {"minAvailable": 1}})
    evicted = budgets.wait_event("PodEvicted", timeout=60)
    victim = evicted.message.split("evict pod ")[1].split(" ")[0]
    assert victim in before
    wait_until(
        lambda: victim not in pod_names(workloads, namespace, "leaky"), 30, "evicted pod gone"
    )
    # Never all at once: one pod per cycle (maxPodsPerCycle 1); the other one kept running.
    assert len(before - pod_names(workloads, namespace, "leaky")) == 1


def test_dry_run_plans_and_reports_but_never_acts(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "5", "LEAK_MAX": "15"})
    before = pod_names(workloads, namespace, "leaky")
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 5},
            remediation={
                "dryRun": True,
                "breachSeconds": 0,
                "cooldownSeconds": 0,
                "terminateIdle": {"minIdleSeconds": 1},
                "restartPods": {"minPodAgeSeconds": 0},
            },
        ),
    )

    event = budgets.wait_event("DryRun", timeout=60)
    assert event.message.startswith("dry-run: would ")
    wait_until(
        lambda: sum(backends(sandbox.db.monitor_dsn, "leaky").values()) == 15,
        30,
        "the leak runs its course",
    )
    time.sleep(3)  # several more cycles
    assert sum(backends(sandbox.db.monitor_dsn, "leaky").values()) == 15
    assert pod_names(workloads, namespace, "leaky") == before
    for reason in ("IdleConnectionsTerminated", "PodEvicted", "PoolerScaled"):
        assert not budgets.events(reason)
    st = budgets.status("leaky")
    assert st["lastAction"]["dryRun"] is True
    assert st["lastAction"]["result"] == "Planned"
    rem = budgets.condition("leaky", "Remediating")
    assert rem is not None
    assert rem["reason"] in ("DryRun", "Waiting")


def test_the_pause_annotation_stops_actions_not_reporting(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "5", "LEAK_MAX": "12"})
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 5},
            remediation={
                "steps": ["TerminateIdle"],
                "breachSeconds": 0,
                "terminateIdle": {"minIdleSeconds": 1},
            },
        ),
        annotations={"connbudget.io/paused": "true"},
    )

    wait_until(lambda: budgets.status("leaky").get("phase") == "Paused", 30, "phase Paused")
    paused = budgets.condition("leaky", "Paused")
    assert paused is not None
    assert paused["status"] == "True"
    wait_until(
        lambda: budgets.status("leaky").get("usage", {}).get("connections", 0) >= 12,
        30,
        "usage reported while paused",
    )
    assert not budgets.events("IdleConnectionsTerminated")

    budgets.patch("leaky", {"metadata": {"annotations": {"connbudget.io/paused": None}}})
    budgets.wait_event("IdleConnectionsTerminated", timeout=30)
    paused = budgets.condition("leaky", "Paused")
    assert paused is not None
    assert paused["status"] == "False"


def test_what_only_the_operator_can_judge_becomes_a_condition_and_recovers(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    db = sandbox.db
    workloads.deploy(namespace, "leaky", replicas=1, env={"LEAK_RATE": "1", "LEAK_MAX": "3"})
    budgets.create("leaky", budget_spec("leaky"))

    def ready_reason() -> str | None:
        c = budgets.condition("leaky", "Ready")
        return f"{c['status']}:{c['reason']}" if c else None

    wait_until(lambda: ready_reason() == "False:SecretMissing", 30, "SecretMissing")
    assert budgets.status("leaky")["phase"] == "Degraded"
    budgets.wait_event("ProbeFailed", timeout=10)

    wrong = "Wr0ng-Passw0rd-xyz"
    budgets.secret("pg-monitor", db.dsn("connbudget_monitor", wrong, db.pg_port, "app"))
    wait_until(lambda: ready_reason() == "False:AuthenticationFailed", 30, "AuthenticationFailed")
    reachable = budgets.condition("leaky", "DatabaseReachable")
    assert reachable is not None
    assert reachable["status"] == "False"

    budgets.secret("pg-monitor", "host=127.0.0.1 port=notaport password=Sec-ret-987 =")
    wait_until(lambda: ready_reason() == "False:DsnInvalid", 30, "DsnInvalid")

    budgets.secret("pg-monitor", db.monitor_dsn)
    wait_until(lambda: ready_reason() == "True:ProbeSucceeded", 30, "recovered")

    budgets.patch("leaky", {"spec": {"selector": {"matchLabels": {"app": "nothing-here"}}}})
    wait_until(lambda: ready_reason() == "False:NoPodsSelected", 30, "NoPodsSelected")
    assert (
        budgets.status("leaky")["observedGeneration"]
        == budgets.get("leaky")["metadata"]["generation"]
    )

    text = all_text(budgets, "leaky", operator)
    for secret in (wrong, db.monitor_password, "Sec-ret-987", db.monitor_dsn):
        assert secret not in text
    assert operator.proc.poll() is None  # never a crash


INVALID_SPECS = [
    pytest.param({"budget": {"maxConnections": 5, "maxPercent": 50}}, "exactly one", id="both"),
    pytest.param({"budget": {"scope": "Database"}}, "exactly one", id="neither"),
    pytest.param({"budget": {"maxConnections": 0}}, "greater than or equal to 1", id="zero"),
    pytest.param({"selector": {}}, "must not be empty", id="empty-selector"),
    pytest.param(
        {"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "need values",
        id="in-no-values",
    ),
    pytest.param(
        {
            "pooler": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgb"},
                "minReplicas": 3,
                "maxReplicas": 1,
            }
        },
        "must not exceed",
        id="pooler-min-max",
    ),
    pytest.param({"remediation": {"steps": ["Reboot"]}}, "Unsupported value", id="step"),
    pytest.param(
        {"remediation": {"restartPods": {"method": "Kill"}}}, "Unsupported value", id="method"
    ),
    pytest.param({"pollSeconds": 0}, "greater than or equal to 1", id="poll"),
    pytest.param(
        {"remediation": {"terminateIdle": {"minIdleSeconds": 900}}},
        "must not exceed",
        id="min-idle",
    ),
]


@pytest.mark.parametrize(("change", "message"), INVALID_SPECS)
def test_the_api_server_rejects_invalid_budgets_and_check_agrees(
    budgets: Budgets, change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    spec = {**budget_spec("web"), **change}
    with pytest.raises(ApiException) as err:
        budgets.create("bad", spec)
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        json.dumps(
            {
                "apiVersion": "connbudget.io/v1alpha1",
                "kind": "ConnectionBudget",
                "metadata": {"name": "bad"},
                "spec": spec,
            }
        )
    )
    res = subprocess.run(
        [sys.executable, "-m", "connbudget", "check", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1, res.stdout


def test_an_operator_restart_mid_episode_does_not_repeat_the_restart(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    tmp_path: Path,
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(namespace, "leaky", replicas=2, env={"LEAK_RATE": "3", "LEAK_MAX": "20"})
    budgets.create(
        "leaky",
        budget_spec(
            "leaky",
            budget={"maxConnections": 8},
            remediation={
                "steps": ["RestartPods"],
                "breachSeconds": 1,
                "cooldownSeconds": 120,
                "terminateIdle": {"minIdleSeconds": 1},
                "restartPods": {"minPodAgeSeconds": 0},
            },
        ),
    )
    budgets.wait_event("PodEvicted", timeout=60)
    cooldown = budgets.status("leaky")["cooldownUntil"]
    assert cooldown
    operator.stop(signal.SIGKILL)

    again = start_operator(sandbox, namespace, tmp_path / "operator-2.log")
    try:
        # The new process reads the cooldown from status: still over budget, but no restart.
        wait_until(
            lambda: "Cooldown" in json.dumps(budgets.status("leaky").get("remediation")),
            40,
            "the restarted operator waiting for the cooldown",
        )
        time.sleep(5)
        assert len(budgets.events("PodEvicted")) == 1
        assert budgets.status("leaky")["cooldownUntil"] == cooldown
    finally:
        again.stop()


def _pooler_budget(budget: int, steps: list[str], replicas_max: int = 2) -> dict[str, Any]:
    return budget_spec(
        "leaky",
        budget={"maxConnections": budget},
        remediation={
            "steps": steps,
            "breachSeconds": 1,
            "cooldownSeconds": 60,
            "terminateIdle": {"minIdleSeconds": 1},
            "restartPods": {"minPodAgeSeconds": 0},
        },
        pooler={
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
            "minReplicas": 1,
            "maxReplicas": replicas_max,
            "serverConnectionsPerReplica": 5,
            "adminSecretRef": {"name": "pgbouncer-admin"},
        },
    )


def _pooler_secrets(sandbox: Sandbox, budgets: Budgets) -> None:
    from sandbox.postgres import BOUNCER_ADMIN

    db = sandbox.db
    budgets.secret("pg-monitor", db.monitor_dsn)
    # The host is a placeholder: the operator queries each pooler pod at its own address.
    budgets.secret(
        "pgbouncer-admin",
        db.dsn(BOUNCER_ADMIN, db.bouncer_admin_password, 6432, "pgbouncer").replace(
            f"@{db.host}:", "@pooler:"
        ),
    )


def test_a_leak_through_pgbouncer_is_traced_to_the_leaking_pod(
    sandbox: Sandbox, workloads: Workloads, namespace: str, budgets: Budgets, operator: Operator
) -> None:
    if sandbox.network.mode != NETNS:
        pytest.skip("pooler pods need their own addresses (netns mode)")
    _pooler_secrets(sandbox, budgets)
    (pooler_ip,) = workloads.deploy_pgbouncer(namespace, pool_size=30)
    poolers = pod_names(workloads, namespace, "pgbouncer")
    workloads.deploy(
        namespace,
        "leaky",
        replicas=2,
        via_pooler=pooler_ip,
        env={"LEAK_RATE": "2", "LEAK_MAX": "20"},
    )
    budgets.create("leaky", _pooler_budget(10, ["RestartPods"]))

    evicted = budgets.wait_event("PodEvicted", timeout=60)
    assert "pod leaky-" in evicted.message
    st = budgets.status("leaky")
    owners = {o["owner"]: o for o in st["usage"]["byOwner"]}
    assert owners["Deployment/leaky"]["pooled"] > 0  # the clients, traced through PgBouncer
    assert owners["Deployment/pgbouncer"]["connections"] > 0  # the pooler's server side
    assert st["pooler"]["replicas"] == 1
    assert st["pooler"]["serverConnections"] > 0
    assert pod_names(workloads, namespace, "pgbouncer") == poolers  # the pooler is never evicted


def test_the_pooler_is_scaled_down_when_its_server_connections_break_the_budget(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    kube_api: kubernetes.client.ApiClient,
) -> None:
    if sandbox.network.mode != NETNS:
        pytest.skip("pooler pods need their own addresses (netns mode)")
    _pooler_secrets(sandbox, budgets)
    ips = workloads.deploy_pgbouncer(namespace, replicas=2, pool_size=5)
    workloads.deploy(
        namespace, "leaky", replicas=1, via_pooler=ips[0], env={"LEAK_RATE": "5", "LEAK_MAX": "8"}
    )
    budgets.create("leaky", _pooler_budget(4, ["ScalePooler"]))

    scaled = budgets.wait_event("PoolerScaled", timeout=60)
    assert "from 2 to 1 replicas" in scaled.message
    apps = kubernetes.client.AppsV1Api(kube_api)
    assert apps.read_namespaced_deployment_scale("pgbouncer", namespace).spec.replicas == 1
    assert budgets.status("leaky")["lastAction"]["type"] == "ScalePooler"
