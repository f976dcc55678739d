"""Decoding the per-poll sample: grouped rows, with per-backend detail only for what changed.

``queries.BACKEND_GROUPS`` returns every group's pids, and the times of a backend (when its state
last changed, when it started) only for backends new or changed since the last sample. ``decode``
puts the two together: a backend without detail is the one the last sample held under that pid
(it started before the last sample, and nothing about it changed since), so its times are those
held. Pure: no I/O and no clock, so it is tested without a server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, cast

from connbudget.model.observations import BackendGroup, ServerSample

# Detail is asked for backends changed since this long before the last sample's time: a backend
# may publish a change stamped a moment before a snapshot that did not show it yet.
DETAIL_MARGIN_SECONDS = 1.0

# (when its state last changed, when it started), epoch seconds on the server's clock
Times = tuple[float, float]
_IN_STATE = itemgetter(1)


@dataclass(frozen=True)
class Decoded:
    sample: ServerSample
    held: dict[int, Times]  # every backend of the sample, by pid: what the next decode may reuse


def detail_since(last: ServerSample | None) -> dt.datetime | None:
    """The ``since`` parameter of the next query after ``last`` (None: every backend in detail)."""
    if last is None:
        return None
    return dt.datetime.fromtimestamp(last.sampled_at - DETAIL_MARGIN_SECONDS, dt.UTC)


def decode(rows: Sequence[Sequence[Any]], held: Mapping[int, Times]) -> Decoded | None:
    """The sample in ``rows``, with the times of backends without detail taken from ``held``.

    None when a backend without detail is not held (the last sample is not what the query
    assumed, such as after the monitor forgot it): the caller asks again for every detail.
    """
    now_s, database, max_conn, reserved = rows[0][:4]
    now = float(now_s)
    groups: list[BackendGroup] = []
    out: dict[int, Times] = {}
    hidden = 0
    for row in rows:
        (datname, user, app, addr, state, n, hid, max_idle, oldest) = row[4:13]
        pids, detail_pids, detail_changed, detail_started = row[13:17]
        if n is None:
            continue  # the one row there is when no client backend is open
        pids = pids or []
        if detail_pids:
            fresh = dict(
                zip(detail_pids, zip(detail_changed, detail_started, strict=True), strict=True)
            )
            times = [fresh.get(pid) or held.get(pid) for pid in pids]
        else:  # nothing of the group changed since the last sample (the usual case)
            times = [held.get(pid) for pid in pids]
        if None in times:
            return None
        known = cast(list[Times], times)
        out.update(zip(pids, known, strict=True))
        # Longest in its state first (a stable sort: ties keep the server's order).
        backends = sorted(
            (
                (pid, now - changed, started)
                for pid, (changed, started) in zip(pids, known, strict=True)
            ),
            key=_IN_STATE,
            reverse=True,
        )
        groups.append(
            BackendGroup(
                database=datname,
                user=user,
                application_name=app or "",
                client_addr=addr,
                state=state,
                count=int(n),
                max_idle_seconds=float(max_idle or 0.0),
                oldest_backend_start=float(oldest),
                backends=tuple(backends),
            )
        )
        hidden += int(hid or 0)
    sample = ServerSample(
        sampled_at=now,
        database=str(database),
        max_connections=int(max_conn),
        reserved=int(reserved),
        groups=tuple(groups),
        hidden=hidden,
    )
    return Decoded(sample=sample, held=out)
