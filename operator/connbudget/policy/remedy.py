"""What a remedy did: container restarts that follow the operator's own terminations.

Pure: no I/O, no clock; every time is an argument.

Why: some client libraries die when the server closes a connection under them (node-postgres
emits ``error`` on an idle client, and a process with no listener exits). Terminating such an
app's leaked connections holds the database by crash-looping the app: measured with a
node-postgres leak of about 5 connections a second over 2 pods, 28 container restarts in 180 s
and the app serving 35 % of the time (``idle_session_timeout = 10s``: 19 restarts, 61 %). So the
operator watches the pods whose connections it terminated: when their containers restart within
``CRASH_WINDOW_SECONDS`` of a termination, ``CRASHES_TO_CONCLUDE`` times, the owner *dies on
termination*: its connections are no longer terminated, its pods are restarted gracefully through
the Eviction API when the budget needs room instead, and the status and an Event say so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from connbudget.model.observations import PodInfo

# A container restart this soon after the operator terminated its pod's connections follows
# from it (a process that exits on an unhandled error restarts within seconds).
CRASH_WINDOW_SECONDS = 30.0
# ... this many times within REMEMBER_SECONDS: the remedy crashes the app (one restart may be
# the app's own).
CRASHES_TO_CONCLUDE = 2
# What was concluded holds this long (a fix rolled out makes new pods; the verdict is tried
# again afterwards).
REMEMBER_SECONDS = 1800.0


class RemedyWatch:
    """The pods whose connections were terminated, their restart counts, and the owners whose
    pods restart when their connections are terminated."""

    def __init__(self) -> None:
        self._terminated: dict[str, float] = {}  # pod -> when its connections were last ended
        self._restarts: dict[str, int] = {}  # pod -> restartCount last seen
        self._crashes: dict[str, deque[float]] = {}  # owner -> restarts after a termination
        self._dies: dict[str, float] = {}  # owner -> until when it dies on termination

    def terminated(self, pods: Iterable[str], *, at: float) -> None:
        """The operator terminated connections of ``pods`` at ``at``."""
        for pod in pods:
            self._terminated[pod] = at

    def observe(self, pods: Sequence[PodInfo], *, at: float) -> tuple[str, ...]:
        """Take the governed pods' restart counts at ``at``; return the owners this observation
        concludes die on termination (each once, when concluded)."""
        concluded: list[str] = []
        seen: set[str] = set()
        for pod in pods:
            seen.add(pod.name)
            before = self._restarts.get(pod.name)
            self._restarts[pod.name] = pod.restarts
            ended = self._terminated.get(pod.name)
            if before is None or pod.restarts <= before or ended is None:
                continue
            if at - ended > CRASH_WINDOW_SECONDS:
                continue
            crashes = self._crashes.setdefault(pod.owner, deque())
            crashes.append(at)
            while crashes and crashes[0] < at - REMEMBER_SECONDS:
                crashes.popleft()
            if len(crashes) >= CRASHES_TO_CONCLUDE and pod.owner not in self._dies:
                concluded.append(pod.owner)
            if len(crashes) >= CRASHES_TO_CONCLUDE:
                self._dies[pod.owner] = at + REMEMBER_SECONDS
        for gone in set(self._restarts) - seen:
            del self._restarts[gone]
            self._terminated.pop(gone, None)
        for owner, until in list(self._dies.items()):
            if until < at:
                del self._dies[owner]
                self._crashes.pop(owner, None)
        return tuple(sorted(concluded))

    def dies_on_termination(self) -> frozenset[str]:
        """The owners whose pods restart when their connections are terminated."""
        return frozenset(self._dies)
