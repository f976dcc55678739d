"""Decide, once per probe, what a ConnectionBudget should do: hysteresis, breach timing, remedies.

Pure: no I/O, no clock; all inputs are arguments (``now`` is epoch seconds from the caller).

The rules, and the failure each prevents:

- **Evidence, not idle age.** Which connections may be terminated is decided per owning workload
  from ``policy.evidence``: a *leaking* owner's connections once idle longer than the gaps its own
  connections show before being used again (and never before ``terminateIdle.minIdleSeconds``);
  any other owner's only once idle beyond ``leakDetection.idleSeconds`` and well beyond its own
  reuse gaps. A healthy pool (Django's ``CONN_MAX_AGE``, SQLAlchemy, psycopg_pool) leaves a
  connection idle for minutes and, without a pre-ping, turns a killed one into a failed request.
- **At the leak's pace.** A leaking owner's abandoned connections are terminated as soon as the
  evidence says so, whatever the level (as ``idle_session_timeout`` would, but only for the leak),
  so the leak never reaches the budget; and the budget is polled every second while usage is at
  the warning line, an owner leaks, or the forecast says the server is full within two polls.
- **Levels with hysteresis.** ``Warning`` from ``warningPercent`` of the budget, ``OverBudget``
  above the budget; after a breach the budget counts as recovered only below the warning line, so
  a usage hovering at the budget does not flap between states and Events.
- **Breach timing.** A breach is acted on once it has lasted ``breachSeconds`` (a short spike is
  no leak), or at once when the server is full or nearly full, when the growth rate says the
  usable slots run out before the window ends or before the next poll, or when usage goes over
  the budget again in an episode already being remediated. The growth rate counts what the
  operator itself removed, so its own terminations never look like a slowing leak.
- **Restart only when it helps.** A leak in the code starts again in the new pod; evicting pods
  while termination holds the budget is disruption without relief. A pod is restarted only when
  termination cannot hold: its leaked connections are ``idle in transaction`` (terminating them
  would roll back whatever they hold; a restart lets the app close them), termination is not
  allowed or not permitted, its leaked clients sit in PgBouncer, its leak grows with pod age
  (the oldest pod leaks fastest under the same traffic), or the breach lasted ``breachSeconds``
  and more than terminations can remove. Where termination is no remedy (the leak sits idle in a
  transaction, or its pods die when their connections are terminated: ``policy.remedy``), the
  restart comes under pressure, before the breach, not after it. A pooling owner's pods are never
  offenders, and a pod restarted in a cycle never has its backends terminated in the same cycle.
- **Disruption limits.** Restarts and pooler scaling wait out ``cooldownSeconds`` (kept in status,
  so an operator restart does not reset it); at most ``maxPodsPerCycle`` pods, none younger than
  ``minPodAgeSeconds``, none terminating, never a pod outside the selector.
- **Pause, blocks and dry-run.** Paused, or blocked by a problem only the operator can judge:
  nothing is planned, and the hold says which. Dry-run: the plan is made and reported (and the
  cooldown advances as if it had been carried out, so the report is what would have happened),
  but nothing is carried out.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from connbudget.model.actions import Action, IdleBackend, RestartPod, ScalePooler, TerminateBackends
from connbudget.model.observations import PodInfo, PoolerClient, PoolerSample
from connbudget.model.spec import BudgetSpec, RestartMethod, Step
from connbudget.policy import evidence, forecast
from connbudget.policy.attribution import Attributed, Via
from connbudget.policy.evidence import OwnerClass, OwnerEvidence, pause_bound
from connbudget.policy.usage import Usage, is_governed, is_pressured, nearly_full

FAST_POLL_SECONDS = 1  # the cadence while usage is high, an owner leaks or the server fills soon
# A budget at the warning line recovers only this share of the budget below it (hysteresis).
RECOVERY_MARGIN_PERCENT = 5
# The forecast asks for the fast cadence when the server is full within this many polls.
FAST_POLL_WITHIN_POLLS = 2
# A leak grows with pod age when its oldest pod leaks at least this many times faster than its
# youngest, and is at least this many times older: the same traffic, a different rate, so a
# restart resets it (a leak in every request leaks as fast in a new pod; a restart is no help).
AGE_RATE_FACTOR = 2.0
AGE_FACTOR = 2.0


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
    BLOCKED = "Blocked"
    COOLDOWN = "Cooldown"
    MIN_POD_AGE = "MinPodAge"
    BREACH_WINDOW = "BreachWindow"


class RestartCause(enum.StrEnum):
    """Why terminating backends cannot hold the budget, so pods are restarted."""

    IDLE_IN_TRANSACTION = "IdleInTransaction"
    NOT_TERMINABLE = "NotTerminable"
    POOLED_CLIENTS = "PooledClients"
    LEAK_GROWS_WITH_AGE = "LeakGrowsWithAge"
    TERMINATION_INSUFFICIENT = "TerminationInsufficient"
    DIES_ON_TERMINATION = "DiesOnTermination"


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
    restart_cause: RestartCause | None = None
    next_poll_seconds: float = 10.0

    @property
    def remediating(self) -> bool:
        return self.memory.episode_since is not None


def decide_level(usage: Usage, previous: Level = Level.WITHIN) -> Level:
    """Classify usage: over the budget, at or above the warning line, or below it.

    With hysteresis: a budget at or above the warning line before counts as recovered only
    ``recovery_margin`` below it (terminations hold a leak just under the line, and each poll
    would otherwise be a Warning and a recovery, an Event each: measured, five of each in 20 s).
    The episode has its own: after a breach, ``Warning`` does not end remediation, only
    ``WithinBudget`` does.
    """
    if usage.connections > usage.budget:
        return Level.OVER
    if usage.connections >= usage.warning_line:
        return Level.WARNING
    if previous is not Level.WITHIN and usage.connections >= usage.warning_line - recovery_margin(
        usage
    ):
        return Level.WARNING
    return Level.WITHIN


def recovery_margin(usage: Usage) -> int:
    """How far below the warning line a budget at the line must go to count as recovered."""
    return max(1, math.ceil(usage.budget * RECOVERY_MARGIN_PERCENT / 100))


def is_nearly_full(usage: Usage) -> bool:
    """Tell whether the server has (almost) no usable slot left for anyone."""
    return nearly_full(usable_slots=usage.usable_slots, server_total=usage.server_total)


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


def _terminate_after(owner: OwnerEvidence | None, spec: BudgetSpec) -> float:
    """Idle seconds after which a governed backend of ``owner`` may be terminated."""
    if owner is None:
        return float(spec.leak_idle_seconds)
    return owner.terminate_after


def termination_need(
    *,
    usage: Usage,
    history: Sequence[tuple[float, int]],
    next_poll_seconds: float,
    line: int | None = None,
) -> int:
    """How many connections the budget needs gone: back under the warning line (or ``line``:
    the budget itself), with the growth until the next poll counted (what the operator removed
    counted back, so its own terminations never hide the leak's pace)."""
    rate = forecast.growth_rate(history) or 0.0
    growth = math.ceil(max(rate, 0.0) * next_poll_seconds)
    below = usage.warning_line - 1 if line is None else line
    return max(usage.connections - below + growth, 0)


def _governed_connections(
    attributed: Sequence[Attributed], spec: BudgetSpec, namespace: str
) -> int:
    """The backends of the governed pods themselves (not their clients in a pooler)."""
    return sum(
        a.group.count
        for a in attributed
        if a.via is not Via.POOLER and is_governed(a.pod, spec.selector, namespace)
    )


def _already_removed(
    attributed: Sequence[Attributed], claimed: Collection[tuple[int, float]]
) -> int:
    """How many of the backends the budget counts another budget terminated moments ago."""
    if not claimed:
        return 0
    return sum(
        1
        for a in attributed
        if a.via is not Via.POOLER
        for pid, _, start in a.group.backends
        if (pid, start) in claimed
    )


def plan_terminations(
    *,
    attributed: Sequence[Attributed],
    owners: Mapping[str, OwnerEvidence],
    spec: BudgetSpec,
    namespace: str,
    sampled_at: float,
    pressure: bool,
    act: bool,
    need: int,
    own_need: int | None = None,
    hard_need: int = 0,
    spare: frozenset[str] = frozenset(),
    fragile: frozenset[str] = frozenset(),
    not_signalable: Collection[tuple[int, float]] = frozenset(),
) -> tuple[IdleBackend, ...]:
    """Choose idle backends to terminate: pressure decides how many, the evidence whose.

    Only ``idle`` backends (never ``active`` or ``idle in transaction``) of governed pods that are
    not terminating and not in ``spare`` (pods restarted in this cycle), nor one a termination was
    refused for (``not_signalable``). In the order of how surely each is
    abandoned, the longest idle first within each tier:

    1. a leaking owner's idle beyond its abandon age (a sustained leak's first);
    2. a leaking owner's idle beyond every pause its requests were seen to make (its longest
       reuse gap and a second), though not yet its abandon age;
    3. a leaking owner's idle beyond the floor (``terminateIdle.minIdleSeconds``) that may be a
       request pausing between two queries: only to get back within the budget itself
       (``hard_need``), never for the warning line;
    4. only while a breach is acted on (``act``), a workload's the evidence has not judged
       (Steady), then a pooling one's, each idle beyond its ``terminate_after``: never while a
       leak's remain, and no more than ``own_need`` (what the governed pods hold beyond the
       warning line themselves; default ``need``);
    5. a ``fragile`` leaking owner's abandoned connections (its pods restart when one is
       terminated, ``policy.remedy``: it is restarted gracefully instead), only as the last
       resort to get back within the budget itself, when restarts cannot (a cooldown, a PDB).

    Without ``pressure`` only a proven, sustained leak's abandoned connections are terminated (as
    ``idle_session_timeout`` would, but only for the leak); under pressure those, and as many
    more as the budget ``need``s to get back under the warning line. At most ``maxPerCycle``.
    """
    own_need = need if own_need is None else own_need
    floor = float(spec.remediation.terminate_idle.min_idle_seconds)
    # (tier, backend): 0 a sustained leak's abandoned, 1 a leak's abandoned, 2 beyond its pauses,
    # 3 maybe paused, 4 Steady, 5 Pooling, 6 a leak's that dies on termination
    ranked: list[tuple[int, IdleBackend]] = []
    for a in attributed:
        pod = a.pod
        if (
            a.via is Via.POOLER
            or a.group.state != "idle"
            or pod is None
            or pod.terminating
            or pod.name in spare
            or not is_governed(pod, spec.selector, namespace)
        ):
            continue
        ev = owners.get(pod.owner)
        leaking = ev is not None and ev.cls is OwnerClass.LEAKING
        if pod.owner in fragile and not leaking:
            continue
        if not leaking and not (pressure and act):
            continue  # no always-on idle timeout: a healthy owner is left alone
        after = _terminate_after(ev, spec)
        beyond_pauses = pause_bound(ev.max_gap, floor=floor) if ev is not None else after
        for pid, idle_s, start in a.group.idle:
            if (pid, start) in not_signalable:
                continue
            if pod.owner in fragile:
                if idle_s < after:
                    continue
                tier = 6  # crashes its pod: the last resort, only to get back within the budget
            elif ev is not None and leaking:
                if idle_s >= after:
                    tier = 0 if ev.sustained else 1
                elif idle_s >= beyond_pauses:
                    tier = 2
                elif idle_s >= floor:
                    tier = 3
                else:
                    continue
            elif idle_s >= after:
                tier = 5 if ev is not None and ev.cls is OwnerClass.POOLING else 4
            else:
                continue
            backend = IdleBackend(
                pid=pid,
                pod=pod.name,
                idle_seconds=idle_s,
                backend_start=start,
                state_change=sampled_at - idle_s,
            )
            ranked.append((tier, backend))
    ranked.sort(key=lambda rb: (rb[0], -rb[1].idle_seconds, rb[1].pid))
    tiers: dict[int, list[IdleBackend]] = {}
    for tier, b in ranked:
        tiers.setdefault(tier, []).append(b)

    def take(tier: int, up_to: int) -> None:
        chosen.extend(tiers.get(tier, [])[: max(up_to - len(chosen), 0)])

    chosen: list[IdleBackend] = list(tiers.get(0, []))
    if pressure:
        take(1, need)
        take(2, need)
        take(3, hard_need)
        # A workload not leaking gives up connections only for the part of the breach the
        # governed pods make themselves: a breach another workload causes would take the
        # slots they free at once, and the healthy app would have paid for nothing.
        take(4, min(need, own_need))
        take(5, min(need, own_need))
        take(6, hard_need)
    return tuple(chosen[: spec.remediation.terminate_idle.max_per_cycle])


def _pooled_offenders(
    *,
    pods: Sequence[PodInfo],
    pooler_clients: Mapping[str, Sequence[PoolerClient]],
    owners: Mapping[str, OwnerEvidence],
) -> dict[str, int]:
    """Pods holding PgBouncer clients their owner abandoned (``evidence.count_abandoned_pooled``,
    the rule the budget's count follows too), by pod name."""
    out: dict[str, int] = {}
    for pod in pods:
        n = evidence.count_abandoned_pooled(pooler_clients.get(pod.name, ()), owners.get(pod.owner))
        if n:
            out[pod.name] = n
    return out


def _restart_cause(
    *,
    pods: Sequence[PodInfo],
    owners: Mapping[str, OwnerEvidence],
    pooled: Mapping[str, int],
    spec: BudgetSpec,
    termination_possible: bool,
    insufficient: bool,
    now: float,
    fragile: frozenset[str] = frozenset(),
    early: bool = False,
) -> tuple[RestartCause | None, dict[str, int]]:
    """Why termination cannot hold the budget, and the offending pods with their leaked counts."""
    leaking = [o for o in owners.values() if o.cls is OwnerClass.LEAKING]
    by_pod = {p.name: p for p in pods}

    def held(
        of: Sequence[OwnerEvidence], counts: Callable[[OwnerEvidence], Mapping[str, int]]
    ) -> dict[str, int]:
        """The governed pods of the owners ``of``, with their ``counts``."""
        return {
            name: n
            for o in of
            for name, n in counts(o).items()
            if name in by_pod and by_pod[name].owner == o.owner
        }

    in_tx = held(leaking, lambda o: o.in_transaction_by_pod)
    if in_tx:
        return RestartCause.IDLE_IN_TRANSACTION, in_tx
    # Its pods restart when its connections are terminated: a graceful restart hurts less.
    dying = held([o for o in leaking if o.owner in fragile], lambda o: o.abandoned_by_pod)
    if dying:
        return RestartCause.DIES_ON_TERMINATION, dying
    if early:
        return None, {}  # the other causes wait for a breach acted on
    if not termination_possible or Step.TERMINATE_IDLE not in spec.remediation.steps:
        abandoned = held(leaking, lambda o: o.abandoned_by_pod)
        if abandoned:
            return RestartCause.NOT_TERMINABLE, abandoned
    if pooled:
        return RestartCause.POOLED_CLIENTS, dict(pooled)
    aging = _aging_leaks(leaking, pods, now)
    if aging:
        return RestartCause.LEAK_GROWS_WITH_AGE, aging
    if insufficient:
        # Only a leaking owner's pods: an owner the evidence has not judged may be a healthy app
        # whose idle connections wait for their next request (a breach another workload caused
        # is no reason to restart it).
        abandoned = held(leaking, lambda o: o.abandoned_by_pod)
        if abandoned:
            return RestartCause.TERMINATION_INSUFFICIENT, abandoned
    return None, {}


def _aging_leaks(
    leaking: Sequence[OwnerEvidence], pods: Sequence[PodInfo], now: float
) -> dict[str, int]:
    """The oldest pod of each leaking owner whose leak grows with pod age (see AGE_RATE_FACTOR),
    weighted by its leak rate per minute."""
    out: dict[str, int] = {}
    for o in leaking:
        mine = [p for p in pods if p.owner == o.owner and not p.terminating]
        if len(mine) < 2:
            continue
        oldest = min(mine, key=lambda p: p.created_at)
        youngest = max(mine, key=lambda p: p.created_at)
        old_rate = o.rate_by_pod.get(oldest.name, 0.0)
        young_rate = o.rate_by_pod.get(youngest.name, 0.0)
        if (
            old_rate > 0
            and old_rate >= AGE_RATE_FACTOR * young_rate
            and now - oldest.created_at >= AGE_FACTOR * (now - youngest.created_at)
        ):
            out[oldest.name] = max(round(old_rate * 60), 1)
    return out


def _plan_restarts(
    *,
    offenders: Mapping[str, int],
    pods: Sequence[PodInfo],
    spec: BudgetSpec,
    namespace: str,
    now: float,
    held: Mapping[str, float],
    young_too: bool = False,
) -> tuple[tuple[RestartPod, ...], int, tuple[str, ...]]:
    """Restarts of the worst offenders (most leaked connections first) within the limits, how
    many offenders were too young to restart, and the owners of offenders ``held`` (restarted by
    another budget, waiting out its cooldown)."""
    rp = spec.remediation.restart_pods
    out: list[RestartPod] = []
    owners_done: set[str] = set()
    too_young = 0
    waiting: set[str] = set()
    eligible = [
        p
        for p in pods
        if p.name in offenders and not p.terminating and is_governed(p, spec.selector, namespace)
    ]
    for pod in sorted(eligible, key=lambda p: (-offenders[p.name], p.name)):
        if pod.owner in held:
            waiting.add(pod.owner)
            continue
        if now - pod.created_at < rp.min_pod_age_seconds and not young_too:
            too_young += 1
            continue
        if len(out) >= rp.max_pods_per_cycle:
            continue
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
    return tuple(out), too_young, tuple(sorted(waiting))


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


@dataclass(frozen=True, kw_only=True)
class _Timing:
    """When a breach may be acted on, and why (in words)."""

    act: bool
    sustained: bool  # over the budget for breachSeconds at least
    breach_since: float | None
    to_full: float | None
    reasons: tuple[str, ...]
    hold: str | None  # why a breach waits, if it does


def _breach_timing(
    *,
    spec: BudgetSpec,
    usage: Usage,
    level: Level,
    now: float,
    memory: Memory,
    episode_since: float | None,
    history: Sequence[tuple[float, int]],
) -> _Timing:
    rem = spec.remediation
    over = level is Level.OVER
    breach_since = (memory.breach_since or now) if over else None
    breached_for = now - breach_since if breach_since is not None else 0.0
    to_full = forecast.seconds_to_full(
        history=history, usable_slots=usage.usable_slots, current=usage.server_total
    )
    reasons: list[str] = []
    sustained = over and breached_for >= rem.breach_seconds
    full = over and is_nearly_full(usage)
    # The next chance to act is one poll away: full before the window ends *or* before the next
    # poll is too late.
    urgent = (
        over
        and to_full is not None
        and to_full < rem.breach_seconds - breached_for + spec.poll_seconds
    )
    # A leak already confirmed in this episode needs no second breach window.
    relapse = over and episode_since is not None
    if over:
        reasons.append(
            f"{usage.connections} connections over the budget of {usage.budget} "
            f"for {breached_for:.0f}s (breachSeconds {rem.breach_seconds})"
        )
    if to_full is not None:
        reasons.append(
            f"without action the server would be full in {to_full:.0f}s at the recent growth "
            "rate (what the operator removed counted back)"
        )
    act = sustained or full or urgent or relapse
    if act:
        why = (
            "the server is full or nearly full"
            if full
            else "the breach lasted breachSeconds"
            if sustained
            else "over the budget again in the same episode"
            if relapse
            else "the server would be full before breachSeconds (or the next poll)"
        )
        reasons.append(f"acting: {why}")
    hold = (
        f"waiting {rem.breach_seconds - breached_for:.0f}s more before acting"
        if over and not act
        else None
    )
    return _Timing(
        act=act,
        sustained=sustained,
        breach_since=breach_since,
        to_full=to_full,
        reasons=tuple(reasons),
        hold=hold,
    )


def decide_poll_seconds(
    *, spec: BudgetSpec, level: Level, owners: Mapping[str, OwnerEvidence], to_full: float | None
) -> float:
    """The cadence for the next probe: ``FAST_POLL_SECONDS`` while it matters, else pollSeconds.

    It matters while usage is at or above the warning line, while an owner leaks (its abandoned
    connections are terminated at the leak's pace, not a poll late) or is a suspect (many fresh
    connections used once: a leak is told only once they are abandoned, a poll later would let
    it grow by a whole poll), and when the forecast says the server is full within
    ``FAST_POLL_WITHIN_POLLS`` polls.
    """
    poll = float(spec.poll_seconds)
    busy = (
        level is not Level.WITHIN
        or any(o.cls is OwnerClass.LEAKING or o.suspect for o in owners.values())
        or (to_full is not None and to_full < FAST_POLL_WITHIN_POLLS * poll)
    )
    return min(float(FAST_POLL_SECONDS), poll) if busy else poll


@dataclass(frozen=True, kw_only=True)
class _Episode:
    """The remediation episode a cycle continues (or none): since when, the step reached, and
    the pods whose backends were terminated in it."""

    since: float | None = None
    escalation: int = 0
    cleaned: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What a cycle does, what waits and why, in words; the escalation for the next cycle."""

    actions: tuple[Action, ...] = ()
    holds: tuple[tuple[Step, Hold, str], ...] = ()
    reasons: tuple[str, ...] = ()
    restart_cause: RestartCause | None = None
    escalation: int = 0


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
    owners: Mapping[str, OwnerEvidence] | None = None,
    blocked: str | None = None,
    termination_possible: bool = True,
    pooler_owner: str | None = None,
    pooler_blocked: str | None = None,
    sampled_at: float | None = None,
    fragile: frozenset[str] = frozenset(),
    not_signalable: Collection[tuple[int, float]] = frozenset(),
    claimed: Collection[tuple[int, float]] = frozenset(),
    restarts_held: Mapping[str, float] | None = None,
) -> Decision:
    """Decide this cycle's level, actions and next memory (the rules: see the module docstring).

    ``owners`` is the evidence per owning workload (``policy.evidence``); ``history`` the
    ``(time, connections)`` series for the forecast, with what the operator removed added back;
    ``blocked`` what stops every action (a problem only the operator can judge) other than a
    pause; ``termination_possible`` is False when the last termination was refused;
    ``pooler_owner`` names what else sets the pooler's replicas (an autoscaler): the operator
    then never scales it; ``pooler_blocked`` what stops the pooler's part only (a PgBouncer pod
    that does not answer hides its clients: no scaling, no restart for pooled clients, but a
    direct leak is still held); ``sampled_at`` the sample's time on the server's clock (default
    ``now``), from which each chosen backend's ``state_change`` is re-checked when terminated;
    ``fragile`` the owners whose pods restart when their connections are terminated
    (``policy.remedy``): theirs are never terminated, their pods restarted when a breach is
    acted on; ``not_signalable`` the backends a termination was refused for, never chosen again;
    ``claimed`` the backends another budget terminated moments ago (``policy.ledger``: not
    chosen again, and counted as removed) and ``restarts_held`` the owners another budget
    restarted, with the end of its cooldown (their pods wait for it).

    In steps, each handing the next what it found: the level; the episode it continues; the
    breach's timing; the leaks in words; the actions (or the hold that stops them all); what
    the next cycle remembers.
    """
    owners = owners or {}
    level = decide_level(usage, memory.level)
    episode = _episode(memory, level)
    timing = _breach_timing(
        spec=spec,
        usage=usage,
        level=level,
        now=now,
        memory=memory,
        episode_since=episode.since,
        history=history,
    )
    if timing.act and episode.since is None:
        episode = _Episode(since=now)
    waits = (
        ((spec.remediation.steps[0], Hold.BREACH_WINDOW, timing.hold),)
        if timing.hold is not None
        else ()
    )
    reasons = (*timing.reasons, *_leak_reasons(owners))
    stop = _stop(paused=paused, blocked=blocked)
    if stop is not None:
        planned = _Plan(holds=((spec.remediation.steps[0], *stop),), escalation=episode.escalation)
    else:
        pressure = is_pressured(
            connections=usage.connections,
            warning_line=usage.warning_line,
            usable_slots=usage.usable_slots,
            server_total=usage.server_total,
            growth_rate=forecast.growth_rate(history),
            poll_seconds=float(spec.poll_seconds),
        )
        planned = _plan_actions(
            spec=spec,
            namespace=namespace,
            now=now,
            usage=usage,
            attributed=attributed,
            pods=pods,
            pooler=pooler,
            pooler_clients=pooler_clients,
            owners=owners,
            act=timing.act,
            sustained=timing.sustained,
            escalation=episode.escalation,
            in_cooldown=memory.cooldown_until is not None and now < memory.cooldown_until,
            termination_possible=termination_possible,
            pooler_owner=pooler_owner,
            pooler_blocked=pooler_blocked,
            pressure=pressure,
            need=max(
                termination_need(
                    usage=usage, history=history, next_poll_seconds=float(FAST_POLL_SECONDS)
                )
                - _already_removed(attributed, claimed),
                0,
            ),
            hard_need=max(
                termination_need(
                    usage=usage,
                    history=history,
                    next_poll_seconds=float(FAST_POLL_SECONDS),
                    line=usage.budget,
                )
                - _already_removed(attributed, claimed),
                0,
            ),
            own_need=max(
                _governed_connections(attributed, spec, namespace)
                - usage.warning_line
                + 1
                - _already_removed(attributed, claimed),
                0,
            ),
            sampled_at=now if sampled_at is None else sampled_at,
            fragile=fragile,
            not_signalable={*not_signalable, *claimed} if claimed else not_signalable,
            restarts_held=restarts_held or {},
        )
    to_full = timing.to_full
    return Decision(
        level=level,
        transition=_transition(memory.level, level),
        actions=planned.actions,
        dry_run=spec.remediation.dry_run,
        memory=_remember(
            spec=spec,
            now=now,
            level=level,
            memory=memory,
            timing=timing,
            episode=replace(episode, escalation=planned.escalation),
            actions=planned.actions,
        ),
        seconds_to_full=None if to_full is None or math.isinf(to_full) else to_full,
        reasons=(*reasons, *planned.reasons),
        holds=(*waits, *planned.holds),
        restart_cause=planned.restart_cause,
        next_poll_seconds=decide_poll_seconds(
            spec=spec, level=level, owners=owners, to_full=to_full
        ),
    )


def _episode(memory: Memory, level: Level) -> _Episode:
    """The episode this cycle continues. Hysteresis: after a breach, usage between the warning
    line and the budget is not recovery; below the warning line, the episode ends."""
    in_episode = memory.episode_since is not None or memory.level is Level.OVER
    if level is Level.WITHIN or not in_episode:
        return _Episode()
    return _Episode(
        since=memory.episode_since, escalation=memory.escalation, cleaned=memory.cleaned_pods
    )


def _leak_reasons(owners: Mapping[str, OwnerEvidence]) -> tuple[str, ...]:
    """The leaking owners in words: their rate and the idle age that abandons a connection."""
    leaking = sorted(o.owner for o in owners.values() if o.cls is OwnerClass.LEAKING)
    if not leaking:
        return ()
    return (
        "leaking: "
        + ", ".join(
            f"{o} ({owners[o].rate_per_minute:.0f}/min, abandoned after "
            f"{owners[o].abandon_after:.0f}s idle)"
            for o in leaking
        ),
    )


def _stop(*, paused: bool, blocked: str | None) -> tuple[Hold, str] | None:
    """What stops every action this cycle (a pause, or a problem only the operator can judge),
    as a hold with its words; None when nothing does."""
    if paused:
        return Hold.PAUSED, "the connbudget.io/paused annotation is set"
    if blocked is not None:
        return Hold.BLOCKED, f"blocked: {blocked}"
    return None


def _remember(
    *,
    spec: BudgetSpec,
    now: float,
    level: Level,
    memory: Memory,
    timing: _Timing,
    episode: _Episode,
    actions: Sequence[Action],
) -> Memory:
    """What the next cycle remembers: the level, the breach, the cooldown (restarted by a
    restart or a scaling), and the episode (none once usage is within the budget)."""
    cooldown_until = memory.cooldown_until
    if any(isinstance(a, RestartPod | ScalePooler) for a in actions):
        cooldown_until = now + spec.remediation.cooldown_seconds
    if cooldown_until is not None and cooldown_until <= now:
        cooldown_until = None
    if level is Level.WITHIN or episode.since is None:
        return Memory(level=level, breach_since=timing.breach_since, cooldown_until=cooldown_until)
    terminated = {b.pod for a in actions if isinstance(a, TerminateBackends) for b in a.backends}
    return Memory(
        level=level,
        breach_since=timing.breach_since,
        cooldown_until=cooldown_until,
        episode_since=episode.since,
        escalation=episode.escalation,
        cleaned_pods=tuple(sorted(set(episode.cleaned) | terminated)),
    )


def _plan_actions(
    *,
    spec: BudgetSpec,
    namespace: str,
    now: float,
    usage: Usage,
    attributed: Sequence[Attributed],
    pods: Sequence[PodInfo],
    pooler: PoolerSample | None,
    pooler_clients: Mapping[str, Sequence[PoolerClient]],
    owners: Mapping[str, OwnerEvidence],
    act: bool,
    sustained: bool,
    escalation: int,
    in_cooldown: bool,
    termination_possible: bool,
    pooler_owner: str | None,
    pooler_blocked: str | None,
    pressure: bool,
    need: int,
    own_need: int,
    hard_need: int,
    sampled_at: float,
    fragile: frozenset[str],
    not_signalable: Collection[tuple[int, float]],
    restarts_held: Mapping[str, float],
) -> _Plan:
    """The actions of a cycle that is neither paused nor blocked, in the order of the steps:
    restarts (only when termination cannot hold), terminations (never of a pod restarted in the
    same cycle), scaling; each step's hold when it waits; the escalation for the next cycle."""
    steps = spec.remediation.steps
    terminate = Step.TERMINATE_IDLE in steps and termination_possible

    # What termination would remove this cycle, before any restart is decided.
    def terminations(spare: frozenset[str]) -> tuple[IdleBackend, ...]:
        return plan_terminations(
            attributed=attributed,
            owners=owners,
            spec=spec,
            namespace=namespace,
            sampled_at=sampled_at,
            pressure=pressure,
            act=act,
            need=need,
            own_need=own_need,
            hard_need=hard_need,
            spare=spare,
            fragile=fragile,
            not_signalable=not_signalable,
        )

    removable = terminations(frozenset()) if terminate else ()
    restarting = _Plan()
    # Where termination is no remedy (a leak idle in a transaction, or one whose pods die when
    # their connections are terminated), waiting for a breach lets it cross the budget: under
    # pressure, restart before it does.
    early = pressure and not act and _restart_is_the_remedy(owners, fragile)
    if (act or early) and Step.RESTART_PODS in steps:
        # More over the budget than terminations can remove, for a whole breach window, after a
        # cycle of the steps before restarts: termination cannot hold it.
        insufficient = (
            act
            and sustained
            and escalation >= steps.index(Step.RESTART_PODS)
            and usage.connections - len(removable) > usage.budget
        )
        restarting = _restart_step(
            spec=spec,
            namespace=namespace,
            now=now,
            pods=pods,
            # A pooler that does not answer hides its clients: none is a reason to restart.
            pooler_clients={} if pooler_blocked is not None else pooler_clients,
            owners=owners,
            terminate=terminate,
            insufficient=insufficient,
            in_cooldown=in_cooldown,
            fragile=fragile,
            held=restarts_held,
            early=early,
        )
    restarts = tuple(a for a in restarting.actions if isinstance(a, RestartPod))
    actions: list[Action] = []
    if terminate:
        # Never terminate the backends of a pod that is being evicted or deleted in this cycle.
        spare = frozenset(r.pod for r in restarts if r.method is not RestartMethod.ROLLOUT_RESTART)
        chosen = terminations(spare) if spare else removable
        if chosen:
            actions.append(TerminateBackends(backends=chosen))
    actions.extend(restarts)
    holds = list(restarting.holds)
    if Step.SCALE_POOLER in steps:
        # Scaling down waits until the steps before it have had a cycle, unless they have
        # nothing to do.
        reached = escalation >= steps.index(Step.SCALE_POOLER) or (not removable and not restarts)
        scale = plan_scaling(spec=spec, usage=usage, pooler=pooler, breached=act)
        if act and not reached and scale is not None and scale.desired < scale.current:
            scale = None
        if scale is not None and pooler_blocked is not None:
            holds.append((Step.SCALE_POOLER, Hold.BLOCKED, f"blocked: {pooler_blocked}"))
        elif scale is not None and pooler_owner is not None:
            holds.append(
                (
                    Step.SCALE_POOLER,
                    Hold.BLOCKED,
                    f"the pooler's replicas are set by {pooler_owner}, not by the operator",
                )
            )
        elif scale is not None and in_cooldown:
            holds.append((Step.SCALE_POOLER, Hold.COOLDOWN, "scaling waits for the cooldown"))
        elif scale is not None:
            actions.append(scale)
    return _Plan(
        actions=tuple(actions),
        holds=tuple(holds),
        reasons=restarting.reasons,
        restart_cause=restarting.restart_cause,
        escalation=min(escalation + 1, len(steps) - 1) if act else escalation,
    )


