"""The fault run's judges: parse the evidence (PostgreSQL's log, the API server's audit log, the
operators' JSON logs, the samples taken during the run) and find every violated invariant.

Pure: no I/O, no clock; all inputs are arguments. Times are epoch seconds. Each judge returns what
it judged (a count) and the violations, each with its evidence, so a test can prove that a judge
catches what it is meant to catch (tests/unit/test_bench_helpers.py).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Set at run time as superuser (ALTER SYSTEM): time in UTC with milliseconds, the backend's pid,
# its application_name and client address, so a termination line names its backend.
LOG_LINE_PREFIX = "%m [%p] app=%a host=%h "
_PG_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (?P<tz>\S+) \[(?P<pid>\d+)\] "
    r"app=(?P<app>.*?) host=(?P<host>\S*) (?P<level>[A-Z]+\d?):\s+(?P<msg>.*)$"
)
TERMINATED = "terminating connection due to administrator command"
SHUTDOWN_START = re.compile(r"received (fast|smart|immediate) shutdown request")
SERVER_READY = "database system is ready to accept connections"

# A lease holder may act until this long after the start of its last successful renewal
# (operator/connbudget/kube/lease.py RENEW_DEADLINE_SECONDS).
RENEW_DEADLINE_SECONDS = 10.0
# An action is logged after it is done; every API call and statement it makes is bounded by 5 s
# (kube/api.py REQUEST_TIMEOUT_SECONDS), so its log line may come that much after its term ended.
ACTION_LOG_LAG_SECONDS = 6.0
# The operator's pod cache lags the API server by a watch event: an eviction sent this soon
# after the pod's deletion is a race the operator cannot see, not a choice.
WATCH_LAG_SECONDS = 2.0
# A pause, deletion or selector change reaches the operator through its watch and takes effect
# at its next cycle.
SPEC_LAG_SECONDS = 5.0


@dataclass(frozen=True)
class Violation:
    """One broken invariant, with the lines or samples that prove it."""

    invariant: str
    at: float
    evidence: str


@dataclass(frozen=True)
class PgLogLine:
    t: float
    pid: int
    app: str
    host: str
    level: str
    message: str
    raw: str


def parse_pg_time(ts: str, tz: str) -> float:
    """Epoch seconds of a ``%m`` timestamp (``log_timezone`` is set to UTC by the run)."""
    if tz not in ("UTC", "GMT"):
        raise ValueError(f"log_timezone must be UTC, got {tz}")
    return dt.datetime.fromisoformat(ts).replace(tzinfo=dt.UTC).timestamp()


def parse_pg_log(lines: Iterable[str]) -> list[PgLogLine]:
    """The lines carrying the run's ``log_line_prefix`` (others, such as the server's own
    startup lines before the prefix was set, are skipped)."""
    out = []
    for raw in lines:
        m = _PG_LINE.match(raw)
        if m is None:
            continue
        out.append(
            PgLogLine(
                t=parse_pg_time(m["ts"], m["tz"]),
                pid=int(m["pid"]),
                app=m["app"],
                host=m["host"],
                level=m["level"],
                message=m["msg"],
                raw=raw,
            )
        )
    return out


def shutdown_windows(lines: Sequence[PgLogLine], *, end: float) -> list[tuple[float, float]]:
    """When the server itself was ending backends: from a shutdown request to ready again."""
    windows: list[tuple[float, float]] = []
    start: float | None = None
    for line in lines:
        if SHUTDOWN_START.search(line.message) and start is None:
            start = line.t
        elif SERVER_READY in line.message and start is not None:
            windows.append((start, line.t))
            start = None
    if start is not None:
        windows.append((start, end))
    return windows


def terminations(lines: Sequence[PgLogLine], *, end: float) -> list[PgLogLine]:
    """Backends ended by ``pg_terminate_backend``: the administrator-command lines outside the
    server's own shutdowns (a fast shutdown ends every backend with the same message)."""
    windows = shutdown_windows(lines, end=end)
    return [
        line
        for line in lines
        if TERMINATED in line.message and not any(a <= line.t <= b for a, b in windows)
    ]


