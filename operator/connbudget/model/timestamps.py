"""Timestamps as the operator's sources write them, read into epoch seconds.

Pure: no I/O, no clock; all inputs are arguments. One parser serves every source, so that a
format one of them starts to send (an offset, more fractional digits) is read the same way
everywhere:

- the Kubernetes API (``creationTimestamp``, ``startTime``: RFC 3339 with ``Z``), and the
  Kubernetes client's ``datetime`` objects (a Lease's ``acquireTime``, a ``MicroTime``);
- the operator's own status (``breachSince``, ``cooldownUntil``: RFC 3339 with ``Z``, whole
  seconds or milliseconds);
- PgBouncer's admin console (``connect_time``, ``request_time``: ``2026-11-25 01:16:58 UTC``), or
  a ``datetime`` when the driver converts the column.
"""

from __future__ import annotations

import datetime as dt

# How PgBouncer prints a time in SHOW CLIENTS; its zone is always UTC.
PGBOUNCER_FORMAT = "%Y-%m-%d %H:%M:%S %Z"


def parse_timestamp(value: object) -> float | None:
    """Read a timestamp into seconds since the epoch.

    Accepts a ``datetime``; an ISO 8601 / RFC 3339 string, with ``Z`` or an offset and with any
    number of fractional digits (beyond microseconds they are cut); and PgBouncer's
    ``YYYY-MM-DD HH:MM:SS UTC``. A time without zone is read as ``datetime`` reads it (local time):
    none of the sources above writes one.

    Args:
        value: what the source gave, of any type.

    Returns:
        Epoch seconds, or None when ``value`` is empty, not a time, or in no format above: every
        caller treats an unreadable time as absent, never as an error.
    """
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        pass
    try:
        t = dt.datetime.strptime(value, PGBOUNCER_FORMAT)
    except ValueError:
        return None
    return t.replace(tzinfo=dt.UTC).timestamp()
