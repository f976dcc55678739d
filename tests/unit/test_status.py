"""Status rendering: kstatus-friendly conditions, stable transition times, memory round trip."""

from __future__ import annotations

from typing import Any

from connbudget.model import timestamps
from connbudget.model.conditions import Condition, ConditionType, Reason
from connbudget.policy import attribution, usage
from connbudget.policy.plan import Level, Memory
from connbudget.report import status
from unit.builders import NOW, idle_group, pod, run, sample, spec

WEB1 = pod("web-1", "10.0.0.1")


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = status.merge_conditions(
        [],
        [Condition(type=ConditionType.READY, status=True, reason=Reason.PROBE_SUCCEEDED)],
        now=NOW,
        generation=1,
    )
    same = status.merge_conditions(
        first,
        [
            Condition(
                type=ConditionType.READY,
                status=True,
                reason=Reason.PROBE_SUCCEEDED,
                message="other words",
            )
        ],
        now=NOW + 60,
        generation=2,
    )
    flipped = status.merge_conditions(
        same,
        [Condition(type=ConditionType.READY, status=False, reason=Reason.PROBE_FAILED)],
        now=NOW + 120,
        generation=2,
    )
    assert first[0]["lastTransitionTime"] == same[0]["lastTransitionTime"] == status.rfc3339(NOW)
    assert same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == status.rfc3339(NOW + 120)


