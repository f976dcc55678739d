"""Render a ConnectionBudget's status from one cycle's outcome, and read the memory back from it.

Pure: no I/O, no clock; ``now`` comes in as an argument. ``lastTransitionTime`` of a condition moves
only when the condition's status flips, so kstatus and humans see when something really changed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connbudget.model import timestamps
from connbudget.model.conditions import STALLED_REASONS, Condition, ConditionType, Phase, Reason
from connbudget.model.observations import PoolerSample
from connbudget.policy.culprits import LeakShape
from connbudget.policy.plan import Decision, Level, Memory
from connbudget.policy.usage import OwnerUsage, Usage


@dataclass(frozen=True, kw_only=True)
class LastAction:
    type: str  # TerminateIdle, RestartPods, ScalePooler
    targets: tuple[str, ...]
    result: str  # Succeeded, Failed, Blocked, Planned (dry-run), Partial
    dry_run: bool
    time: float
    message: str


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one cycle found and did, as the status needs it."""

    generation: int
    now: float
    problem: tuple[Reason, str] | None = None  # the controller cannot do its job: Ready=False
    database_reachable: bool | None = None  # None: not tried (e.g. the Secret is missing)
    usage: Usage | None = None
    decision: Decision | None = None
    paused: bool = False
    last_action: LastAction | None = None  # None: keep the previous one
    pooler: PoolerSample | None = None
    pooler_desired: int | None = None
    probe_time: float | None = None
    leaks: Mapping[str, Sequence[LeakShape]] = field(default_factory=dict)  # owner → top shapes
    hints: Mapping[str, str] = field(default_factory=dict)  # owner → one actionable line
    statements_visible: bool | None = None  # None: no leaked statement asked for yet
    hidden_backends: int = 0  # backends whose state and statement the monitoring role cannot read


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_ms(t: float) -> str:
    """With milliseconds, for the decision memory read back each cycle: whole seconds would cut
    up to a second off ``breachSeconds`` and the cooldown."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[Condition], *, now: float, generation: int
) -> list[dict[str, Any]]:
    """Render ``new`` conditions, keeping each ``lastTransitionTime`` unless its status flipped."""
    previous = {c.get("type"): c for c in old if isinstance(c, Mapping)}
    out = []
    for c in new:
        status = "True" if c.status else "False"
        before = previous.get(c.type.value)
        since = (
            before.get("lastTransitionTime") if before and before.get("status") == status else None
        )
        out.append(
            {
                "type": c.type.value,
                "status": status,
                "reason": c.reason.value,
                "message": c.message[:1024],
                "observedGeneration": generation,
                "lastTransitionTime": since or rfc3339(now),
            }
        )
    return out


def reuse_gaps_from_status(status: Mapping[str, Any] | None) -> dict[str, float]:
    """Each owner's longest reuse gap as the status kept it (``byOwner[].maxReuseGapSeconds``):
    the prior a new evidence starts from after an operator restart or a change of leader."""
    out: dict[str, float] = {}
    for row in ((status or {}).get("usage") or {}).get("byOwner") or []:
        if not isinstance(row, Mapping):
            continue
        owner, gap = row.get("owner"), row.get("maxReuseGapSeconds")
        if isinstance(owner, str) and isinstance(gap, int | float) and gap >= 0:
            out[owner] = float(gap)
    return out


def memory_from_status(status: Mapping[str, Any] | None) -> Memory:
    """Read the decision memory back from a status (after an operator restart, say)."""
    status = status or {}
    rem = status.get("remediation") or {}
    level_raw = rem.get("level")
    level = Level(level_raw) if level_raw in {lv.value for lv in Level} else Level.WITHIN
    escalation = rem.get("escalation")
    cleaned = rem.get("cleanedPods") or []
    return Memory(
        level=level,
        breach_since=timestamps.parse_timestamp(rem.get("breachSince")),
        cooldown_until=timestamps.parse_timestamp(status.get("cooldownUntil")),
        episode_since=timestamps.parse_timestamp(rem.get("episodeSince")),
        escalation=escalation if isinstance(escalation, int) and escalation >= 0 else 0,
        cleaned_pods=tuple(str(p) for p in cleaned if isinstance(p, str)),
    )


def _phase(o: Outcome) -> Phase:
    if o.problem is not None:
        return Phase.DEGRADED
    if o.usage is None or o.decision is None:
        return Phase.PENDING
    if o.paused:
        return Phase.PAUSED
    d = o.decision
    if d.actions or (d.remediating and d.level is not Level.WITHIN):
        return Phase.REMEDIATING
    return {
        Level.OVER: Phase.OVER_BUDGET,
        Level.WARNING: Phase.WARNING,
        Level.WITHIN: Phase.WITHIN_BUDGET,
    }[d.level]


def _conditions(o: Outcome) -> list[Condition]:
    conds: list[Condition] = []
    if o.problem is not None:
        reason, message = o.problem
        conds.append(
            Condition(type=ConditionType.READY, status=False, reason=reason, message=message)
        )
    elif o.usage is None:
        conds.append(
            Condition(
                type=ConditionType.READY,
                status=False,
                reason=Reason.PENDING,
                message="waiting for the first probe",
            )
        )
    else:
        conds.append(
            Condition(
                type=ConditionType.READY,
                status=True,
                reason=Reason.PROBE_SUCCEEDED,
                message="probing and ready to act",
            )
        )
    pending = o.problem is None and o.usage is None
    conds.append(
        Condition(
            type=ConditionType.RECONCILING,
            status=pending,
            reason=Reason.PENDING if pending else Reason.PROBED,
            message="waiting for the first probe" if pending else "",
        )
    )
    stalled = o.problem is not None and o.problem[0] in STALLED_REASONS
    conds.append(
        Condition(
            type=ConditionType.STALLED,
            status=stalled,
            reason=o.problem[0] if stalled and o.problem else Reason.NOT_STALLED,
            message=o.problem[1] if stalled and o.problem else "",
        )
    )
    if o.database_reachable is True:
        conds.append(
            Condition(
                type=ConditionType.DATABASE_REACHABLE,
                status=True,
                reason=Reason.PROBE_SUCCEEDED,
                message="the last probe succeeded",
            )
        )
    elif o.database_reachable is False:
        reason, message = o.problem or (Reason.PROBE_FAILED, "the probe failed")
        conds.append(
            Condition(
                type=ConditionType.DATABASE_REACHABLE, status=False, reason=reason, message=message
            )
        )
    u, d = o.usage, o.decision
    if u is not None:
        conds.append(budget_fits(u))
    if u is not None and d is not None:
        text = f"{u.connections}/{u.budget} connections ({u.percent:.0f}% of the budget)"
        if d.level is Level.OVER:
            conds.append(
                Condition(
                    type=ConditionType.WITHIN_BUDGET,
                    status=False,
                    reason=Reason.BUDGET_EXCEEDED,
                    message=text,
                )
            )
        elif d.level is Level.WARNING:
            conds.append(
                Condition(
                    type=ConditionType.WITHIN_BUDGET,
                    status=True,
                    reason=Reason.BUDGET_WARNING,
                    message=text,
                )
            )
        else:
            conds.append(
                Condition(
                    type=ConditionType.WITHIN_BUDGET,
                    status=True,
                    reason=Reason.BUDGET_OK,
                    message=text,
                )
            )
        why = "; ".join(d.reasons + tuple(h[2] for h in d.holds))
        if d.actions:
            conds.append(
                Condition(
                    type=ConditionType.REMEDIATING,
                    status=True,
                    reason=Reason.DRY_RUN if d.dry_run else Reason.ACTING,
                    message=why,
                )
            )
        elif d.remediating and d.level is not Level.WITHIN:
            conds.append(
                Condition(
                    type=ConditionType.REMEDIATING, status=True, reason=Reason.WAITING, message=why
                )
            )
        else:
            conds.append(
                Condition(
                    type=ConditionType.REMEDIATING,
                    status=False,
                    reason=Reason.IDLE,
                    message=why or "nothing to do",
                )
            )
    if o.hidden_backends or o.statements_visible is not None:
        conds.append(statements_visible(bool(o.statements_visible), hidden=o.hidden_backends))
    conds.append(
        Condition(
            type=ConditionType.PAUSED,
            status=o.paused,
            reason=Reason.PAUSED if o.paused else Reason.NOT_PAUSED,
            message="actions are paused by the connbudget.io/paused annotation" if o.paused else "",
        )
    )
    return conds


def statements_visible(visible: bool, *, hidden: int = 0) -> Condition:
    """Whether leaked connections' last statements could be read: without pg_read_all_stats
    PostgreSQL hides other roles' statements, and the leak is counted but not located. ``hidden``
    backends (of other roles) showed not even their state: counted, never terminated."""
    if hidden:
        return Condition(
            type=ConditionType.STATEMENTS_VISIBLE,
            status=False,
            reason=Reason.INSUFFICIENT_PRIVILEGE,
            message=(
                f"{hidden} backends of other roles hide their state, address and statement from "
                "the monitoring role: they are counted (by database, user and application_name) "
                "but never terminated, and a leak among them is not located; GRANT "
                "pg_read_all_stats (part of pg_monitor) to it"
            ),
        )
    if visible:
        return Condition(
            type=ConditionType.STATEMENTS_VISIBLE,
            status=True,
            reason=Reason.STATEMENTS_READABLE,
            message="leaked connections' last statements are read (literals stripped)",
        )
    return Condition(
        type=ConditionType.STATEMENTS_VISIBLE,
        status=False,
        reason=Reason.INSUFFICIENT_PRIVILEGE,
        message=(
            "the monitoring role cannot read other roles' statements, so a leak is counted but "
            "not located: GRANT pg_read_all_stats (part of pg_monitor) to it"
        ),
    )


def leak_shapes(shapes: Sequence[LeakShape]) -> list[dict[str, Any]]:
    """``byOwner[].leaks``: normalised statements only, never a literal."""
    return [
        {
            "fingerprint": s.fingerprint,
            "statement": s.statement,
            "tags": dict(s.tags),
            "count": s.count,
            "share": round(s.share, 2),
            "firstSeen": rfc3339(s.first_seen),
            "revision": s.revision,
            "rollout": s.rollout,
        }
        for s in shapes
    ]


def budget_fits(u: Usage) -> Condition:
    """Whether the budget can be breached before the server is full.

    A budget above the server's usable slots (``max_connections`` less the reserved ones) is a
    mistake only the operator can see (the API server does not know the server): it is reported,
    and the operator goes on (a leak is still told by its evidence, not by the budget).
    """
    if u.budget > u.usable_slots:
        return Condition(
            type=ConditionType.BUDGET_FITS,
            status=False,
            reason=Reason.BUDGET_ABOVE_SERVER,
            message=(
                f"the budget of {u.budget} connections is more than the server's "
                f"{u.usable_slots} usable slots (max_connections {u.server_max_connections} "
                f"less {u.reserved} reserved): the server is full before the budget is "
                "breached; lower spec.budget or use maxPercent"
            ),
        )
    return Condition(
        type=ConditionType.BUDGET_FITS,
        status=True,
        reason=Reason.BUDGET_FITS,
        message=f"{u.budget} of the server's {u.usable_slots} usable slots",
    )


def worth_writing(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    seconds_since_write: float | None,
    heartbeat: float,
) -> bool:
    """Whether to write the merge patch ``new`` over ``old``, written ``seconds_since_write`` ago.

    A patch that would change nothing but ``lastProbeTime`` is left out (each write costs the API
    server a PATCH and every watcher an event, and with hundreds of budgets that is most of the
    work), unless the last write is a ``heartbeat`` old or there was none (None). A field set to
    ``None`` in the patch deletes it, so it equals a field ``old`` lacks.
    """
    if seconds_since_write is None or seconds_since_write >= heartbeat:
        return True
    return changes_more_than_probe_time(old, new)


def changes_more_than_probe_time(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether the merge patch ``new`` changes ``old`` in more than ``lastProbeTime``."""
    return any(k != "lastProbeTime" and old.get(k) != v for k, v in new.items())


