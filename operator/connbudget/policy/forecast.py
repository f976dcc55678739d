"""How soon will the server be full? A least-squares slope over the recent samples.

Pure: no I/O, no clock; all inputs are arguments.

Why: a fast leak (a Django app under ASGI, measured at about 100 slots in 15 s) fills the server
before a fixed breach window has passed. The slope of the last few samples tells when the usable
slots run out, so the plan can act at once instead of waiting out ``breachSeconds``.
"""

from __future__ import annotations

from collections.abc import Sequence

FORECAST_WINDOW_SECONDS = 30.0  # samples older than this say little about the current leak rate
MIN_SPAN_SECONDS = 1.0  # two samples closer than this give no usable slope


def growth_rate(history: Sequence[tuple[float, int]]) -> float | None:
    """Connections per second over ``history`` (``(time, server_total)``), or None if unknown."""
    if len(history) < 2:
        return None
    latest = history[-1][0]
    pts = [(t, n) for t, n in history if latest - t <= FORECAST_WINDOW_SECONDS]
    if len(pts) < 2 or pts[-1][0] - pts[0][0] < MIN_SPAN_SECONDS:
        return None
    mean_t = sum(t for t, _ in pts) / len(pts)
    mean_n = sum(n for _, n in pts) / len(pts)
    var = sum((t - mean_t) ** 2 for t, _ in pts)
    if var == 0:
        return None
    return sum((t - mean_t) * (n - mean_n) for t, n in pts) / var


def seconds_to_full(
    *, history: Sequence[tuple[float, int]], usable_slots: int, current: int | None = None
) -> float | None:
    """Seconds until ``usable_slots`` are taken at the recent growth rate; None if not growing.

    ``history`` may count back what the operator itself removed (so its own terminations do not
    look like a slowing leak); ``current`` is then what the server holds now (default: the last
    point of ``history``).
    """
    rate = growth_rate(history)
    if rate is None or rate <= 0 or not history:
        return None
    free = usable_slots - (history[-1][1] if current is None else current)
    return max(free, 0) / rate
