"""What every budget of this replica did lately, so budgets whose selectors overlap do not each
act on the same backends and pods.

Pure: no I/O, no clock; every time is an argument.

Why: two ConnectionBudgets may govern the same pods (one per database and one for the whole
server, or a team's budget inside a platform's). Each decided alone from the same sample: both
terminated as many backends as their own usage needed (twice what either needed, the second
finding half of its choice gone) and each restarted pods with its own cooldown (two evictions of
one workload per cooldown, where one was allowed). The ledger is shared by the budgets of a
replica: a backend another budget terminated moments ago is not chosen again and counts as
already removed, and a workload another budget restarted waits out that budget's cooldown.
"""

from __future__ import annotations

from collections.abc import Iterable

# A termination is remembered this long: longer than a fast poll, so a budget due at the same
# slot or the next sees it, and no longer (a pid is reused only with another backend_start).
TERMINATED_KEEP_SECONDS = 10.0


class Ledger:
    """Backends terminated and workloads restarted by any budget, lately."""

    def __init__(self) -> None:
        self._terminated: dict[tuple[int, float], float] = {}  # (pid, start) -> when
        self._restarted: dict[str, tuple[float, str]] = {}  # owner -> (until, by which budget)

    def terminated(self, backends: Iterable[tuple[int, float]], *, at: float) -> None:
        for key in backends:
            self._terminated[key] = at

    def restarted(self, owner: str, *, until: float, by: str) -> None:
        """``by`` (a budget) restarted pods of ``owner``: others wait until ``until``."""
        self._restarted[owner] = (until, by)

    def recently_terminated(self, *, at: float) -> frozenset[tuple[int, float]]:
        for key, when in list(self._terminated.items()):
            if when < at - TERMINATED_KEEP_SECONDS:
                del self._terminated[key]
        return frozenset(self._terminated)

    def restarts_held(self, *, at: float, me: str) -> dict[str, float]:
        """The owners another budget than ``me`` restarted, and until when they wait."""
        for owner, (until, _) in list(self._restarted.items()):
            if until <= at:
                del self._restarted[owner]
        return {owner: until for owner, (until, by) in self._restarted.items() if by != me}
