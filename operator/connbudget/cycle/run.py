"""One pass of a ConnectionBudget, as a pipeline: observe, judge, decide, act, report.

Each step hands the next a typed value: ``observe`` an ``Observation`` (or the ``Problem`` that
leaves nothing to judge), ``judge`` a ``Judgement``, ``policy.plan.decide`` (pure) a ``Decision``
with its levels, holds and actions, ``act`` what each action did (``Done``), and the status is
rendered from those values. The pass never raises for what only the operator can judge: that
becomes a condition and an Event, and blocks every action until it is fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from connbudget.cycle import act, reporting, schedule
from connbudget.cycle.deps import Deps, Runtime
from connbudget.cycle.judge import Judgement, judge
from connbudget.cycle.observe import (
    Observation,
    Problem,
    observe,
    parsed_spec,
    read_credentials,
)
from connbudget.kube.api import KubeError, SecretProblem
from connbudget.model.actions import RestartPod, ScalePooler, TerminateBackends
from connbudget.model.conditions import Reason
from connbudget.model.spec import BudgetSpec, SpecError, is_paused, parse_spec
from connbudget.policy import plan
from connbudget.probe.errors import ProbeError
from connbudget.report import status
from connbudget.report.events import WARNING, EventReason


async def run_cycle(
    *,
    namespace: str,
    name: str,
    generation: int,
    spec_raw: Mapping[str, Any],
    annotations: Mapping[str, str],
    old_status: Mapping[str, Any],
    runtime: Runtime,
    deps: Deps,
) -> dict[str, Any] | None:
    """Run one pass if the budget is due; return the new status (None: not due yet)."""
    now = deps.now()
    try:
        spec = parsed_spec(runtime, spec_raw)
    except SpecError as e:
        problem = Problem(Reason.SPEC_INVALID, f"invalid spec: {e}", EventReason.SPEC_INVALID, None)
        return await reporting.degraded(runtime, deps, old_status, generation, now, problem)
    poll = schedule.cadence(runtime, spec)
    if not schedule.is_probe_due(last_probe_at=runtime.last_probe_at, poll_seconds=poll, now=now):
        return None
    # The probe belongs to a slot of the poll grid, its time from here on (a breach seen at one
    # slot has lasted exactly a poll at the next, whatever the event loop's delays); a budget's
    # first probe, or one made at once after a change, is made now.
    if runtime.last_probe_at is not None:
        now = schedule.slot_at(now, poll)
    runtime.last_probe_at = now

    seen = await observe(
        namespace=namespace, name=name, spec=spec, runtime=runtime, deps=deps, slot=now
    )
    if seen is None:
        runtime.last_probe_at = None  # the pod watch is catching up: probe again next tick
        return None
    if isinstance(seen, Problem):
        return await reporting.degraded(runtime, deps, old_status, generation, now, seen)
    if not runtime.evidence_seeded:
        runtime.evidence.seed(status.reuse_gaps_from_status(old_status), at=seen.sample.sampled_at)
        runtime.evidence_seeded = True
    # Whether the governed pods' containers restarted after the operator's terminations, before
    # judging (a workload found to die on termination gets its hint at once).
    await _watch_the_remedy(runtime, deps, seen, now)
    judged = await judge(seen, spec, namespace, runtime)
    remembered = status.memory_from_status(old_status)
    paused = is_paused(annotations)
    decision = _decide(
        spec, namespace, now, seen, judged, runtime, remembered, paused=paused, deps=deps, name=name
    )
    runtime.next_poll_seconds = decision.next_poll_seconds
    await _report_judgement(namespace, name, seen, judged, decision, runtime, deps)

    outcome = status.Outcome(
        generation=generation,
        now=now,
        problem=_problem_of(seen.blockers),
        database_reachable=True,
        usage=judged.usage,
        decision=decision,
        paused=paused,
        pooler=seen.pooler.sample,
        probe_time=now,
        leaks=judged.shapes,
        hints=judged.hints,
        statements_visible=runtime.culprits.visible,
        hidden_backends=seen.sample.hidden,
    )
    await act.record_intent(decision, old_status, outcome, deps, now)
    done = await act.carry_out(decision, spec, namespace, name, seen.monitor, deps, runtime, now)
    _remember_what_was_done(done, decision, runtime, deps, f"{namespace}/{name}", now)
    decision = act.settle(done, decision, remembered, spec, namespace, runtime, deps)
    blockers = seen.blockers
    if done.denied is not None:
        blockers += (
            Problem(Reason.PERMISSION_DENIED, done.denied, EventReason.ACTION_FAILED, True),
        )
    await reporting.post_problems(runtime, deps, blockers)
    desired = next((a.desired for a in decision.actions if isinstance(a, ScalePooler)), None)
    return status.render_status(
        old_status,
        dataclasses.replace(
            outcome,
            decision=decision,
            problem=_problem_of(blockers),
            last_action=done.last,
            pooler_desired=desired,
        ),
    )


def _decide(
    spec: BudgetSpec,
    namespace: str,
    now: float,
    seen: Observation,
    judged: Judgement,
    runtime: Runtime,
    remembered: plan.Memory,
    *,
    paused: bool,
    deps: Deps,
    name: str,
) -> plan.Decision:
    """The pure decision, from what was observed and judged, what the status remembers and what
    the other budgets of this replica did lately (the ledger)."""
    # A pooler's problem stops the pooler's part only: a direct leak is still held.
    pooler_problem = seen.pooler.problem
    blockers = tuple(p for p in seen.blockers if p is not pooler_problem)
    return plan.decide(
        spec=spec,
        namespace=namespace,
        now=now,
        usage=judged.usage,
        attributed=seen.governed_groups,
        pods=seen.governed,
        pooler=seen.pooler.sample,
        pooler_clients=seen.pooler_clients,
        history=list(runtime.history),
        memory=remembered,
        paused=paused,
        owners=judged.owners,
        # What only the operator can judge blocks every action until it is fixed.
        blocked="; ".join(p.message for p in blockers) if blockers else None,
        termination_possible=not runtime.termination_denied,
        pooler_owner=seen.pooler.owner,
        pooler_blocked=pooler_problem.message if pooler_problem is not None else None,
        sampled_at=seen.sample.sampled_at,
        fragile=runtime.remedy.dies_on_termination(),
        not_signalable=runtime.not_signalable,
        claimed=deps.ledger.recently_terminated(at=now) if deps.ledger else frozenset(),
        restarts_held=(
            deps.ledger.restarts_held(at=now, me=f"{namespace}/{name}") if deps.ledger else None
        ),
    )


def _remember_what_was_done(
    done: act.Done,
    decision: plan.Decision,
    runtime: Runtime,
    deps: Deps,
    budget: str,
    now: float,
) -> None:
    """What the pass did, for the remedy's watch (whose pods lost connections) and for the other
    budgets of this replica (``policy.ledger``): the backends terminated, the owners restarted."""
    if decision.dry_run:
        return
    ended = [b for a in decision.actions if isinstance(a, TerminateBackends) for b in a.backends]
    if done.terminated and ended:
        runtime.remedy.terminated({b.pod for b in ended}, at=now)
        if deps.ledger is not None:
            deps.ledger.terminated(((b.pid, b.backend_start) for b in ended), at=now)
    until = decision.memory.cooldown_until
    if done.restarted and deps.ledger is not None and until is not None:
        for a in decision.actions:
            if isinstance(a, RestartPod):
                deps.ledger.restarted(f"{a.owner_kind}/{a.owner_name}", until=until, by=budget)


async def _watch_the_remedy(runtime: Runtime, deps: Deps, seen: Observation, now: float) -> None:
    """Whether the governed pods' containers restarted after the operator terminated their
    connections (``policy.remedy``); an Event for each owner found to die on termination."""
    for owner in runtime.remedy.observe(seen.governed, at=now):
        await deps.post_event(
            WARNING,
            EventReason.TERMINATION_RESTARTS_PODS.value,
            f"{owner}'s containers restarted after its connections were terminated: its client "
            "library dies when the server closes a connection (node-postgres: listen for "
            "'error' on every client and on the pool). Its connections are no longer "
            "terminated; its pods are restarted through the Eviction API when the budget "
            "needs room.",
            None,
        )


async def _report_judgement(
    namespace: str,
    name: str,
    seen: Observation,
    judged: Judgement,
    decision: plan.Decision,
    runtime: Runtime,
    deps: Deps,
) -> None:
    """Metrics and Events of what was judged and decided (before anything is done)."""
    use = judged.usage
    deps.metrics.record_usage(namespace, name, use, decision.seconds_to_full)
    deps.metrics.record_owners(namespace, name, judged.owners.values(), judged.shapes)
    await reporting.post_transition(deps, runtime, decision, use)
    await reporting.post_leaks(deps, runtime, judged.owners, judged.shapes, judged.hints)
    await reporting.post_budget_fit(deps, runtime, use)


def _problem_of(blockers: tuple[Problem, ...]) -> tuple[Reason, str] | None:
    """The condition's reason (the first blocker's) and message (every blocker's)."""
    if not blockers:
        return None
    return blockers[0].reason, "; ".join(p.message for p in blockers)


async def keep_connected(
    *, namespace: str, name: str, spec_raw: Mapping[str, Any], deps: Deps, fresh_within: float
) -> bool:
    """Open, or check, the budget's monitoring connection without acting or reporting anything.

    A replica that does not lead keeps its connection open: when it takes over, the server may
    be full (nobody acted while the old leader was dying), and a new connection would be refused.
    A sample another budget's check took within ``fresh_within`` seconds says as much. Returns
    whether the connection works.
    """
    try:
        spec = parse_spec(spec_raw)
    except SpecError:
        return False
    secret = spec.database_secret
    try:
        dsn, ca_pem = await read_credentials(deps, namespace, secret)
        monitor = await deps.bind_monitor(f"{namespace}/{name}", dsn, ca_pem)
        await monitor.sample(not_before=deps.now() - fresh_within)
    except (SecretProblem, ProbeError, KubeError):
        return False
    return True
