"""Act: carry out a decision's actions, the intent written first, and say what each did.

A restart or a scaling is recorded in status (with its cooldown) before it is carried out, and
nothing is done when that write fails. Every action asks first whether this replica may still act
(it leads for sure). Dry-run only reports what would be done. A termination re-checks each backend
in the statement that acts (``probe.queries.TERMINATE_IDLE``) and leaves alone, and says so, the
backends the monitoring role may not signal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connbudget.cycle.deps import NOT_SIGNALABLE_KEPT, Deps, MonitorLike, Runtime
from connbudget.cycle.reporting import series
from connbudget.kube.api import EvictionResult, KubeError
from connbudget.model.actions import Action, RestartPod, ScalePooler, TerminateBackends
from connbudget.model.spec import BudgetSpec, RestartMethod
from connbudget.policy import plan
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.report import events, status
from connbudget.report.events import NORMAL, WARNING, EventReason

log = logging.getLogger("connbudget.cycle")

# Why a chosen backend was not terminated although still idle (no name, no SQL).
NOT_SIGNALABLE = "the monitoring role may not signal"
NOT_SIGNALABLE_HINT = (
    "only a superuser may signal a superuser's backends; another role's need pg_signal_backend"
)


async def record_intent(
    decision: plan.Decision,
    old_status: Mapping[str, Any],
    outcome: status.Outcome,
    deps: Deps,
    now: float,
) -> None:
    """Write the cooldown and the action about to be taken before taking it.

    An operator killed between acting and reporting would otherwise come back with no cooldown in
    status and restart a second pod. Raises (and so acts on nothing) when the write fails.
    """
    disruptive = [a for a in decision.actions if not isinstance(a, TerminateBackends)]
    if decision.dry_run or not disruptive or deps.write_status is None or not deps.may_act():
        return
    action = disruptive[0]
    intent = status.LastAction(
        type=step_name(action),
        targets=action.targets,
        result="Started",
        dry_run=False,
        time=now,
        message=f"about to {events.describe(action)}",
    )
    await deps.write_status(
        status.render_status(old_status, dataclasses.replace(outcome, last_action=intent))
    )


def step_name(action: Action) -> str:
    if isinstance(action, TerminateBackends):
        return "TerminateIdle"
    if isinstance(action, RestartPod):
        return "RestartPods"
    return "ScalePooler"


@dataclass(frozen=True, kw_only=True)
class Done:
    """What carrying out a plan did."""

    last: status.LastAction | None = None
    denied: str | None = None  # an action was refused for lack of permissions
    terminated: int = 0  # backends terminated
    restarted: bool = False  # a pod or a workload was restarted
    gone: tuple[str, ...] = ()  # pods to restart that the API server no longer has
    termination_denied: bool = False  # a termination was refused for lack of permissions
    # (pid, backend_start) of chosen backends left alone: the monitoring role may not signal them.
    not_signalable: frozenset[tuple[int, float]] = frozenset()


@dataclass(frozen=True)
class _Carried:
    """What carrying out one action did: its result, Event reason and message, and more."""

    result: str
    reason: EventReason
    message: str
    terminated: int = 0  # backends terminated
    denied: bool = False  # refused for lack of permissions
    not_signalable: frozenset[tuple[int, float]] = frozenset()


async def carry_out(
    decision: plan.Decision,
    spec: BudgetSpec,
    namespace: str,
    name: str,
    monitor: MonitorLike,
    deps: Deps,
    runtime: Runtime,
    now: float,
) -> Done:
    """Carry out the plan's actions (or, in dry-run, only report them)."""
    last: status.LastAction | None = None
    denied: str | None = None
    terminated = 0
    restarted = termination_denied = False
    gone: list[str] = []
    not_signalable: set[tuple[int, float]] = set()
    why = "; ".join(decision.reasons)
    episode = series(runtime)
    for action in decision.actions:
        step = step_name(action)
        if decision.dry_run:
            message = f"dry-run: would {events.describe(action)}" + (f" ({why})" if why else "")
            await deps.post_event(NORMAL, EventReason.DRY_RUN.value, message, episode)
            deps.metrics.record_action(namespace, name, step, "DryRun")
            last = status.LastAction(
                type=step,
                targets=action.targets,
                result="Planned",
                dry_run=True,
                time=now,
                message=message,
            )
            continue
        if not deps.may_act():
            # The Lease may be another replica's by now: terminations included, nothing is done.
            log.warning(
                "not acting: leadership uncertain",
                extra={"budget": f"{namespace}/{name}", "action": step},
            )
            continue
        try:
            if isinstance(action, TerminateBackends):
                carried = await _terminate(action, monitor)
            else:
                carried = await _execute(action, spec, namespace, deps, now)
        except (ProbeError, KubeError) as e:
            carried = _Carried(
                "Failed",
                EventReason.ACTION_FAILED,
                f"could not {events.describe(action)}: {e}",
                denied=(isinstance(e, ProbeError) and e.failure is ProbeFailure.PERMISSION_DENIED)
                or (isinstance(e, KubeError) and e.status == 403),
            )
        result, message, n = carried.result, carried.message, carried.terminated
        if carried.denied:
            denied = message
            termination_denied = termination_denied or isinstance(action, TerminateBackends)
        not_signalable |= carried.not_signalable
        if isinstance(action, TerminateBackends):
            terminated += n
        elif result == "Succeeded":
            restarted = restarted or isinstance(action, RestartPod)
        elif result == "Skipped" and isinstance(action, RestartPod):
            gone.append(action.pod)
        event_type = NORMAL if result == "Succeeded" else WARNING
        await deps.post_event(
            event_type, carried.reason.value, message + (f" ({why})" if why else ""), episode
        )
        deps.metrics.record_action(namespace, name, step, result)
        if n:
            deps.metrics.record_terminated(namespace, name, n)
        log.info(
            "action",
            extra={
                "budget": f"{namespace}/{name}",
                "action": step,
                "result": result,
                "detail": message,
            },
        )
        last = status.LastAction(
            type=step,
            targets=action.targets,
            result=result,
            dry_run=False,
            time=now,
            message=message,
        )
    return Done(
        last=last,
        denied=denied,
        terminated=terminated,
        restarted=restarted,
        gone=tuple(gone),
        termination_denied=termination_denied,
        not_signalable=frozenset(not_signalable),
    )


