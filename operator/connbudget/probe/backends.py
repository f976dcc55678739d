"""Decoding the per-poll sample: every pid, with per-backend detail only for what changed.

``queries.BACKEND_SAMPLE`` returns the pid of every client backend, and the detail of a backend
(its group: database, user, application, address, state; when its state last changed, when it
started) only for backends new or changed since the last sample. ``decode`` puts the two together:
a backend without detail is the one the last sample held under that pid (it started before the
last sample, its state has not changed since, and so neither has its group), so it stays in the
group it was in, with the times held. The groups are built here, not by the server, and only the
groups a change touched are built again: a quiet server costs a comparison of two pid lists and,
per backend, its seconds in its state at the new ``now``. Pure: no I/O and no clock, so it is
tested without a server.

The figures of each group are the ones the server computed when it grouped: its count, hidden
backends, the oldest start, and the longest idle as
``date_part('epoch', now() - min(state_change))`` (``interval_epoch`` does that arithmetic on the
same microseconds). Groups come ordered by their key (database and user oids, application,
address, state), each group's backends longest in their state first (ties by pid).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connbudget.model.observations import BackendGroup, ServerSample

# Detail is asked for backends changed since this long before the last sample's time: a backend
# may publish a change stamped a moment before a snapshot that did not show it yet.
DETAIL_MARGIN_SECONDS = 1.0
USECS_PER_DAY = 86_400_000_000

# (datid, usesysid, application_name, client address, state): what the server grouped by
Key = tuple[int | None, int | None, str, str | None, str | None]
# (pid, when its state last changed, when it started), epoch seconds on the server's clock
Member = tuple[int, float, float]


@dataclass(frozen=True)
class Group:
    """A group's backends, sorted (longest in their state first), and what does not age."""

    members: tuple[Member, ...]
    first_change: int  # the earliest state change of its backends, microseconds
    first_start: float | None  # the earliest backend_start (None: no backend showed one)
    hidden: int


@dataclass(frozen=True)
class Held:
    """What a sample leaves for the next decode: every backend by pid, and the groups."""

    pids: Sequence[int] = ()  # as the server listed them (a quiet server lists the same again)
    keys: Mapping[int, Key] = field(default_factory=dict)
    groups: Mapping[Key, Group] = field(default_factory=dict)
    order: tuple[Key, ...] = ()  # the groups' keys, sorted


EMPTY = Held()


@dataclass(frozen=True)
class Decoded:
    sample: ServerSample
    held: Held  # what the next decode may reuse


def detail_since(last: ServerSample | None) -> dt.datetime | None:
    """The ``since`` parameter of the next query after ``last`` (None: every backend in detail)."""
    if last is None:
        return None
    return dt.datetime.fromtimestamp(last.sampled_at - DETAIL_MARGIN_SECONDS, dt.UTC)


def micros(epoch: float) -> int:
    """The whole microseconds of a timestamp given as its float8 epoch seconds (``date_part``).

    Exact: the float8's error is below a quarter of a microsecond for any date before 2100.
    """
    return round(epoch * 1e6)


def interval_epoch(diff: int) -> float:
    """``date_part('epoch', a - b)`` of two timestamps ``diff`` microseconds apart.

    As the server does it: the hours justified into days, the parts added up in float8.
    """
    if 0 <= diff < USECS_PER_DAY:
        return diff / 1e6  # no days: the server adds 0.0
    days = abs(diff) // USECS_PER_DAY
    if diff < 0:
        days = -days
    return (diff - days * USECS_PER_DAY) / 1e6 + 86400.0 * days


# Whether ``BackendGroup`` is a plain dataclass whose ``__init__`` only stores its fields.
_PLAIN = not hasattr(BackendGroup, "__slots__") and not hasattr(BackendGroup, "__post_init__")


def backend_group(values: dict[str, Any]) -> BackendGroup:
    """``BackendGroup(**values)`` (``values`` names every field), made without its frozen
    ``__init__``, which stores each field through ``object.__setattr__``: a third of a quiet poll's
    decoding at 100 groups. The same object either way (``test_backend_detail`` checks it)."""
    if not _PLAIN:
        return BackendGroup(**values)
    group: BackendGroup = object.__new__(BackendGroup)
    object.__setattr__(group, "__dict__", values)
    return group


