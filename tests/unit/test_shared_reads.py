"""Work shared by the budgets of a replica: one read of a Secret however many budgets need it at
once; the workers' context; kopf building no diff base (only event handlers); the forecast's
history bounded by what it reads."""

from __future__ import annotations

import asyncio
import contextvars

import kubernetes
import pytest

from connbudget.kube.api import Kube, KubeError
from connbudget.model.spec import SecretRef

REF = SecretRef(name="pg")


class Reads:
    """A Secret read that waits until let go, counting the reads."""

    def __init__(self, values: list[str]) -> None:
        self.values = values
        self.calls = 0
        self.go = asyncio.Event()

    async def __call__(self, namespace: str, ref: SecretRef) -> str:
        self.calls += 1
        await self.go.wait()
        value = self.values.pop(0)
        if value == "fail":
            raise KubeError(504, "no answer from the API server in time")
        return value


async def settle() -> None:
    """Let every task started run until it waits."""
    for _ in range(5):
        await asyncio.sleep(0)


def kube_with(reads: Reads) -> Kube:
    kube = Kube(kubernetes.client.ApiClient())
    kube._read_secret_value = reads  # type: ignore[method-assign]
    return kube


def test_budgets_reading_one_secret_at_once_share_one_read() -> None:
    async def main() -> None:
        reads = Reads(["dsn-1"])
        kube = kube_with(reads)
        waiting = [asyncio.create_task(kube.read_secret_value("shop", REF)) for _ in range(50)]
        await settle()
        reads.go.set()
        assert await asyncio.gather(*waiting) == ["dsn-1"] * 50
        assert reads.calls == 1
        assert await kube.read_secret_value("shop", REF) == "dsn-1"  # cached
        assert reads.calls == 1

    asyncio.run(main())


def test_a_failed_read_reaches_every_waiter_and_is_not_cached() -> None:
    async def main() -> None:
        reads = Reads(["fail", "dsn-2"])
        kube = kube_with(reads)
        waiting = [asyncio.create_task(kube.read_secret_value("shop", REF)) for _ in range(3)]
        await settle()
        reads.go.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, KubeError) for r in results)
        assert await kube.read_secret_value("shop", REF) == "dsn-2"
        assert reads.calls == 2

    asyncio.run(main())


def test_a_read_begun_before_the_secret_was_forgotten_is_not_kept() -> None:
    """The DSN failed (a rotated password): what a read begun before says may be the old value;
    the next budget reads again."""

    async def main() -> None:
        reads = Reads(["old", "new"])
        kube = kube_with(reads)
        before = asyncio.create_task(kube.read_secret_value("shop", REF))
        await settle()
        kube.forget_secret("shop", REF)
        after = asyncio.create_task(kube.read_secret_value("shop", REF))
        await settle()
        reads.go.set()
        assert await before == "old"
        assert await after == "new"
        assert reads.calls == 2
        assert await kube.read_secret_value("shop", REF) == "new"

    asyncio.run(main())


def test_one_cancelled_reader_does_not_cancel_the_read_the_others_await() -> None:
    async def main() -> None:
        reads = Reads(["dsn"])
        kube = kube_with(reads)
        first = asyncio.create_task(kube.read_secret_value("shop", REF))
        second = asyncio.create_task(kube.read_secret_value("shop", REF))
        await settle()
        first.cancel()
        await settle()
        reads.go.set()
        assert await second == "dsn"
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())


def test_a_budgets_worker_runs_in_a_context_of_its_own() -> None:
    """Started from a kopf handler, a worker must not keep that handler's context (its cause,
    body and patch) alive as long as it runs."""
    from connbudget.handlers.reconciler import Reconciler
    from connbudget.probe.postgres import MonitorPool
    from connbudget.report.metrics import Metrics

    handlers_var: contextvars.ContextVar[str] = contextvars.ContextVar("cause")
    seen: list[str | None] = []

    async def main() -> None:
        reconciler = Reconciler(kube=None, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]

        async def work(key: tuple[str, str]) -> None:
            seen.append(handlers_var.get(None))

        reconciler._work = work  # type: ignore[method-assign]
        handlers_var.set("the event's cause")
        reconciler._start_worker(("shop", "web"))
        await reconciler.workers[("shop", "web")]

    asyncio.run(main())
    assert seen == [None]


def test_kopf_builds_no_diff_base_and_no_change_handler_needs_one() -> None:
    import kopf

    import connbudget.handlers.lifecycle
    import connbudget.handlers.watches  # noqa: F401  (registers the handlers)
    from connbudget.handlers.lifecycle import NoDiffBase

    registry = kopf.get_default_registry()
    assert not list(registry._changing.get_all_handlers())
    assert not list(registry._spawning.get_all_handlers())
    assert list(registry._watching.get_all_handlers())
    body = kopf.Body({"metadata": {"name": "web", "labels": {"a": "b"}}, "spec": {"x": 1}})
    assert NoDiffBase().build(body=body) == {}


