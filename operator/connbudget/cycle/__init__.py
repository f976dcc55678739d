"""One reconcile pass of a ConnectionBudget, and when it is due: the imperative shell around the
pure policy.

``run.run_cycle`` is the pass, a pipeline of steps with typed hand-offs (``observe``, ``judge``,
``policy.plan.decide``, ``act``, ``reporting``); ``schedule`` says when a budget probes (the poll
grid the budgets of a database share); ``deps`` holds what a pass is given (``Deps``) and what a
budget remembers between passes (``Runtime``). The names below are what the handlers use.
"""

from connbudget.cycle.deps import HISTORY_LENGTH, Deps, KubeCalls, MonitorLike, Runtime
from connbudget.cycle.observe import (
    WATCH_SYNC_GRACE_SECONDS,
    Censuses,
    pooler_pod_labels,
    transient,
)
from connbudget.cycle.run import keep_connected, run_cycle
from connbudget.cycle.schedule import (
    PACING_SLACK_SECONDS,
    WAKE_MARGIN_SECONDS,
    is_probe_due,
    next_slot,
    seconds_to_next_cycle,
    slot_at,
)

__all__ = [
    "HISTORY_LENGTH",
    "PACING_SLACK_SECONDS",
    "WAKE_MARGIN_SECONDS",
    "WATCH_SYNC_GRACE_SECONDS",
    "Censuses",
    "Deps",
    "KubeCalls",
    "MonitorLike",
    "Runtime",
    "is_probe_due",
    "keep_connected",
    "next_slot",
    "pooler_pod_labels",
    "run_cycle",
    "seconds_to_next_cycle",
    "slot_at",
    "transient",
]
