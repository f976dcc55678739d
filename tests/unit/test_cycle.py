"""The reconcile cycle with fake dependencies: what it calls, and what it never calls."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from connbudget import cycle
from connbudget.kube.api import EvictionResult, Scale, SecretProblem
from connbudget.model.actions import IdleBackend, Termination
from connbudget.model.observations import LastStatement, PodInfo, PoolerSample, ServerSample
from connbudget.model.spec import ObjectRef, SecretRef, parse_spec
from connbudget.model.timestamps import parse_timestamp as status_time
from connbudget.policy.usage import is_governed
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.report.metrics import Metrics
from unit.builders import NOW, leak_group, pod, sample

PASSWORD = "pa55-Word-Zz"
DSN = f"postgresql://mon:{PASSWORD}@db:5432/app"
WEB1 = pod("web-1", "10.0.0.1")
WEB2 = pod("web-2", "10.0.0.2")


class FakeKube:
    def __init__(
        self, *, dsn: str | None = DSN, evict: EvictionResult = EvictionResult.EVICTED
    ) -> None:
        self.dsn = dsn
        self.evict_result = evict
        self.unwatched_pods = 0  # pods the API server has that the watch has not delivered
        self.autoscalers: list[str] = []  # HPAs that own the pooler's replicas
        self.calls: list[tuple[str, Any]] = []

    async def read_secret_value(self, namespace: str, ref: SecretRef) -> str:
        if self.dsn is None:
            raise SecretProblem(f"Secret {namespace}/{ref.name} not found")
        return self.dsn

    def forget_secret(self, namespace: str, ref: SecretRef) -> None:
        self.calls.append(("forget", ref.name))

    async def evict_pod(
        self, namespace: str, name: str, uid: str, *, dry_run: bool
    ) -> EvictionResult:
        self.calls.append(("evict", name))
        return self.evict_result

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, dry_run: bool
    ) -> EvictionResult:
        self.calls.append(("delete", name))
        return EvictionResult.EVICTED

    async def rollout_restart(
        self, namespace: str, kind: str, name: str, *, now: float, dry_run: bool
    ) -> None:
        self.calls.append(("rollout", name))

    async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
        return Scale(replicas=1, selector="app=pgbouncer")

    async def patch_scale(
        self, namespace: str, target: ObjectRef, replicas: int, *, dry_run: bool
    ) -> None:
        self.calls.append(("scale", replicas))

    async def count_pods(self, namespace: str, label_selector: str) -> int:
        return self.unwatched_pods

    async def autoscalers_of(self, namespace: str, target: ObjectRef) -> list[str]:
        return list(self.autoscalers)

    async def replica_managers(self, namespace: str, target: ObjectRef) -> list[str]:
        return []


class FakeMonitor:
    def __init__(self, result: ServerSample | ProbeError, query: str = "SELECT 1") -> None:
        self.result = result
        self.terminated: list[int] = []
        self.not_permitted: set[int] = set()  # pids the monitoring role may not signal
        self.query = query  # what every backend last ran
        self.asked: list[int] = []
        self.not_before: list[float | None] = []  # what each sample() was asked for

    async def sample(self, *, not_before: float | None = None) -> ServerSample:
        self.not_before.append(not_before)
        if isinstance(self.result, ProbeError):
            raise self.result
        return self.result

    async def terminate(self, backends: Iterable[IdleBackend]) -> Termination:
        pids = [b.pid for b in backends]
        ended = [p for p in pids if p not in self.not_permitted]
        self.terminated += ended
        return Termination(
            terminated=tuple(ended),
            not_permitted=tuple(p for p in pids if p in self.not_permitted),
        )

    async def statements(self, backends: Iterable[tuple[int, float]]) -> list[LastStatement]:
        chosen = list(backends)
        self.asked += [pid for pid, _ in chosen]
        return [
            LastStatement(pid=pid, backend_start=start, query_id=None, query=self.query)
            for pid, start in chosen
        ]


def make_deps(
    kube: FakeKube, monitor: FakeMonitor, pods: Sequence[PodInfo], now: float = NOW
) -> tuple[cycle.Deps, list[tuple[str, str, str]]]:
    events: list[tuple[str, str, str]] = []

    async def bind(budget: str, dsn: str, ca_pem: str | None) -> cycle.MonitorLike:
        return monitor

    async def poolers(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        return PoolerSample(replicas=replicas)

    async def post(type_: str, reason: str, message: str, series: str | None) -> None:
        events.append((type_, reason, message))

    return cycle.Deps(
        kube=kube,
        bind_monitor=bind,
        sample_poolers=poolers,
        pods=lambda ns: list(pods),
        # As the reconciler passes it (its pod cache matches a selector once per change).
        governed=lambda ns, selector: [p for p in pods if is_governed(p, selector, ns)],
        post_event=post,
        metrics=Metrics(),
        now=lambda: now,
    ), events


SPEC: dict[str, Any] = {
    "database": {"secretRef": {"name": "pg"}},
    "budget": {"maxConnections": 80},
    "selector": {"matchLabels": {"app": "web"}},
    "remediation": {"breachSeconds": 0, "restartPods": {"minPodAgeSeconds": 0}},
}
OVER_STATUS = {
    "remediation": {
        "level": "OverBudget",
        "breachSince": "2027-01-15T08:00:00Z",
        "episodeSince": "2027-01-15T08:00:00Z",
        "escalation": 1,
    }
}


def run_cycle(
    deps: cycle.Deps,
    *,
    spec: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    old_status: dict[str, Any] | None = None,
    runtime: cycle.Runtime | None = None,
) -> dict[str, Any]:
    out = asyncio.run(
        cycle.run_cycle(
            namespace="shop",
            name="web",
            generation=2,
            spec_raw=spec or SPEC,
            annotations=annotations or {},
            old_status=old_status or {},
            runtime=runtime or cycle.Runtime(),
            deps=deps,
        )
    )
    assert out is not None
    return out


def leaking() -> ServerSample:
    """90 leaked connections: web-1 leaves 30 idle in a transaction (a restart is the remedy)
    and 30 idle, web-2 leaves 30 idle (termination is)."""
    return sample(
        [
            leak_group(WEB1, 30, state="idle in transaction"),
            leak_group(WEB1, 30),
            leak_group(WEB2, 30),
        ]
    )


def test_a_leak_is_located_in_status_event_and_metrics_without_its_literals() -> None:
    secret = "planted-S3cret-literal"
    query = f"SELECT id FROM accounts WHERE password = '{secret}' /*route='login%2F'*/"
    kube, monitor = FakeKube(), FakeMonitor(leaking(), query=query)
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    rt = cycle.Runtime()
    out = run_cycle(deps, old_status=OVER_STATUS, runtime=rt)
    web = next(o for o in out["usage"]["byOwner"] if o["owner"] == "Deployment/web")
    (where,) = web["leaks"]
    assert where["statement"] == "SELECT id FROM accounts WHERE password = ?"
    assert where["tags"] == {"route": "login/"}
    assert where["count"] == 90
    (leak_event,) = [m for _, r, m in events if r == "LeakDetected"]
    assert "100% after `SELECT id FROM accounts WHERE password = ?` (route=login/)" in leak_event
    exposition = generate_latest(deps.metrics.registry).decode()
    assert f'fingerprint="{where["fingerprint"]}"' in exposition
    assert all(secret not in text for text in (str(out), str(events), exposition))
    assert {c["type"]: c["status"] for c in out["conditions"]}["StatementsVisible"] == "True"
    # Asked once per connection: the next cycle asks about none of them again.
    asked = len(monitor.asked)
    rt.last_probe_at = None
    run_cycle(deps, old_status=out, runtime=rt)
    assert len(monitor.asked) == asked == 90


def test_a_breach_terminates_and_evicts_and_reports_it() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    out = run_cycle(deps, old_status=OVER_STATUS)
    # web-2's idle leaked connections are terminated, as many as the budget needs (90 counted,
    # the warning line at 64); web-1's are not, it is being evicted.
    assert len(monitor.terminated) == 90 - 64 + 1
    assert kube.calls == [("evict", "web-1")]
    assert out["remediation"]["restartCause"] == "IdleInTransaction"
    web = next(o for o in out["usage"]["byOwner"] if o["owner"] == "Deployment/web")
    assert (web["class"], web["abandoned"]) == ("Leaking", 90)
    assert web["leakRatePerMinute"] > 0
    assert {r for _, r, _ in events} >= {"IdleConnectionsTerminated", "PodEvicted"}
    assert out["lastAction"]["type"] == "RestartPods"
    assert out["cooldownUntil"]


def test_the_cooldown_counts_from_the_restart_not_from_the_cycles_start() -> None:
    # Found by the fault run: the probe of a cycle waited 1-2 s on a stalled server, the pod was
    # evicted after it, and a cooldown counted from the cycle's start let the next eviction come
    # 28.8 s after it under a 30 s cooldown.
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    clock = iter([NOW, NOW + 2.0, NOW + 2.5, NOW + 3.0, NOW + 3.5, NOW + 4.0])
    deps = dataclasses.replace(deps, now=lambda: next(clock, NOW + 5.0))
    out = run_cycle(deps, old_status=OVER_STATUS)
    assert kube.calls == [("evict", "web-1")]
    until = status_time(out["cooldownUntil"])
    assert until is not None
    assert until >= NOW + 2.0 + 60  # the default cooldownSeconds, from the eviction


@pytest.mark.parametrize("how", ["dry-run", "paused"])
def test_dry_run_and_pause_never_call_anything_that_acts(how: str) -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    spec = {**SPEC, "remediation": {**SPEC["remediation"], "dryRun": how == "dry-run"}}
    annotations = {"connbudget.io/paused": "true"} if how == "paused" else {}
    out = run_cycle(deps, spec=spec, annotations=annotations, old_status=OVER_STATUS)
    assert kube.calls == []
    assert monitor.terminated == []
    if how == "dry-run":
        assert {r for _, r, _ in events} >= {"DryRun"}
        assert out["lastAction"]["dryRun"] is True
    else:
        assert out["phase"] == "Paused"
        assert "lastAction" not in out


def test_a_blocked_eviction_is_reported_and_waits_for_the_cooldown() -> None:
    kube, monitor = FakeKube(evict=EvictionResult.BLOCKED), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    out = run_cycle(deps, old_status=OVER_STATUS)
    assert ("Warning", "RestartBlocked") in {(t, r) for t, r, _ in events}
    assert out["lastAction"]["result"] == "Blocked"
    assert out["cooldownUntil"]  # no retry in a tight loop


@pytest.mark.parametrize(
    ("kube", "monitor", "reason"),
    [
        pytest.param(FakeKube(dsn=None), FakeMonitor(leaking()), "SecretMissing", id="secret"),
        pytest.param(
            FakeKube(),
            FakeMonitor(
                ProbeError(ProbeFailure.AUTHENTICATION_FAILED, "password authentication failed")
            ),
            "AuthenticationFailed",
            id="auth",
        ),
        pytest.param(
            FakeKube(),
            FakeMonitor(ProbeError(ProbeFailure.DATABASE_UNREACHABLE, "connection refused")),
            "DatabaseUnreachable",
            id="unreachable",
        ),
    ],
)
def test_what_only_the_operator_can_judge_is_a_condition_and_no_action(
    kube: FakeKube, monitor: FakeMonitor, reason: str
) -> None:
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    out = run_cycle(deps, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert out["phase"] == "Degraded"
    assert [c for c in kube.calls if c[0] != "forget"] == []
    assert [r for _, r, _ in events] == ["ProbeFailed"]
    assert PASSWORD not in str(out) + str(events)
    if reason == "AuthenticationFailed":
        assert ("forget", "pg") in kube.calls  # a fixed Secret is read again at the next poll


def test_a_selector_matching_nothing_blocks_actions() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _events = make_deps(kube, monitor, [pod("other-1", "10.0.0.5", app="other")])
    out = run_cycle(deps, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NoPodsSelected"
    assert kube.calls == []
    assert monitor.terminated == []
    assert out["usage"]["connections"] == 90  # still reported


def test_pods_the_watch_has_not_delivered_yet_are_no_false_alarm() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    kube.unwatched_pods = 1  # just after a start: the API server has them, the index not yet
    deps, events = make_deps(kube, monitor, [pod("other-1", "10.0.0.5", app="other")])
    runtime = cycle.Runtime()

    def once(now: float) -> dict[str, Any] | None:
        deps.now = lambda: now
        return asyncio.run(
            cycle.run_cycle(
                namespace="shop",
                name="web",
                generation=2,
                spec_raw=SPEC,
                annotations={},
                old_status=OVER_STATUS,
                runtime=runtime,
                deps=deps,
            )
        )

    assert once(NOW) is None  # nothing reported, nothing done
    assert once(NOW + 1) is None  # probed again at the next tick
    assert events == []
    assert kube.calls == []
    assert monitor.terminated == []
    # A watch that still lags after the grace period: reported as it is.
    late = once(NOW + cycle.WATCH_SYNC_GRACE_SECONDS + 1)
    assert late is not None
    ready = next(c for c in late["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NoPodsSelected"


def test_an_invalid_spec_is_reported_without_probing() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    out = run_cycle(deps, spec={**SPEC, "budget": {}})
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "SpecInvalid"
    assert "exactly one of maxConnections and maxPercent" in ready["message"]
    assert [r for _, r, _ in events] == ["SpecInvalid"]


def test_the_same_problem_is_announced_once_not_every_poll() -> None:
    kube, monitor = FakeKube(dsn=None), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    runtime = cycle.Runtime()
    for i in range(3):
        deps.now = lambda i=i: NOW + 20 * i  # type: ignore[misc]
        asyncio.run(
            cycle.run_cycle(
                namespace="shop",
                name="web",
                generation=1,
                spec_raw=SPEC,
                annotations={},
                old_status={},
                runtime=runtime,
                deps=deps,
            )
        )
    assert len(events) == 1


def test_polling_follows_poll_seconds() -> None:
    t = 1_800_000_000.0  # a slot of the 10 s grid
    assert cycle.is_probe_due(last_probe_at=None, poll_seconds=10, now=t)
    assert not cycle.is_probe_due(last_probe_at=t - 5, poll_seconds=10, now=t - 0.1)
    assert cycle.is_probe_due(last_probe_at=t - 10, poll_seconds=10, now=t)
    assert cycle.is_probe_due(last_probe_at=t - 10, poll_seconds=10, now=t - 0.02)
    assert not cycle.is_probe_due(last_probe_at=t, poll_seconds=10, now=t + 9.9)


@given(
    last=st.floats(min_value=1.6e9, max_value=2.0e9, allow_nan=False),
    poll=st.sampled_from([1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 300.0]),
)
def test_slots_are_a_grid_a_poll_apart(last: float, poll: float) -> None:
    nxt = cycle.next_slot(last, poll)
    assert last < nxt <= last + poll + 1e-6
    assert nxt / poll == pytest.approx(round(nxt / poll), abs=1e-6)  # on the grid
    # From a slot, the next one is exactly a poll later.
    assert cycle.next_slot(nxt, poll) == pytest.approx(nxt + poll)
    # A probe due at the slot (or a hair before, or late) belongs to that slot.
    assert cycle.slot_at(nxt, poll) == pytest.approx(nxt)
    assert cycle.slot_at(nxt - cycle.PACING_SLACK_SECONDS / 2, poll) == pytest.approx(nxt)
    assert cycle.slot_at(nxt + poll * 0.9, poll) == pytest.approx(nxt)


def test_budgets_created_apart_probe_at_the_same_slots_and_share_them() -> None:
    """Two budgets of one database, created 3.7 s apart: after each one's first probe (made at
    once), both are due at the same slots, and each asks the monitor for a sample of that slot."""
    t0 = 1_800_000_003.3
    runtimes = [cycle.Runtime(), cycle.Runtime()]
    spec = parse_spec({**SPEC, "pollSeconds": 10})
    for rt in runtimes:
        rt.parsed = ({}, spec)
    runtimes[0].last_probe_at = t0
    runtimes[1].last_probe_at = t0 + 3.7
    wakes = [t0 + 5 + cycle.seconds_to_next_cycle(rt, t0 + 5, tick=1.0) for rt in runtimes]
    assert wakes[0] == pytest.approx(wakes[1])
    assert wakes[0] == pytest.approx(1_800_000_010.0 + cycle.WAKE_MARGIN_SECONDS)

    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    deps.now = lambda: wakes[0] + 0.3  # the event loop was a little late
    for rt in runtimes:
        run_cycle(deps, spec={**SPEC, "pollSeconds": 10}, runtime=rt)
        assert rt.last_probe_at == pytest.approx(1_800_000_010.0)
    assert monitor.not_before == [pytest.approx(1_800_000_010.0)] * 2


def test_a_role_without_pg_signal_backend_is_permission_denied() -> None:
    class Refusing(FakeMonitor):
        async def terminate(self, backends: Iterable[IdleBackend]) -> Termination:
            raise ProbeError(
                ProbeFailure.PERMISSION_DENIED,
                "permission denied (grant pg_signal_backend to the monitoring role)",
            )

    kube, monitor = FakeKube(), Refusing(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    out = run_cycle(
        deps,
        spec={**SPEC, "remediation": {**SPEC["remediation"], "steps": ["TerminateIdle"]}},
        old_status=OVER_STATUS,
    )
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PermissionDenied")
    assert out["lastAction"]["result"] == "Failed"
    assert "ActionFailed" in {r for _, r, _ in events}


def test_a_pooler_target_without_scale_is_a_condition_and_no_action() -> None:
    from connbudget.kube.api import KubeError

    class NoScale(FakeKube):
        async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
            raise KubeError(404, "no resource of kind Pooler in example.com/v1")

    kube, monitor = NoScale(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    spec = {
        **SPEC,
        "pooler": {"targetRef": {"apiVersion": "example.com/v1", "kind": "Pooler", "name": "pgb"}},
    }
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PoolerTargetInvalid")
    # The pooler's part waits; a direct leak is still held.
    assert not [c for c in kube.calls if c[0] == "scale"]
    assert monitor.terminated
    assert "ProbeFailed" in {r for _, r, _ in events}


def test_the_spec_is_parsed_once_and_again_when_it_changes() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    runtime = cycle.Runtime()
    spec_raw: dict[str, Any] = {**SPEC, "budget": {"maxConnections": 80}, "pollSeconds": 1}

    def budget_seen() -> int:
        runtime.last_probe_at = None  # due every time
        return int(run_cycle(deps, spec=spec_raw, runtime=runtime)["usage"]["budget"])

    assert budget_seen() == 80
    parsed = runtime.parsed
    assert budget_seen() == 80
    assert runtime.parsed is parsed  # not parsed again
    spec_raw["budget"]["maxConnections"] = 60  # changed in place, as a watch event never does
    assert budget_seen() == 60


def test_a_worker_sleeps_until_its_next_slot() -> None:
    runtime = cycle.Runtime()
    t0 = 1_800_000_000.0  # a slot of the 10 s grid
    # Nothing parsed or probed yet: one tick.
    assert cycle.seconds_to_next_cycle(runtime, t0, tick=1.0) == 1.0
    runtime.parsed = ({}, parse_spec({**SPEC, "pollSeconds": 10}))
    runtime.last_probe_at = t0
    wait = cycle.seconds_to_next_cycle(runtime, t0 + 0.4, tick=1.0)
    assert wait == pytest.approx(9.6 + cycle.WAKE_MARGIN_SECONDS)
    assert cycle.is_probe_due(last_probe_at=t0, poll_seconds=10, now=t0 + 0.4 + wait)
    # A first probe off the grid: the next slot, less than a poll later.
    runtime.last_probe_at = t0 + 3.3
    assert cycle.seconds_to_next_cycle(runtime, t0 + 3.4, tick=1.0) == pytest.approx(
        6.6 + cycle.WAKE_MARGIN_SECONDS
    )
    # Past due (the cycle was slow): at once, never a negative sleep.
    runtime.last_probe_at = t0
    assert cycle.seconds_to_next_cycle(runtime, t0 + 12.5, tick=1.0) == 0.0


def test_what_the_operator_terminates_is_counted_back_into_the_forecast() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    runtime = cycle.Runtime()
    spec = {**SPEC, "remediation": {**SPEC["remediation"], "steps": ["TerminateIdle"]}}
    run_cycle(deps, spec=spec, runtime=runtime)
    # Idle leaked ones (not those in a transaction), as many as the budget needs: 90 counted,
    # the warning line at 64.
    assert len(monitor.terminated) == 27
    assert runtime.removed == 27
    assert runtime.history[-1][1] == 90  # the sample it was decided on: nothing removed yet
    runtime.last_probe_at = None
    run_cycle(deps, spec=spec, runtime=runtime)
    assert runtime.history[-1][1] == 90 + 27
    assert runtime.next_poll_seconds == 1  # a leak: polled every second


def test_a_restart_of_a_pod_already_gone_does_not_spend_the_cooldown() -> None:
    kube, monitor = FakeKube(evict=EvictionResult.GONE), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    forgotten: list[str] = []
    deps = dataclasses.replace(deps, forget_pod=lambda ns, name: forgotten.append(name))
    out = run_cycle(deps, old_status=OVER_STATUS)
    assert kube.calls == [("evict", "web-1")]
    assert out["lastAction"]["result"] == "Skipped"
    assert out.get("cooldownUntil") is None
    assert forgotten == ["web-1"]


def test_a_stale_view_never_acts_when_its_intent_write_conflicts() -> None:
    from connbudget.handlers.status_writer import StatusConflict

    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])

    async def conflict(status: dict[str, Any]) -> None:
        raise StatusConflict("shop/web changed meanwhile")

    deps = dataclasses.replace(deps, write_status=conflict)
    with pytest.raises(StatusConflict):
        run_cycle(deps, old_status=OVER_STATUS)
    assert kube.calls == []  # the eviction was never asked for


def test_every_blocker_is_kept_not_only_the_last() -> None:
    """No pod selected and a pooler target without /scale: the condition names the first and
    says both, each posts its Event once, and nothing is done."""
    from connbudget.kube.api import KubeError

    class NoScale(FakeKube):
        async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
            raise KubeError(404, "no resource of kind Pooler in example.com/v1")

    kube, monitor = NoScale(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [])
    spec = {
        **SPEC,
        "pooler": {"targetRef": {"apiVersion": "example.com/v1", "kind": "Pooler", "name": "pgb"}},
    }
    runtime = cycle.Runtime()
    out = run_cycle(deps, spec=spec, old_status=OVER_STATUS, runtime=runtime)
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoPodsSelected")
    assert "matches no pod" in ready["message"]
    assert "no readable /scale" in ready["message"]
    assert [r for _, r, _ in events].count("ProbeFailed") == 2
    assert monitor.terminated == []
    assert kube.calls == []
    runtime.last_probe_at = None
    run_cycle(deps, spec=spec, old_status=OVER_STATUS, runtime=runtime)
    assert [r for _, r, _ in events].count("ProbeFailed") == 2  # said once, not every poll
