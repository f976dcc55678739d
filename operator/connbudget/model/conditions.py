"""Condition types, reasons and phases of a ConnectionBudget's status.

Pure data. Conditions follow the ``metav1.Condition`` shape, so kstatus (Flux, Argo CD) and
``kubectl wait --for=condition=Ready`` understand them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ConditionType(enum.StrEnum):
    READY = "Ready"  # the controller can do its job (not: usage is within the budget)
    DATABASE_REACHABLE = "DatabaseReachable"
    WITHIN_BUDGET = "WithinBudget"
    REMEDIATING = "Remediating"
    PAUSED = "Paused"
    BUDGET_FITS = "BudgetFits"  # the budget is within the server's usable slots
    # Leaked connections' statements can be read (pg_read_all_stats): set once a leak was seen.
    STATEMENTS_VISIBLE = "StatementsVisible"
    # kstatus' "abnormal-true" pair, read by Flux and the cli-utils applier: Reconciling=True while
    # the first probe is pending, Stalled=True while only a change by the user can help.
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class Reason(enum.StrEnum):
    # Ready / DatabaseReachable
    PROBE_SUCCEEDED = "ProbeSucceeded"
    PROBE_FAILED = "ProbeFailed"
    SPEC_INVALID = "SpecInvalid"
    SECRET_MISSING = "SecretMissing"
    DSN_INVALID = "DsnInvalid"
    AUTHENTICATION_FAILED = "AuthenticationFailed"
    DATABASE_UNREACHABLE = "DatabaseUnreachable"
    PERMISSION_DENIED = "PermissionDenied"
    NO_PODS_SELECTED = "NoPodsSelected"
    POOLER_TARGET_INVALID = "PoolerTargetInvalid"
    PENDING = "Pending"
    # WithinBudget
    BUDGET_OK = "WithinBudget"
    BUDGET_WARNING = "BudgetWarning"
    BUDGET_EXCEEDED = "BudgetExceeded"
    # BudgetFits
    BUDGET_FITS = "BudgetFits"
    BUDGET_ABOVE_SERVER = "BudgetAboveServerLimit"
    # StatementsVisible
    STATEMENTS_READABLE = "StatementsReadable"
    INSUFFICIENT_PRIVILEGE = "InsufficientPrivilege"
    # Remediating
    IDLE = "Idle"
    ACTING = "Acting"
    WAITING = "Waiting"
    DRY_RUN = "DryRun"
    # Paused
    NOT_PAUSED = "NotPaused"
    PAUSED = "PausedByAnnotation"
    # Reconciling / Stalled when false
    PROBED = "Probed"
    NOT_STALLED = "NotStalled"


# Problems that do not go away by waiting (unlike an unreachable database): kstatus reports the
# budget as Failed (Stalled=True), so Flux fails the health check at once instead of timing out.
STALLED_REASONS = frozenset(
    {
        Reason.SPEC_INVALID,
        Reason.SECRET_MISSING,
        Reason.DSN_INVALID,
        Reason.AUTHENTICATION_FAILED,
        Reason.PERMISSION_DENIED,
        Reason.POOLER_TARGET_INVALID,
    }
)


class Phase(enum.StrEnum):
    PENDING = "Pending"
    WITHIN_BUDGET = "WithinBudget"
    WARNING = "Warning"
    OVER_BUDGET = "OverBudget"
    REMEDIATING = "Remediating"
    PAUSED = "Paused"
    DEGRADED = "Degraded"


@dataclass(frozen=True, kw_only=True)
class Condition:
    type: ConditionType
    status: bool
    reason: Reason
    message: str = ""
