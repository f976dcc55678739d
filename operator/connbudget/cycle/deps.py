"""What a pass works with: the injected calls (``Deps``) and a budget's memory (``Runtime``).

Everything a pass touches comes in through ``Deps`` (Kubernetes calls, the database monitor, the
pod index, Events, metrics, the clock), so tests drive it with fakes and the handlers with the real
thing; ``Runtime`` is what a budget remembers from one pass to the next.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connbudget.kube.api import EvictionResult, Scale
from connbudget.model.actions import IdleBackend, Termination
from connbudget.model.observations import LastStatement, PodInfo, PoolerSample, ServerSample
from connbudget.model.spec import (
    AttributionMode,
    BudgetSpec,
    LabelSelector,
    ObjectRef,
    SecretRef,
)
from connbudget.policy import attribution, culprits, evidence, ledger, occupancy, remedy
from connbudget.policy.census import Census
from connbudget.report.metrics import Metrics

HISTORY_LENGTH = 64  # samples kept for the growth-rate forecast, at most its last 30 s (judge)
NOT_SIGNALABLE_KEPT = 1000  # backends remembered as not signalable, per budget


class KubeCalls(Protocol):
    async def read_secret_value(self, namespace: str, ref: SecretRef) -> str: ...

    def forget_secret(self, namespace: str, ref: SecretRef) -> None: ...

    async def evict_pod(
        self, namespace: str, name: str, uid: str, *, dry_run: bool
    ) -> EvictionResult: ...

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, dry_run: bool
    ) -> EvictionResult: ...

    async def rollout_restart(
        self, namespace: str, kind: str, name: str, *, now: float, dry_run: bool
    ) -> None: ...

    async def read_scale(self, namespace: str, target: ObjectRef) -> Scale: ...

    async def count_pods(self, namespace: str, label_selector: str) -> int: ...

    async def autoscalers_of(self, namespace: str, target: ObjectRef) -> list[str]: ...

    async def replica_managers(self, namespace: str, target: ObjectRef) -> list[str]: ...

    async def patch_scale(
        self, namespace: str, target: ObjectRef, replicas: int, *, dry_run: bool
    ) -> None: ...


class MonitorLike(Protocol):
    async def sample(self, *, not_before: float | None = None) -> ServerSample: ...

    async def terminate(self, backends: Iterable[IdleBackend]) -> Termination: ...

    async def statements(self, backends: Iterable[tuple[int, float]]) -> list[LastStatement]: ...


class CensusTaker(Protocol):
    def __call__(
        self,
        *,
        sample: ServerSample,
        index: attribution.PodIndex,
        mode: AttributionMode,
        pooler_ips: frozenset[str] = ...,
    ) -> Census: ...


@dataclass
class Deps:
    kube: KubeCalls
    # (budget id, DSN, PEM CA certificate or None)
    bind_monitor: Callable[[str, str, str | None], Awaitable[MonitorLike]]
    sample_poolers: Callable[[str, Sequence[str], int], Awaitable[PoolerSample]]
    pods: Callable[[str], Sequence[PodInfo]]  # every pod of a namespace, from the watch index
    # (type, reason, message, series): Events of one series and reason are one Event, counted
    post_event: Callable[[str, str, str, str | None], Awaitable[None]]
    metrics: Metrics
    now: Callable[[], float] = time.time
    # Writes a status before a restart or a scaling is carried out (None: not recorded ahead).
    write_status: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    # Every pod the operator sees, by address, and a namespace's by name (None: only the pods of
    # the budget's namespace, from ``pods``).
    pod_index: Callable[[str], attribution.PodIndex] | None = None
    # The pods of a namespace a selector matches, kept until the pods change (None: each pass
    # matches the selector against every pod of the namespace, from ``pods``).
    governed: Callable[[str, LabelSelector], Sequence[PodInfo]] | None = None
    # Drops a pod the API server says is gone from the watch cache (None: nothing to drop).
    forget_pod: Callable[[str, str], None] | None = None
    # Attributes and counts a sample against a pod index, shared by the budgets that ask for the
    # same (None: each budget takes its own census; see ``cycle.observe.Censuses``).
    census: CensusTaker | None = None
    # Whether this replica may act now (it leads for sure); asked before every action.
    may_act: Callable[[], bool] = lambda: True
    # What every budget of this replica terminated and restarted lately, shared by them all, so
    # budgets whose selectors overlap do not act twice (None: each budget on its own).
    ledger: ledger.Ledger | None = None


@dataclass
class Runtime:
    """Per-budget memory that need not survive a restart (kept in kopf's memo)."""

    history: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH)
    )
    last_probe_at: float | None = None
    # The cadence the last decision asked for (None: the spec's pollSeconds).
    next_poll_seconds: float | None = None
    # Each governed backend followed across polls: who leaks, who pools (policy.evidence).
    evidence: evidence.Evidence = field(default_factory=evidence.Evidence)
    # Whether the evidence has taken the owners' reuse gaps the status kept (once per runtime:
    # after an operator restart or a change of leader, a pool is not new).
    evidence_seeded: bool = False
    # Connections per pod of each governed owner over the last hour (policy.occupancy).
    occupancy: occupancy.Occupancy = field(default_factory=occupancy.Occupancy)
    # What the operator's terminations did to the governed pods (policy.remedy).
    remedy: remedy.RemedyWatch = field(default_factory=remedy.RemedyWatch)
    # What leaking owners' abandoned connections last ran (policy.culprits).
    culprits: culprits.Culprits = field(default_factory=culprits.Culprits)
    # Connections the operator removed itself (terminated), added back into the forecast's
    # series, so that its own actions never look like a slowing leak.
    removed: int = 0
    # The last termination was refused (permission): termination cannot hold the budget.
    termination_denied: bool = False
    # (pid, backend_start) of backends a termination left alone because the monitoring role may
    # not signal them (a superuser's): choosing them again would be refused again. At most
    # NOT_SIGNALABLE_KEPT, set by ``act.settle``.
    not_signalable: set[tuple[int, float]] = field(default_factory=set)
    # Events of one episode (from one recovery to the next) and reason are one Event.
    episode: int = 0
    # The owners the evidence said were leaking at the last poll.
    leaking: set[str] = field(default_factory=set)
    # Whether the budget fitted the server's usable slots at the last poll (None: not known).
    budget_fits: bool | None = None
    # What else sets the pooler's replicas (an HPA), and when that was last asked.
    pooler_owner: str | None = None
    pooler_owner_checked: float | None = None
    # Since when the API server has pods for the selector that the watch index lacks.
    unwatched_since: float | None = None
    # The problems last reported (reason and message): each posts an Event when it appears.
    problems_said: frozenset[str] = frozenset()
    # The spec as last parsed (a copy of the raw spec, and the result): parsed again only when it
    # changes, not on every tick.
    parsed: tuple[dict[str, Any], BudgetSpec] | None = None