def test_the_forecasts_history_keeps_only_what_it_reads() -> None:
    import dataclasses

    from connbudget import cycle
    from connbudget.policy.forecast import FORECAST_WINDOW_SECONDS
    from unit import builders
    from unit import test_cycle as tc

    first = builders.sample([])  # nothing to act on: nothing clears the history
    kube, monitor = tc.FakeKube(), tc.FakeMonitor(first)
    runtime = cycle.Runtime()
    for i in range(12):
        at = first.sampled_at + 5.0 * i
        deps, _ = tc.make_deps(kube, monitor, [tc.WEB1, tc.WEB2], now=at)
        monitor.result = dataclasses.replace(first, sampled_at=at)
        runtime.last_probe_at = None  # due at once
        tc.run_cycle(deps, runtime=runtime)
    times = [t for t, _ in runtime.history]
    assert len(times) >= 2
    assert times[-1] == first.sampled_at + 55.0
    assert times[-1] - times[0] <= FORECAST_WINDOW_SECONDS


def test_a_selector_is_matched_once_per_change_of_the_pods() -> None:
    from connbudget.handlers.pod_cache import PodCache
    from connbudget.model.spec import LabelRequirement, LabelSelector
    from connbudget.policy.usage import is_governed
    from unit.builders import pod
    from unit.test_attribution import pod_body

    cache = PodCache(None)  # type: ignore[arg-type]
    web = LabelSelector(match_labels={"app": "web"})
    not_web = LabelSelector(
        match_expressions=(LabelRequirement(key="app", operator="NotIn", values=("web",)),)
    )
    for p in (pod("web-0", "10.0.0.1"), pod("api-0", "10.0.0.2", app="api")):
        cache.on_event("ADDED", pod_body(p))
    pods = cache.of("shop")

    def scan(selector: LabelSelector) -> list[str]:
        return sorted(p.name for p in pods if is_governed(p, selector, "shop"))

    first = cache.governed("shop", web)
    assert sorted(p.name for p in first) == scan(web) == ["web-0"]
    assert [p.name for p in cache.governed("shop", not_web)] == scan(not_web) == ["api-0"]
    # The same selector, another object: the same entry, not matched again.
    assert cache.governed("shop", LabelSelector(match_labels={"app": "web"})) is first
    assert cache.governed("staging", web) == ()
    cache.on_event("ADDED", pod_body(pod("web-1", "10.0.0.3")))
    assert sorted(p.name for p in cache.governed("shop", web)) == ["web-0", "web-1"]
    cache.forget("shop", "web-0")
    assert [p.name for p in cache.governed("shop", web)] == ["web-1"]


def test_a_budgets_series_are_kept_set_and_dropped_with_it() -> None:
    from prometheus_client import generate_latest

    from connbudget.policy.usage import Usage
    from connbudget.report.metrics import Metrics

    def usage(connections: int, by_state: dict[str, int]) -> Usage:
        return Usage(
            connections=connections,
            budget=80,
            warning_line=64,
            server_max_connections=100,
            reserved=3,
            server_total=connections,
            leaked=0,
            unattributed=0,
            by_owner=(),
            by_state=by_state,
        )

    metrics = Metrics()

    def lines() -> set[str]:
        text = generate_latest(metrics.registry).decode()
        return {ln for ln in text.splitlines() if 'budget="web"' in ln and "_created" not in ln}

    metrics.record_usage("shop", "web", usage(10, {"idle": 7, "active": 3}), None)
    metrics.record_probe("shop", "web", 0.01)
    metrics.record_usage("shop", "web", usage(12, {"idle": 12}), 30.0)
    got = lines()
    assert 'connbudget_connections{budget="web",namespace="shop",state="idle"} 12.0' in got
    assert 'connbudget_connections{budget="web",namespace="shop",state="active"} 0.0' in got
    assert 'connbudget_usage_ratio{budget="web",namespace="shop"} 0.15' in got
    assert 'connbudget_seconds_to_full{budget="web",namespace="shop"} 30.0' in got
    assert 'connbudget_probe_duration_seconds_count{budget="web",namespace="shop"} 1.0' in got
    metrics.forget("shop", "web")
    assert lines() == set()
    metrics.record_usage("shop", "web", usage(5, {"idle": 5}), None)  # made again
    got = lines()
    assert 'connbudget_budget_connections{budget="web",namespace="shop"} 80.0' in got
    assert 'connbudget_connections{budget="web",namespace="shop",state="idle"} 5.0' in got
