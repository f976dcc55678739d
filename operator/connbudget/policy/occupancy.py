"""How many connections each pod of a governed workload holds: a high percentile and the peak.

Pure: no I/O, no clock; all inputs are arguments.

Budget admission (``policy.admission``) multiplies a workload's pods by the connections one pod
may open. Where the workload declares no figure (the ``connbudget.io/connections-per-pod``
annotation), the figure it has been seen to hold stands in: per owner, the 95th percentile of
its pods' busiest minute, and the peak, over the last hour. The percentile leaves out the odd
pod caught in a warm-up burst; the peak says how far one went. Pods of the owner that hold no
connection count as zero: a worker pool whose pods are mostly idle has a low percentile, and its
peak still shows what one busy pod holds.

Memory is a minute's maximum per pod, for an hour: with a poll a second, keeping every poll would
cost sixty times as much and change no figure but the percentile's rank. What is remembered is
lost with the operator's memory (a restart, a change of leader); the status keeps the last
figures, and an hour after a restart they are whole again.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from connbudget.model.observations import PodInfo
from connbudget.policy.attribution import Attributed, Via

# An hour covers a workload's warm-up after a rollout and its traffic's usual swings within
# memory that an operator restart loses anyway (seconds).
WINDOW_SECONDS = 3600
# A pod's count is kept as its maximum per minute (seconds): sixty per hour per pod.
BUCKET_SECONDS = 60
# The percentile reported beside the peak: high enough to be what a pod needs, low enough that
# one pod's warm-up burst is not it.
PERCENTILE = 95


@dataclass(frozen=True, kw_only=True)
class PerPodFigures:
    """One owner's connections per pod over the window."""

    p95: int  # the PERCENTILE-th percentile of its pods' per-minute maxima
    peak: int  # the most one of its pods held at any poll


def percentile(values: Sequence[int], q: float) -> int:
    """Return the ``q``-th percentile of ``values`` by nearest rank (0 for no values).

    Nearest rank always returns a value that was seen, never an interpolation between two.
    """
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def pod_counts(
    *, governed: Iterable[PodInfo], attributed: Iterable[Attributed]
) -> dict[str, dict[str, int]]:
    """Owner → pod → its direct backends now; every governed pod is there, zero if it holds none.

    Clients through a pooler are left out: their server connections are the pooler's.
    """
    out: dict[str, dict[str, int]] = {}
    for pod in governed:
        out.setdefault(pod.owner, {})[pod.name] = 0
    for a in attributed:
        if a.pod is None or a.via is Via.POOLER:
            continue
        pods = out.setdefault(a.pod.owner, {})
        pods[a.pod.name] = pods.get(a.pod.name, 0) + a.group.count
    return out


@dataclass
class _Minute:
    index: int  # seconds since the epoch // BUCKET_SECONDS
    by_pod: dict[str, int] = field(default_factory=dict)


@dataclass
class Occupancy:
    """Per owner, the most connections each of its pods held in each minute of the window."""

    _minutes: dict[str, collections.deque[_Minute]] = field(default_factory=dict)

    def observe(self, *, at: float, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Take one poll's counts (owner → pod → connections, as ``pod_counts`` gives them)."""
        index = int(at // BUCKET_SECONDS)
        for owner, pods in counts.items():
            minutes = self._minutes.setdefault(owner, collections.deque())
            if not minutes or minutes[-1].index != index:
                minutes.append(_Minute(index=index))
            last = minutes[-1].by_pod
            for pod, n in pods.items():
                last[pod] = max(last.get(pod, 0), n)
        self._forget(at)

    def figures(self, *, at: float) -> dict[str, PerPodFigures]:
        """Each owner seen within the window: its percentile and peak connections per pod."""
        self._forget(at)
        out: dict[str, PerPodFigures] = {}
        for owner, minutes in self._minutes.items():
            values = [n for m in minutes for n in m.by_pod.values()]
            out[owner] = PerPodFigures(p95=percentile(values, PERCENTILE), peak=max(values))
        return out

    def _forget(self, at: float) -> None:
        oldest = int((at - WINDOW_SECONDS) // BUCKET_SECONDS)
        for owner in list(self._minutes):
            minutes = self._minutes[owner]
            while minutes and minutes[0].index <= oldest:
                minutes.popleft()
            if not minutes or not any(m.by_pod for m in minutes):
                del self._minutes[owner]


def find_pods_above(counts: Mapping[str, int], *, declared: int) -> list[str]:
    """The pods holding more connections than their workload declares, most first.

    A declared figure is what budget admission counts a pod at: a pod above it means the check
    under-counted the workload, and the breach it was meant to prevent can still happen.
    """
    above = [(n, pod) for pod, n in counts.items() if n > declared]
    return [pod for _, pod in sorted(above, key=lambda x: (-x[0], x[1]))]
