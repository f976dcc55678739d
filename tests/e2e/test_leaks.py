"""A real leak held inside the budget, and what the operator must never do while it holds it.

On the sandbox, with the real workloads (``sandbox.apps``): Django 5.0.1 under uvicorn leaking
as in ticket #35059 beside healthy pools that do not pre-ping, and a ConnectionBudget that names
only its database, its budget and its selector. Damage is counted from the apps' own logs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from e2e.conftest import Budgets, Operator, wait_until
from sandbox.apps.deploy import deploy_app, leak_settings, pool_settings
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads, eventually
from sandbox.workloads.outcomes import count_outcomes

BUDGET = 80
THREE_FIELDS = {
    "database": {"secretRef": {"name": "pg-monitor"}},
    "budget": {"maxConnections": BUDGET},
    "selector": {"matchLabels": {"tier": "shop"}},
}
SHOP = {"tier": "shop"}


@dataclass
class Sampler:
    """Counts the app database's client backends a few times a second, from outside."""

    dsn: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seconds: float) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="test-sampler") as c:
            end = time.monotonic() + seconds
            while not self.stop.is_set() and time.monotonic() < end:
                row = c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND datname = 'app' AND application_name NOT IN "
                    "('test-sampler', 'connbudget-probe')"
                ).fetchone()
                assert row is not None
                self.samples.append((time.time(), int(row[0])))
                self.stop.wait(0.25)

    def peak(self, since: float = 0.0) -> int:
        return max((n for t, n in self.samples if t >= since), default=0)


