"""Status writes are conditional: a replica with a stale view never overwrites another's."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from connbudget.handlers.reconciler import Reconciler
from connbudget.handlers.status_writer import StatusConflict
from connbudget.kube.api import KubeError
from connbudget.probe.postgres import MonitorPool
from connbudget.report.metrics import Metrics

THEIRS = {"cooldownUntil": "2027-01-15T08:05:00.000Z", "phase": "Remediating"}


class VersionedKube:
    """A budget whose status only a write naming its current resourceVersion may change."""

    def __init__(self) -> None:
        self.version = 7
        self.status: dict[str, Any] = dict(THEIRS)
        self.writes = 0

    def body(self) -> dict[str, Any]:
        return {
            "metadata": {
                "namespace": "shop",
                "name": "web",
                "uid": "u1",
                "generation": 1,
                "resourceVersion": str(self.version),
            },
            "spec": {},
            "status": dict(self.status),
        }

    async def patch_budget_status(
        self, namespace: str, name: str, status: dict[str, Any], *, resource_version: str | None
    ) -> str:
        if resource_version != str(self.version):
            raise KubeError(409, "the object has been modified")
        self.status.update(status)
        self.version += 1
        self.writes += 1
        return str(self.version)

    async def read_budget(self, namespace: str, name: str) -> dict[str, Any]:
        return self.body()


def test_a_write_on_a_stale_view_is_refused_and_the_view_refreshed() -> None:
    kube = VersionedKube()
    reconciler = Reconciler(kube=kube, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    stale = kube.body()
    stale["metadata"]["resourceVersion"] = "6"  # what this replica saw before the other wrote
    stale["status"] = {}
    asyncio.run(reconciler.on_budget(None, stale))
    key = ("shop", "web")
    ours = {"cooldownUntil": None, "phase": "OverBudget"}
    with pytest.raises(StatusConflict):
        asyncio.run(reconciler.status.write(key, {}, ours))
    assert kube.status == THEIRS  # the other replica's cooldown survives
    assert reconciler.budgets[key].status == THEIRS
    assert reconciler.budgets[key].resource_version == "7"
    # With the fresh view, the next write goes through, and the version follows it.
    asyncio.run(reconciler.status.write(key, THEIRS, {"phase": "Remediating"}))
    assert kube.writes == 1
    assert reconciler.budgets[key].resource_version == "8"


def test_a_conflict_on_its_own_status_is_written_again() -> None:
    kube = VersionedKube()
    reconciler = Reconciler(kube=kube, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    asyncio.run(reconciler.on_budget(None, kube.body()))
    key = ("shop", "web")
    asyncio.run(reconciler.status.write(key, THEIRS, {"phase": "OverBudget"}))
    # The watch now delivers an older echo: the version goes back, the status is this one's.
    older = kube.body()
    older["metadata"]["resourceVersion"] = "7"
    asyncio.run(reconciler.on_budget(None, older))
    asyncio.run(reconciler.status.write(key, kube.status, {"phase": "Remediating"}))
    assert kube.status["phase"] == "Remediating"
    assert kube.writes == 2


def test_an_api_server_away_is_said_once_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Away:
        async def read_secret_value(self, namespace: str, ref: object) -> str:
            raise KubeError(504, "no answer from the API server in time (ReadTimeoutError)")

    reconciler = Reconciler(kube=Away(), monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    body = VersionedKube().body()
    body["spec"] = {
        "database": {"secretRef": {"name": "pg"}},
        "budget": {"maxConnections": 10},
        "selector": {"matchLabels": {"app": "web"}},
        "pollSeconds": 1,
    }

    async def play() -> None:
        await reconciler.on_budget(None, body)
        reconciler.lead()
        await asyncio.sleep(2.5)  # three polls
        await reconciler.close()

    asyncio.run(play())
    said = [r for r in caplog.records if "Kubernetes API call failed" in r.getMessage()]
    assert len(said) == 1
    assert not [r for r in caplog.records if r.exc_info]


def test_stepping_down_is_never_held_by_a_worker_that_lost_its_cancellation() -> None:
    # Python 3.11's asyncio.wait_for can swallow a cancellation; found by the fault run: the
    # replica that stepped down kept a worker and never tried for the Lease again.
    reconciler = Reconciler(kube=VersionedKube(), monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    turns: list[float] = []

    async def deaf(key: object, b: object, runtime: object) -> None:
        turns.append(asyncio.get_running_loop().time())
        with contextlib.suppress(asyncio.CancelledError):  # the lost cancellation
            await asyncio.sleep(0.3)

    reconciler._once = deaf  # type: ignore[method-assign]
    body = VersionedKube().body()
    body["spec"] = {"pollSeconds": 1}

    async def play() -> float:
        await reconciler.on_budget(None, body)
        reconciler.lead()
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await reconciler.follow()
        stepped_down = loop.time() - started
        await asyncio.sleep(2.5)  # a worker still running would take more turns
        await reconciler.close()
        return stepped_down

    stepped_down = asyncio.run(play())
    assert stepped_down < 6
    assert len(turns) == 1


def test_stepping_down_is_never_held_by_a_pod_resync_that_lost_its_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by the 30-minute fault run: follow() awaited the pod resync without a limit; one that
    # lost its cancellation (Python 3.11's wait_for) held it forever, so the replica kept its
    # workers, wrote statuses from what it had written itself (erasing the new leader's
    # cooldown: two evictions 8 s apart under a 30 s cooldown) and never tried for the Lease.
    from connbudget.handlers import reconciler as rec

    monkeypatch.setattr(rec, "POD_RESYNC_SECONDS", 0.05)
    monkeypatch.setattr(rec, "STOP_WAIT_SECONDS", 0.5)
    kube = VersionedKube()
    reconciler = Reconciler(kube=kube, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]
    resyncs: list[float] = []

    async def deaf_resync() -> None:
        resyncs.append(asyncio.get_running_loop().time())
        with contextlib.suppress(asyncio.CancelledError):  # the lost cancellation
            await asyncio.sleep(0.3)

    reconciler.pods.resync = deaf_resync  # type: ignore[method-assign,assignment]
    body = kube.body()
    body["spec"] = {"pollSeconds": 1}

    async def once(key: object, b: object, runtime: object) -> None:
        await asyncio.sleep(0.05)

    reconciler._once = once  # type: ignore[method-assign]

    async def play() -> float:
        await reconciler.on_budget(None, body)
        reconciler.lead()
        await asyncio.sleep(0.1)  # the resync is inside resync_pods
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(reconciler.follow(), timeout=5)
        took = loop.time() - started
        assert not reconciler.workers
        assert reconciler.standby
        count = len(resyncs)
        await asyncio.sleep(0.5)  # a resync still running would take more turns
        assert len(resyncs) == count
        await reconciler.close()
        return took

    assert asyncio.run(play()) < 2


def test_a_replica_that_no_longer_leads_writes_no_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from connbudget import cycle

    kube = VersionedKube()
    reconciler = Reconciler(kube=kube, monitors=MonitorPool(), metrics=Metrics())  # type: ignore[arg-type]

    async def decided(**_: object) -> dict[str, Any]:
        return {"phase": "OverBudget", "cooldownUntil": None}

    monkeypatch.setattr(cycle, "run_cycle", decided)

    async def play() -> None:
        await reconciler.on_budget(None, kube.body())
        b = reconciler.budgets[("shop", "web")]
        await reconciler._once(("shop", "web"), b, cycle.Runtime())  # not leading, no worker

    asyncio.run(play())
    assert kube.writes == 0
    assert kube.status == THEIRS  # the leader's cooldown stays
