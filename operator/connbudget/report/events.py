"""Kubernetes Event reasons and the messages that go with them.

Pure: messages are built from model types and numbers only, never from a DSN or a Secret.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence

from connbudget.model.actions import Action, RestartPod, TerminateBackends
from connbudget.model.spec import RestartMethod
from connbudget.policy.usage import Usage

NORMAL = "Normal"
WARNING = "Warning"
MAX_TARGETS_IN_MESSAGE = 5


class EventReason(enum.StrEnum):
    BUDGET_WARNING = "BudgetWarning"
    BUDGET_EXCEEDED = "BudgetExceeded"
    BUDGET_RECOVERED = "BudgetRecovered"
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


def usage_text(u: Usage) -> str:
    top = ", ".join(
        f"{o.owner} {o.connections}" + (f" (+{o.pooled} through the pooler)" if o.pooled else "")
        for o in u.by_owner[:3]
    )
    return (
        f"{u.connections}/{u.budget} connections ({u.percent:.0f}% of the budget; server "
        f"{u.server_total}/{u.server_max_connections})" + (f"; top: {top}" if top else "")
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


def summarize(actions: Sequence[Action]) -> str:
    return "; ".join(describe(a) for a in actions)
