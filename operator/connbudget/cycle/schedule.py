"""When a budget probes: the poll grid every budget of a database shares.

Slots are whole multiples of the poll interval since the epoch. Budgets that poll alike are due
at the same slots, whenever each was created, so a database is sampled once per slot for all of
them (``Monitor.sample(not_before=slot)``), not once per budget at its own moment.
"""

from __future__ import annotations

import math

from connbudget.cycle.deps import Runtime
from connbudget.model.spec import BudgetSpec

PACING_SLACK_SECONDS = 0.05  # a wake-up this early still counts as on time

# Workers sleep this much past their slot (see seconds_to_next_cycle).
WAKE_MARGIN_SECONDS = 0.02

SLOT_EPSILON = 1e-9  # a time that is a slot but for float rounding is that slot


def next_slot(last: float, poll_seconds: float) -> float:
    """The first slot of the poll grid after ``last``.

    Slots are whole multiples of the poll interval since the epoch: every budget of a database
    that polls alike is due at the same slots, and they share one sample (``Monitor.sample``
    with ``not_before`` the slot), however many they are and whenever each was created. At most
    a poll after ``last``; exactly a poll after it when ``last`` is itself a slot (a budget's
    first probe, made at once, is off the grid; the next one is on it).
    """
    return (math.floor(last / poll_seconds + SLOT_EPSILON) + 1) * poll_seconds


def slot_at(now: float, poll_seconds: float) -> float:
    """The slot a probe due at ``now`` belongs to: the latest one not after ``now`` (counting
    a wake-up ``PACING_SLACK_SECONDS`` early as on time)."""
    return math.floor((now + PACING_SLACK_SECONDS) / poll_seconds + SLOT_EPSILON) * poll_seconds


def is_probe_due(*, last_probe_at: float | None, poll_seconds: float, now: float) -> bool:
    """Tell whether a budget last probed for the slot ``last_probe_at`` is due again at ``now``."""
    return (
        last_probe_at is None
        or now >= next_slot(last_probe_at, poll_seconds) - PACING_SLACK_SECONDS
    )


def seconds_to_next_cycle(runtime: Runtime, now: float, *, tick: float) -> float:
    """How long a budget's worker may sleep: until its next slot.

    A little past it (``WAKE_MARGIN_SECONDS``): the loop's timer and the wall clock (NTP may slew
    it) must not make it wake before the slot. A budget whose spec is not parsed yet, or that must
    probe again at once, wakes after one ``tick``.
    """
    if runtime.last_probe_at is None or runtime.parsed is None:
        return tick
    due = next_slot(runtime.last_probe_at, cadence(runtime, runtime.parsed[1]))
    return max(0.0, due - now + WAKE_MARGIN_SECONDS)


def cadence(runtime: Runtime, spec: BudgetSpec) -> float:
    """The current cadence: the last decision's (faster while it matters), else pollSeconds."""
    if runtime.next_poll_seconds is None:
        return float(spec.poll_seconds)
    return min(runtime.next_poll_seconds, float(spec.poll_seconds))