@dataclass(frozen=True)
class BackendSeen:
    """The last sample of one backend (pid and backend_start) by the superuser's sampler."""

    pid: int
    backend_start: float
    t: float  # when it was last seen
    state: str
    pod: str | None  # namespace/name of the pod it belongs to, by address then by name
    app: str


@dataclass(frozen=True)
class Selection:
    """A budget's life over the run: which pods it selects, when it existed, when paused."""

    budget: str
    pods: frozenset[str]  # namespace/name of every pod its selector matched during the run
    alive: tuple[tuple[float, float], ...]  # intervals it existed
    paused: tuple[tuple[float, float], ...] = ()
    max_pods_per_cycle: int = 1
    cooldown_seconds: float = 0.0


def _within(t: float, intervals: Iterable[tuple[float, float]], slack: float = 0.0) -> bool:
    return any(a - slack <= t <= b + slack for a, b in intervals)


def selecting(selections: Sequence[Selection], pod: str | None, t: float) -> list[Selection]:
    """The budgets selecting ``pod`` at ``t``, alive and not paused (with the spec lag)."""
    if pod is None:
        return []
    return [
        s
        for s in selections
        if pod in s.pods
        and _within(t, s.alive, SPEC_LAG_SECONDS)
        and not any(a + SPEC_LAG_SECONDS < t < b for a, b in s.paused)
    ]


def judge_terminations(
    *,
    ended: Sequence[PgLogLine],
    seen: Mapping[tuple[int, float], BackendSeen],
    selections: Sequence[Selection],
    own: Iterable[int] = (),
    min_idle_seconds: float,
) -> tuple[int, list[Violation]]:
    """Judge every backend ended by an administrator command.

    Each must have been idle when last seen and belong to a pod selected by a live, unpaused
    budget. A last sample that is not idle proves a busy backend was terminated only when it was
    taken less than ``min_idle_seconds`` before the termination (the operator terminates only
    backends idle that long); an older one is counted as unjudged, not as a violation. ``own``
    are pids the run terminated itself (the Secret rotation drops the monitoring connections).
    """
    own_pids = set(own)
    by_pid: dict[int, list[BackendSeen]] = {}
    for b in seen.values():
        by_pid.setdefault(b.pid, []).append(b)
    violations: list[Violation] = []
    judged = 0
    for line in ended:
        if line.pid in own_pids or line.app == "connbudget-probe":
            continue
        candidates = [b for b in by_pid.get(line.pid, []) if b.backend_start <= line.t]
        if not candidates:
            violations.append(
                Violation("terminated a backend never seen", line.t, f"{line.raw} (no sample)")
            )
            continue
        b = max(candidates, key=lambda c: c.backend_start)
        judged += 1
        if b.state != "idle" and line.t - b.t < min_idle_seconds:
            violations.append(
                Violation(
                    f"terminated a backend {b.state!r}",
                    line.t,
                    f"{line.raw} | last seen {line.t - b.t:.2f}s before: {b}",
                )
            )
        if not selecting(selections, b.pod, line.t):
            violations.append(
                Violation(
                    "terminated a backend of an unselected pod",
                    line.t,
                    f"{line.raw} | pod {b.pod}, app {b.app!r}",
                )
            )
    return judged, violations


# --- the audit log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEvent:
    t: float
    verb: str
    resource: str  # resource/subresource
    namespace: str
    name: str
    code: int
    holder: str | None = None  # a Lease write's holderIdentity


def parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_audit(lines: Iterable[str]) -> list[AuditEvent]:
    """The ResponseComplete events of the audit log, oldest first."""
    out = []
    for raw in lines:
        if not raw.startswith("{"):
            continue
        try:
            e: dict[str, Any] = json.loads(raw)
        except ValueError:
            continue
        if e.get("stage") != "ResponseComplete":
            continue
        ref = e.get("objectRef") or {}
        resource = str(ref.get("resource", ""))
        if ref.get("subresource"):
            resource += "/" + str(ref["subresource"])
        holder = None
        if resource == "leases":
            holder = ((e.get("requestObject") or {}).get("spec") or {}).get("holderIdentity")
        out.append(
            AuditEvent(
                t=parse_time(str(e.get("requestReceivedTimestamp") or e["stageTimestamp"])),
                verb=str(e.get("verb", "")),
                resource=resource,
                namespace=str(ref.get("namespace", "")),
                name=str(ref.get("name", "")),
                code=int((e.get("responseStatus") or {}).get("code", 0)),
                holder=holder,
            )
        )
    return sorted(out, key=lambda a: a.t)


