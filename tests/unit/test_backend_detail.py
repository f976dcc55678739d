"""Per-backend detail only for what changed: decoding the sample's row against the last sample's
backends and groups (no database; the query itself runs against every PostgreSQL major in
``integration/test_probe_sample.py``, ``integration/test_pg_versions.py`` and
``integration/test_probe.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connbudget.model.observations import BackendGroup
from connbudget.probe import backends
from connbudget.probe.postgres import Monitor

NOW = 1000.0
DATABASES = [[5, "app"], [6, "other"]]
ROLES = [[10, "web"], [11, "batch"]]

# (datid, usesysid, application_name, client address, state)
WEB_IDLE = (5, 10, "web-1", "10.0.0.1", "idle")
WEB_BUSY = (5, 10, "web-1", "10.0.0.1", "active")


def detail(
    pid: int, key: tuple[Any, ...], changed: float, start: float | None, *, hidden: bool = False
) -> list[Any]:
    """One backend's detail as ``queries.BACKEND_SAMPLE`` returns it (a json array)."""
    return [pid, *key, hidden, changed, start]


def row(pids: list[int], details: list[list[Any]], *, now: float = NOW) -> tuple[Any, ...]:
    """The one row of ``queries.BACKEND_SAMPLE``."""
    return (now, "app", 100, 3, pids or None, details or None, DATABASES, ROLES)


def test_the_first_sample_has_every_detail_and_groups_as_the_server_did() -> None:
    out = backends.decode(
        row(
            [7, 8, 9],
            [
                detail(7, WEB_IDLE, 990.0, 100.0),
                detail(8, WEB_IDLE, 995.0, 200.0),
                detail(9, WEB_BUSY, 999.5, 50.0),
            ],
        ),
        None,
    )
    assert out is not None
    busy, idle = out.sample.groups  # ordered by key: "active" before "idle"
    assert (busy.state, idle.state) == ("active", "idle")
    assert (idle.database, idle.user, idle.application_name, idle.client_addr) == (
        "app",
        "web",
        "web-1",
        "10.0.0.1",
    )
    assert idle.backends == ((7, 10.0, 100.0), (8, 5.0, 200.0))  # longest in its state first
    assert (idle.count, idle.max_idle_seconds, idle.oldest_backend_start) == (2, 10.0, 100.0)
    assert (busy.count, busy.max_idle_seconds, busy.oldest_backend_start) == (1, 0.0, 50.0)
    since = backends.detail_since(out.sample)
    assert since is not None
    assert since.timestamp() == NOW - backends.DETAIL_MARGIN_SECONDS
    assert backends.detail_since(None) is None


def test_unchanged_backends_keep_their_group_and_times_and_their_idle_age_grows() -> None:
    first = backends.decode(
        row(
            [7, 8, 9],
            [
                detail(7, WEB_IDLE, 990.0, 100.0),
                detail(8, WEB_IDLE, 995.0, 200.0),
                detail(9, WEB_IDLE, 999.0, 300.0),
            ],
        ),
        None,
    )
    assert first is not None
    # 10 s later: 8 was used again (new detail), 9 ended, 11 is new, 7 is unchanged.
    later = row(
        [7, 8, 11],
        [detail(8, WEB_IDLE, 1008.0, 200.0), detail(11, WEB_IDLE, 1009.0, 1009.0)],
        now=1010.0,
    )
    out = backends.decode(later, first.held)
    assert out is not None
    (g,) = out.sample.groups
    assert g.backends == ((7, 20.0, 100.0), (8, 2.0, 200.0), (11, 1.0, 1009.0))
    assert (g.count, g.max_idle_seconds, g.oldest_backend_start) == (3, 20.0, 100.0)
    assert set(out.held.keys) == {7, 8, 11}  # 9 is forgotten


def test_a_group_whose_members_changed_with_the_same_count_is_noticed() -> None:
    first = backends.decode(
        row([7, 8], [detail(7, WEB_IDLE, 990.0, 100.0), detail(8, WEB_IDLE, 995.0, 200.0)]),
        None,
    )
    assert first is not None
    # 8 ended and 12 opened in its place: the group still has two backends.
    out = backends.decode(
        row([7, 12], [detail(12, WEB_IDLE, 1004.0, 1003.0)], now=1005.0), first.held
    )
    assert out is not None
    (g,) = out.sample.groups
    assert [pid for pid, _, _ in g.backends] == [7, 12]
    assert g.count == 2


