"""Budget admission: the most connections a workload change may open, against its budget.

Pure: no I/O, no clock; all inputs are arguments.

A budget is breached long after the change that made the breach possible: a Deployment scaled to
30 replicas of a 10-connection pool fits a 200-connection budget on a quiet day and breaks it the
first time the pools fill, or during the next rollout, when the surge pods open theirs before
the old pods close any. This module computes the worst case a workload's spec allows, the
workload's ``replicas`` (or its HorizontalPodAutoscaler's ``maxReplicas``) plus the pods its
rollout strategy may add on top (``maxSurge``), times the connections each pod may open, plus
what the budget's other owners hold, and compares it with the budget.

The rollout arithmetic follows the controllers:

- Deployment, ``RollingUpdate`` (the default): ``maxSurge`` (default 25%) is a number of pods or
  a percentage of the desired replicas rounded **up** (``intstr.GetScaledValueFromIntOrPercent``
  with ``roundUp=true`` in ``ResolveFenceposts``: 25% of 10 replicas is 3 pods, not 2).
  ``Recreate`` stops every old pod before starting a new one: no surge.
- StatefulSet: pods are replaced in place, one ordinal at a time; its ``RollingUpdate``
  ``maxUnavailable`` takes pods away, never adds any, and a StatefulSet has no ``maxSurge``.
- Argo Rollouts ``Rollout``: a canary's ``maxSurge`` as a Deployment's (same default, same
  rounding); a blue-green runs the preview ReplicaSet beside the active one, at
  ``previewReplicaCount`` pods or, by default, at full scale (a 100% surge).

What this does not see: pods still terminating after their replacement started (the Deployment
controller does not count them against ``maxSurge``, so their connections may briefly be held
beside the surge's), and a rollout of another owner at the same moment (other owners are counted
at what they hold, or may hold at their ``replicas``, not at their own surge).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.spec import AdmissionMode, BudgetSpec

CONNECTIONS_PER_POD_ANNOTATION = "connbudget.io/connections-per-pod"
# The most connections per pod the annotation may declare: PostgreSQL's max_connections is an
# int capped at 262143 (2^18 - 1), so a pod can never hold more.
MAX_CONNECTIONS_PER_POD = 262_143
# apps/v1's default maxSurge for a RollingUpdate Deployment and Argo Rollouts' for a canary.
DEFAULT_MAX_SURGE = "25%"
# A blue-green Rollout without previewReplicaCount runs its preview at full scale.
FULL_SCALE_SURGE = "100%"
# The only string an IntOrString surge may be (apimachinery's IsValidPercent): digits and '%'.
_PERCENT = re.compile(r"^[0-9]+%$")
_POSITIVE_INTEGER = re.compile(r"^[0-9]+$")

# Workload kinds whose pods the admission check counts (with their apiVersions' groups).
DEPLOYMENT, STATEFULSET, ROLLOUT = "Deployment", "StatefulSet", "Rollout"
AUTOSCALER = "HorizontalPodAutoscaler"
WORKLOAD_KINDS = {DEPLOYMENT: "apps", STATEFULSET: "apps", ROLLOUT: "argoproj.io"}

IntOrPercent = int | str
_TIMES = "\N{MULTIPLICATION SIGN}"


class Verdict(enum.StrEnum):
    FITS = "Fits"
    BREAKS = "Breaks"


class PerPodSource(enum.StrEnum):
    """Where a workload's connections per pod come from."""

    DECLARED = "declared"  # the connbudget.io/connections-per-pod annotation
    OBSERVED = "observed"  # the figure seen in status.usage.byOwner[]


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the admission check needs of a Deployment, StatefulSet or Rollout."""

    kind: str
    namespace: str
    name: str
    replicas: int  # spec.replicas (1 when absent, as the API server defaults it)
    max_surge: IntOrPercent  # pods the rollout may add: a number or "N%" of the replicas
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``Kind namespace/name``, as the message names it."""
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True)
class Autoscaler:
    """What the admission check needs of a HorizontalPodAutoscaler."""

    namespace: str
    name: str
    target_kind: str
    target_name: str
    max_replicas: int


@dataclass(frozen=True, kw_only=True)
class PerPod:
    """A workload's connections per pod, or why there is no number."""

    connections: int | None
    source: PerPodSource | None = None
    problem: str | None = None  # the annotation is there but says no positive integer


