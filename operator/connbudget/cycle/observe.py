"""Observe: what a pass sees before it judges anything.

The budget's credentials, one sample of its database (shared with every budget due at the same
slot), the pods it governs, its pooler, and who holds each backend. What only the operator can
judge (a missing Secret, an unreachable database, a selector that matches nothing, a pooler target
without ``/scale``) is returned as a ``Problem``: no observation at all, or blockers kept with it,
every one of them, never only the last.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connbudget.cycle.deps import Deps, MonitorLike, Runtime
from connbudget.kube.api import KubeError, Scale, SecretProblem
from connbudget.model.conditions import Reason
from connbudget.model.observations import PodInfo, PoolerClient, PoolerSample, ServerSample
from connbudget.model.spec import AttributionMode, BudgetSpec, ObjectRef, SecretRef, parse_spec
from connbudget.policy import attribution, usage
from connbudget.policy.census import Census, take_census
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.report.events import WARNING, EventReason

log = logging.getLogger("connbudget.cycle")

# How long pods the watch has not delivered may hold back NoPodsSelected (a watch lagging longer
# than this is reported as it is).
WATCH_SYNC_GRACE_SECONDS = 30.0


# The label CloudNativePG puts on a Pooler's pods; its /scale has no selector to find them by.
CNPG_POOLER_LABEL = "cnpg.io/poolerName"
CNPG_GROUP = "postgresql.cnpg.io"


@dataclass
class Problem:
    """Why a budget cannot be judged or acted on, as a condition and an Event say it."""

    reason: Reason
    message: str
    event: EventReason
    database_reachable: bool | None


@dataclass(frozen=True, kw_only=True)
class PoolerView:
    """What the pass knows of the budget's pooler (``sample`` None: no pooler, or no /scale)."""

    sample: PoolerSample | None = None
    ips: frozenset[str] = frozenset()  # its pods' addresses: backends from them are its own
    owner: str | None = None  # what else sets its replicas (an HPA), if anything
    problem: Problem | None = None


@dataclass(frozen=True, kw_only=True)
class Observation:
    """One look at the budget's world: the sample, the pods, the pooler, who holds what."""

    monitor: MonitorLike
    sample: ServerSample
    governed: tuple[PodInfo, ...]  # the pods the selector matches
    index: attribution.PodIndex
    census: Census  # the sample attributed and counted once, shared by the namespace's budgets
    governed_groups: tuple[
        attribution.Attributed, ...
    ]  # the direct backend groups of the governed pods
    pooler: PoolerView
    pooler_clients: Mapping[str, Sequence[PoolerClient]]
    # What only the operator can judge: each blocks every action until it is fixed.
    blockers: tuple[Problem, ...] = ()


async def observe(
    *, namespace: str, name: str, spec: BudgetSpec, runtime: Runtime, deps: Deps, slot: float
) -> Observation | Problem | None:
    """Look at the budget's database, pods and pooler for the poll ``slot``.

    Returns a ``Problem`` when there is nothing to judge (no credentials, no sample), and None
    when the pod watch has not caught up with the API server yet (probe again at the next tick).
    """
    secret = spec.database_secret
    try:
        dsn, ca_pem = await read_credentials(deps, namespace, secret)
    except SecretProblem as e:
        deps.metrics.record_probe_error(namespace, name, Reason.SECRET_MISSING.value)
        return Problem(Reason.SECRET_MISSING, str(e), EventReason.PROBE_FAILED, None)
    started = time.perf_counter()
    try:
        monitor = await deps.bind_monitor(f"{namespace}/{name}", dsn, ca_pem)
        # Every budget of this database due at this slot shares one query.
        sample = await monitor.sample(not_before=slot)
    except ProbeError as e:
        deps.metrics.record_probe_error(namespace, name, e.failure.value)
        runtime.history.clear()  # a gap in the samples: the old rate says nothing now
        # Nor does a backend seen before the gap; what the owners taught (their reuse gaps)
        # still holds: a pool that reconnects after an outage is the same pool.
        runtime.evidence.forget_backends()
        runtime.culprits.clear()
        if e.failure in (ProbeFailure.AUTHENTICATION_FAILED, ProbeFailure.DSN_INVALID):
            # The Secret may be fixed any moment: read it again at the next poll.
            deps.kube.forget_secret(namespace, secret)
            if secret.ca_key:
                deps.kube.forget_secret(namespace, SecretRef(name=secret.name, key=secret.ca_key))
        return Problem(
            Reason(e.failure.value), f"probe failed: {e}", EventReason.PROBE_FAILED, False
        )
    deps.metrics.record_probe(namespace, name, time.perf_counter() - started)

    all_pods = deps.pods(namespace)
    if deps.governed is not None:
        governed = tuple(deps.governed(namespace, spec.selector))
    else:
        governed = tuple(p for p in all_pods if usage.is_governed(p, spec.selector, namespace))
    blockers: list[Problem] = []
    if not governed and await _pods_not_yet_watched(deps, namespace, spec.selector.to_query()):
        # Just after a start the pod watch may not have delivered every pod: reporting
        # NoPodsSelected (and an Event) for pods that exist would be a false alarm. Probe again
        # at the next tick, without reporting or acting, for a bounded time.
        if runtime.unwatched_since is None:
            runtime.unwatched_since = slot
        if slot - runtime.unwatched_since < WATCH_SYNC_GRACE_SECONDS:
            return None
    else:
        runtime.unwatched_since = None
    if not governed:
        blockers.append(
            Problem(
                Reason.NO_PODS_SELECTED,
                f"selector {spec.selector.to_query()} matches no pod in {namespace}",
                EventReason.PROBE_FAILED,
                True,
            )
        )
    pooler = await _observe_pooler(namespace, spec, all_pods, runtime, deps)
    if pooler.problem is not None:
        blockers.append(pooler.problem)
    index = (
        deps.pod_index(namespace)
        if deps.pod_index is not None
        else attribution.PodIndex.build(all_pods, namespace=namespace)
    )
    take = deps.census or take_census
    counted = take(sample=sample, index=index, mode=spec.attribution, pooler_ips=pooler.ips)
    pooler_clients = attribution.attribute_pooler_clients(
        clients=pooler.sample.clients if pooler.sample else (), index=index
    )
    return Observation(
        monitor=monitor,
        sample=sample,
        governed=governed,
        index=index,
        census=counted,
        governed_groups=tuple(counted.slice(p.name for p in governed)),
        pooler=pooler,
        pooler_clients=pooler_clients,
        blockers=tuple(blockers),
    )


