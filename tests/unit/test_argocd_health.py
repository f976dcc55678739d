"""The Argo CD health check (Lua) against statuses rendered by the operator's own status code."""

from __future__ import annotations

from typing import Any

from connbudget.model.conditions import Reason
from connbudget.policy import attribution, usage
from connbudget.report import status
from unit.argocd import health
from unit.builders import NOW, idle_group, pod, run, sample, spec

WEB1 = pod("web-1", "10.0.0.1")


def rendered(groups: int, *, paused: bool = False, problem: bool = False) -> dict[str, Any]:
    d = run(spec(), [WEB1], [idle_group(WEB1, [5.0] * groups)], paused=paused)
    smp = sample([idle_group(WEB1, [5.0] * groups)])
    attributed = attribution.attribute_backends(
        groups=smp.groups,
        index=attribution.PodIndex.build([WEB1], namespace="shop"),
        mode=spec().attribution,
    )
    u = usage.compute_usage(spec=spec(), namespace="shop", sample=smp, attributed=attributed)
    st = status.render_status(
        {},
        status.Outcome(
            generation=2,
            now=NOW,
            usage=u,
            decision=d,
            paused=paused,
            database_reachable=True,
            problem=(Reason.AUTHENTICATION_FAILED, "password authentication failed")
            if problem
            else None,
            probe_time=NOW,
        ),
    )
    return {"metadata": {"generation": 2}, "status": st}


def test_a_working_budget_is_healthy_even_when_over_budget() -> None:
    assert health(rendered(10))[0] == "Healthy"
    assert health(rendered(95))[0] == "Healthy"  # over budget is traffic, not ill health


def test_a_degraded_budget_is_degraded_with_the_reason() -> None:
    state, message = health(rendered(10, problem=True))
    assert state == "Degraded"
    assert message.startswith("AuthenticationFailed")


def test_paused_is_suspended_and_no_status_is_progressing() -> None:
    assert health(rendered(10, paused=True))[0] == "Suspended"
    assert health({"metadata": {"generation": 1}})[0] == "Progressing"
    stale = rendered(10)
    stale["metadata"]["generation"] = 3
    assert health(stale)[0] == "Progressing"