def test_ready_means_the_controller_works_not_that_usage_is_low() -> None:
    d = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * 90)])
    assert d.level is Level.OVER
    out = status.render_status(
        {},
        status.Outcome(
            generation=3, now=NOW, usage=None, decision=d, database_reachable=True, probe_time=NOW
        ),
    )
    # No usage yet: Pending, not Ready.
    assert out["phase"] == "Pending"
    smp = sample([idle_group(WEB1, [5.0] * 90)])
    attributed = attribution.attribute_backends(
        groups=smp.groups,
        index=attribution.PodIndex.build([WEB1], namespace="shop"),
        mode=spec().attribution,
    )
    u = usage.compute_usage(spec=spec(), namespace="shop", sample=smp, attributed=attributed)
    out = status.render_status(
        {},
        status.Outcome(
            generation=3, now=NOW, usage=u, decision=d, database_reachable=True, probe_time=NOW
        ),
    )
    conds = {c["type"]: c for c in out["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["WithinBudget"]["status"] == "False"
    assert conds["WithinBudget"]["reason"] == "BudgetExceeded"
    assert out["phase"] == "OverBudget"
    assert out["observedGeneration"] == 3
    assert out["usage"]["percent"] == 112
    assert out["usage"]["byOwner"][0]["owner"] == "Deployment/web"


def test_a_problem_makes_the_budget_degraded_and_not_ready() -> None:
    out = status.render_status(
        {},
        status.Outcome(
            generation=1, now=NOW, problem=(Reason.SECRET_MISSING, "Secret shop/pg not found")
        ),
    )
    conds = {c["type"]: c for c in out["conditions"]}
    assert out["phase"] == "Degraded"
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == "SecretMissing"
    assert "DatabaseReachable" not in conds  # not tried: the Secret is missing


def test_memory_survives_a_round_trip_through_status() -> None:
    memory = Memory(
        level=Level.OVER,
        breach_since=NOW - 20,
        cooldown_until=NOW + 40,
        episode_since=NOW - 10,
        escalation=1,
        cleaned_pods=("web-1",),
    )
    d = run(spec(), [WEB1], [idle_group(WEB1, [40.0] * 90)], memory=memory)
    out = status.render_status({}, status.Outcome(generation=1, now=NOW, decision=d))
    back = status.memory_from_status(out)
    assert back.level == d.memory.level
    assert back.breach_since == d.memory.breach_since
    assert back.episode_since == d.memory.episode_since
    assert back.escalation == d.memory.escalation
    assert back.cleaned_pods == d.memory.cleaned_pods
    assert back.cooldown_until == d.memory.cooldown_until


def test_garbage_in_status_reads_as_empty_memory() -> None:
    assert (
        status.memory_from_status(
            {
                "remediation": {"level": "Nonsense", "escalation": -3, "breachSince": "yesterday"},
                "cooldownUntil": 17,
            }
        )
        == Memory()
    )


def _kstatus_pair(out: dict[str, object]) -> dict[str, str]:
    conds = out["conditions"]
    assert isinstance(conds, list)
    return {c["type"]: c["status"] for c in conds if c["type"] in ("Reconciling", "Stalled")}


def test_kstatus_reconciling_while_pending_and_stalled_only_for_problems_waiting_cannot_fix() -> (
    None
):
    pending = status.render_status({}, status.Outcome(generation=1, now=NOW))
    assert _kstatus_pair(pending) == {"Reconciling": "True", "Stalled": "False"}
    for reason, stalled in [
        (Reason.SECRET_MISSING, "True"),
        (Reason.AUTHENTICATION_FAILED, "True"),
        (Reason.DSN_INVALID, "True"),
        (Reason.SPEC_INVALID, "True"),
        (Reason.PERMISSION_DENIED, "True"),
        (Reason.DATABASE_UNREACHABLE, "False"),  # may come back by itself: in progress
        (Reason.PROBE_FAILED, "False"),
        (Reason.NO_PODS_SELECTED, "False"),  # the app may not be deployed yet
    ]:
        out = status.render_status(
            {}, status.Outcome(generation=1, now=NOW, problem=(reason, "what to fix"))
        )
        assert _kstatus_pair(out) == {"Reconciling": "False", "Stalled": stalled}, reason
        if stalled == "True":
            cond = next(c for c in out["conditions"] if c["type"] == "Stalled")
            assert cond["reason"] == reason.value
            assert cond["message"] == "what to fix"


def test_memory_keeps_fractions_of_a_second_so_the_breach_window_is_never_cut_short() -> None:
    memory = Memory(
        level=Level.OVER,
        breach_since=NOW - 4.75,
        cooldown_until=NOW + 40.25,
        episode_since=NOW - 4.75,
    )
    d = run(spec(), [WEB1], [idle_group(WEB1, [40.0] * 90)], memory=memory)
    out = status.render_status({}, status.Outcome(generation=1, now=NOW, decision=d))
    back = status.memory_from_status(out)
    assert back.breach_since == d.memory.breach_since == NOW - 4.75
    assert back.cooldown_until == d.memory.cooldown_until
    # Status written before this change (whole seconds) still reads.
    assert timestamps.parse_timestamp("2026-11-25T04:00:00Z") == timestamps.parse_timestamp(
        "2026-11-25T04:00:00.000Z"
    )


def test_a_budget_above_the_servers_usable_slots_is_a_condition_and_one_event() -> None:
    from connbudget import cycle
    from unit.test_cycle import SPEC as CYCLE_SPEC
    from unit.test_cycle import WEB1 as CYCLE_WEB1
    from unit.test_cycle import FakeKube, FakeMonitor, leaking, make_deps, run_cycle

    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [CYCLE_WEB1])
    runtime = cycle.Runtime()
    spec = {**CYCLE_SPEC, "budget": {"maxConnections": 500}}
    out = run_cycle(deps, spec=spec, runtime=runtime)
    fits = next(c for c in out["conditions"] if c["type"] == "BudgetFits")
    assert (fits["status"], fits["reason"]) == ("False", "BudgetAboveServerLimit")
    assert "97 usable slots" in fits["message"]
    runtime.last_probe_at = None
    run_cycle(deps, spec=spec, runtime=runtime)
    assert [r for _, r, _ in events].count("BudgetAboveServerLimit") == 1
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"  # reported, not blocking: the leak is still held


def test_where_a_leak_is_shows_per_owner_with_its_hint_and_the_privilege_condition() -> None:
    from connbudget.policy.culprits import LeakShape

    smp = sample([idle_group(WEB1, [5.0] * 10)])
    attributed = attribution.attribute_backends(
        groups=smp.groups,
        index=attribution.PodIndex.build([WEB1], namespace="shop"),
        mode=spec().attribution,
    )
    u = usage.compute_usage(spec=spec(), namespace="shop", sample=smp, attributed=attributed)
    shape = LeakShape(
        fingerprint="0123456789abcdef",
        statement='SELECT COUNT(*) AS "__count" FROM "auth_user"',
        tags={"route": "sync/"},
        count=42,
        share=0.956,
        first_seen=NOW - 30,
        revision="web-7457d5dc96",
    )

    def render(visible: bool | None) -> dict[str, Any]:
        return status.render_status(
            {},
            status.Outcome(
                generation=1,
                now=NOW,
                usage=u,
                database_reachable=True,
                leaks={"Deployment/web": [shape]},
                hints={"Deployment/web": "set PGAPPNAME"},
                statements_visible=visible,
            ),
        )

    out = render(True)
    (owner,) = out["usage"]["byOwner"]
    assert owner["leaks"] == [
        {
            "fingerprint": "0123456789abcdef",
            "statement": 'SELECT COUNT(*) AS "__count" FROM "auth_user"',
            "tags": {"route": "sync/"},
            "count": 42,
            "share": 0.96,
            "firstSeen": status.rfc3339(NOW - 30),
            "revision": "web-7457d5dc96",
            "rollout": False,
        }
    ]
    assert owner["hint"] == "set PGAPPNAME"
    conds = {c["type"]: c for c in out["conditions"]}
    assert conds["StatementsVisible"]["reason"] == "StatementsReadable"
    hidden = {c["type"]: c for c in render(False)["conditions"]}
    assert hidden["StatementsVisible"]["status"] == "False"
    assert "pg_read_all_stats" in hidden["StatementsVisible"]["message"]
    # Before any leak was seen, nothing is said of statements.
    assert "StatementsVisible" not in {c["type"] for c in render(None)["conditions"]}


def test_backends_hidden_from_the_monitoring_role_are_said_whether_or_not_anything_leaks() -> None:
    out = status.render_status(
        {}, status.Outcome(generation=1, now=NOW, database_reachable=True, hidden_backends=4)
    )
    cond = next(c for c in out["conditions"] if c["type"] == "StatementsVisible")
    assert (cond["status"], cond["reason"]) == ("False", "InsufficientPrivilege")
    assert cond["message"].startswith("4 backends of other roles hide their state")
    assert "pg_read_all_stats" in cond["message"]