async def _observe_pooler(
    namespace: str, spec: BudgetSpec, all_pods: Sequence[PodInfo], runtime: Runtime, deps: Deps
) -> PoolerView:
    """The pooler's replicas, its pods' addresses and (with an admin Secret) its clients.

    Raises ``KubeError`` when the API server is away (retried, not the user's mistake).
    """
    if spec.pooler is None:
        return PoolerView()
    target = spec.pooler.target_ref
    try:
        scale = await deps.kube.read_scale(namespace, target)
    except KubeError as e:
        if transient(e):
            raise
        return PoolerView(
            problem=Problem(
                Reason.POOLER_TARGET_INVALID,
                f"pooler target {target.kind}/{target.name} has no readable /scale: {e}",
                EventReason.PROBE_FAILED,
                True,
            )
        )
    problem: Problem | None = None
    labels = pooler_pod_labels(target, spec.pooler.pod_labels, scale)
    if not labels:
        problem = Problem(
            Reason.POOLER_TARGET_INVALID,
            f"pooler target {target.kind}/{target.name} names no pods (its /scale has no "
            "selector): set spec.pooler.selector to its pods' labels",
            EventReason.PROBE_FAILED,
            True,
        )
    owner = await _pooler_owner(deps, runtime, namespace, target)
    ips = frozenset(
        p.ip
        for p in all_pods
        if labels
        and not p.terminating
        and p.ip
        and all(p.labels.get(k) == v for k, v in labels.items())
    )
    sample = PoolerSample(replicas=scale.replicas)
    if spec.pooler.admin_secret_ref is not None:
        try:
            template = await deps.kube.read_secret_value(namespace, spec.pooler.admin_secret_ref)
            sample = await deps.sample_poolers(template, sorted(ips), scale.replicas)
            if sample.errors:
                # A pooler pod that does not answer hides its clients and its server
                # connections: acting on the rest would be acting on half the picture.
                raise ProbeError(
                    ProbeFailure(sample.failure)
                    if sample.failure
                    else ProbeFailure.DATABASE_UNREACHABLE,
                    "; ".join(sample.errors),
                )
        except (SecretProblem, ProbeError) as e:
            # A malformed admin DSN or a wrong password waits for the user (Stalled); a
            # pooler that does not answer may come back by itself.
            reason = Reason.PROBE_FAILED
            if isinstance(e, ProbeError) and e.failure in (
                ProbeFailure.DSN_INVALID,
                ProbeFailure.AUTHENTICATION_FAILED,
            ):
                reason = Reason(e.failure.value)
            problem = Problem(reason, f"pooler probe failed: {e}", EventReason.PROBE_FAILED, True)
    return PoolerView(sample=sample, ips=ips, owner=owner, problem=problem)


def pooler_pod_labels(
    target: ObjectRef, given: Mapping[str, str] | None, scale: Scale
) -> dict[str, str]:
    """The labels of the pooler's pods: the spec's, else the target's ``/scale`` selector, else
    (a CloudNativePG Pooler) its ``cnpg.io/poolerName`` label; empty when none says."""
    if given:
        return dict(given)
    parsed = _parse_selector(scale.selector)
    if parsed:
        return parsed
    if target.kind == "Pooler" and target.api_version.startswith(f"{CNPG_GROUP}/"):
        return {CNPG_POOLER_LABEL: target.name}
    return {}