@dataclass(frozen=True, kw_only=True)
class WorstCase:
    """The most connections a workload's spec allows, counted against one budget."""

    workload: str  # Kind namespace/name
    replicas: int  # the replicas counted: spec.replicas, or the autoscaler's maxReplicas
    autoscaler: str | None  # namespace/name of the HPA whose maxReplicas was counted
    surge: int  # pods the rollout may add on top of the replicas
    per_pod: int
    per_pod_source: PerPodSource
    others: int  # connections the budget's other owners hold (or may hold)
    budget: int
    budget_name: str  # namespace/name of the ConnectionBudget

    @property
    def pods(self) -> int:
        return self.replicas + self.surge

    @property
    def opens(self) -> int:
        """The connections the workload alone may open."""
        return self.pods * self.per_pod

    @property
    def total(self) -> int:
        """The connections the budget would count with the workload at its worst."""
        return self.opens + self.others

    @property
    def verdict(self) -> Verdict:
        return Verdict.FITS if self.total <= self.budget else Verdict.BREAKS


def scaled_surge(value: IntOrPercent, *, desired: int) -> int:
    """Resolve a ``maxSurge`` to pods as the Deployment controller does.

    A number is taken as it is; a percentage of ``desired`` replicas is rounded up (apimachinery's
    ``GetScaledValueFromIntOrPercent`` with ``roundUp=true``, which ``ResolveFenceposts`` uses for
    the surge), so a surge is never under-counted.

    Raises:
        ValueError: ``value`` is neither a non-negative integer nor digits followed by ``%``.
    """
    if isinstance(value, bool):
        raise ValueError(f"maxSurge must be a number of pods or a percentage, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"maxSurge must not be negative, not {value}")
        return value
    if not _PERCENT.match(value):
        raise ValueError(f"maxSurge must be a number of pods or a percentage, not {value!r}")
    percent = int(value[:-1])
    # Exact integer ceiling of percent * desired / 100 (the controller's float ceiling agrees
    # for every replica count the API server accepts).
    return -(-percent * desired // 100)


def declared_per_pod(annotations: Mapping[str, str] | None, *, workload: str) -> PerPod:
    """Read the ``connbudget.io/connections-per-pod`` annotation of ``workload``.

    An absent annotation gives no number and no problem; a present one must be a positive
    integer in decimal digits, else it gives a problem and no number (a figure that cannot be
    read is never guessed: "10 " or "ten" would otherwise check nothing).
    """
    raw = (annotations or {}).get(CONNECTIONS_PER_POD_ANNOTATION)
    if raw is None:
        return PerPod(connections=None)
    if _POSITIVE_INTEGER.match(raw) and 1 <= int(raw) <= MAX_CONNECTIONS_PER_POD:
        return PerPod(connections=int(raw), source=PerPodSource.DECLARED)
    return PerPod(
        connections=None,
        problem=(
            f"{workload}: annotation {CONNECTIONS_PER_POD_ANNOTATION} must be a positive integer"
            f" (1 to {MAX_CONNECTIONS_PER_POD}), not {raw!r}"
        ),
    )


def decide_per_pod(
    *, annotations: Mapping[str, str] | None, observed: int | None, workload: str
) -> PerPod:
    """Decide the connections per pod to count for ``workload``: declared, else observed.

    The team's declaration wins over what was seen: the declared figure is the pool size the
    workload is configured with, while a quiet week's observation may be below it. An invalid
    declaration is a problem, and the observed figure does not stand in for it: the team meant
    to declare one, and checking against another number would hide the mistake.
    """
    declared = declared_per_pod(annotations, workload=workload)
    if declared.connections is not None or declared.problem is not None:
        return declared
    if observed is not None and observed > 0:
        return PerPod(connections=observed, source=PerPodSource.OBSERVED)
    return PerPod(connections=None)


def evaluate_worst_case(
    *,
    workload: Workload,
    per_pod: int,
    per_pod_source: PerPodSource,
    others: int,
    budget: int,
    budget_name: str,
    autoscaler: Autoscaler | None = None,
) -> WorstCase:
    """Compute the worst case ``workload`` allows against a budget of ``budget`` connections.

    An autoscaler's ``maxReplicas`` replaces the workload's ``replicas``: the HPA may scale it
    there whatever the manifest says, and the surge is then taken of that many replicas, as the
    controller computes it from the replicas the HPA set.

    Raises:
        ValueError: the workload's ``max_surge`` cannot be resolved (see ``scaled_surge``).
    """
    replicas = autoscaler.max_replicas if autoscaler is not None else workload.replicas
    return WorstCase(
        workload=workload.ref,
        replicas=replicas,
        autoscaler=f"{autoscaler.namespace}/{autoscaler.name}" if autoscaler else None,
        surge=scaled_surge(workload.max_surge, desired=replicas),
        per_pod=per_pod,
        per_pod_source=per_pod_source,
        others=others,
        budget=budget,
        budget_name=budget_name,
    )


def explain(worst: WorstCase) -> str:
    """Say the worst case's arithmetic: the one text the webhook and ``connbudget check`` give."""
    if worst.autoscaler is not None:
        replicas = f"{worst.replicas} maxReplicas of HorizontalPodAutoscaler {worst.autoscaler}"
    else:
        replicas = f"{worst.replicas} replicas"
    text = (
        f"{worst.workload} may open {worst.pods} pods {_TIMES} {worst.per_pod} connections"
        f" ({worst.per_pod_source.value}) = {worst.opens} ({replicas} + {worst.surge} surge);"
        f" with {worst.others} held by other owners that is {worst.total} of the budget's"
        f" {worst.budget} (ConnectionBudget {worst.budget_name})"
    )
    if worst.verdict is Verdict.BREAKS:
        text += f": {worst.total - worst.budget} over"
    return text


# --- manifests ----------------------------------------------------------------------------------


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _strings(value: object) -> dict[str, str]:
    return {str(k): v for k, v in _mapping(value).items() if isinstance(v, str)}


def _surge_of(kind: str, spec: Mapping[str, object]) -> IntOrPercent:
    """The rollout's surge as the manifest gives it, its default filled in (a null is absent)."""
    strategy = _mapping(spec.get("strategy"))
    if kind == DEPLOYMENT:
        if strategy.get("type") == "Recreate":
            return 0
        surge = _mapping(strategy.get("rollingUpdate")).get("maxSurge")
    elif kind == ROLLOUT and strategy.get("blueGreen") is not None:
        surge = _mapping(strategy.get("blueGreen")).get("previewReplicaCount")
        if surge is None:
            return FULL_SCALE_SURGE
    elif kind == ROLLOUT:
        surge = _mapping(strategy.get("canary")).get("maxSurge")
    else:
        return 0
    if surge is None:
        return DEFAULT_MAX_SURGE
    if isinstance(surge, int | str) and not isinstance(surge, bool):
        return surge
    return repr(surge)  # refused by scaled_surge, with the value in its message


def workload_of(doc: Mapping[str, object], *, default_namespace: str) -> Workload | None:
    """Read a Deployment, StatefulSet or Rollout manifest (None: not one of those kinds).

    Raises:
        ValueError: ``spec.replicas`` is not a non-negative integer.
    """
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOAD_KINDS:
        return None
    api_version = doc.get("apiVersion")
    if not isinstance(api_version, str) or api_version.split("/")[0] != WORKLOAD_KINDS[kind]:
        return None
    meta, spec = _mapping(doc.get("metadata")), _mapping(doc.get("spec"))
    name = meta.get("name")
    namespace = meta.get("namespace")
    ref = f"{kind} {namespace or default_namespace}/{name}"
    replicas = spec.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"{ref}: spec.replicas must be a non-negative integer, not {replicas!r}")
    template_meta = _mapping(_mapping(spec.get("template")).get("metadata"))
    return Workload(
        kind=kind,
        namespace=namespace if isinstance(namespace, str) and namespace else default_namespace,
        name=str(name),
        replicas=replicas,
        max_surge=_surge_of(kind, spec),
        pod_labels=_strings(template_meta.get("labels")),
        annotations=_strings(meta.get("annotations")),
    )


def autoscaler_of(doc: Mapping[str, object], *, default_namespace: str) -> Autoscaler | None:
    """Read a HorizontalPodAutoscaler manifest (None: not one, or without a usable target)."""
    if doc.get("kind") != AUTOSCALER:
        return None
    meta, spec = _mapping(doc.get("metadata")), _mapping(doc.get("spec"))
    target = _mapping(spec.get("scaleTargetRef"))
    kind, name, high = target.get("kind"), target.get("name"), spec.get("maxReplicas")
    if not isinstance(kind, str) or not isinstance(name, str):
        return None
    if isinstance(high, bool) or not isinstance(high, int) or high < 1:
        return None
    namespace = meta.get("namespace")
    return Autoscaler(
        namespace=namespace if isinstance(namespace, str) and namespace else default_namespace,
        name=str(meta.get("name")),
        target_kind=kind,
        target_name=name,
        max_replicas=high,
    )


# --- the offline check ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Finding:
    """What the check says of one workload against one budget."""

    workload: str  # Kind namespace/name
    budget: str  # namespace/name of the ConnectionBudget
    mode: AdmissionMode
    message: str
    verdict: Verdict | None = None  # None: not checked, or a problem
    problem: bool = False  # a manifest that cannot be checked as it is (an invalid annotation)


def autoscaler_for(workload: Workload, autoscalers: Iterable[Autoscaler]) -> Autoscaler | None:
    """The HorizontalPodAutoscaler that scales ``workload`` (None: none does)."""
    return next(
        (
            a
            for a in autoscalers
            if a.namespace == workload.namespace
            and a.target_kind == workload.kind
            and a.target_name == workload.name
        ),
        None,
    )


def find_breaches(
    *,
    budget_name: str,
    namespace: str,
    spec: BudgetSpec,
    workloads: Sequence[Workload],
    autoscalers: Sequence[Autoscaler] = (),
) -> list[Finding]:
    """Check each workload a budget governs against it, from manifests (``connbudget check``).

    Offline there is no observed figure, only the declared one: a workload without the annotation
    is not checked (said so, never a failure), and counts for nothing among the other owners. The
    other owners are the budget's other workloads in the same manifests, each at its replicas (or
    its autoscaler's maxReplicas) times its declared figure, without their own surge: one rollout
    at a time. A budget given as a percentage of the server's max_connections is not checked: the
    server is not known offline. A budget whose mode is Off is not checked at all.
    """
    if spec.admission is AdmissionMode.OFF:
        return []
    governed = [
        w for w in workloads if w.namespace == namespace and spec.selector.matches(w.pod_labels)
    ]
    budget = spec.budget.max_connections
    if budget is None:
        return [
            Finding(
                workload=w.ref,
                budget=budget_name,
                mode=spec.admission,
                message=(
                    f"{w.ref}: not checked: ConnectionBudget {budget_name} is a percentage of the"
                    " server's max_connections, unknown offline"
                ),
            )
            for w in governed
        ]
    per_pod = {w.ref: declared_per_pod(w.annotations, workload=w.ref) for w in governed}
    scaled = {w.ref: autoscaler_for(w, autoscalers) for w in governed}
    holds = {
        w.ref: n * (a.max_replicas if (a := scaled[w.ref]) is not None else w.replicas)
        for w in governed
        if (n := per_pod[w.ref].connections) is not None
    }
    out: list[Finding] = []
    for w in governed:
        found = per_pod[w.ref]
        said = functools.partial(Finding, workload=w.ref, budget=budget_name, mode=spec.admission)
        if found.problem is not None:
            out.append(said(message=found.problem, problem=True))
            continue
        if found.connections is None:
            out.append(
                said(
                    message=(
                        f"{w.ref}: not checked: no declared connections per pod (annotation"
                        f" {CONNECTIONS_PER_POD_ANNOTATION})"
                    )
                )
            )
            continue
        try:
            worst = evaluate_worst_case(
                workload=w,
                per_pod=found.connections,
                per_pod_source=PerPodSource.DECLARED,
                others=sum(n for ref, n in holds.items() if ref != w.ref),
                budget=budget,
                budget_name=budget_name,
                autoscaler=scaled[w.ref],
            )
        except ValueError as e:
            out.append(said(message=f"{w.ref}: {e}", problem=True))
            continue
        out.append(said(message=explain(worst), verdict=worst.verdict))
    return out
