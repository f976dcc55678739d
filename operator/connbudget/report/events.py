"""Kubernetes Event reasons and the messages that go with them.

Pure: messages are built from model types and numbers only, never from a DSN or a Secret.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence

from connbudget.model.actions import Action, RestartPod, TerminateBackends
from connbudget.model.spec import RestartMethod
from connbudget.policy.culprits import LeakShape
from connbudget.policy.evidence import OwnerEvidence
from connbudget.policy.usage import Usage

NORMAL = "Normal"
WARNING = "Warning"
MAX_TARGETS_IN_MESSAGE = 5


class EventReason(enum.StrEnum):
    BUDGET_WARNING = "BudgetWarning"
    BUDGET_EXCEEDED = "BudgetExceeded"
    BUDGET_RECOVERED = "BudgetRecovered"
    LEAK_DETECTED = "LeakDetected"
    BUDGET_ABOVE_SERVER = "BudgetAboveServerLimit"
    POOLER_SCALED_ELSEWHERE = "PoolerScaledElsewhere"
    IDLE_TERMINATED = "IdleConnectionsTerminated"
    POD_EVICTED = "PodEvicted"
    POD_DELETED = "PodDeleted"
    RESTART_BLOCKED = "RestartBlocked"
    WORKLOAD_RESTARTED = "WorkloadRestarted"
    POOLER_SCALED = "PoolerScaled"
    DRY_RUN = "DryRun"
    PROBE_FAILED = "ProbeFailed"
    SPEC_INVALID = "SpecInvalid"
    ACTION_FAILED = "ActionFailed"
    TERMINATION_RESTARTS_PODS = "TerminationRestartsPods"


def usage_text(u: Usage) -> str:
    top = ", ".join(
        f"{o.owner} {o.connections}" + (f" (+{o.pooled} through the pooler)" if o.pooled else "")
        for o in u.by_owner[:3]
    )
    return (
        f"{u.connections}/{u.budget} connections ({u.percent:.0f}% of the budget; server "
        f"{u.server_total}/{u.server_max_connections})" + (f"; top: {top}" if top else "")
    )


def where_text(shape: LeakShape) -> str:
    """What the leaked connections last ran: share, normalised statement, tags, revision."""
    tags = ", ".join(f"{k}={v}" for k, v in shape.tags.items())
    return (
        f"{shape.share:.0%} after `{shape.statement}`"
        + (f" ({tags})" if tags else "")
        + (
            f" on revision {shape.revision}"
            + (
                " only: it came with a rollout (pods of other revisions do not leak it)"
                if shape.rollout
                else ""
            )
            if shape.revision
            else ""
        )
    )


def leak_text(ev: OwnerEvidence, shapes: Sequence[LeakShape] = (), hint: str | None = None) -> str:
    """Who leaks, how fast, where (the statement its leaked connections last ran), and from when
    on its connections count as abandoned; then the hint, if one applies."""
    rate = ev.leak_rate
    pace = f"{rate:.1f} connections/s" if rate >= 1 else f"{ev.rate_per_minute:.0f} connections/min"
    return (
        f"{ev.owner} leaks about {pace}"
        + (f"; {where_text(shapes[0])}" if shapes else "")
        + ": its connections are abandoned after "
        f"{ev.abandon_after:.0f}s idle"
        + (
            f" (the longest idle gap before reuse seen is {ev.max_gap:.0f}s)"
            if ev.max_gap is not None
            else " (none was seen reused)"
        )
        + f"; {ev.abandoned} abandoned now"
        + (
            f", {ev.abandoned_in_transaction} of them idle in a transaction"
            if ev.abandoned_in_transaction
            else ""
        )
        + (f". Hint: {hint}" if hint else "")
    )


def describe(action: Action) -> str:
    """What the action does, with numbers and targets."""
    if isinstance(action, TerminateBackends):
        per_pod = Counter(b.pod for b in action.backends)
        pods = ", ".join(f"{p} ({n})" for p, n in per_pod.most_common(MAX_TARGETS_IN_MESSAGE))
        more = len(per_pod) - MAX_TARGETS_IN_MESSAGE
        idle = [b.idle_seconds for b in action.backends]
        return (
            f"terminate {len(action.backends)} idle backends of {pods}"
            + (f" and {more} more pods" if more > 0 else "")
            + f", idle {min(idle):.0f}-{max(idle):.0f}s"
        )
    if isinstance(action, RestartPod):
        if action.method is RestartMethod.ROLLOUT_RESTART:
            return f"rollout-restart {action.owner_kind}/{action.owner_name} (for pod {action.pod})"
        verb = "evict" if action.method is RestartMethod.EVICT else "delete"
        return f"{verb} pod {action.pod} of {action.owner_kind}/{action.owner_name}"
    return (
        f"scale {action.target.kind}/{action.target.name} from {action.current} to "
        f"{action.desired} replicas"
    )