async def _terminate(action: TerminateBackends, monitor: MonitorLike) -> _Carried:
    """Terminate the chosen backends; the statement re-checks each (``queries.TERMINATE_IDLE``).

    Backends the monitoring role may not signal are left alone and counted in the message; when
    none was terminated and some were such, the termination was refused for lack of permissions
    (as a role without ``pg_signal_backend`` is), and the plan stops counting on termination.
    """
    done = await monitor.terminate(action.backends)
    ended, refused = set(done.terminated), set(done.not_permitted)
    keys = frozenset((b.pid, b.backend_start) for b in action.backends if b.pid in refused)
    unused = len(action.backends) - len(ended) - len(refused)  # used again, or gone
    if not ended and refused:
        return _Carried(
            "Failed",
            EventReason.ACTION_FAILED,
            f"could not {events.describe(action)}: {NOT_SIGNALABLE} "
            + ("them" if not unused else f"{len(refused)} of them ({unused} no longer idle)")
            + f"; {NOT_SIGNALABLE_HINT}",
            denied=True,
            not_signalable=keys,
        )
    if not ended:
        return _Carried(
            "Skipped",
            EventReason.IDLE_TERMINATED,
            f"none of the {len(action.backends)} chosen backends was still idle",
        )
    terminated = TerminateBackends(backends=tuple(b for b in action.backends if b.pid in ended))
    left = [f"{unused} no longer idle"] if unused else []
    left += [f"{len(refused)} that {NOT_SIGNALABLE}"] if refused else []
    return _Carried(
        "Succeeded",
        EventReason.IDLE_TERMINATED,
        events.describe(terminated).replace("terminate", "terminated", 1)
        + (f" ({' and '.join(left)}, left alone)" if left else ""),
        terminated=len(terminated.backends),
        not_signalable=keys,
    )


