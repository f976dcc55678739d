"""Per-backend detail only for what changed: decoding grouped rows against the last sample's
backends (no database; the query itself runs against every PostgreSQL major in
``integration/test_pg_versions.py`` and ``integration/test_probe.py``)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from connbudget.probe import backends

HEAD = (1000.0, "app", 100, 3)


def row(
    app: str,
    state: str | None,
    pids: list[int],
    detail: dict[int, tuple[float, float]],
    *,
    hidden: int = 0,
) -> tuple[Any, ...]:
    """One group's row as ``queries.BACKEND_GROUPS`` returns it."""
    return (
        *HEAD,
        "app",
        "web",
        app,
        "10.0.0.1",
        state,
        len(pids),
        hidden,
        0.0,
        100.0,
        pids,
        list(detail) or None,
        [c for c, _ in detail.values()] or None,
        [s for _, s in detail.values()] or None,
    )


def test_the_first_sample_has_every_detail() -> None:
    rows = [row("web-1", "idle", [7, 8], {7: (990.0, 100.0), 8: (995.0, 200.0)})]
    out = backends.decode(rows, {})
    assert out is not None
    (g,) = out.sample.groups
    assert g.backends == ((7, 10.0, 100.0), (8, 5.0, 200.0))  # longest in its state first
    assert out.held == {7: (990.0, 100.0), 8: (995.0, 200.0)}
    since = backends.detail_since(out.sample)
    assert since is not None
    assert since.timestamp() == 1000.0 - backends.DETAIL_MARGIN_SECONDS
    assert backends.detail_since(None) is None


def test_unchanged_backends_keep_their_times_and_their_idle_age_grows() -> None:
    held = {7: (990.0, 100.0), 8: (995.0, 200.0), 9: (999.0, 300.0)}
    # 10 s later: 8 was used again (new detail), 9 ended, 11 is new, 7 is unchanged.
    later = (1010.0, "app", 100, 3)
    rows = [
        (*later, *row("web-1", "idle", [7, 8, 11], {8: (1008.0, 200.0), 11: (1009.0, 1009.0)})[4:])
    ]
    out = backends.decode(rows, held)
    assert out is not None
    (g,) = out.sample.groups
    assert g.backends == ((7, 20.0, 100.0), (8, 2.0, 200.0), (11, 1.0, 1009.0))
    assert set(out.held) == {7, 8, 11}  # 9 is forgotten


def test_a_backend_without_detail_that_is_not_held_asks_for_every_detail() -> None:
    rows = [row("web-1", "idle", [7, 8], {8: (995.0, 200.0)})]
    assert backends.decode(rows, {}) is None


def test_no_client_backend_is_an_empty_sample_with_the_servers_figures() -> None:
    out = backends.decode([(*HEAD, *([None] * 13))], {})
    assert out is not None
    assert out.sample.groups == ()
    assert (out.sample.max_connections, out.sample.reserved, out.sample.hidden) == (100, 3, 0)


def test_hidden_backends_are_counted() -> None:
    rows = [row("web-1", None, [7], {7: (1000.0, 1000.0)}, hidden=1)]
    out = backends.decode(rows, {})
    assert out is not None
    assert out.sample.hidden == 1


@given(
    pids=st.lists(st.integers(1, 10_000), min_size=1, max_size=40, unique=True),
    changed=st.data(),
)
def test_what_is_held_and_what_changed_decode_as_a_full_detail_would(
    pids: list[int], changed: st.DataObject
) -> None:
    """Whatever part of the backends comes in detail, the sample is the one a query asking
    every detail returns (the rest taken from what the last sample held)."""
    truth = {p: (900.0 + p % 97, float(p)) for p in pids}
    full = backends.decode([row("web-1", "idle", pids, truth)], {})
    part = changed.draw(st.sets(st.sampled_from(pids)))
    held = {p: t for p, t in truth.items() if p not in part}
    partial = backends.decode([row("web-1", "idle", pids, {p: truth[p] for p in part})], held)
    assert full is not None
    assert partial is not None
    assert partial.sample == full.sample
    assert partial.held == full.held


def test_the_monitor_asks_only_what_changed_and_everything_when_it_holds_too_little(
    monkeypatch: Any,
) -> None:
    """The second sample asks detail since the first's time; a reply naming a pid the monitor
    does not hold (as after it forgot its samples) is asked again with every detail."""
    import asyncio

    from connbudget.probe.postgres import Monitor

    asked: list[Any] = []
    replies = [
        [row("web-1", "idle", [7], {7: (990.0, 100.0)})],  # first: every detail
        [(1010.0, "app", 100, 3, *row("web-1", "idle", [7], {})[4:])],  # 7 unchanged
        [(1020.0, "app", 100, 3, *row("web-1", "idle", [7, 9], {})[4:])],  # 9 unknown
        [
            (
                1020.0,
                "app",
                100,
                3,
                *row("web-1", "idle", [7, 9], {7: (990.0, 100.0), 9: (1015.0, 1015.0)})[4:],
            )
        ],
    ]

    async def run_locked(query: Any, params: dict[str, Any] | None = None) -> Any:
        asked.append((params or {}).get("since"))
        return replies[len(asked) - 1]

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
