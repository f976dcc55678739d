"""One reconcile pass of a ConnectionBudget: probe, attribute, decide, act, report.

The imperative shell around the pure policy. Everything it touches comes in through ``Deps``
(Kubernetes calls, database monitors, the pod index, Events, metrics, the clock), so tests drive
it with fakes and the handlers with the real thing. It never raises for what only the operator can
judge (missing Secret, unreachable database, selector matching nothing): those become conditions
and Events, and no action is taken on them.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connbudget.kube.api import EvictionResult, KubeError, Scale, SecretProblem
from connbudget.model.actions import (
    Action,
    IdleBackend,
    RestartPod,
    ScalePooler,
    TerminateBackends,
)
from connbudget.model.conditions import Reason
from connbudget.model.observations import LastStatement, PodInfo, PoolerSample, ServerSample
from connbudget.model.spec import (
    BudgetSpec,
    ObjectRef,
    RestartMethod,
    SecretRef,
    SpecError,
    is_paused,
    parse_spec,
)
from connbudget.policy import attribution, culprits, evidence, hints, plan, usage
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.report import events, status
from connbudget.report.events import NORMAL, WARNING, EventReason
from connbudget.report.metrics import Metrics

log = logging.getLogger("connbudget.cycle")
HISTORY_LENGTH = 64  # samples kept for the growth-rate forecast (it uses the last 30 s of them)
PACING_SLACK_SECONDS = 0.05  # a wake-up this early still counts as on time
# Workers sleep this much past the due time: the loop's timer and the wall clock (NTP may slew
# it) must not make a poll come a hair early (see seconds_to_next_cycle).
WAKE_MARGIN_SECONDS = 0.02
IDLE_RECHECK_SLACK_SECONDS = 0.5  # rounding between the probe's idle ages and the re-check


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
    async def sample(self) -> ServerSample: ...

    async def terminate(
        self, backends: Iterable[IdleBackend], *, min_idle_seconds: float
    ) -> list[int]: ...

    async def statements(self, backends: Iterable[tuple[int, float]]) -> list[LastStatement]: ...


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
    # Drops a pod the API server says is gone from the watch cache (None: nothing to drop).
    forget_pod: Callable[[str, str], None] | None = None
    # Whether this replica may act now (it leads for sure); asked before every action.
    may_act: Callable[[], bool] = lambda: True


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
    # What leaking owners' abandoned connections last ran (policy.culprits).
    culprits: culprits.Culprits = field(default_factory=culprits.Culprits)
    # Connections the operator removed itself (terminated), added back into the forecast's
    # series, so that its own actions never look like a slowing leak.
    removed: int = 0
    # The last termination was refused (permission): termination cannot hold the budget.
    termination_denied: bool = False
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
    last_problem: str | None = None
    # The spec as last parsed (a copy of the raw spec, and the result): parsed again only when it
    # changes, not on every tick.
    parsed: tuple[dict[str, Any], BudgetSpec] | None = None


# How long pods the watch has not delivered may hold back NoPodsSelected (a watch lagging longer
# than this is reported as it is).
WATCH_SYNC_GRACE_SECONDS = 30.0


def is_probe_due(*, last_probe_at: float | None, poll_seconds: float, now: float) -> bool:
    """Tell whether a budget polled at ``last_probe_at`` is due again at ``now``."""
    return last_probe_at is None or now - last_probe_at >= poll_seconds - PACING_SLACK_SECONDS


def seconds_to_next_cycle(runtime: Runtime, now: float, *, tick: float) -> float:
    """How long a budget's worker may sleep: until its next probe is due.

    Never before a whole poll interval has passed: a poll even a little early would find a
    breach of exactly ``breachSeconds`` not yet sustained and act one poll late. A budget whose
    spec is not parsed yet, or that must probe again at once, wakes after one ``tick``.
    """
    if runtime.last_probe_at is None or runtime.parsed is None:
        return tick
    due = runtime.last_probe_at + _poll_seconds(runtime, runtime.parsed[1])
    return max(0.0, due - now + WAKE_MARGIN_SECONDS)


def _poll_seconds(runtime: Runtime, spec: BudgetSpec) -> float:
    """The current cadence: the last decision's (faster while it matters), else pollSeconds."""
    if runtime.next_poll_seconds is None:
        return float(spec.poll_seconds)
    return min(runtime.next_poll_seconds, float(spec.poll_seconds))


# The label CloudNativePG puts on a Pooler's pods; its /scale has no selector to find them by.
CNPG_POOLER_LABEL = "cnpg.io/poolerName"
CNPG_GROUP = "postgresql.cnpg.io"


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