def _owner_evidence(w: OwnerUsage) -> dict[str, Any]:
    """What the evidence says of a governed owner (nothing for one it does not judge)."""
    if w.cls is None:
        return {}
    return {
        "class": w.cls,
        "leakRatePerMinute": round(w.leak_rate * 60, 1),
        "abandoned": w.abandoned,
        "abandonAfterSeconds": round(w.abandon_after, 1) if w.abandon_after is not None else None,
        "maxReuseGapSeconds": round(w.max_reuse_gap, 1) if w.max_reuse_gap is not None else None,
        **_per_pod(w),
    }


def _per_pod(w: OwnerUsage) -> dict[str, Any]:
    """The connections one of its pods held over the last hour (nothing before a poll saw it)."""
    if w.per_pod is None:
        return {}
    return {"connectionsPerPodP95": w.per_pod.p95, "connectionsPerPodPeak": w.per_pod.peak}


def _where(owner: str, o: Outcome) -> dict[str, Any]:
    """Where an owner's leak is (``leaks``) and what to do (``hint``): left out when unknown."""
    out: dict[str, Any] = {}
    if shapes := o.leaks.get(owner):
        out["leaks"] = leak_shapes(shapes)
    if hint := o.hints.get(owner):
        out["hint"] = hint
    return out


