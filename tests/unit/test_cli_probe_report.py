"""``connbudget probe``: what each application's waiting connections last ran, literals stripped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

import pytest

from connbudget import cli
from connbudget.model.observations import (
    PROBE_APPLICATION_NAME,
    BackendGroup,
    LastStatement,
    ServerSample,
)
from connbudget.policy.fingerprint import HIDDEN

START = 1_700_000_000.0
COUNT = 'SELECT COUNT(*) AS "__count" FROM "auth_user"'
TAGGED_COUNT = COUNT + " /*framework='django%3A5.0.1',route='%5Esync/%24',traceparent='00-a-b-01'*/"
LOOKUP = 'SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."password" = \'{}\' LIMIT 21'
X = "\N{MULTIPLICATION SIGN}"  # as in "12 times SELECT ..."
SECRETS = ("hunter2", "swordfish", "Tr0ub4dor")


def group(
    app: str, state: str | None, pids: Iterable[int], *, addr: str = "10.0.0.1"
) -> BackendGroup:
    backends = tuple((pid, 60.0 + pid, START + pid) for pid in pids)
    return BackendGroup(
        database="app",
        user="app",
        application_name=app,
        client_addr=addr,
        state=state,
        count=len(backends),
        max_idle_seconds=max((b[1] for b in backends), default=0.0) if state == "idle" else 0.0,
        oldest_backend_start=min((b[2] for b in backends), default=START),
        backends=backends,
    )


def last(
    pid: int, query: str, *, query_id: int | None = None, start: float | None = None
) -> LastStatement:
    return LastStatement(
        pid=pid,
        backend_start=START + pid if start is None else start,
        query_id=query_id,
        query=query,
    )


def sample(*groups: BackendGroup) -> ServerSample:
    return ServerSample(
        sampled_at=START + 1000, database="app", max_connections=100, reserved=3, groups=groups
    )


def leaking_web() -> tuple[ServerSample, list[LastStatement]]:
    web = group("web", "idle", range(1, 16))
    statements = [last(pid, TAGGED_COUNT) for pid in range(1, 13)]
    statements += [last(13, LOOKUP.format("hunter2")), last(14, LOOKUP.format("swordfish"))]
    statements += [last(15, "SELECT 'Tr0ub4dor' AS x, 42")]
    return sample(web), statements


def test_an_idle_group_lists_its_statement_shapes_most_frequent_first() -> None:
    s, statements = leaking_web()
    report = cli.probe_report(s, None, statements=statements)
    (web,) = report["groups"]
    shapes = web["statements"]
    assert [(x["statement"], x["count"]) for x in shapes] == [
        (COUNT, 12),
        ('SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."password" = ? LIMIT ?', 2),
        ("SELECT ? AS x, ?", 1),
    ]
    assert shapes[0]["tags"] == {"route": "^sync/$", "framework": "django:5.0.1"}
    assert shapes[1]["tags"] == {}
    assert all(len(x["fingerprint"]) == 16 for x in shapes)
    assert set(shapes[0]) == {"fingerprint", "statement", "tags", "count"}
    assert report["statementsVisible"] is True


def test_only_the_top_three_shapes_are_listed() -> None:
    web = group("web", "idle", range(1, 6))
    statements = [last(pid, f"SELECT * FROM t{pid}") for pid in range(1, 6)]
    statements.append(last(99, "SELECT * FROM t1"))  # a backend of no group: not counted
    (g,) = cli.probe_report(sample(web), None, statements=statements)["groups"]
    assert [x["statement"] for x in g["statements"]] == [
        "SELECT * FROM t1",
        "SELECT * FROM t2",
        "SELECT * FROM t3",
    ]
    assert [x["count"] for x in g["statements"]] == [1, 1, 1]


def test_no_literal_is_ever_printed_as_json_or_as_a_table() -> None:
    s, statements = leaking_web()
    report = cli.probe_report(s, None, statements=statements)
    printed = json.dumps(report, indent=2) + cli.render_probe_table(report)
    assert not [x for x in SECRETS if x in printed]
    assert not [x for g in report["groups"] for x in g["statements"] if "42" in x["statement"]]
    assert "traceparent" not in printed


def test_the_table_shows_each_shape_under_its_group() -> None:
    s, statements = leaking_web()
    lines = cli.render_probe_table(cli.probe_report(s, None, statements=statements)).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("web "))
    assert lines[row + 1] == f"    12{X} {COUNT}  route=^sync/$ framework=django:5.0.1"
    assert lines[row + 2].startswith(f'    2{X} SELECT "auth_user"."id" FROM "auth_user" WHERE')
    assert lines[row + 3] == f"    1{X} SELECT ? AS x, ?"
    assert "pg_read_all_stats" not in "\n".join(lines)


def test_a_busy_group_lists_no_statements() -> None:
    busy = group("web", "active", [1, 2])
    waiting = group("worker", "idle in transaction", [3])
    statements = [last(1, COUNT), last(2, COUNT), last(3, "UPDATE t SET x = 1")]
    report = cli.probe_report(sample(busy, waiting), None, statements=statements)
    by_app = {g["applicationName"]: g for g in report["groups"]}
    assert by_app["web"]["statements"] == []
    assert [x["statement"] for x in by_app["worker"]["statements"]] == ["UPDATE t SET x = ?"]
    table = cli.render_probe_table(report)
    assert f"2{X} {COUNT}" not in table
    assert f"    1{X} UPDATE t SET x = ?" in table


def test_a_reused_pid_is_another_backend() -> None:
    web = group("web", "idle", [1, 2])
    statements = [last(1, COUNT), last(2, COUNT, start=START + 2 + 5.0)]
    (g,) = cli.probe_report(sample(web), None, statements=statements)["groups"]
    assert [x["count"] for x in g["statements"]] == [1]


def test_hidden_statements_are_not_shapes_and_the_table_says_what_to_grant() -> None:
    web = group("web", "idle", [1, 2, 3])
    statements = [last(1, HIDDEN), last(2, HIDDEN), last(3, COUNT, query_id=-42)]
    report = cli.probe_report(sample(web), None, statements=statements)
    (g,) = report["groups"]
    assert [(x["statement"], x["count"]) for x in g["statements"]] == [(COUNT, 1)]
    assert report["statementsVisible"] is False
    table = cli.render_probe_table(report)
    assert "pg_read_all_stats" in table
    assert "pg_monitor" in table
    assert HIDDEN not in table


def test_the_existing_report_keys_stay_and_no_statements_is_no_problem() -> None:
    web = group("web", "idle", [1, 2])
    report = cli.probe_report(sample(web, group(PROBE_APPLICATION_NAME, "idle", [9])), None)
    assert report["connections"] == 2
    assert report["statementsVisible"] is True
    (g,) = report["groups"]
    assert set(g) == {
        "applicationName",
        "clientAddr",
        "user",
        "database",
        "state",
        "count",
        "maxIdleSeconds",
        "statements",
    }
    assert g["statements"] == []
    # A report from before statements existed still renders.
    del g["statements"]
    del report["statementsVisible"]
    assert "web" in cli.render_probe_table(report)


class FakeMonitor:
    """Stands in for probe.postgres.Monitor: one sample, and the statements asked for."""

    asked: list[tuple[int, float]]
    closed: bool

    def __init__(self, dsn: str) -> None:
        FakeMonitor.asked = []
        FakeMonitor.closed = False

    async def sample(self) -> ServerSample:
        return sample(
            group("web", "idle", [1, 2]),
            group("web", "active", [3]),
            group("worker", "idle in transaction (aborted)", [4]),
            group(PROBE_APPLICATION_NAME, "idle", [5]),
        )

    async def statements(self, backends: Iterable[tuple[int, float]]) -> list[LastStatement]:
        FakeMonitor.asked = list(backends)
        return [last(pid, f"SELECT {pid * 1111}") for pid, _ in FakeMonitor.asked]

    async def close(self) -> None:
        FakeMonitor.closed = True


def test_probe_asks_for_the_statements_of_waiting_backends_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("connbudget.probe.postgres.Monitor", FakeMonitor)
    report = asyncio.run(cli._probe("host=db", None))
    assert sorted(FakeMonitor.asked) == [(1, START + 1), (2, START + 2), (4, START + 4)]
    assert FakeMonitor.closed
    by_state = {g["state"]: g for g in report["groups"]}
    assert by_state["idle"]["statements"][0]["count"] == 2
    assert by_state["active"]["statements"] == []
    assert "1111" not in json.dumps(report)