def _ok(code: int) -> bool:
    return 200 <= code < 300


def judge_evictions(
    *, audit: Sequence[AuditEvent], namespace: str, selections: Sequence[Selection]
) -> tuple[int, list[Violation]]:
    """Judge every eviction of the run's namespace.

    - the pod is selected by a live, unpaused budget;
    - the pod was not already terminating (deleted or evicted before, beyond the watch lag);
    - per budget, never more than ``maxPodsPerCycle`` evictions within ``cooldownSeconds``.
    """
    violations: list[Violation] = []
    gone_at: dict[str, float] = {}
    done: dict[str, list[float]] = {}
    judged = 0
    for e in audit:
        if e.namespace != namespace:
            continue
        pod = f"{e.namespace}/{e.name}"
        if e.resource == "pods" and e.verb == "delete" and _ok(e.code):
            gone_at.setdefault(pod, e.t)
            continue
        if e.resource != "pods/eviction" or e.verb != "create":
            continue
        judged += 1
        evidence = f"eviction of {pod} at {e.t:.3f} (HTTP {e.code})"
        if pod in gone_at and e.t - gone_at[pod] > WATCH_LAG_SECONDS:
            violations.append(
                Violation(
                    "evicted a pod already terminating",
                    e.t,
                    f"{evidence}; deleted {e.t - gone_at[pod]:.1f}s before",
                )
            )
        owners = selecting(selections, pod, e.t)
        if not owners:
            violations.append(Violation("evicted an unselected pod", e.t, evidence))
        if not _ok(e.code):
            continue
        gone_at.setdefault(pod, e.t)
        for s in owners:
            times = done.setdefault(s.budget, [])
            times.append(e.t)
            # Only evictions of the same incarnation of the budget count against its cooldown.
            born = max(a for a, _ in s.alive if a - SPEC_LAG_SECONDS <= e.t)
            recent = [
                t
                for t in times
                if t > e.t - s.cooldown_seconds + 1.0 and t >= born - SPEC_LAG_SECONDS
            ]
            if len(recent) > s.max_pods_per_cycle:
                violations.append(
                    Violation(
                        "more evictions than maxPodsPerCycle within cooldownSeconds",
                        e.t,
                        f"{evidence}; budget {s.budget}: {len(recent)} within "
                        f"{s.cooldown_seconds:.0f}s at " + ", ".join(f"{t:.3f}" for t in recent),
                    )
                )
    return judged, violations


# --- leases and who acted -----------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """Consecutive successful Lease writes by one holder."""

    holder: str
    start: float
    last_renewal: float

    @property
    def end(self) -> float:
        """The latest moment the holder may still act (its renew deadline)."""
        return self.last_renewal + RENEW_DEADLINE_SECONDS


def lease_terms(audit: Sequence[AuditEvent], *, namespace: str, name: str) -> list[Term]:
    """The Lease's terms, from its successful writes in the audit log."""
    terms: list[Term] = []
    for e in audit:
        if (e.resource, e.namespace, e.name) != ("leases", namespace, name) or not _ok(e.code):
            continue
        if e.verb not in ("create", "update", "patch") or not e.holder:
            continue
        if terms and terms[-1].holder == e.holder:
            terms[-1] = Term(e.holder, terms[-1].start, e.t)
        else:
            terms.append(Term(e.holder, e.t, e.t))
    return terms


def judge_terms(terms: Sequence[Term]) -> list[Violation]:
    """A Lease never changes hands while its holder may still act."""
    return [
        Violation(
            "the Lease was taken while its holder could still act",
            b.start,
            f"{b.holder} took it at {b.start:.3f}; {a.holder} renewed at {a.last_renewal:.3f} "
            f"and may act until {a.end:.3f}",
        )
        for a, b in itertools.pairwise(terms)
        if b.start < a.end
    ]


