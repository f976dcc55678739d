"""Pooler targets: a CloudNativePG Pooler's pods are found, an autoscaler is never fought."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from connbudget import cycle
from connbudget.kube.api import KubeError, Scale
from connbudget.model.observations import PoolerSample
from connbudget.model.spec import ObjectRef
from unit.test_cycle import (
    OVER_STATUS,
    SPEC,
    WEB1,
    WEB2,
    FakeKube,
    FakeMonitor,
    leaking,
    make_deps,
    run_cycle,
)

CNPG = ObjectRef(api_version="postgresql.cnpg.io/v1", kind="Pooler", name="pooler-rw")
NO_SELECTOR = Scale(replicas=2, selector="")


def test_a_cloudnativepg_pooler_is_found_by_its_pooler_name_label() -> None:
    assert cycle.pooler_pod_labels(CNPG, None, NO_SELECTOR) == {"cnpg.io/poolerName": "pooler-rw"}
    given = {"app": "bouncer"}
    assert cycle.pooler_pod_labels(CNPG, given, NO_SELECTOR) == given


def test_a_target_that_names_no_pods_is_pooler_target_invalid() -> None:
    class NoSelector(FakeKube):
        async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
            return NO_SELECTOR

    kube, monitor = NoSelector(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    spec = {
        **SPEC,
        "pooler": {"targetRef": {"apiVersion": "example.com/v1", "kind": "Bouncer", "name": "b"}},
    }
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PoolerTargetInvalid")
    assert "spec.pooler.selector" in ready["message"]
    # The pooler's part waits; a direct leak is still held.
    assert not [c for c in kube.calls if c[0] == "scale"]


def test_an_api_server_away_is_no_invalid_pooler_target() -> None:
    # Found by the fault run: while the API server restarted, reading /scale timed out and the
    # budget said PoolerTargetInvalid (a Stalled reason: "only a change by the user can help").
    # An API server away is the cycle's failure, retried, not the user's mistake.
    class Away(FakeKube):
        async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
            raise KubeError(504, "no answer from the API server in time (MaxRetryError)")

    class Missing(FakeKube):
        async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
            raise KubeError(404, 'deployments.apps "pgbouncer" not found')

    spec = {
        **SPEC,
        "pooler": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgb"}},
    }
    deps, _ = make_deps(Away(), FakeMonitor(leaking()), [WEB1, WEB2])
    with pytest.raises(KubeError):
        run_cycle(deps, spec=spec, old_status=OVER_STATUS)
    deps, _ = make_deps(Missing(), FakeMonitor(leaking()), [WEB1, WEB2])
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PoolerTargetInvalid")


def test_a_pooler_an_autoscaler_owns_is_never_scaled() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    kube.autoscalers = ["HorizontalPodAutoscaler/keda-hpa-pgbouncer"]
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])

    async def busy(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        return PoolerSample(replicas=4, server_connections=80)

    deps = dataclasses.replace(deps, sample_poolers=busy)
    spec = {
        **SPEC,
        "remediation": {**SPEC["remediation"], "steps": ["ScalePooler"]},
        "pooler": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
            "adminSecretRef": {"name": "pgbouncer-admin"},
        },
    }
    runtime = cycle.Runtime()
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS, runtime=runtime)
    assert [c for c in kube.calls if c[0] == "scale"] == []
    holds = out["remediation"]["holds"]
    assert any(h["step"] == "ScalePooler" and h["reason"] == "Blocked" for h in holds), holds
    runtime.last_probe_at = None
    run_cycle(deps, spec=spec, old_status=OVER_STATUS, runtime=runtime)
    assert [r for _, r, _ in events].count("PoolerScaledElsewhere") == 1
    # Without the autoscaler, the same breach scales the pooler down.
    kube.autoscalers = []
    runtime.pooler_owner_checked = None
    runtime.last_probe_at = None
    run_cycle(deps, spec=spec, old_status=OVER_STATUS, runtime=runtime)
    assert [c for c in kube.calls if c[0] == "scale"]


def test_a_pgbouncer_client_carries_when_it_connected() -> None:
    from connbudget.probe.pgbouncer import summarise

    _, _, (client,) = summarise(
        [],
        [
            {
                "database": "app",
                "user": "app",
                "addr": "10.0.0.1",
                "state": "active",
                "connect_time": "2027-01-15 07:59:00 UTC",
                "request_time": "2027-01-15 07:59:50 UTC",
            }
        ],
        now=1_800_000_000.0,  # 2027-01-15 08:00:00 UTC
    )
    assert client.connected_at == 1_800_000_000.0 - 60
    assert client.idle_seconds == 10


def test_a_malformed_admin_dsn_waits_for_the_user() -> None:
    from connbudget.probe.errors import ProbeError, ProbeFailure

    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])

    async def malformed(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        raise ProbeError(ProbeFailure.DSN_INVALID, "the DSN is not a valid libpq connection string")

    deps = dataclasses.replace(deps, sample_poolers=malformed)
    spec = {
        **SPEC,
        "pooler": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
            "adminSecretRef": {"name": "pgbouncer-admin"},
        },
    }
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS)
    stalled = next(c for c in out["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "DsnInvalid")


def test_a_wrong_admin_password_on_a_pooler_pod_waits_for_the_user() -> None:
    # Found by the reasons-table review: a pod's login failure came back as one of the sample's
    # errors and was reported as DatabaseUnreachable (not stalled: "waiting may cure it").
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])

    async def refused(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        return PoolerSample(
            replicas=replicas,
            errors=("10.0.0.9: password authentication failed",),
            failure="AuthenticationFailed",
        )

    deps = dataclasses.replace(deps, sample_poolers=refused)
    spec = {
        **SPEC,
        "pooler": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
            "adminSecretRef": {"name": "pgbouncer-admin"},
        },
    }
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS)
    stalled = next(c for c in out["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "AuthenticationFailed")
    assert not [c for c in kube.calls if c[0] == "scale"]  # the pooler's part waits


def test_a_gitops_tool_that_applies_the_replicas_owns_them() -> None:
    from connbudget.kube.api import replica_managers

    replicas: dict[str, object] = {"f:spec": {"f:replicas": {}, "f:template": {}}}
    template_only: dict[str, object] = {"f:spec": {"f:template": {}}}
    fields = [
        {"manager": "kustomize-controller", "operation": "Apply", "fieldsV1": replicas},
        {"manager": "argocd-controller", "operation": "Update", "fieldsV1": replicas},
        {"manager": "connbudget", "operation": "Update", "fieldsV1": replicas},
        {"manager": "kubectl", "operation": "Update", "fieldsV1": replicas},  # kubectl scale
        {"manager": "helm", "operation": "Apply", "fieldsV1": template_only},
    ]
    assert replica_managers(fields) == [
        "field manager argocd-controller",
        "field manager kustomize-controller",
    ]
