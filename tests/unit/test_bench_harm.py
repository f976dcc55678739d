"""The do-no-harm benchmark's arithmetic over PostgreSQL's log and the audit log."""

from __future__ import annotations

import json

from bench.harm import evictions, operator_terminations, shutdown_requests, verdicts

ADMIN = "FATAL:  terminating connection due to administrator command"
LOG = "\n".join(
    [
        f"2026-12-07 18:00:01.100 UTC [101] app=psycopg-6d9f-abcde {ADMIN}",
        "2026-12-07 18:00:30.000 UTC [1] app= LOG:  received fast shutdown request",
        f"2026-12-07 18:00:30.200 UTC [102] app=django-5c7d-xyz12 {ADMIN}",
        f"2026-12-07 18:01:30.200 UTC [103] app=leak-5c7d-qwert {ADMIN}",
        "2026-12-07 18:01:31.000 UTC [104] app=node-5c7d-qwert FATAL:  terminating connection "
        "due to idle-session timeout",
    ]
)


def test_terminations_in_a_shutdown_are_the_shutdowns() -> None:
    shutdowns = shutdown_requests(LOG)
    assert len(shutdowns) == 1
    found = [pod for _, pod in operator_terminations(LOG, shutdowns=shutdowns)]
    assert found == ["psycopg-6d9f-abcde", "leak-5c7d-qwert"]  # not the shutdown's, no timeout


def test_evictions_are_read_from_the_audit_log() -> None:
    def event(ns: str, sub: str, code: int) -> str:
        return json.dumps(
            {
                "stage": "ResponseComplete",
                "objectRef": {"namespace": ns, "name": "web-1", "subresource": sub},
                "responseStatus": {"code": code},
            }
        )

    lines = [event("a", "eviction", 201), event("a", "eviction", 429), event("b", "eviction", 201)]
    lines += [event("a", "", 200), "not json"]
    assert evictions(lines, "a") == ["web-1"]


def scenario(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "guard": "connbudget",
        "healthy_terminated": 0,
        "healthy_failed_by_operator": 0,
        "healthy_evicted": 0,
        "healthy_restarted": 0,
        "false_leak_events": 0,
        "refused": 0,
        "peak": 40,
        "peak_in_transaction": 0,
        "crossed_budget": False,
        "restart_cause": None,
        "leak": None,
    }
    return base | over


def test_verdicts_follow_the_figures() -> None:
    leak = {"paused": 10, "paused_broken": 1, "requests": 100, "answered": 96}
    leak |= {"evicted": 0, "container_restarts": 0}
    got = verdicts(
        {
            "start": scenario(),
            "rollout": scenario(healthy_terminated=2),
            "leak-7": scenario(leak=leak),
            "node-leak": scenario(leak=leak | {"container_restarts": 0}),
            "node-leak-ist10": scenario(guard="idle_session_timeout", leak=leak),
            "tx-leak": scenario(leak=leak | {"evicted": 1}, crossed_budget=True),
        }
    )
    assert [m for t, _, m in got if t.startswith("start")] == [True]
    assert [m for t, _, m in got if t.startswith("rollout")] == [False]
    assert [m for t, _, m in got if t.startswith("leak-7")] == [True, False]  # a paused broken
    assert [m for t, _, m in got if t.startswith("node-leak:")] == [True, True]
    assert [m for t, _, m in got if t.startswith("tx-leak")] == [True, False]
    assert not any(t.startswith("node-leak-ist10") for t, _, _ in got)  # no guard, no target


def test_an_idle_in_transaction_leak_must_have_been_restarted() -> None:
    leak = {"paused": 0, "paused_broken": 0, "evicted": 0, "container_restarts": 0}
    never = verdicts({"tx-leak": scenario(leak=leak)})
    done = verdicts({"tx-leak": scenario(leak=leak | {"evicted": 3})})
    assert [m for t, _, m in never if "restarted" in t] == [False]  # short of the budget only
    assert [m for t, _, m in done if "restarted" in t] == [True]


def test_the_fastest_leak_is_held_to_a_share_of_its_unguarded_refusals() -> None:
    leak = {"paused": 10, "paused_broken": 0, "requests": 100, "answered": 96}
    unguarded = scenario(guard="none", refused=3000, leak=leak)
    held = verdicts({"leak-20": scenario(refused=30, leak=leak), "leak-20-none": unguarded})
    missed = verdicts({"leak-20": scenario(refused=31, leak=leak), "leak-20-none": unguarded})
    assert [m for t, _, m in held if t.startswith("leak-20:")] == [True, True]
    assert [m for t, _, m in missed if t.startswith("leak-20:")] == [True, False]
    assert "no guard 3000" in next(f for t, f, _ in missed if "refusals" in t)
    assert not any(t.startswith("leak-20-none") for t, _, _ in held)  # no guard, no target


def test_a_scenario_run_again_replaces_only_itself() -> None:
    from bench.harm import merge

    before = {"scenarios": {"start": scenario(), "failover": scenario()}, "errors": {"x": "e"}}
    again = {"scenarios": {"failover": scenario(healthy_terminated=1)}, "errors": {}}
    got = merge(before, again)
    assert got["scenarios"]["start"]["from_run"] is True
    assert "from_run" not in got["scenarios"]["failover"]
    assert got["scenarios"]["failover"]["healthy_terminated"] == 1
    assert got["errors"] == {"x": "e"}
    assert [m for t, _, m in got["targets"] if t.startswith("failover")] == [False]