def app_outcomes(sandbox: Sandbox, workloads: Workloads, namespace: str, app: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for p in workloads.pods(namespace, f"app={app}"):
        total.update(count_outcomes(sandbox.pod_log(namespace, p.metadata.name, "app")))
    return total


def owner(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    by_owner = (status.get("usage") or {}).get("byOwner") or []
    return next((o for o in by_owner if o["owner"] == f"Deployment/{name}"), None)


def test_a_real_leak_at_7_per_second_is_held_inside_the_budget_by_the_three_field_spec(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    pg_dsn: str,
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    deploy_app(
        workloads,
        namespace,
        "pool",
        kind="django",
        driver_env=pool_settings(4, (5.0, 20.0), 150, INFLIGHT_FRACTION="0.3"),
        labels=SHOP,
    )
    budgets.create("shop", THREE_FIELDS)
    wait_until(lambda: budgets.status("shop").get("usage"), 60, "the first probe")
    sampler = Sampler(pg_dsn)
    watcher = threading.Thread(target=sampler.run, args=(150,), daemon=True)
    watcher.start()
    rate = 7.0
    deploy_app(
        workloads,
        namespace,
        "leak",
        kind="leak",
        # Beside the abandoned requests, requests that finish: half of them pause 1-2 s between
        # two queries, on a connection of the very workload that leaks.
        driver_env=leak_settings(
            rate,
            60,
            DRIVE_RATE="2",
            INFLIGHT_FRACTION="0.5",
            INFLIGHT_IDLE_MIN="1",
            INFLIGHT_IDLE_MAX="2",
        ),
        labels=SHOP,
    )
    started = time.time()
    # The status names the leaking workload, at about the driven rate, within 30 s.
    estimates: list[float] = []

    def named() -> bool:
        leak = owner(budgets.status("shop"), "leak")
        if leak and leak.get("class") == "Leaking":
            estimates.append(leak["leakRatePerMinute"] / 60)
            return abs(estimates[-1] - rate) <= 0.2 * rate
        return False

    eventually(named, timeout=45, interval=1, what="the leak named at its rate")
    named_after = time.time() - started
    time.sleep(max(0.0, started + 60 - time.time()))
    sampler.stop.set()
    watcher.join(timeout=10)

    status = budgets.status("shop")
    peak = sampler.peak(since=started)
    leak_log = app_outcomes(sandbox, workloads, namespace, "leak")
    pool_log = app_outcomes(sandbox, workloads, namespace, "pool")
    summary = (
        f"peak {peak}, named after {named_after:.0f}s at {estimates[-1:]}/s, "
        f"leak app {dict(leak_log)}, pool app {dict(pool_log)}"
    )
    print(summary)
    assert peak <= BUDGET, summary
    assert named_after <= 35, summary
    # No request in flight (pausing 1-2 s between two queries on a connection of the leaking
    # workload) was broken, and the healthy pool lost nothing.
    assert leak_log["ok"] > 0, summary
    assert leak_log["inflight_broken"] == 0, summary
    assert pool_log["ok"] > 0, summary
    assert sum(pool_log[k] for k in ("refused", "terminated", "inflight_broken", "error")) == 0
    pool = owner(status, "pool")
    assert pool is not None
    assert pool["class"] != "Leaking", summary
    # Termination held it: nobody was restarted.
    assert not budgets.events("PodEvicted")
    # One Event per reason and episode (from one recovery to the next), however many polls acted:
    # held under the warning line first (as much as the budget needs), then, the leak proven
    # sustained, its abandoned connections ended at its own pace, back within: at most two
    # episodes, no flapping between Warning and recovery.
    per_reason = Counter(e.reason for e in budgets.events())
    assert per_reason["BudgetWarning"] <= 1, per_reason
    episodes = per_reason["BudgetRecovered"] + 1
    assert 1 <= per_reason["IdleConnectionsTerminated"] <= episodes, per_reason
    assert per_reason["LeakDetected"] == 1, per_reason
    assert sum(e.count or 0 for e in budgets.events("IdleConnectionsTerminated")) > 5
    assert 'owner="Deployment/leak"' in operator.metrics()


def test_a_pool_with_30_to_90_s_gaps_loses_nothing_in_a_breach_another_workload_causes(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    deploy_app(
        workloads,
        namespace,
        "pool",
        kind="psycopg",
        driver_env=pool_settings(6, (30.0, 90.0), 150),
        labels=SHOP,
    )
    # A budget the leak breaches, in Database scope: the pool counts too, but only the leak may
    # pay for it.
    budgets.create("shop", {**THREE_FIELDS, "budget": {"maxConnections": 20, "scope": "Database"}})
    wait_until(lambda: budgets.status("shop").get("usage"), 60, "the first probe")
    time.sleep(20)  # the pool has opened its connections and reused some
    deploy_app(
        workloads, namespace, "leak", kind="leak", driver_env=leak_settings(7.0, 90), labels=SHOP
    )
    classes: set[str] = set()
    end = time.time() + 100
    while time.time() < end:
        pool = owner(budgets.status("shop"), "pool")
        if pool is not None:
            classes.add(pool.get("class", ""))
        time.sleep(1)
    status = budgets.status("shop")
    assert budgets.events("BudgetExceeded"), "the leak never breached the budget"
    pool_log = app_outcomes(sandbox, workloads, namespace, "pool")
    assert pool_log["ok"] > 0
    assert sum(pool_log[k] for k in ("refused", "terminated", "inflight_broken", "error")) == 0, (
        dict(pool_log),
        status.get("remediation"),
    )
    assert "Leaking" not in classes, classes
    leak = owner(status, "leak")
    assert leak is not None
    assert leak["class"] == "Leaking"


def test_an_idle_in_transaction_leak_is_restarted_and_never_terminated(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
) -> None:
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    workloads.deploy(
        namespace,
        "leaky",
        env={"LEAK_RATE": "2", "LEAK_MAX": "60", "IN_TRANSACTION": "1"},
        labels=SHOP,
    )
    budgets.create(
        "shop",
        {
            **THREE_FIELDS,
            "budget": {"maxConnections": 10},
            "remediation": {"breachSeconds": 2, "restartPods": {"minPodAgeSeconds": 0}},
        },
    )
    evicted = budgets.wait_event("PodEvicted", timeout=90)
    status = budgets.status("shop")
    assert status["remediation"]["restartCause"] == "IdleInTransaction"
    assert "idle in a transaction" in evicted.message
    assert not budgets.events("IdleConnectionsTerminated")
    terminated = [
        line
        for line in operator.metrics().splitlines()
        if line.startswith("connbudget_terminated_connections_total{")
    ]
    assert all(line.endswith(" 0.0") for line in terminated), terminated


@pytest.fixture(autouse=True)
def _apps_ready(sandbox: Sandbox) -> None:
    """The real apps need their environments (``tests/setup`` installs them)."""
    from sandbox.apps import envs

    missing = [name for name in envs.ENVS if not envs.is_ready(name)]
    assert not missing, f"app environments missing: {missing}; run tests/setup"


def test_requests_pausing_2_to_8_s_inside_a_leaking_app_are_not_broken(
    sandbox: Sandbox,
    workloads: Workloads,
    namespace: str,
    budgets: Budgets,
    operator: Operator,
    pg_dsn: str,
) -> None:
    # Measured before: the seed's Django 5.0.1 app with 30 % of its requests querying, waiting
    # 2-8 s on an upstream with the connection idle, then querying again: 4 of 229 paused
    # requests were broken before the pauses were learned. A leaked connection and a paused one
    # look alike (idle after the same statement); only a pause ends, so the leak's connections
    # idle beyond every pause seen go first, and one that may be paused only for the budget.
    budgets.secret("pg-monitor", sandbox.db.monitor_dsn)
    budgets.create("shop", THREE_FIELDS)
    wait_until(lambda: budgets.status("shop").get("usage") is not None, 60, "the first probe")
    sampler = Sampler(pg_dsn)
    watcher = threading.Thread(target=sampler.run, args=(110,), daemon=True)
    watcher.start()
    deploy_app(
        workloads,
        namespace,
        "leak",
        kind="leak",
        driver_env=leak_settings(
            5.0,
            75,
            DRIVE_RATE="3",
            INFLIGHT_FRACTION="0.3",
            INFLIGHT_IDLE_MIN="2",
            INFLIGHT_IDLE_MAX="8",
        ),
        labels=SHOP,
    )
    started = time.time()
    time.sleep(90)
    sampler.stop.set()
    watcher.join(timeout=10)
    leak_log = app_outcomes(sandbox, workloads, namespace, "leak")
    leak = owner(budgets.status("shop"), "leak")
    summary = f"peak {sampler.peak(since=started)}, leak app {dict(leak_log)}, status {leak}"
    print(summary)
    assert leak is not None, summary
    assert leak["class"] == "Leaking", summary
    assert sampler.peak(since=started) <= BUDGET, summary
    assert leak_log["ok"] > 50, summary
    assert leak_log["refused"] == 0, summary
    # Of about 70 paused requests, measured 2 broken (3 %) in a loaded run (the target is 0, see
    # BENCHMARKS.md; before, an abandon age of 13 s let the server fill): a pause longer than any
    # seen yet is still taken for a leaked connection until it is seen.
    paused = 0.3 * (leak_log["ok"] + leak_log["inflight_broken"])
    assert leak_log["inflight_broken"] <= 0.05 * paused, summary
