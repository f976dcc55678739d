"""One timestamp parser for the Kubernetes API, the Lease client, the status and PgBouncer."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from connbudget.model.timestamps import parse_timestamp
from connbudget.report.status import rfc3339, rfc3339_ms

# 2026-11-25 01:16:58 UTC
T = dt.datetime(2026, 11, 25, 1, 16, 58, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("2026-11-25T01:16:58Z", T, id="kubernetes-rfc3339-z"),
        pytest.param("2026-11-25T01:16:58.250Z", T + 0.25, id="status-milliseconds"),
        pytest.param("2026-11-25T01:16:58.250000Z", T + 0.25, id="lease-microtime"),
        pytest.param("2026-11-25T01:16:58.250000999Z", T + 0.25, id="nanoseconds-cut"),
        pytest.param("2026-11-25T03:16:58+02:00", T, id="positive-offset"),
        pytest.param("2026-11-24T20:16:58.5-05:00", T + 0.5, id="negative-offset-fraction"),
        pytest.param("2026-11-25T01:16:58+00:00", T, id="utc-offset"),
        pytest.param("2026-11-25 01:16:58 UTC", T, id="pgbouncer"),
        pytest.param(dt.datetime(2026, 11, 25, 1, 16, 58, tzinfo=dt.UTC), T, id="client-datetime"),
        pytest.param(
            dt.datetime(2026, 11, 25, 2, 16, 58, tzinfo=dt.timezone(dt.timedelta(hours=1))),
            T,
            id="client-datetime-offset",
        ),
    ],
)
def test_every_format_a_source_writes_is_read(value: object, expected: float) -> None:
    assert parse_timestamp(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param("yesterday", id="words"),
        pytest.param("2026-11-25 01:16:58 PST+8", id="pgbouncer-unknown-zone"),
        pytest.param("2026-13-25T01:16:58Z", id="no-such-month"),
        pytest.param(1_700_000_000, id="number"),
    ],
)
def test_what_is_not_a_time_is_absent(value: object) -> None:
    assert parse_timestamp(value) is None


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        pytest.param(rfc3339, T, id="whole-seconds"),
        pytest.param(rfc3339_ms, T + 0.25, id="milliseconds"),
    ],
)
def test_the_status_reads_back_what_it_writes(
    write: Callable[[float], str], expected: float
) -> None:
    assert parse_timestamp(write(T + 0.25)) == pytest.approx(expected)