@dataclass
class _Problem:
    reason: Reason
    message: str
    event: EventReason
    database_reachable: bool | None


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
    budget_id = f"{namespace}/{name}"
    try:
        spec = _parsed_spec(runtime, spec_raw)
    except SpecError as e:
        return await _degraded(
            runtime,
            deps,
            old_status,
            generation,
            now,
            _Problem(Reason.SPEC_INVALID, f"invalid spec: {e}", EventReason.SPEC_INVALID, None),
        )
    if not is_probe_due(
        last_probe_at=runtime.last_probe_at, poll_seconds=_poll_seconds(runtime, spec), now=now
    ):
        return None
    runtime.last_probe_at = now
    paused = is_paused(annotations)

    secret = spec.database_secret
    try:
        dsn, ca_pem = await _read_credentials(deps, namespace, secret)
    except SecretProblem as e:
        deps.metrics.record_probe_error(namespace, name, Reason.SECRET_MISSING.value)
        return await _degraded(
            runtime,
            deps,
            old_status,
            generation,
            now,
            _Problem(Reason.SECRET_MISSING, str(e), EventReason.PROBE_FAILED, None),
        )

    started = time.perf_counter()
    try:
        monitor = await deps.bind_monitor(budget_id, dsn, ca_pem)
        sample = await monitor.sample()
    except ProbeError as e:
        deps.metrics.record_probe_error(namespace, name, e.failure.value)
        runtime.history.clear()  # a gap in the samples: the old rate says nothing now
        runtime.evidence.clear()  # nor does a backend seen before the gap
        runtime.culprits.clear()
        if e.failure in (ProbeFailure.AUTHENTICATION_FAILED, ProbeFailure.DSN_INVALID):
            # The Secret may be fixed any moment: read it again at the next poll.
            deps.kube.forget_secret(namespace, secret)
            if secret.ca_key:
                deps.kube.forget_secret(namespace, SecretRef(name=secret.name, key=secret.ca_key))
        return await _degraded(
            runtime,
            deps,
            old_status,
            generation,
            now,
            _Problem(
                Reason(e.failure.value), f"probe failed: {e}", EventReason.PROBE_FAILED, False
            ),
        )
    deps.metrics.record_probe(namespace, name, time.perf_counter() - started)

    all_pods = deps.pods(namespace)
    governed = [p for p in all_pods if usage.is_governed(p, spec.selector, namespace)]
    problem: _Problem | None = None
    if not governed and await _pods_not_yet_watched(deps, namespace, spec.selector.to_query()):
        # Just after a start the pod watch may not have delivered every pod: reporting
        # NoPodsSelected (and an Event) for pods that exist would be a false alarm. Probe again
        # at the next tick, without reporting or acting, for a bounded time.
        if runtime.unwatched_since is None:
            runtime.unwatched_since = now
        if now - runtime.unwatched_since < WATCH_SYNC_GRACE_SECONDS:
            runtime.last_probe_at = None
            return None
    else:
        runtime.unwatched_since = None
    if not governed:
        problem = _Problem(
            Reason.NO_PODS_SELECTED,
            f"selector {spec.selector.to_query()} matches no pod in {namespace}",
            EventReason.PROBE_FAILED,
            True,
        )

    pooler_sample: PoolerSample | None = None
    pooler_ips: frozenset[str] = frozenset()
    pooler_owner: str | None = None
    if spec.pooler is not None:
        try:
            scale = await deps.kube.read_scale(namespace, spec.pooler.target_ref)
        except KubeError as e:
            if transient(e):
                raise  # the API server is away: retried, not the user's mistake
            t = spec.pooler.target_ref
            problem = _Problem(
                Reason.POOLER_TARGET_INVALID,
                f"pooler target {t.kind}/{t.name} has no readable /scale: {e}",
                EventReason.PROBE_FAILED,
                True,
            )
        else:
            labels = pooler_pod_labels(spec.pooler.target_ref, spec.pooler.pod_labels, scale)
            if not labels:
                t = spec.pooler.target_ref
                problem = _Problem(
                    Reason.POOLER_TARGET_INVALID,
                    f"pooler target {t.kind}/{t.name} names no pods (its /scale has no "
                    "selector): set spec.pooler.selector to its pods' labels",
                    EventReason.PROBE_FAILED,
                    True,
                )
            pooler_owner = await _pooler_owner(deps, runtime, namespace, spec.pooler.target_ref)
            pooler_pods = [
                p
                for p in all_pods
                if labels
                and not p.terminating
                and p.ip
                and all(p.labels.get(k) == v for k, v in labels.items())
            ]
            pooler_ips = frozenset(p.ip for p in pooler_pods if p.ip)
            pooler_sample = PoolerSample(replicas=scale.replicas)
            if spec.pooler.admin_secret_ref is not None:
                try:
                    template = await deps.kube.read_secret_value(
                        namespace, spec.pooler.admin_secret_ref
                    )
                    pooler_sample = await deps.sample_poolers(
                        template, sorted(pooler_ips), scale.replicas
                    )
                    if pooler_sample.errors:
                        # A pooler pod that does not answer hides its clients and its server
                        # connections: acting on the rest would be acting on half the picture.
                        raise ProbeError(
                            ProbeFailure(pooler_sample.failure)
                            if pooler_sample.failure
                            else ProbeFailure.DATABASE_UNREACHABLE,
                            "; ".join(pooler_sample.errors),
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
                    problem = _Problem(
                        reason,
                        f"pooler probe failed: {e}",
                        EventReason.PROBE_FAILED,
                        True,
                    )

    index = (
        deps.pod_index(namespace)
        if deps.pod_index is not None
        else attribution.PodIndex.build(all_pods, namespace=namespace)
    )
    attributed = attribution.attribute_backends(
        groups=sample.groups, index=index, mode=spec.attribution, pooler_ips=pooler_ips
    )
    pooler_clients = attribution.attribute_pooler_clients(
        clients=pooler_sample.clients if pooler_sample else (), index=index
    )
    floor = float(spec.remediation.terminate_idle.min_idle_seconds)
    runtime.evidence.observe(
        at=sample.sampled_at,
        seen=evidence.seen_backends(
            attributed=attributed,
            sampled_at=sample.sampled_at,
            governed=frozenset(p.name for p in governed),
        ),
        floor=floor,
    )
    owners = runtime.evidence.judge(
        at=sample.sampled_at, floor=floor, idle_seconds=spec.leak_idle_seconds
    )
    shapes = await _where_leaks(monitor, runtime, owners, index, at=sample.sampled_at)
    use = usage.compute_usage(
        spec=spec,
        namespace=namespace,
        sample=sample,
        attributed=attributed,
        pooled=pooler_clients,
        pods=index.by_name,
        owners=owners,
    )
    runtime.history.append((sample.sampled_at, use.server_total + runtime.removed))
    owner_hints = hints.hints_of(
        hints.owner_facts(owners=owners, attributed=attributed, shapes=shapes, budget=use.budget)
    )
    memory = status.memory_from_status(old_status)
    decision = plan.decide(
        spec=spec,
        namespace=namespace,
        now=now,
        usage=use,
        attributed=attributed,
        pods=governed,
        pooler=pooler_sample,
        pooler_clients=pooler_clients,
        history=list(runtime.history),
        memory=memory,
        paused=paused,
        owners=owners,
        # What only the operator can judge blocks every action until it is fixed.
        blocked=problem.message if problem is not None else None,
        termination_possible=not runtime.termination_denied,
        pooler_owner=pooler_owner,
    )
    runtime.next_poll_seconds = decision.next_poll_seconds
    deps.metrics.record_usage(
        namespace, name, use, [a.group for a in attributed], decision.seconds_to_full
    )
    deps.metrics.record_owners(namespace, name, owners.values(), shapes)
    await _post_transition(deps, runtime, decision, use)
    await _post_leaks(deps, runtime, owners, shapes, owner_hints)
    await _post_budget_fit(deps, runtime, use)
    outcome = status.Outcome(
        generation=generation,
        now=now,
        problem=(problem.reason, problem.message) if problem else None,
        database_reachable=True,
        usage=use,
        decision=decision,
        paused=paused,
        pooler=pooler_sample,
        probe_time=now,
        leaks=shapes,
        hints=owner_hints,
        statements_visible=runtime.culprits.visible,
        hidden_backends=sample.hidden,
    )
    await _record_intent(decision, old_status, outcome, deps, now)
    done = await _carry_out(decision, spec, namespace, name, monitor, deps, runtime, now)
    last_action, denied = done.last, done.denied
    runtime.removed += done.terminated
    if done.restarted:
        # A restarted pod's connections end over the next seconds: a drop the operator caused,
        # which the forecast must not read as a slowing leak. Start its series afresh.
        runtime.history.clear()
    runtime.termination_denied = done.termination_denied
    cooldown = decision.memory.cooldown_until
    if done.restarted and cooldown is not None:
        # The cooldown counts from when the restart was done, not from the cycle's start: a
        # probe that waited on a stalled server took seconds off it (found by the fault run: two
        # evictions 28.8 s apart under a 30 s cooldown).
        after = deps.now() + spec.remediation.cooldown_seconds
        if after > cooldown:
            decision = dataclasses.replace(
                decision, memory=dataclasses.replace(decision.memory, cooldown_until=after)
            )
            outcome = dataclasses.replace(outcome, decision=decision)
    if (
        done.gone
        and not done.restarted
        and not any(isinstance(a, ScalePooler) for a in decision.actions)
    ):
        # Nothing was restarted: the pods were already gone (the watch had missed it). The
        # cooldown is not spent on them, and the cache forgets them.
        decision = dataclasses.replace(
            decision,
            memory=dataclasses.replace(decision.memory, cooldown_until=memory.cooldown_until),
        )
        outcome = dataclasses.replace(outcome, decision=decision)
        for pod_name in done.gone:
            if deps.forget_pod is not None:
                deps.forget_pod(namespace, pod_name)
    if denied is not None:
        problem = _Problem(Reason.PERMISSION_DENIED, denied, EventReason.ACTION_FAILED, True)
    await _post_problem(runtime, deps, problem)
    desired = next((a.desired for a in decision.actions if isinstance(a, ScalePooler)), None)
    return status.render_status(
        old_status,
        dataclasses.replace(
            outcome,
            problem=(problem.reason, problem.message) if problem else None,
            last_action=last_action,
            pooler_desired=desired,
        ),
    )


def _parsed_spec(runtime: Runtime, spec_raw: Mapping[str, Any]) -> BudgetSpec:
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


async def _read_credentials(
    deps: Deps, namespace: str, secret: SecretRef
) -> tuple[str, str | None]:
    """The DSN and, if the budget names one, the PEM CA certificate (raises ``SecretProblem``)."""
    dsn = await deps.kube.read_secret_value(namespace, secret)
    if not secret.ca_key:
        return dsn, None
    ca_ref = SecretRef(name=secret.name, key=secret.ca_key)
    return dsn, await deps.kube.read_secret_value(namespace, ca_ref)


async def keep_connected(
    *, namespace: str, name: str, spec_raw: Mapping[str, Any], deps: Deps
) -> bool:
    """Open, or check, the budget's monitoring connection without acting or reporting anything.

    A replica that does not lead keeps its connection open: when it takes over, the server may
    be full (nobody acted while the old leader was dying), and a new connection would be refused.
    Returns whether the connection works.
    """
    try:
        spec = parse_spec(spec_raw)
    except SpecError:
        return False
    secret = spec.database_secret
    try:
        dsn, ca_pem = await _read_credentials(deps, namespace, secret)
        monitor = await deps.bind_monitor(f"{namespace}/{name}", dsn, ca_pem)
        await monitor.sample()
    except (SecretProblem, ProbeError, KubeError):
        return False
    return True


async def _record_intent(
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
        type=_step_name(action),
        targets=action.targets,
        result="Started",
        dry_run=False,
        time=now,
        message=f"about to {events.describe(action)}",
    )
    await deps.write_status(
        status.render_status(old_status, dataclasses.replace(outcome, last_action=intent))
    )


async def _degraded(
    runtime: Runtime,
    deps: Deps,
    old_status: Mapping[str, Any],
    generation: int,
    now: float,
    problem: _Problem,
) -> dict[str, Any]:
    await _post_problem(runtime, deps, problem)
    return status.render_status(
        old_status,
        status.Outcome(
            generation=generation,
            now=now,
            problem=(problem.reason, problem.message),
            database_reachable=problem.database_reachable,
        ),
    )


async def _post_problem(runtime: Runtime, deps: Deps, problem: _Problem | None) -> None:
    """Post an Event when a problem appears or changes (not on every poll)."""
    key = f"{problem.reason}:{problem.message}" if problem else None
    if problem is not None and key != runtime.last_problem:
        await deps.post_event(WARNING, problem.event.value, problem.message, None)
        log.warning(
            "budget degraded", extra={"reason": problem.reason.value, "detail": problem.message}
        )
    runtime.last_problem = key


def _series(runtime: Runtime) -> str:
    return f"episode-{runtime.episode}"


async def _post_transition(
    deps: Deps, runtime: Runtime, decision: plan.Decision, use: usage.Usage
) -> None:
    """Post an Event for a change of level: one per reason and episode (repeats update it)."""
    text = events.usage_text(use)
    if decision.transition is plan.Transition.WARNING:
        await deps.post_event(WARNING, EventReason.BUDGET_WARNING.value, text, _series(runtime))
    elif decision.transition is plan.Transition.EXCEEDED:
        await deps.post_event(WARNING, EventReason.BUDGET_EXCEEDED.value, text, _series(runtime))
    elif decision.transition is plan.Transition.RECOVERED:
        await deps.post_event(NORMAL, EventReason.BUDGET_RECOVERED.value, text, _series(runtime))
        runtime.episode += 1  # what comes next is another episode


def transient(e: KubeError) -> bool:
    """An API error that waiting may cure (no answer, overloaded, throttled), not a refusal."""
    return e.status >= 500 or e.status in (408, 429)


async def _where_leaks(
    monitor: MonitorLike,
    runtime: Runtime,
    owners: Mapping[str, evidence.OwnerEvidence],
    index: attribution.PodIndex,
    *,
    at: float,
) -> dict[str, tuple[culprits.LeakShape, ...]]:
    """What leaking owners' abandoned connections last ran: asked of the server only for
    connections not asked about before. A failed ask costs the detail, never the cycle."""
    ask = runtime.culprits.ask(owners, index.by_name, at=at)
    if ask.backends:
        try:
            found = await monitor.statements(ask.backends)
        except ProbeError as e:
            log.warning("reading leaked connections' statements failed", extra={"error": str(e)})
        else:
            runtime.culprits.record(at=at, ask=ask, found=found)
    leaking = [o for o, ev in owners.items() if ev.cls is evidence.OwnerClass.LEAKING]
    shapes = runtime.culprits.shapes(at=at, leaking=leaking)
    return culprits.with_rollouts(shapes, index.by_name.values()) if shapes else shapes


async def _post_leaks(
    deps: Deps,
    runtime: Runtime,
    owners: Mapping[str, evidence.OwnerEvidence],
    shapes: Mapping[str, Sequence[culprits.LeakShape]],
    owner_hints: Mapping[str, str],
) -> None:
    """Post a ``LeakDetected`` Event when an owner starts leaking (once per owner and episode),
    naming what its leaked connections last ran where that is known."""
    leaking = {o for o, ev in owners.items() if ev.cls is evidence.OwnerClass.LEAKING}
    for owner in sorted(leaking - runtime.leaking):
        text = events.leak_text(owners[owner], shapes.get(owner, ()), owner_hints.get(owner))
        await deps.post_event(WARNING, EventReason.LEAK_DETECTED.value, text, owner)
    runtime.leaking = leaking


async def _post_budget_fit(deps: Deps, runtime: Runtime, use: usage.Usage) -> None:
    """Post a ``BudgetAboveServerLimit`` Event when the budget stops fitting the server."""
    fit = status.budget_fits(use)
    if not fit.status and runtime.budget_fits is not False:
        await deps.post_event(WARNING, EventReason.BUDGET_ABOVE_SERVER.value, fit.message, None)
    runtime.budget_fits = fit.status


def _step_name(action: Action) -> str:
    if isinstance(action, TerminateBackends):
        return "TerminateIdle"
    if isinstance(action, RestartPod):
        return "RestartPods"
    return "ScalePooler"


@dataclass(frozen=True, kw_only=True)
class _Done:
    """What carrying out a plan did."""

    last: status.LastAction | None = None
    denied: str | None = None  # an action was refused for lack of permissions
    terminated: int = 0  # backends terminated
    restarted: bool = False  # a pod or a workload was restarted
    gone: tuple[str, ...] = ()  # pods to restart that the API server no longer has
    termination_denied: bool = False  # a termination was refused for lack of permissions


async def _carry_out(
    decision: plan.Decision,
    spec: BudgetSpec,
    namespace: str,
    name: str,
    monitor: MonitorLike,
    deps: Deps,
    runtime: Runtime,
    now: float,
) -> _Done:
    """Carry out the plan's actions (or, in dry-run, only report them)."""
    last: status.LastAction | None = None
    denied: str | None = None
    terminated = 0
    restarted = termination_denied = False
    gone: list[str] = []
    why = "; ".join(decision.reasons)
    series = _series(runtime)
    for action in decision.actions:
        step = _step_name(action)
        if decision.dry_run:
            message = f"dry-run: would {events.describe(action)}" + (f" ({why})" if why else "")
            await deps.post_event(NORMAL, EventReason.DRY_RUN.value, message, series)
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
            event_type, reason.value, message + (f" ({why})" if why else ""), series
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
    return _Done(
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
