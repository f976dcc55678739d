"""Act: carry out a decision's actions, the intent written first, and say what each did.

A restart or a scaling is recorded in status (with its cooldown) before it is carried out, and
nothing is done when that write fails. Every action asks first whether this replica may still act
(it leads for sure). Dry-run only reports what would be done.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connbudget.cycle.deps import Deps, MonitorLike, Runtime
from connbudget.cycle.reporting import series
from connbudget.kube.api import EvictionResult, KubeError
from connbudget.model.actions import Action, RestartPod, ScalePooler, TerminateBackends
from connbudget.model.spec import BudgetSpec, RestartMethod
from connbudget.policy import plan
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.report import events, status
from connbudget.report.events import NORMAL, WARNING, EventReason

log = logging.getLogger("connbudget.cycle")

IDLE_RECHECK_SLACK_SECONDS = 0.5  # rounding between the probe's idle ages and the re-check


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
            result, reason, message, n = await _execute(action, spec, namespace, monitor, deps, now)
        except (ProbeError, KubeError) as e:
            result, reason, n = "Failed", EventReason.ACTION_FAILED, 0
            message = f"could not {events.describe(action)}: {e}"
            if (isinstance(e, ProbeError) and e.failure is ProbeFailure.PERMISSION_DENIED) or (
                isinstance(e, KubeError) and e.status == 403
            ):
                denied = message
                termination_denied = termination_denied or isinstance(action, TerminateBackends)
        if isinstance(action, TerminateBackends):
            terminated += n
        elif result == "Succeeded":
            restarted = restarted or isinstance(action, RestartPod)
        elif result == "Skipped" and isinstance(action, RestartPod):
            gone.append(action.pod)
        event_type = NORMAL if result == "Succeeded" else WARNING
        await deps.post_event(
            event_type, reason.value, message + (f" ({why})" if why else ""), episode
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
    )


async def _execute(
    action: Action, spec: BudgetSpec, namespace: str, monitor: MonitorLike, deps: Deps, now: float
) -> tuple[str, EventReason, str, int]:
    """Carry out one action: its result, Event reason, message and how many backends it ended."""
    if isinstance(action, TerminateBackends):
        # Each was idle at least this long at the probe; one that ran a query since is not now.
        min_idle = min(b.idle_seconds for b in action.backends) - IDLE_RECHECK_SLACK_SECONDS
        done = set(await monitor.terminate(action.backends, min_idle_seconds=max(min_idle, 0.0)))
        if not done:
            return (
                "Skipped",
                EventReason.IDLE_TERMINATED,
                f"none of the {len(action.backends)} chosen backends was still idle",
                0,
            )
        ended = TerminateBackends(backends=tuple(b for b in action.backends if b.pid in done))
        skipped = len(action.backends) - len(ended.backends)
        return (
            "Succeeded",
            EventReason.IDLE_TERMINATED,
            events.describe(ended).replace("terminate", "terminated", 1)
            + (f" ({skipped} no longer idle, left alone)" if skipped else ""),
            len(ended.backends),
        )
    if isinstance(action, RestartPod):
        if action.method is RestartMethod.ROLLOUT_RESTART:
            await deps.kube.rollout_restart(
                namespace, action.owner_kind, action.owner_name, now=now, dry_run=False
            )
            return (
                "Succeeded",
                EventReason.WORKLOAD_RESTARTED,
                f"restarted {action.owner_kind}/{action.owner_name} (pod {action.pod} leaked)",
                0,
            )
        if action.method is RestartMethod.DELETE:
            res = await deps.kube.delete_pod(namespace, action.pod, action.uid, dry_run=False)
            reason = EventReason.POD_DELETED
        else:
            res = await deps.kube.evict_pod(namespace, action.pod, action.uid, dry_run=False)
            reason = EventReason.POD_EVICTED
        if res is EvictionResult.BLOCKED:
            return (
                "Blocked",
                EventReason.RESTART_BLOCKED,
                f"eviction of pod {action.pod} refused by a PodDisruptionBudget; retrying "
                f"after the cooldown ({spec.remediation.cooldown_seconds}s), never bypassing it",
                0,
            )
        if res is EvictionResult.GONE:
            return "Skipped", reason, f"pod {action.pod} was already gone", 0
        return "Succeeded", reason, f"{events.describe(action)}: done", 0
    await deps.kube.patch_scale(namespace, action.target, action.desired, dry_run=False)
    return "Succeeded", EventReason.POOLER_SCALED, events.describe(action), 0


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
    and the pod cache forgets them.
    """
    runtime.removed += done.terminated
    runtime.termination_denied = done.termination_denied
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