def _sort_key(key: Key) -> tuple[int, int, str, str, str]:
    datid, usesysid, app, addr, state = key
    return (
        -1 if datid is None else datid,
        -1 if usesysid is None else usesysid,
        app,
        addr or "",
        state or "",
    )


def _group(members: list[Member], starts: Iterable[float | None], hidden: int) -> Group:
    members.sort(key=lambda m: (m[1], m[0]))  # earliest change first: longest in its state
    known = [s for s in starts if s is not None]
    return Group(
        members=tuple(members),
        first_change=micros(members[0][1]),
        first_start=min(known) if known else None,
        hidden=hidden,
    )


def decode(row: Sequence[Any], held: Held | None) -> Decoded | None:
    """The sample in ``row``, with backends without detail taken from ``held``.

    None when a backend without detail is not held (the last sample is not what the query
    assumed, such as after the monitor forgot it): the caller asks again for every detail.
    """
    now_s, database, max_conn, reserved, pids, detail, databases, roles = row
    now = float(now_s)
    pids = pids or []
    before = held or EMPTY
    # pid -> (key, changed, started, raw started, hidden) of every backend in detail
    fresh: dict[int, tuple[Key, float, float, float | None, bool]] = {}
    arrived: dict[Key, list[int]] = {}  # the pids in detail, by group
    for pid, datid, usesysid, app, addr, state, hid, changed, start in detail or ():
        key: Key = (datid, usesysid, app or "", addr, state)
        raw = None if start is None else float(start)
        fresh[int(pid)] = (key, float(changed), now if raw is None else raw, raw, bool(hid))
        arrived.setdefault(key, []).append(int(pid))
    keys = before.keys
    if pids == before.pids:
        ended: set[int] = set()
    else:
        current = set(pids)
        if not (current - keys.keys()) <= fresh.keys():
            return None  # a backend without detail that the last sample did not hold
        ended = keys.keys() - current
    groups = before.groups
    order = before.order
    datnames: dict[int | None, str] = dict(databases or ())
    rolnames: dict[int | None, str] = dict(roles or ())
    if ended or fresh:
        touched = ended | fresh.keys()
        affected = {keys[p] for p in touched if p in keys}
        affected.update(arrived)
        keys = {p: k for p, k in keys.items() if p not in ended} if ended else dict(keys)
        keys.update((p, f[0]) for p, f in fresh.items())
        groups = dict(groups)
        for k in affected:
            old = groups.pop(k, None)
            kept = [m for m in old.members if m[0] not in touched] if old is not None else []
            # a kept backend's raw start is its start: only detail has NULL starts
            starts: list[float | None] = [m[2] for m in kept]
            hidden = 0  # hidden backends always come in detail: every one is in ``fresh``
            for p in arrived.get(k, ()):
                _, changed, started, start, hid = fresh[p]
                kept.append((p, changed, started))
                starts.append(start)
                hidden += hid
            if kept:
                groups[k] = _group(kept, starts, hidden)
        if groups.keys() != set(order):
            order = tuple(sorted(groups, key=_sort_key))
    out: list[BackendGroup] = []
    hidden_total = 0
    now_us = micros(now)
    for k in order:
        g = groups[k]
        datid, usesysid, app, addr, state = k
        if state == "idle":
            idle_for = now_us - g.first_change
            max_idle = idle_for / 1e6 if 0 <= idle_for < USECS_PER_DAY else interval_epoch(idle_for)
        else:
            max_idle = 0.0
        out.append(
            backend_group(
                {
                    "database": datnames.get(datid),
                    "user": rolnames.get(usesysid),
                    "application_name": app,
                    "client_addr": addr,
                    "state": state,
                    "count": len(g.members),
                    "max_idle_seconds": max_idle,
                    "oldest_backend_start": now if g.first_start is None else g.first_start,
                    "backends": tuple([(p, now - c, s) for p, c, s in g.members]),
                }
            )
        )
        hidden_total += g.hidden
    sample = ServerSample(
        sampled_at=now,
        database=str(database),
        max_connections=int(max_conn),
        reserved=int(reserved),
        groups=tuple(out),
        hidden=hidden_total,
    )
    return Decoded(sample=sample, held=Held(pids=pids, keys=keys, groups=groups, order=order))