async def _pooler_owner(
    deps: Deps, runtime: Runtime, namespace: str, target: ObjectRef
) -> str | None:
    """What else sets the pooler's replicas (an HPA, KEDA's, or a GitOps tool that applies them),
    so the operator does not fight it.

    Asked once a minute at most; what the operator may not read is not assumed.
    """
    now = deps.now()
    if runtime.pooler_owner_checked is not None and now - runtime.pooler_owner_checked < 60:
        return runtime.pooler_owner
    owners: list[str] = []
    for ask in (deps.kube.autoscalers_of, deps.kube.replica_managers):
        try:
            owners += await ask(namespace, target)
        except KubeError as e:
            log.info("who sets the pooler's replicas: not readable", extra={"error": str(e)})
    owner = ", ".join(owners) or None
    if owner is not None and owner != runtime.pooler_owner:
        await deps.post_event(
            WARNING,
            EventReason.POOLER_SCALED_ELSEWHERE.value,
            f"{target.kind}/{target.name}'s replicas are set by {owner}: the operator will not "
            "scale it (remove ScalePooler from the steps, or the autoscaler)",
            None,
        )
    runtime.pooler_owner, runtime.pooler_owner_checked = owner, now
    return owner


def _parse_selector(text: str) -> dict[str, str]:
    """Equality-based part of a ``status.selector`` string (``a=b,c=d``)."""
    out = {}
    for part in text.split(","):
        if "=" in part and "!=" not in part:
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip().lstrip("=")
    return out


def parsed_spec(runtime: Runtime, spec_raw: Mapping[str, Any]) -> BudgetSpec:
    """The budget's spec, parsed once per change (raises ``SpecError``)."""
    if runtime.parsed is not None and runtime.parsed[0] == spec_raw:
        return runtime.parsed[1]
    spec = parse_spec(spec_raw)
    runtime.parsed = (copy.deepcopy(dict(spec_raw)), spec)
    return spec


async def _pods_not_yet_watched(deps: Deps, namespace: str, label_selector: str) -> bool:
    """Whether the API server has pods for a selector the watch index has none for."""
    try:
        return await deps.kube.count_pods(namespace, label_selector) > 0
    except KubeError:
        return False  # cannot tell: report what the index shows


async def read_credentials(deps: Deps, namespace: str, secret: SecretRef) -> tuple[str, str | None]:
    """The DSN and, if the budget names one, the PEM CA certificate (raises ``SecretProblem``)."""
    dsn = await deps.kube.read_secret_value(namespace, secret)
    if not secret.ca_key:
        return dsn, None
    ca_ref = SecretRef(name=secret.name, key=secret.ca_key)
    return dsn, await deps.kube.read_secret_value(namespace, ca_ref)


def transient(e: KubeError) -> bool:
    """An API error that waiting may cure (no answer, overloaded, throttled), not a refusal."""
    return e.status >= 500 or e.status in (408, 429)


class Censuses:
    """The censuses of the latest samples, so the budgets of a namespace that share a sample (and
    an attribution mode and pooler) attribute and count it once between them, not once each.

    Keyed by the sample and the pod index objects themselves (a new sample, or any change of the
    pods, is a new index object): a census is never reused for another sample or other pods. The
    budgets that share a sample take it within moments of each other (they are due at one slot),
    so a census is kept only ``keep_seconds``: an older one would never be asked for again, and
    it would hold its sample in memory (found by the soak: 256 kept censuses of 1,000 backends
    each took 35 MB).
    """

    def __init__(
        self, *, keep_seconds: float = 2.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._keep = keep_seconds
        self._monotonic = monotonic
        self._taken: dict[tuple[int, int, AttributionMode, frozenset[str]], _Taken] = {}

    def __len__(self) -> int:
        return len(self._taken)

    def take(
        self,
        *,
        sample: ServerSample,
        index: attribution.PodIndex,
        mode: AttributionMode,
        pooler_ips: frozenset[str] = frozenset(),
    ) -> Census:
        now = self._monotonic()
        while self._taken:  # the oldest first (insertion order)
            oldest = next(iter(self._taken))
            if now - self._taken[oldest].at < self._keep:
                break
            del self._taken[oldest]
        key = (id(sample), id(index), mode, pooler_ips)
        found = self._taken.get(key)
        # The objects are held with their census, so their ids cannot be another's meanwhile.
        if found is not None and found.sample is sample and found.index is index:
            return found.census
        counted = take_census(sample=sample, index=index, mode=mode, pooler_ips=pooler_ips)
        self._taken[key] = _Taken(sample=sample, index=index, census=counted, at=now)
        return counted


@dataclass(frozen=True)
class _Taken:
    sample: ServerSample
    index: attribution.PodIndex
    census: Census
    at: float  # when it was taken (monotonic)