def _restart_is_the_remedy(owners: Mapping[str, OwnerEvidence], fragile: frozenset[str]) -> bool:
    """Whether a leaking owner can be held only by restarting its pods: its leaked connections
    sit idle in a transaction, or its pods die when their connections are terminated."""
    return any(
        o.cls is OwnerClass.LEAKING
        and (o.abandoned_in_transaction > 0 or (o.owner in fragile and o.abandoned > 0))
        for o in owners.values()
    )


def _restart_step(
    *,
    spec: BudgetSpec,
    namespace: str,
    now: float,
    pods: Sequence[PodInfo],
    pooler_clients: Mapping[str, Sequence[PoolerClient]],
    owners: Mapping[str, OwnerEvidence],
    terminate: bool,
    insufficient: bool,
    in_cooldown: bool,
    fragile: frozenset[str],
    held: Mapping[str, float],
    early: bool = False,
) -> _Plan:
    """The restarts of a breach being acted on (``early``: of a budget under pressure, before a
    breach, only for the causes termination cannot help): why termination cannot hold (if it
    cannot), the worst offenders within the limits, or the hold (cooldown, pods too young) that
    stops them."""
    cause, offenders = _restart_cause(
        pods=pods,
        owners=owners,
        pooled=_pooled_offenders(pods=pods, pooler_clients=pooler_clients, owners=owners),
        spec=spec,
        termination_possible=terminate,
        insufficient=insufficient,
        now=now,
        fragile=fragile,
        early=early,
    )
    if cause is None:
        return _Plan()
    # Where a restart is the only remedy (the workload dies on termination, or its leaked
    # connections sit in a transaction that termination would roll back), a pod is restarted
    # however young: an eviction costs no more than the crash a termination would cause, and
    # waiting lets the leak fill the budget (harm benchmark: an idle-in-transaction leak of 1/s
    # waited out minPodAgeSeconds 120, crossed the budget of 80 and reached 95, 57 refused).
    planned, too_young, waiting = _plan_restarts(
        offenders=offenders,
        pods=pods,
        spec=spec,
        namespace=namespace,
        now=now,
        held=held,
        young_too=cause in (RestartCause.DIES_ON_TERMINATION, RestartCause.IDLE_IN_TRANSACTION),
    )
    reasons = (f"restarting because {_CAUSE_TEXT[cause]}",)
    # An idle-in-transaction leak still waits for the cooldown between restarts: paced by the
    # replacements alone, a young pod holding two connections in a transaction was evicted as
    # soon as its replacement was ready, three in 6 s (the fault run: cooldown 30 s).
    if cause is RestartCause.DIES_ON_TERMINATION:
        # Its pods are replaced one at a time as its leak needs, not once a cooldown: the next
        # waits only for the last one's replacement (a fixed cooldown cannot hold a leak of a
        # pod's connections a second, and the crash or the breach it spares is the alternative).
        replacing = _replacing(pods, {p.owner for p in pods if p.name in offenders})
        if planned and replacing:
            hold = (
                Step.RESTART_PODS,
                Hold.COOLDOWN,
                f"restarts wait for {replacing} to be replaced and ready",
            )
            return _Plan(holds=(hold,), reasons=reasons, restart_cause=cause)
        in_cooldown = False
    # The cause is said while restarts wait too, so the status tells why they are wanted.
    if planned and in_cooldown:
        hold = (Step.RESTART_PODS, Hold.COOLDOWN, "restarts wait for the cooldown")
        return _Plan(holds=(hold,), reasons=reasons, restart_cause=cause)
    if planned:
        return _Plan(actions=planned, reasons=reasons, restart_cause=cause)
    if waiting:
        until = max(held[o] for o in waiting)
        hold = (
            Step.RESTART_PODS,
            Hold.COOLDOWN,
            f"{', '.join(waiting)} restarted by another budget: waits {until - now:.0f}s more",
        )
        return _Plan(holds=(hold,), reasons=reasons, restart_cause=cause)
    if too_young:
        young = spec.remediation.restart_pods.min_pod_age_seconds
        hold = (
            Step.RESTART_PODS,
            Hold.MIN_POD_AGE,
            f"{too_young} offending pods are younger than minPodAgeSeconds {young}",
        )
        return _Plan(holds=(hold,), reasons=reasons, restart_cause=cause)
    return _Plan(reasons=reasons, restart_cause=cause)


def _replacing(pods: Sequence[PodInfo], owners: set[str]) -> str | None:
    """A pod of ``owners`` on its way out or not ready yet (a restart not finished), if any."""
    for p in sorted(pods, key=lambda p: p.name):
        if p.owner in owners and (p.terminating or not p.ready):
            return f"pod {p.name}"
    return None


_CAUSE_TEXT = {
    RestartCause.IDLE_IN_TRANSACTION: (
        "leaked connections sit idle in a transaction (terminating them would roll it back)"
    ),
    RestartCause.NOT_TERMINABLE: "leaked connections may not be terminated",
    RestartCause.POOLED_CLIENTS: "leaked clients are held in PgBouncer",
    RestartCause.LEAK_GROWS_WITH_AGE: (
        "the leak grows with pod age (its oldest pod leaks fastest; a new pod starts afresh)"
    ),
    RestartCause.TERMINATION_INSUFFICIENT: (
        "terminations cannot bring usage back within the budget"
    ),
    RestartCause.DIES_ON_TERMINATION: (
        "its pods restart when its connections are terminated (the client library dies on a "
        "server-side close), so they are restarted gracefully instead"
    ),
}
