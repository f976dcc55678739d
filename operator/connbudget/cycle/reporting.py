"""Report: the Events a pass posts and the status it renders when it has nothing to judge.

Events say what changed, not every poll: a problem when it appears or changes, a level when it
is crossed, a leaking owner when it starts leaking (once per owner and episode), a budget that
stops fitting the server. Events of one episode and reason are one Event, counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from connbudget.cycle.deps import Deps, Runtime
from connbudget.cycle.observe import Problem
from connbudget.policy import culprits, evidence, plan, usage
from connbudget.report import events, status
from connbudget.report.events import NORMAL, WARNING, EventReason

log = logging.getLogger("connbudget.cycle")


async def degraded(
    runtime: Runtime,
    deps: Deps,
    old_status: Mapping[str, Any],
    generation: int,
    now: float,
    problem: Problem,
) -> dict[str, Any]:
    """The status of a pass that has nothing to judge (and the problem's Event, if new)."""
    await post_problems(runtime, deps, (problem,))
    return status.render_status(
        old_status,
        status.Outcome(
            generation=generation,
            now=now,
            problem=(problem.reason, problem.message),
            database_reachable=problem.database_reachable,
        ),
    )


async def post_problems(runtime: Runtime, deps: Deps, problems: Iterable[Problem]) -> None:
    """Post an Event for each problem that appears or changes (not on every poll)."""
    keys = set()
    for problem in problems:
        key = f"{problem.reason}:{problem.message}"
        keys.add(key)
        if key in runtime.problems_said:
            continue
        await deps.post_event(WARNING, problem.event.value, problem.message, None)
        log.warning(
            "budget degraded", extra={"reason": problem.reason.value, "detail": problem.message}
        )
    runtime.problems_said = frozenset(keys)


def series(runtime: Runtime) -> str:
    """The Event series of the budget's current episode (from one recovery to the next)."""
    return f"episode-{runtime.episode}"


async def post_transition(
    deps: Deps, runtime: Runtime, decision: plan.Decision, use: usage.Usage
) -> None:
    """Post an Event for a change of level: one per reason and episode (repeats update it)."""
    text = events.usage_text(use)
    if decision.transition is plan.Transition.WARNING:
        await deps.post_event(WARNING, EventReason.BUDGET_WARNING.value, text, series(runtime))
    elif decision.transition is plan.Transition.EXCEEDED:
        await deps.post_event(WARNING, EventReason.BUDGET_EXCEEDED.value, text, series(runtime))
    elif decision.transition is plan.Transition.RECOVERED:
        await deps.post_event(NORMAL, EventReason.BUDGET_RECOVERED.value, text, series(runtime))
        runtime.episode += 1  # what comes next is another episode


async def post_leaks(
    deps: Deps,
    runtime: Runtime,
    owners: Mapping[str, evidence.OwnerEvidence],
    shapes: Mapping[str, Sequence[culprits.LeakShape]],
    owner_hints: Mapping[str, str],
) -> None:
    """Post a ``LeakDetected`` Event when an owner starts leaking (once per owner and episode),
    naming what its leaked connections last ran where that is known."""
    leaking = {o for o, ev in owners.items() if ev.cls is evidence.OwnerClass.LEAKING}
    for owner in sorted(leaking - runtime.leaking):
        text = events.leak_text(owners[owner], shapes.get(owner, ()), owner_hints.get(owner))
        await deps.post_event(WARNING, EventReason.LEAK_DETECTED.value, text, owner)
    runtime.leaking = leaking


async def post_budget_fit(deps: Deps, runtime: Runtime, use: usage.Usage) -> None:
    """Post a ``BudgetAboveServerLimit`` Event when the budget stops fitting the server."""
    fit = status.budget_fits(use)
    if not fit.status and runtime.budget_fits is not False:
        await deps.post_event(WARNING, EventReason.BUDGET_ABOVE_SERVER.value, fit.message, None)
    runtime.budget_fits = fit.status