async def _execute(
    action: RestartPod | ScalePooler, spec: BudgetSpec, namespace: str, deps: Deps, now: float
) -> _Carried:
    """Carry out a restart or a scaling: its result, Event reason and message."""
    if isinstance(action, RestartPod):
        if action.method is RestartMethod.ROLLOUT_RESTART:
            await deps.kube.rollout_restart(
                namespace, action.owner_kind, action.owner_name, now=now, dry_run=False
            )
            return _Carried(
                "Succeeded",
                EventReason.WORKLOAD_RESTARTED,
                f"restarted {action.owner_kind}/{action.owner_name} (pod {action.pod} leaked)",
            )
        if action.method is RestartMethod.DELETE:
            res = await deps.kube.delete_pod(namespace, action.pod, action.uid, dry_run=False)
            reason = EventReason.POD_DELETED
        else:
            res = await deps.kube.evict_pod(namespace, action.pod, action.uid, dry_run=False)
            reason = EventReason.POD_EVICTED
        if res is EvictionResult.BLOCKED:
            return _Carried(
                "Blocked",
                EventReason.RESTART_BLOCKED,
                f"eviction of pod {action.pod} refused by a PodDisruptionBudget; retrying "
                f"after the cooldown ({spec.remediation.cooldown_seconds}s), never bypassing it",
            )
        if res is EvictionResult.GONE:
            return _Carried("Skipped", reason, f"pod {action.pod} was already gone")
        return _Carried("Succeeded", reason, f"{events.describe(action)}: done")
    await deps.kube.patch_scale(namespace, action.target, action.desired, dry_run=False)
    return _Carried("Succeeded", EventReason.POOLER_SCALED, events.describe(action))


def settle(
    done: Done,
    decision: plan.Decision,
    remembered: plan.Memory,
    spec: BudgetSpec,
    namespace: str,
    runtime: Runtime,
    deps: Deps,
) -> plan.Decision:
    """Take in what carrying out the decision did; return the decision as it now stands.

    Terminations are counted back into the forecast's series; a restart starts the series afresh
    (its connections end over the next seconds: a drop the operator caused, not a slowing leak),
    and its cooldown counts from when it was done, not from the pass's start (found by the fault
    run: a probe that waited on a stalled server took seconds off it, and two evictions came
    28.8 s apart under a 30 s cooldown). Pods to restart that the API server no longer has (the
    watch missed it) spend no cooldown (``remembered``: the memory the decision started from),
    and the pod cache forgets them. Backends the monitoring role may not signal are remembered
    (``Runtime.not_signalable``), so that they are not chosen again.
    """
    runtime.removed += done.terminated
    runtime.termination_denied = done.termination_denied
    if done.not_signalable:
        kept = runtime.not_signalable | done.not_signalable
        if len(kept) > NOT_SIGNALABLE_KEPT:  # over the cap: only this pass's are kept
            kept = set(sorted(done.not_signalable)[:NOT_SIGNALABLE_KEPT])
        runtime.not_signalable = kept
    if done.restarted:
        runtime.history.clear()
    memory = decision.memory
    cooldown = memory.cooldown_until
    if done.restarted and cooldown is not None:
        after = deps.now() + spec.remediation.cooldown_seconds
        if after > cooldown:
            memory = dataclasses.replace(memory, cooldown_until=after)
    scaled = any(isinstance(a, ScalePooler) for a in decision.actions)
    if done.gone and not done.restarted and not scaled:
        memory = dataclasses.replace(memory, cooldown_until=remembered.cooldown_until)
        for pod_name in done.gone:
            if deps.forget_pod is not None:
                deps.forget_pod(namespace, pod_name)
    return dataclasses.replace(decision, memory=memory)