def test_a_backend_that_moved_leaves_its_old_group() -> None:
    first = backends.decode(
        row([7, 8], [detail(7, WEB_IDLE, 990.0, 100.0), detail(8, WEB_IDLE, 995.0, 200.0)]),
        None,
    )
    assert first is not None
    out = backends.decode(row([7, 8], [detail(8, WEB_BUSY, 1001.0, 200.0)]), first.held)
    assert out is not None
    busy, idle = out.sample.groups
    assert [b[0] for b in busy.backends] == [8]
    assert [b[0] for b in idle.backends] == [7]


def test_a_backend_without_detail_that_is_not_held_asks_for_every_detail() -> None:
    assert backends.decode(row([7, 8], [detail(8, WEB_IDLE, 995.0, 200.0)]), None) is None


def test_no_client_backend_is_an_empty_sample_with_the_servers_figures() -> None:
    out = backends.decode((NOW, "app", 100, 3, None, None, None, None), None)
    assert out is not None
    assert out.sample.groups == ()
    assert (out.sample.max_connections, out.sample.reserved, out.sample.hidden) == (100, 3, 0)


def test_hidden_backends_are_counted_and_start_at_now_without_a_start() -> None:
    key = (5, 11, "batch", None, None)
    out = backends.decode(
        row(
            [7, 8], [detail(7, key, NOW, None, hidden=True), detail(8, key, NOW, None, hidden=True)]
        ),
        None,
    )
    assert out is not None
    (g,) = out.sample.groups
    assert (out.sample.hidden, g.count, g.oldest_backend_start) == (2, 2, NOW)
    assert g.backends == ((7, 0.0, NOW), (8, 0.0, NOW))
    # Hidden backends always come in detail: the next sample counts them again, not twice.
    again = backends.decode(
        row(
            [7, 8],
            [detail(7, key, 1001.0, None, hidden=True), detail(8, key, 1001.0, None, hidden=True)],
            now=1001.0,
        ),
        out.held,
    )
    assert again is not None
    assert again.sample.hidden == 2


def test_a_name_is_the_one_the_server_gives_now() -> None:
    first = backends.decode(row([7], [detail(7, WEB_IDLE, 990.0, 100.0)]), None)
    assert first is not None
    renamed = (NOW + 1, "app", 100, 3, [7], None, DATABASES, [[10, "web-renamed"]])
    out = backends.decode(renamed, first.held)
    assert out is not None
    assert out.sample.groups[0].user == "web-renamed"


@pytest.mark.parametrize(
    ("micros", "expected"),
    [
        (0, 0.0),
        (1, 1e-6),
        (86_399_999_999, 86_399.999999),
        (86_400_000_000, 86_400.0),
        (3 * 86_400_000_000 + 7, 7 / 1e6 + 86400.0 * 3),
        (-5, -5e-6),
        (-(2 * 86_400_000_000 + 3), -3 / 1e6 - 86400.0 * 2),
    ],
)
def test_interval_epoch_adds_the_justified_parts_as_the_server_does(
    micros: int, expected: float
) -> None:
    assert backends.interval_epoch(micros) == expected


