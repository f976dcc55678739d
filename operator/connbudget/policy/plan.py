"""Decide, once per probe, what a ConnectionBudget should do: hysteresis, breach timing, escalation.

Pure: no I/O, no clock; all inputs are arguments (``now`` is epoch seconds from the caller).

The rules, and the failure each prevents:

- **Levels with hysteresis.** ``Warning`` from ``warningPercent`` of the budget, ``OverBudget``
  above the budget; after a breach the budget counts as recovered only below the warning line, so
  a usage hovering at the budget does not flap between states and Events.
- **Breach timing.** Act when usage has stayed over the budget for ``breachSeconds`` (a short spike
  is no leak), or at once when the growth rate says the usable slots run out before that window
  would end or before the next poll (a fast leak fills 100 slots in about 15 s; waiting it out
  means an outage), or at once when usage goes over the budget again in an episode whose leak was
  already confirmed.
- **Leaks are leaks.** A governed pod's backend idle longer than ``leakDetection.idleSeconds`` is
  terminated whatever the budget says (step ``TerminateIdle`` only; nothing escalates from it).
- **Escalation.** While breached, each cycle walks ``steps`` in order up to the current escalation
  level, moving on in the same cycle when a step finds nothing to do; a step that acted raises the
  level for the next cycle if the budget is still breached then, and a pod that re-leaks after its
  idle backends were terminated is restarted.
- **Gentle first.** Only ``idle`` backends are terminated (never ``active`` or ``idle in
  transaction``), only of governed pods, longest idle first from the pods holding the most idle
  backends; young idle backends (down to ``minIdleSeconds``) only while breached, only as many as
  bring usage below the warning line, and never from a pod holding less than half as many idle
  backends as the worst one: its pool is being reused, the leak is elsewhere.
- **Disruption limits.** Restarts and pooler scaling wait out ``cooldownSeconds`` (kept in status,
  so an operator restart does not reset it); at most ``maxPodsPerCycle`` pods, none younger than
  ``minPodAgeSeconds``, none terminating, never a pod outside the selector.
- **Pause and dry-run.** Paused: nothing is planned. Dry-run: the plan is made and reported (and the
  cooldown advances as if it had been carried out, so the report is what would have happened), but
  nothing is carried out.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from connbudget.model.actions import Action, IdleBackend, RestartPod, ScalePooler, TerminateBackends
from connbudget.model.observations import PodInfo, PoolerClient, PoolerSample
from connbudget.model.spec import BudgetSpec, RestartMethod, Step
from connbudget.policy import forecast
from connbudget.policy.attribution import Attributed, Via
from connbudget.policy.usage import Usage, is_governed


class Level(enum.StrEnum):
    WITHIN = "WithinBudget"
    WARNING = "Warning"
    OVER = "OverBudget"


class Transition(enum.StrEnum):
    """A change of level worth an Event."""

    WARNING = "BudgetWarning"
    EXCEEDED = "BudgetExceeded"
    RECOVERED = "BudgetRecovered"


class Hold(enum.StrEnum):
    """Why a step that had something to do did not do it."""

    PAUSED = "Paused"
    COOLDOWN = "Cooldown"
    MIN_POD_AGE = "MinPodAge"
    BREACH_WINDOW = "BreachWindow"


@dataclass(frozen=True, kw_only=True)
class Memory:
    """Decision state carried from one cycle to the next; kept in status to survive restarts."""

    level: Level = Level.WITHIN
    breach_since: float | None = None  # when usage last went over the budget (None: not over)
    cooldown_until: float | None = None  # no restart or scaling before this
    episode_since: float | None = None  # when remediation of the current breach began
    escalation: int = 0  # index into steps reached in this episode
    cleaned_pods: tuple[str, ...] = ()  # pods whose idle backends were terminated this episode


@dataclass(frozen=True, kw_only=True)
class Decision:
    level: Level
    transition: Transition | None
    actions: tuple[Action, ...]
    dry_run: bool
    memory: Memory
    seconds_to_full: float | None
    reasons: tuple[str, ...]  # why, in words, for status and Events
    holds: tuple[tuple[Step, Hold, str], ...]  # steps that waited, and why

    @property
    def remediating(self) -> bool:
        return self.memory.episode_since is not None


def decide_level(usage: Usage) -> Level:
    """Classify usage: over the budget, at or above the warning line, or below it.

    The hysteresis lives in the episode: after a breach, ``Warning`` does not end remediation, only
    ``WithinBudget`` (below the warning line) does.
    """
    if usage.connections > usage.budget:
        return Level.OVER
    if usage.connections >= usage.warning_line:
        return Level.WARNING
    return Level.WITHIN


def _transition(old: Level, new: Level) -> Transition | None:
    if new == old:
        return None
    if new is Level.OVER:
        return Transition.EXCEEDED
    if new is Level.WARNING and old is Level.WITHIN:
        return Transition.WARNING
    if new is Level.WITHIN:
        return Transition.RECOVERED
    return None


@dataclass(frozen=True, kw_only=True)
class _Idle:
    pod: PodInfo
    backends: tuple[IdleBackend, ...]


def _idle_by_pod(
    attributed: Sequence[Attributed], spec: BudgetSpec, namespace: str
) -> dict[str, _Idle]:
    """Idle direct backends of governed, non-terminating pods, per pod, longest idle first."""
    out: dict[str, list[IdleBackend]] = {}
    pods: dict[str, PodInfo] = {}
    for a in attributed:
        pod = a.pod
        if (
            a.via is Via.POOLER
            or a.group.state != "idle"
            or pod is None
            or pod.terminating
            or not is_governed(pod, spec.selector, namespace)
        ):
            continue
        pods[pod.name] = pod
        out.setdefault(pod.name, []).extend(
            IdleBackend(pid=pid, pod=pod.name, idle_seconds=idle_s, backend_start=start)
            for pid, idle_s, start in a.group.idle
        )
    return {
        name: _Idle(pod=pods[name], backends=tuple(sorted(bs, key=lambda b: -b.idle_seconds)))
        for name, bs in out.items()
    }


def plan_terminations(
    *,
    idle: Mapping[str, _Idle],
    spec: BudgetSpec,
    breached: bool,
    excess: int,
) -> tuple[IdleBackend, ...]:
    """Choose idle backends to terminate (see the module's rules); at most ``maxPerCycle``."""
    leak_after = spec.leak_idle_seconds
    min_idle = spec.remediation.terminate_idle.min_idle_seconds
    worst = max((len(i.backends) for i in idle.values()), default=0)
    leaked: list[IdleBackend] = []
    young: list[IdleBackend] = []
    # Pods holding the most idle backends first; in each, the longest idle first.
    for entry in sorted(idle.values(), key=lambda i: (-len(i.backends), i.pod.name)):
        reused_pool = 2 * len(entry.backends) < worst
        for b in entry.backends:
            if b.idle_seconds > leak_after:
                leaked.append(b)
            elif breached and not reused_pool and b.idle_seconds >= min_idle:
                young.append(b)
    chosen = leaked + young[: max(excess - len(leaked), 0)]
    return tuple(chosen[: spec.remediation.terminate_idle.max_per_cycle])


def _restart_candidates(
    *,
    idle: Mapping[str, _Idle],
    pods: Sequence[PodInfo],
    pooler_clients: Mapping[str, Sequence[PoolerClient]],
    spec: BudgetSpec,
    namespace: str,
    now: float,
    releaking: set[str],
) -> tuple[list[PodInfo], int]:
    """Governed pods worth restarting, worst first, and how many were too young to restart."""
    min_idle = spec.remediation.terminate_idle.min_idle_seconds
    scored: list[tuple[int, int, int, str, PodInfo]] = []
    too_young = 0
    for pod in pods:
        if pod.terminating or not is_governed(pod, spec.selector, namespace):
            continue
        stale_idle = (
            sum(1 for b in idle[pod.name].backends if b.idle_seconds >= min_idle)
            if pod.name in idle
            else 0
        )
        pooled = sum(1 for c in pooler_clients.get(pod.name, ()) if c.idle_seconds >= min_idle)
        if stale_idle + pooled == 0:
            continue  # holds nothing that looks leaked: not an offender
        if now - pod.created_at < spec.remediation.restart_pods.min_pod_age_seconds:
            too_young += 1
            continue
        scored.append(
            (0 if pod.name in releaking else 1, -(stale_idle + pooled), -stale_idle, pod.name, pod)
        )
    scored.sort(key=lambda s: s[:4])
    return [s[4] for s in scored], too_young


def _plan_restarts(candidates: Sequence[PodInfo], spec: BudgetSpec) -> tuple[RestartPod, ...]:
    rp = spec.remediation.restart_pods
    out: list[RestartPod] = []
    owners_done: set[str] = set()
    for pod in candidates:
        if rp.method is RestartMethod.ROLLOUT_RESTART:
            # One rollout restart per workload: it replaces every pod of it, gradually.
            if pod.owner in owners_done or pod.owner_kind == "Pod":
                continue
            owners_done.add(pod.owner)
        out.append(
            RestartPod(
                namespace=pod.namespace,
                pod=pod.name,
                uid=pod.uid,
                method=rp.method,
                owner_kind=pod.owner_kind,
                owner_name=pod.owner_name or pod.name,
            )
        )
        if len(out) >= rp.max_pods_per_cycle:
            break
    return tuple(out)


def plan_scaling(
    *, spec: BudgetSpec, usage: Usage, pooler: PoolerSample | None, breached: bool
) -> ScalePooler | None:
    """Scale the pooler down when its server connections push usage over the budget, up when
    clients wait in PgBouncer and the budget has room for another replica's pool."""
    p = spec.pooler
    if p is None or pooler is None:
        return None
    per = p.server_connections_per_replica
    current = pooler.replicas
    if breached and pooler.server_connections > 0:
        others = max(usage.connections - pooler.server_connections, 0)
        room = usage.budget - others
        desired = min(max(room // per, p.min_replicas), p.max_replicas)
        if desired < current:
            return ScalePooler(target=p.target_ref, current=current, desired=desired)
        return None
    if (
        not breached
        and pooler.clients_waiting > 0
        and current < p.max_replicas
        and usage.connections + per <= usage.budget
    ):
        return ScalePooler(target=p.target_ref, current=current, desired=current + 1)
    if current < p.min_replicas:
        return ScalePooler(target=p.target_ref, current=current, desired=p.min_replicas)
    return None


def decide(
    *,
    spec: BudgetSpec,
    namespace: str,
    now: float,
    usage: Usage,
    attributed: Sequence[Attributed],
    pods: Sequence[PodInfo],
    pooler: PoolerSample | None,
    pooler_clients: Mapping[str, Sequence[PoolerClient]],
    history: Sequence[tuple[float, int]],
    memory: Memory,
    paused: bool,
) -> Decision:
    """Decide this cycle's level, actions and next memory (the rules: see the module docstring)."""
    rem = spec.remediation
    level = decide_level(usage)
    over = level is Level.OVER
    reasons: list[str] = []
    holds: list[tuple[Step, Hold, str]] = []

    # Hysteresis: after a breach, usage between the warning line and the budget is not recovery.
    in_episode = memory.episode_since is not None or memory.level is Level.OVER
    episode_since: float | None
    escalation: int
    cleaned: tuple[str, ...]
    if level is Level.WITHIN or not in_episode:
        episode_since, escalation, cleaned = None, 0, ()
    else:
        episode_since, escalation, cleaned = (
            memory.episode_since,
            memory.escalation,
            memory.cleaned_pods,
        )
    transition = _transition(memory.level, level)

    breach_since = (memory.breach_since or now) if over else None
    breached_for = now - breach_since if breach_since is not None else 0.0
    to_full = forecast.seconds_to_full(history=history, usable_slots=usage.usable_slots)
    sustained = over and breached_for >= rem.breach_seconds
    # The next chance to act is one poll away: full before the window ends *or* before the next
    # poll is too late.
    urgent = (
        over
        and to_full is not None
        and (to_full < rem.breach_seconds - breached_for + spec.poll_seconds)
    )
    # A leak already confirmed in this episode needs no second breach window.
    relapse = over and episode_since is not None
    if over:
        reasons.append(
            f"{usage.connections} connections over the budget of {usage.budget} "
            f"for {breached_for:.0f}s (breachSeconds {rem.breach_seconds})"
        )
    if to_full is not None:
        reasons.append(f"at the recent growth rate the server is full in {to_full:.0f}s")
    act_on_breach = sustained or urgent or relapse
    if over and not act_on_breach:
        holds.append(
            (
                rem.steps[0],
                Hold.BREACH_WINDOW,
                f"waiting {rem.breach_seconds - breached_for:.0f}s more before acting",
            )
        )
    if act_on_breach:
        reasons.append(
            "acting: "
            + (
                "the breach lasted breachSeconds"
                if sustained
                else "over the budget again in the same episode"
                if relapse
                else "the server would be full before breachSeconds (or the next poll)"
            )
        )
        if episode_since is None:
            episode_since, escalation, cleaned = now, 0, ()

    idle = _idle_by_pod(attributed, spec, namespace)
    releaking = {
        name
        for name in cleaned
        if name in idle
        and any(b.idle_seconds >= rem.terminate_idle.min_idle_seconds for b in idle[name].backends)
    }
    excess = max(usage.connections - usage.warning_line + 1, 0) if act_on_breach else 0
    in_cooldown = memory.cooldown_until is not None and now < memory.cooldown_until
    actions: list[Action] = []
    cooldown_until = memory.cooldown_until
    acted_at: int | None = None

    if paused:
        holds.append((rem.steps[0], Hold.PAUSED, "the connbudget.io/paused annotation is set"))
    else:
        allowed = escalation
        if act_on_breach and releaking and Step.RESTART_PODS in rem.steps:
            allowed = max(allowed, rem.steps.index(Step.RESTART_PODS))
            reasons.append(f"re-leaking after termination: {', '.join(sorted(releaking))}")
        for idx, step in enumerate(rem.steps):
            if idx > allowed:
                break
            found = False
            if step is Step.TERMINATE_IDLE:
                chosen = plan_terminations(
                    idle=idle, spec=spec, breached=act_on_breach, excess=excess
                )
                if chosen:
                    actions.append(TerminateBackends(backends=chosen))
                    found = True
            elif not act_on_breach:
                pass  # restarts and scale-downs only remedy a breach
            elif step is Step.RESTART_PODS:
                candidates, too_young = _restart_candidates(
                    idle=idle,
                    pods=pods,
                    pooler_clients=pooler_clients,
                    spec=spec,
                    namespace=namespace,
                    now=now,
                    releaking=releaking,
                )
                restarts = _plan_restarts(candidates, spec)
                if restarts and in_cooldown:
                    holds.append((step, Hold.COOLDOWN, "restarts wait for the cooldown"))
                    found = True
                elif restarts:
                    actions.extend(restarts)
                    found = True
                elif too_young:
                    holds.append(
                        (
                            step,
                            Hold.MIN_POD_AGE,
                            f"{too_young} offending pods are younger "
                            f"than minPodAgeSeconds {rem.restart_pods.min_pod_age_seconds}",
                        )
                    )
            elif step is Step.SCALE_POOLER:
                scale = plan_scaling(spec=spec, usage=usage, pooler=pooler, breached=True)
                if scale and in_cooldown:
                    holds.append((step, Hold.COOLDOWN, "scaling waits for the cooldown"))
                    found = True
                elif scale:
                    actions.append(scale)
                    found = True
            if found:
                acted_at = idx
            elif idx == allowed and act_on_breach:
                allowed += 1  # nothing to do here: try the next step in this cycle
        if act_on_breach:
            # Still breached next cycle? Then the step after the furthest one that acted may act.
            escalation = min(
                max(allowed, (acted_at if acted_at is not None else allowed) + 1),
                len(rem.steps) - 1,
            )
        if not act_on_breach and Step.SCALE_POOLER in rem.steps:
            scale = plan_scaling(spec=spec, usage=usage, pooler=pooler, breached=False)
            if scale and in_cooldown:
                holds.append((Step.SCALE_POOLER, Hold.COOLDOWN, "scaling waits for the cooldown"))
            elif scale:
                actions.append(scale)

    disruptive = any(isinstance(a, RestartPod | ScalePooler) for a in actions)
    if disruptive:
        cooldown_until = now + rem.cooldown_seconds
    terminated_pods = {
        b.pod for a in actions if isinstance(a, TerminateBackends) for b in a.backends
    }
    new_memory = Memory(
        level=level,
        breach_since=breach_since,
        cooldown_until=cooldown_until if cooldown_until is None or cooldown_until > now else None,
        episode_since=episode_since,
        escalation=escalation if episode_since is not None else 0,
        cleaned_pods=tuple(sorted(set(cleaned) | terminated_pods)) if episode_since else (),
    )
    if level is Level.WITHIN:
        new_memory = replace(new_memory, episode_since=None, escalation=0, cleaned_pods=())
    return Decision(
        level=level,
        transition=transition,
        actions=tuple(actions),
        dry_run=rem.dry_run,
        memory=new_memory,
        seconds_to_full=None if to_full is None or math.isinf(to_full) else to_full,
        reasons=tuple(reasons),
        holds=tuple(holds),
    )