def judge_takeover(
    *, killed_at: float, old_holder: str | None, terms: Sequence[Term], within: float
) -> tuple[float | None, list[Violation]]:
    """After the leader was killed or frozen at ``killed_at``, another replica holds the Lease
    within ``within`` seconds (its Lease duration, a retry and some slack). Return how long it
    took (None: never) and the violation if too long."""
    took = next(
        (t.start - killed_at for t in terms if t.start > killed_at and t.holder != old_holder),
        None,
    )
    if took is not None and took <= within:
        return took, []
    return took, [
        Violation(
            "nobody took over the Lease in time",
            killed_at,
            f"the leader {old_holder} stopped at {killed_at:.3f}; the Lease was taken "
            + (f"{took:.1f}s later" if took is not None else "never"),
        )
    ]


@dataclass(frozen=True)
class Action:
    """One ``action`` line of a replica's JSON log."""

    t: float
    replica: str  # the replica's Lease identity
    step: str
    result: str
    detail: str = ""


def parse_actions(lines: Iterable[str]) -> tuple[str | None, list[Action], list[str]]:
    """A replica's identity, its ``action`` records and its tracebacks, from its JSON log."""
    identity: str | None = None
    acts: list[Action] = []
    tracebacks: list[str] = []
    for raw in lines:
        if "Traceback" in raw:
            tracebacks.append(raw[:2000])
        if not raw.startswith("{"):
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if rec.get("message") == "leader election" and rec.get("identity"):
            identity = str(rec["identity"])
        elif rec.get("message") == "action" and identity is not None:
            acts.append(
                Action(
                    t=parse_time(str(rec["time"])),
                    replica=identity,
                    step=str(rec.get("action", "")),
                    result=str(rec.get("result", "")),
                    detail=str(rec.get("detail", "")),
                )
            )
    return identity, acts, tracebacks


DONE_RESULTS = frozenset({"Succeeded", "Failed", "Skipped"})  # an action attempted, not planned


def judge_actions(
    *,
    actions: Sequence[Action],
    terms: Sequence[Term],
    evictions: Sequence[AuditEvent],
    ended: Sequence[PgLogLine],
    frozen: Sequence[tuple[str, float, float]] = (),
) -> tuple[int, list[Violation]]:
    """Every action falls within a term of the replica that took it.

    From the replicas' own logs: each attempted action lies within one of its own terms (its log
    line may lag by ``ACTION_LOG_LAG_SECONDS``, and by the length of a freeze of that replica,
    ``frozen`` as ``(replica, start, end)``, that ended just before it: an action done before
    the freeze is logged after it). From outside the operator: each eviction (audit log) and
    each termination (PostgreSQL's log) lies within some term, so nobody acted while no replica
    led.
    """
    violations: list[Violation] = []
    judged = 0
    for a in actions:
        if a.result not in DONE_RESULTS:
            continue
        judged += 1
        own = [t for t in terms if t.holder == a.replica]
        lag = ACTION_LOG_LAG_SECONDS + sum(
            end - start
            for replica, start, end in frozen
            if replica == a.replica and end <= a.t <= end + ACTION_LOG_LAG_SECONDS
        )
        if not any(t.start <= a.t <= t.end + lag for t in own):
            holder = next((t.holder for t in terms if t.start <= a.t <= t.end), None)
            violations.append(
                Violation(
                    "a replica acted outside its own lease term",
                    a.t,
                    f"{a.replica} {a.step} {a.result} at {a.t:.3f} ({a.detail}); "
                    f"the term then was {holder}'s",
                )
            )
    outside = [(e.t, f"eviction of {e.namespace}/{e.name}") for e in evictions]
    outside += [(line.t, line.raw) for line in ended]
    for t, what in outside:
        judged += 1
        if not any(term.start <= t <= term.end for term in terms):
            violations.append(Violation("an action while no replica held the Lease", t, what))
    return judged, violations


# --- status: noticed and recovered --------------------------------------------------------------


@dataclass(frozen=True)
class StatusSample:
    t: float
    budget: str
    ready: str | None  # "True:ProbeSucceeded", "False:DatabaseUnreachable", ...
    probe_time: float | None  # status.lastProbeTime