def test_the_fast_backend_group_is_the_constructors() -> None:
    values: dict[str, Any] = {
        "database": "app",
        "user": "web",
        "application_name": "web-1",
        "client_addr": None,
        "state": "idle",
        "count": 1,
        "max_idle_seconds": 1.5,
        "oldest_backend_start": 10.0,
        "backends": ((7, 1.5, 10.0),),
    }
    assert set(values) == {f.name for f in dataclasses.fields(BackendGroup)}
    made = backends.backend_group(dict(values))
    assert made == BackendGroup(**values)
    assert hash(made) == hash(BackendGroup(**values))
    assert made.idle == ((7, 1.5, 10.0),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.count = 2  # type: ignore[misc]


# --- incremental decoding equals decoding every detail ------------------------------------------

KEYS = [
    WEB_IDLE,
    WEB_BUSY,
    (5, 10, "web-2", "10.0.0.2", "idle"),
    (5, 11, "batch", None, "idle in transaction"),
    (6, 10, "", "10.0.0.1", "idle"),
]


@st.composite
def servers(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A few successive server states: pid -> (key, state_change, backend_start); each state
    follows the last by ending, opening and moving backends (a move changes state_change)."""
    states: list[dict[str, Any]] = []
    now, next_pid = NOW, 100
    current: dict[int, tuple[Any, ...]] = {}
    for _ in range(draw(st.integers(1, 5))):
        now += draw(st.floats(1.5, 30.0))
        for pid in draw(st.lists(st.sampled_from(sorted(current)), unique=True)) if current else []:
            del current[pid]  # ended
        for pid in draw(st.lists(st.sampled_from(sorted(current)), unique=True)) if current else []:
            start = current[pid][2]
            current[pid] = (draw(st.sampled_from(KEYS)), now - draw(st.floats(0, 0.9)), start)
        for _ in range(draw(st.integers(0, 6))):
            # a new backend, sometimes reusing the pid of one that ended
            pid = draw(st.integers(1, 12)) if draw(st.booleans()) else next_pid
            next_pid += 1
            if pid in current:
                continue
            start = now - draw(st.floats(0, 0.9))
            current[pid] = (draw(st.sampled_from(KEYS)), start + draw(st.floats(0, 0.05)), start)
        states.append({"now": now, "backends": dict(current)})
    return states


def query_row(state: dict[Any, Any], since: float | None) -> tuple[Any, ...]:
    """What the server returns for ``state`` given ``since`` (None: every detail)."""
    order = sorted(state["backends"])
    details = [
        detail(pid, key, changed, start)
        for pid, (key, changed, start) in sorted(state["backends"].items())
        if since is None or changed > since or start > since
    ]
    return row(order, details, now=state["now"])


@settings(max_examples=200, deadline=None)
@given(states=servers())
def test_what_is_held_and_what_changed_decode_as_a_full_detail_would(
    states: list[dict[Any, Any]],
) -> None:
    """Whatever came before, the sample is the one a query asking every detail returns: the same
    groups, members, times and figures (the rest taken from what the last sample held)."""
    held: backends.Held | None = None
    last = None
    for state in states:
        since = None if last is None else last.sampled_at - backends.DETAIL_MARGIN_SECONDS
        part = backends.decode(query_row(state, since), held)
        full = backends.decode(query_row(state, None), None)
        assert full is not None
        assert part is not None
        assert part.sample == full.sample
        assert part.held.keys == full.held.keys
        assert part.held.groups == full.held.groups
        held, last = part.held, part.sample


def test_the_monitor_asks_only_what_changed_and_everything_when_it_holds_too_little(
    monkeypatch: Any,
) -> None:
    """The second sample asks detail since the first's time; a reply naming a pid the monitor
    does not hold (as after it forgot its samples) is asked again with every detail."""
    asked: list[Any] = []
    replies = [
        row([7], [detail(7, WEB_IDLE, 990.0, 100.0)]),  # first: every detail
        row([7], [], now=1010.0),  # 7 unchanged
        row([7, 9], [], now=1020.0),  # 9 unknown
        row(
            [7, 9],
            [detail(7, WEB_IDLE, 990.0, 100.0), detail(9, WEB_IDLE, 1015.0, 1015.0)],
            now=1020.0,
        ),
    ]

    async def run_locked(query: Any, params: dict[str, Any] | None = None) -> Any:
        asked.append((params or {}).get("since"))
        return [replies[len(asked) - 1]]

    m = Monitor("postgresql://mon:secret@db:5432/app")
    monkeypatch.setattr(m, "_run_locked", run_locked)

    async def main() -> list[Any]:
        return [await m.sample(), await m.sample(), await m.sample()]

    first, second, third = asyncio.run(main())
    assert first.groups[0].backends == ((7, 10.0, 100.0),)
    epochs = [None if a is None else a.timestamp() for a in asked]
    assert epochs == [None, 1000.0 - backends.DETAIL_MARGIN_SECONDS, 1010.0 - 1.0, None]
    assert second.groups[0].backends == ((7, 20.0, 100.0),)
    assert third.groups[0].backends == ((7, 30.0, 100.0), (9, 5.0, 1015.0))
