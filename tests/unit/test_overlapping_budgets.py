"""Budgets whose selectors overlap act once between them (``policy.ledger``).

Found by reading: each budget decided alone from the same sample, so both terminated as many
backends as their own usage needed (the second choosing the same backends again) and each
restarted the leaking workload with its own cooldown (two evictions per cooldown).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from connbudget import cycle
from connbudget.policy.ledger import TERMINATED_KEEP_SECONDS, Ledger
from unit.builders import NOW
from unit.test_cycle import OVER_STATUS, SPEC, WEB1, WEB2, FakeKube, FakeMonitor, leaking, make_deps


def run(deps: cycle.Deps, name: str) -> dict[str, Any]:
    out = asyncio.run(
        cycle.run_cycle(
            namespace="shop",
            name=name,
            generation=1,
            spec_raw=SPEC,
            annotations={},
            old_status=OVER_STATUS,
            runtime=cycle.Runtime(),
            deps=deps,
        )
    )
    assert out is not None
    return out


def evictions(kube: FakeKube) -> list[tuple[str, str]]:
    return [c for c in kube.calls if c[0] == "evict"]


def test_two_budgets_over_the_same_pods_terminate_and_restart_once() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    deps = dataclasses.replace(deps, ledger=Ledger())
    run(deps, "web")
    first = list(monitor.terminated)
    assert first
    out = run(deps, "web-platform")
    assert monitor.terminated == first  # the second budget chose none of them again
    assert evictions(kube) == [("evict", "web-1")]  # one eviction, not one per budget
    (hold,) = out["remediation"]["holds"]
    assert (hold["step"], hold["reason"]) == ("RestartPods", "Cooldown")
    assert hold["message"] == "Deployment/web restarted by another budget: waits 60s more"


def test_without_the_ledger_each_budget_acts_alone() -> None:
    # What the ledger prevents, shown: the same sample, two budgets, twice the action.
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    deps, _ = make_deps(kube, monitor, [WEB1, WEB2])
    run(deps, "web")
    run(deps, "web-platform")
    assert len(monitor.terminated) > len(set(monitor.terminated))
    assert len(evictions(kube)) == 2


def test_the_ledger_forgets_terminations_and_restarts_in_time() -> None:
    ledger = Ledger()
    ledger.terminated([(1, NOW)], at=NOW)
    assert ledger.recently_terminated(at=NOW + 1) == {(1, NOW)}
    assert ledger.recently_terminated(at=NOW + TERMINATED_KEEP_SECONDS + 1) == frozenset()
    ledger.restarted("Deployment/web", until=NOW + 60, by="shop/web")
    assert ledger.restarts_held(at=NOW, me="shop/web") == {}  # its own cooldown is its own
    assert ledger.restarts_held(at=NOW, me="shop/other") == {"Deployment/web": NOW + 60}
    assert ledger.restarts_held(at=NOW + 61, me="shop/other") == {}