@dataclass(frozen=True)
class Fault:
    kind: str
    start: float
    end: float
    budgets: tuple[str, ...]  # the budgets whose status should tell
    notice: tuple[str, ...] = ()  # Ready reasons that count as noticed; empty: nothing to notice
    detail: str = ""
    holder: str | None = None  # the Lease holder a leader fault hit


@dataclass
class Outcome:
    fault: Fault
    noticed_after: float | None = None
    recovered_after: float | None = None
    violations: list[Violation] = field(default_factory=list)


def recovered_at(fault: Fault, samples: Sequence[StatusSample], budget: str) -> float | None:
    """When ``budget`` was first seen Ready after ``fault`` ended, on a probe made since the fault
    began and no older than any failed probe it showed since (None: not yet).

    A probe made after the fault's *end* is not required: the operator writes a status that only
    moves ``lastProbeTime`` once a minute (a heartbeat), so a fault the operator came through
    without a change (a leader replaced before the fault's end, a pause) shows no newer probe for
    up to a minute. ``lastProbeTime`` has whole seconds: the fault's start is cut to its second.
    """
    floor = float(math.floor(fault.start))
    for s in samples:
        if s.budget != budget or s.t < fault.start:
            continue
        if s.ready != "True:ProbeSucceeded":
            if s.probe_time is not None:
                floor = max(floor, s.probe_time)
            continue
        if s.t >= fault.end and s.probe_time is not None and s.probe_time >= floor:
            return s.t
    return None


def judge_fault(
    fault: Fault,
    samples: Sequence[StatusSample],
    *,
    notice_within: float,
    recover_within: float,
) -> Outcome:
    """When the fault showed in status, and when every budget it hit was probed and Ready again.

    Noticed: a Ready reason of ``fault.notice`` on one of its budgets within ``notice_within`` of
    its start (required only of faults that lasted that long). Recovered: each budget Ready=True
    after the fault ended, on a fresh probe (``recovered_at``), within ``recover_within`` of it.
    """
    out = Outcome(fault)
    if fault.notice:
        hits = [
            s.t
            for s in samples
            if s.budget in fault.budgets
            and fault.start <= s.t
            and s.ready is not None
            and s.ready.split(":", 1)[-1] in fault.notice
        ]
        first = min(hits, default=None)
        if first is not None and first - fault.start <= max(notice_within, fault.end - fault.start):
            out.noticed_after = first - fault.start
        if fault.end - fault.start >= notice_within and (
            out.noticed_after is None or out.noticed_after > notice_within
        ):
            out.violations.append(
                Violation(
                    "a fault not noticed in status in time",
                    fault.start,
                    f"{fault.kind} ({fault.detail}) {fault.start:.3f}-{fault.end:.3f}: "
                    f"{'|'.join(fault.notice)} first seen "
                    + (f"after {first - fault.start:.1f}s" if first is not None else "never"),
                )
            )
    back: list[float] = []
    for budget in fault.budgets:
        at = recovered_at(fault, samples, budget)
        if at is None or at - fault.end > recover_within:
            out.violations.append(
                Violation(
                    "a fault not recovered from in time",
                    fault.end,
                    f"{fault.kind} ({fault.detail}) ended {fault.end:.3f}: {budget} "
                    + (
                        f"Ready again after {at - fault.end:.1f}s"
                        if at is not None
                        else "never Ready"
                    ),
                )
            )
        else:
            back.append(at - fault.end)
    if back and len(back) == len(fault.budgets):
        out.recovered_after = max(back)
    return out


def growth_mb(samples: Sequence[tuple[float, float]], *, warmup: float) -> float | None:
    """RSS growth of one process: the median of its last fifth minus that of its first fifth
    after ``warmup`` seconds, in MB (None with too few samples)."""
    if not samples:
        return None
    t0 = samples[0][0] + warmup
    kept = [mb for t, mb in samples if t >= t0]
    if len(kept) < 10:
        return None
    n = max(2, len(kept) // 5)
    first, last = sorted(kept[:n]), sorted(kept[-n:])
    return last[len(last) // 2] - first[len(first) // 2]
