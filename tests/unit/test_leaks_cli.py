"""``connbudget leaks``: the table and JSON made from budgets' status, and its error lines."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from connbudget import cli, leaks
from connbudget.kube import budgets
from connbudget.kube.budgets import BudgetList, BudgetsUnreadable, Problem
from connbudget.policy import fingerprint

ROOT = Path(__file__).resolve().parents[2]
SELECT_USER = 'SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."id" = ? LIMIT ?'
INSERT_ORDER = 'INSERT INTO "orders" ("customer_id", "total") VALUES (...) RETURNING "id"'


def leak(
    statement: str = SELECT_USER,
    *,
    count: int = 10,
    share: float = 1.0,
    tags: dict[str, str] | None = None,
    revision: str = "web-7457d5dc96",
    fp: str = "0123456789abcdef",
) -> dict[str, Any]:
    return {
        "fingerprint": fp,
        "statement": statement,
        "tags": {"route": "sync/", "framework": "django:5.0.1"} if tags is None else tags,
        "count": count,
        "share": share,
        "firstSeen": "2026-12-03T12:00:00Z",
        "revision": revision,
    }


def owner(
    name: str = "Deployment/web",
    *,
    cls: str | None = "Leaking",
    rate: float = 4.0,
    abandoned: int = 12,
    found: list[dict[str, Any]] | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"owner": name, "pods": 2, "connections": 30, "idle": 20}
    if cls is not None:
        out |= {"class": cls, "leakRatePerMinute": rate, "abandoned": abandoned}
    if found is not None:
        out["leaks"] = found
    if hint is not None:
        out["hint"] = hint
    return out


def budget(
    name: str = "app-db",
    namespace: str = "shop",
    *owners: dict[str, Any],
    phase: str = "WithinBudget",
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "connbudget.io/v1alpha1",
        "kind": "ConnectionBudget",
        "metadata": {"name": name, "namespace": namespace},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "usage": {"connections": 60, "budget": 80, "byOwner": list(owners)},
        },
    }


def table(objs: list[Any], *, namespace: str | None = "shop", all_owners: bool = False) -> str:
    report = leaks.find_owners(objs, all_owners=all_owners)
    return leaks.render_table(report, namespace=namespace, all_owners=all_owners)


def as_json(objs: list[Any], *, all_owners: bool = False) -> list[dict[str, Any]]:
    out = json.loads(leaks.render_json(leaks.find_owners(objs, all_owners=all_owners)))
    assert isinstance(out, list)
    return out


def columns(line: str) -> list[str]:
    return line.split()


# --- the table ----------------------------------------------------------------------------------


def test_one_row_per_statement_with_the_owner_on_its_first_row_and_the_hint_below() -> None:
    web = owner(
        found=[
            leak(INSERT_ORDER, count=3, share=0.25, tags={"route": "checkout/"}, fp="b" * 16),
            leak(SELECT_USER, count=9, share=0.75),
        ],
        hint="known leak: Django 5.0-5.0.1 under ASGI",
    )
    lines = table([budget("app-db", "shop", web)]).splitlines()
    assert columns(lines[0]) == [
        "BUDGET",
        "OWNER",
        "RATE/MIN",
        "ABANDONED",
        "SHARE",
        "STATEMENT",
        "TAGS",
        "REVISION",
    ]
    # The owner's columns on its first row; its statements most counted first.
    assert lines[1].startswith("app-db  Deployment/web  4.0")
    assert "75%" in lines[1]
    assert "route=sync/ framework=django:5.0.1" in lines[1]  # TAG_KEYS order, not the status's
    assert lines[1].rstrip().endswith("web-7457d5dc96")
    assert lines[2].startswith(" ")
    assert "25%" in lines[2]
    assert "route=checkout/" in lines[2]
    assert "Deployment/web" not in lines[2]
    assert lines[3].strip() == "hint: known leak: Django 5.0-5.0.1 under ASGI"
    # Every row's cells line up under the header.
    assert lines[2].index("25%") == lines[1].index("75%") == lines[0].index("SHARE")
    assert len(lines) == 4


def test_only_the_top_three_statements_and_each_cut_to_fit() -> None:
    long = "SELECT " + ", ".join(f'"col_{i}"' for i in range(40)) + ' FROM "wide"'
    found = [leak(long, count=9, fp="a" * 16)] + [
        leak(f'SELECT "t{i}".* FROM "t{i}"', count=5 - i, fp=f"{i}" * 16) for i in range(4)
    ]
    lines = table([budget("db", "shop", owner(found=found))]).splitlines()
    assert len(lines) == 1 + leaks.TOP_LEAKS
    statements = [line[lines[0].index("STATEMENT") :] for line in lines[1:]]
    assert statements[0].startswith(long[: leaks.STATEMENT_WIDTH - 1] + fingerprint.ELLIPSIS)
    assert '"t3"' not in "\n".join(lines)  # the fourth and fifth are left out


def test_owners_are_sorted_by_leak_rate_across_budgets() -> None:
    objs = [
        budget("a", "shop", owner("Deployment/slow", rate=0.5, abandoned=40, found=[leak()])),
        budget(
            "b",
            "shop",
            owner("Deployment/fast", rate=12.3, abandoned=2),
            owner("StatefulSet/mid", rate=3.0),
            owner("Deployment/tie", rate=3.0, abandoned=99),
        ),
    ]
    report = leaks.find_owners(objs)
    assert [o.owner for o in report.owners] == [
        "Deployment/fast",
        "Deployment/tie",  # same rate: more abandoned first
        "StatefulSet/mid",
        "Deployment/slow",
    ]
    lines = leaks.render_table(report, namespace="shop").splitlines()
    assert [columns(line)[1] for line in lines[1:]] == [o.owner for o in report.owners]
    assert columns(lines[1])[2] == "12.3"


def test_all_namespaces_adds_the_namespace_column() -> None:
    objs = [
        budget("db", "shop", owner("Deployment/web", rate=2.0)),
        budget("db", "billing", owner("Deployment/invoicer", rate=5.0)),
    ]
    lines = table(objs, namespace=None).splitlines()
    assert columns(lines[0])[:3] == ["NAMESPACE", "BUDGET", "OWNER"]
    assert columns(lines[1])[:3] == ["billing", "db", "Deployment/invoicer"]
    assert columns(lines[2])[:3] == ["shop", "db", "Deployment/web"]
    assert "NAMESPACE" not in table(objs, namespace="shop")


def test_only_leaking_owners_unless_all_owners_is_asked_for() -> None:
    objs = [
        budget(
            "db",
            "shop",
            owner("Deployment/web", rate=1.5),
            owner("Deployment/api", cls="Pooling", rate=0.0, abandoned=0),
            owner("Deployment/batch", cls=None),  # not judged: no class at all
        )
    ]
    assert [o["owner"] for o in as_json(objs)] == ["Deployment/web"]
    hinted = budget("db", "shop", owner("Deployment/web", rate=1.5, hint="upgrade"))
    for ns, all_owners in ((None, True), (None, False), ("shop", True), ("shop", False)):
        lines = table([hinted], namespace=ns, all_owners=all_owners).splitlines()
        assert lines[2].index("hint: upgrade") == lines[0].index("OWNER")
    lines = table(objs, all_owners=True).splitlines()
    assert columns(lines[0])[:3] == ["BUDGET", "OWNER", "CLASS"]
    assert [columns(line)[1:3] for line in lines[1:]] == [
        ["Deployment/web", "Leaking"],
        ["Deployment/api", "Pooling"],
        ["Deployment/batch", "-"],
    ]


@pytest.mark.parametrize(
    ("objs", "namespace", "expected"),
    [
        pytest.param([], "shop", "no leaking workloads in namespace shop (0 budgets)", id="none"),
        pytest.param(
            [budget("db", "shop", owner(cls="Pooling"))],
            "shop",
            "no leaking workloads in namespace shop (1 budget)",
            id="pooling-only",
        ),
        pytest.param(
            [budget("a", "shop"), budget("b", "billing")],
            None,
            "no leaking workloads in any namespace (2 budgets)",
            id="all-namespaces",
        ),
    ],
)
def test_nothing_leaking_says_so_in_one_line(
    objs: list[Any], namespace: str | None, expected: str
) -> None:
    assert table(objs, namespace=namespace) == expected
    assert as_json(objs) == []


def test_a_leak_whose_statements_are_hidden_says_how_to_see_them() -> None:
    hidden = [{"type": "StatementsVisible", "status": "False", "reason": "InsufficientPrivilege"}]
    line = table([budget("db", "shop", owner(), conditions=hidden)]).splitlines()[1]
    assert "(hidden: grant pg_read_all_stats)" in line
    # Without the condition (an older operator), just unknown.
    assert "grant" not in table([budget("db", "shop", owner())])


def test_a_budget_that_cannot_probe_is_noted_as_showing_old_figures() -> None:
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": "ProbeFailed",
        "message": "connection refused",
    }
    objs = [budget("db", "shop", owner(), phase="Degraded", conditions=[ready])]
    out = table(objs)
    assert out.splitlines()[-1] == (
        "note: shop/db is Degraded (ProbeFailed: connection refused), its figures are from its"
        " last successful probe"
    )
    assert table([budget("db", "shop", phase="Degraded")]).splitlines()[0] == (
        "no leaking workloads in namespace shop (1 budget)"
    )


# --- what it never shows ------------------------------------------------------------------------

SECRET = "hunter2-Planted"


def test_no_literal_reaches_the_output_whoever_wrote_the_status() -> None:
    # A status patched by someone else (or a future bug) with a literal in a statement, and raw
    # text in fields this command does not know: neither is printed.
    planted = leak(f"ALTER ROLE app PASSWORD '{SECRET}'", tags={"route": "admin/"})
    planted["query"] = f"SELECT * FROM users WHERE token = '{SECRET}'"
    web = owner(found=[planted, leak(f"SELECT * FROM t WHERE a = 4242 AND b = E'{SECRET}'")])
    web["lastStatement"] = f"UPDATE t SET password = '{SECRET}'"
    objs = [budget("db", "shop", web)]
    for out in (
        table(objs),
        table(objs, all_owners=True),
        leaks.render_json(leaks.find_owners(objs)),
    ):
        for literal in ("Planted", "hunter2", "4242"):
            assert literal not in out
    (row,) = as_json(objs)
    assert [s["statement"] for s in row["leaks"]] == [
        "ALTER ROLE app PASSWORD ?",
        "SELECT * FROM t WHERE a = ? AND b = ?",
    ]
    assert set(row["leaks"][0]) == {
        "fingerprint",
        "statement",
        "tags",
        "count",
        "share",
        "firstSeen",
        "revision",
    }


def test_normalised_statements_are_shown_as_the_status_has_them() -> None:
    for statement in (SELECT_USER, INSERT_ORDER, 'SELECT $1, "Table 3".x FROM "Table 3"'):
        (row,) = as_json([budget("db", "shop", owner(found=[leak(statement)]))])
        assert row["leaks"][0]["statement"] == statement


def test_control_characters_never_reach_the_terminal() -> None:
    escape = "\x1b]52;c;Zm9v\x07\x1b[2J"
    web = owner(
        f"Deployment/web{escape}",
        found=[leak(tags={"route": f"sync/{escape}", f"x{escape}": "y"})],
        hint=f"restart\r\nit{escape}",
    )
    for out in (
        table([budget("db", "shop", web)]),
        leaks.render_json(leaks.find_owners([budget("db", "shop", web)])),
    ):
        for control in ("\x1b", "\x07", "\r"):
            assert control not in out
    assert "hint: restart it]52;c;Zm9v[2J" in table([budget("db", "shop", web)])


# --- old and odd statuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"metadata": {"name": "db", "namespace": "shop"}}, id="no-status"),
        pytest.param({"metadata": {"name": "db"}, "status": None}, id="null-status"),
        pytest.param({"status": {"usage": None}}, id="null-usage"),
        pytest.param({"status": {"usage": {"byOwner": None}}}, id="null-byOwner"),
        pytest.param({"status": {"usage": {"byOwner": "oops"}}}, id="string-byOwner"),
        pytest.param({"status": {"usage": {"byOwner": [None, 3, "x"]}}}, id="junk-items"),
        pytest.param({"status": {"conditions": None, "phase": None}}, id="null-conditions"),
    ],
)
def test_a_status_without_usage_counts_as_a_budget_with_nothing_to_show(
    obj: dict[str, Any],
) -> None:
    assert table([obj, "not a budget"]) == "no leaking workloads in namespace shop (1 budget)"


def test_fields_an_older_operator_does_not_write_are_shown_as_unknown() -> None:
    old = {"owner": "Deployment/web", "class": "Leaking"}  # no rate, abandoned, leaks or hint
    nulls = {
        "owner": None,
        "class": "Leaking",
        "leakRatePerMinute": None,
        "abandoned": None,
        "leaks": None,
        "hint": None,
    }
    odd = owner(
        "Deployment/odd",
        rate=float("nan"),
        found=[
            {"statement": None, "tags": None},  # nothing known: skipped
            {"statement": SELECT_USER, "tags": None, "share": None, "count": "7"},
        ],
    )
    odd["leaks"].append("junk")
    odd["abandoned"] = True
    objs = [budget("db", "shop", old, nulls, odd)]
    lines = table(objs).splitlines()
    # All at rate 0: by owner name, the nameless one first.
    assert [columns(line)[1:4] for line in lines[1:]] == [
        ["-", "0.0", "0"],
        ["Deployment/odd", "0.0", "0"],
        ["Deployment/web", "0.0", "0"],
    ]
    assert "SELECT" in lines[2]
    rows = as_json(objs)
    assert rows[1]["leaks"] == [
        {
            "fingerprint": "",
            "statement": SELECT_USER,
            "tags": {},
            "count": 0,
            "share": None,
            "firstSeen": None,
            "revision": "",
        }
    ]
    assert [(r["owner"], r["leakRatePerMinute"], r["leaks"], r["hint"]) for r in rows] == [
        ("-", 0.0, [], None),
        ("Deployment/odd", 0.0, rows[1]["leaks"], None),
        ("Deployment/web", 0.0, [], None),
    ]


def test_json_has_one_object_per_owner_with_its_leaks_and_hint() -> None:
    objs = [
        budget(
            "db",
            "shop",
            owner(rate=4.04, abandoned=12, found=[leak(share=0.96)], hint="set PGAPPNAME"),
        )
    ]
    (row,) = as_json(objs)
    assert row == {
        "namespace": "shop",
        "budget": "db",
        "owner": "Deployment/web",
        "class": "Leaking",
        "leakRatePerMinute": 4.04,
        "abandoned": 12,
        "leaks": [
            {
                "fingerprint": "0123456789abcdef",
                "statement": SELECT_USER,
                "tags": {"route": "sync/", "framework": "django:5.0.1"},
                "count": 10,
                "share": 0.96,
                "firstSeen": "2026-12-03T12:00:00Z",
                "revision": "web-7457d5dc96",
            }
        ],
        "hint": "set PGAPPNAME",
    }


# --- the command: its wiring and its errors -----------------------------------------------------


class FakeRead:
    """Stands in for ``kube.budgets.read_budgets``: records its call, answers or raises."""

    def __init__(
        self, items: list[Any] | None = None, error: BudgetsUnreadable | None = None
    ) -> None:
        self.items, self.error = items or [], error
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        *,
        namespace: str | None,
        all_namespaces: bool,
        kubeconfig: str | None = None,
        context: str | None = None,
    ) -> BudgetList:
        self.calls.append(
            {
                "namespace": namespace,
                "all_namespaces": all_namespaces,
                "kubeconfig": kubeconfig,
                "context": context,
            }
        )
        if self.error is not None:
            raise self.error
        return BudgetList(
            namespace=None if all_namespaces else namespace or "default", items=self.items
        )


def run_leaks(*argv: str, read: FakeRead) -> int:
    args = cli.build_parser().parse_args(["leaks", *argv])
    assert args.func is leaks.cmd_leaks
    code: int = leaks.cmd_leaks(args, read=read)
    return code


def test_the_command_passes_its_scope_and_kubeconfig_and_prints_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    read = FakeRead([budget("db", "shop", owner())])
    argv = ["-n", "shop", "--kubeconfig", "kc.yaml", "--context", "dev"]
    assert run_leaks(*argv, read=read) == 0
    assert read.calls == [
        {"namespace": "shop", "all_namespaces": False, "kubeconfig": "kc.yaml", "context": "dev"}
    ]
    out = capsys.readouterr().out
    assert out.startswith("BUDGET")
    assert "Deployment/web" in out
    assert run_leaks("-A", "--json", read=read) == 0
    assert read.calls[-1]["all_namespaces"] is True
    assert json.loads(capsys.readouterr().out)[0]["namespace"] == "shop"


def test_namespace_and_all_namespaces_cannot_both_be_given() -> None:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["leaks", "-n", "shop", "-A"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("problem", "namespace", "says"),
    [
        pytest.param(Problem.NO_CONFIG, None, "--kubeconfig FILE", id="no-kubeconfig"),
        pytest.param(Problem.UNREACHABLE, "shop", "check that the cluster is up", id="unreachable"),
        pytest.param(Problem.UNAUTHORIZED, "shop", "log in again", id="401"),
        pytest.param(
            Problem.FORBIDDEN,
            "shop",
            "not allowed to list connectionbudgets.connbudget.io in namespace shop",
            id="403",
        ),
        pytest.param(Problem.FORBIDDEN, None, "use -n NAMESPACE", id="403-all-namespaces"),
        pytest.param(Problem.NOT_SERVED, "shop", "install the CRD", id="crd-missing"),
        pytest.param(Problem.FAILED, "shop", "failed: ", id="other"),
    ],
)
def test_errors_are_one_line_on_stderr_saying_what_to_do_and_exit_2(
    capsys: pytest.CaptureFixture[str], problem: Problem, namespace: str | None, says: str
) -> None:
    error = BudgetsUnreadable(problem, "the\nserver said\tno", namespace=namespace)
    assert run_leaks(read=FakeRead(error=error)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("connbudget leaks: ")
    assert says in line
    assert "the server said no" in line
    assert "Traceback" not in captured.err


def test_a_missing_kubeconfig_or_context_is_no_config_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(BudgetsUnreadable) as e:
        budgets.read_budgets(
            namespace="shop", all_namespaces=False, kubeconfig=str(tmp_path / "none")
        )
    assert e.value.problem is Problem.NO_CONFIG
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    with pytest.raises(BudgetsUnreadable) as e:
        budgets.read_budgets(
            namespace=None, all_namespaces=True, kubeconfig=str(kubeconfig), context="nope"
        )
    assert e.value.problem is Problem.NO_CONFIG
    assert "nope" in e.value.detail


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (401, Problem.UNAUTHORIZED),
        (403, Problem.FORBIDDEN),
        (404, Problem.NOT_SERVED),
        (500, Problem.FAILED),
        (0, Problem.FAILED),
    ],
)
def test_http_statuses_map_to_problems(status: int, problem: Problem) -> None:
    assert budgets.problem_of(status) is problem


# --- the kubectl plugin -------------------------------------------------------------------------


def test_it_is_installed_as_a_kubectl_plugin_too() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-connbudget"] == scripts["connbudget"] == "connbudget.cli:main"


def test_run_as_a_kubectl_plugin_it_calls_itself_kubectl_connbudget(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # kubectl runs `kubectl-connbudget leaks -n shop` for `kubectl connbudget leaks -n shop`.
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/kubectl-connbudget", "leaks", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kubectl connbudget leaks ")


def test_tags_read_back_from_a_status_are_checked_again() -> None:
    from connbudget.leaks import _leak

    leak = _leak({"statement": "SELECT 1", "tags": {"action": "reset password=hunter2"}})
    assert leak is not None
    assert "hunter2" not in str(leak.tags)