def render_status(old: Mapping[str, Any] | None, o: Outcome) -> dict[str, Any]:
    """The whole new status (a merge patch: fields not rendered keep their old values)."""
    old = old or {}
    status: dict[str, Any] = {
        "observedGeneration": o.generation,
        "phase": _phase(o).value,
        "conditions": merge_conditions(
            old.get("conditions") or [], _conditions(o), now=o.now, generation=o.generation
        ),
    }
    if o.probe_time is not None:
        status["lastProbeTime"] = rfc3339(o.probe_time)
    u, d = o.usage, o.decision
    if u is not None:
        status["usage"] = {
            "connections": u.connections,
            "budget": u.budget,
            "serverMaxConnections": u.server_max_connections,
            "reserved": u.reserved,
            "percent": round(u.percent),
            "leaked": u.leaked,
            "unattributed": u.unattributed,
            "secondsToFull": (
                round(d.seconds_to_full, 1)
                if d is not None and d.seconds_to_full is not None
                else None
            ),
            "byOwner": [
                {
                    "owner": w.owner,
                    "pods": w.pods,
                    "connections": w.connections,
                    "idle": w.idle,
                    "leaked": w.leaked,
                    "pooled": w.pooled,
                    **_owner_evidence(w),
                    **_where(w.owner, o),
                }
                for w in u.by_owner
            ],
        }
    if d is not None:
        m = d.memory
        status["remediation"] = {
            "level": m.level.value,
            "breachSince": rfc3339_ms(m.breach_since) if m.breach_since else None,
            "episodeSince": rfc3339_ms(m.episode_since) if m.episode_since else None,
            "escalation": m.escalation,
            "cleanedPods": list(m.cleaned_pods),
            "restartCause": d.restart_cause.value if d.restart_cause else None,
            "pollSeconds": d.next_poll_seconds,
            "reasons": list(d.reasons),
            "holds": [
                {"step": s.value, "reason": h.value, "message": msg} for s, h, msg in d.holds
            ],
        }
        status["cooldownUntil"] = rfc3339_ms(m.cooldown_until) if m.cooldown_until else None
    if o.last_action is not None:
        a = o.last_action
        status["lastAction"] = {
            "type": a.type,
            "targets": list(a.targets),
            "result": a.result,
            "dryRun": a.dry_run,
            "time": rfc3339(a.time),
            "message": a.message[:1024],
        }
    if o.pooler is not None:
        status["pooler"] = {
            "replicas": o.pooler.replicas,
            "desiredReplicas": o.pooler_desired
            if o.pooler_desired is not None
            else o.pooler.replicas,
            "clientsWaiting": o.pooler.clients_waiting,
            "serverConnections": o.pooler.server_connections,
        }
    return status
