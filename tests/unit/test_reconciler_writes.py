"""Status writes: only when something other than the probe time changed, or as a heartbeat.

The reconciler runs with a fake cycle and a fake API client that records every status patch.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from connbudget import cycle
from connbudget.handlers import reconciler as rec
from connbudget.handlers.status_writer import STATUS_HEARTBEAT_SECONDS
from connbudget.kube.api import Kube, KubeError
from connbudget.probe.postgres import MonitorPool
from connbudget.report import status
from connbudget.report.metrics import Metrics
from unit.builders import NOW

KEY = ("shop", "web")
BODY: dict[str, Any] = {
    "metadata": {"namespace": "shop", "name": "web", "uid": "u1", "generation": 1},
    "spec": {},
}


class PatchRecorder:
    def __init__(self, *, busy: bool = False) -> None:
        self.patches: list[dict[str, Any]] = []
        self.busy = busy  # the client's token bucket below half: heartbeats wait

    def spare(self) -> bool:
        return not self.busy

    async def patch_budget_status(
        self,
        namespace: str,
        name: str,
        body: dict[str, Any],
        *,
        resource_version: str | None = None,
    ) -> str:
        self.patches.append(body)
        return str(len(self.patches))


def probed(at: float, connections: int = 10) -> dict[str, Any]:
    return {
        "observedGeneration": 1,
        "phase": "WithinBudget",
        "lastProbeTime": status.rfc3339(at),
        "usage": {"connections": connections, "budget": 80, "secondsToFull": None},
    }


class Scripted:
    """A cycle that returns the next status of a script, ignoring its arguments."""

    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        self.statuses = statuses

    async def __call__(self, **_: object) -> dict[str, Any] | None:
        return self.statuses.pop(0)


def run_cycles(
    monkeypatch: pytest.MonkeyPatch,
    statuses: list[dict[str, Any]],
    clock: list[float],
    *,
    busy: bool = False,
) -> tuple[rec.Reconciler, PatchRecorder]:
    kube = PatchRecorder(busy=busy)
    ticks = iter(clock)
    r = rec.Reconciler(
        kube=cast(Kube, kube),
        monitors=MonitorPool(),
        metrics=Metrics(),
        monotonic=lambda: next(ticks),
    )
    monkeypatch.setattr(cycle, "run_cycle", Scripted(list(statuses)))
    b = rec.budget_from_body(BODY)
    r.budgets[KEY] = b

    async def main() -> None:
        r.held[0] = lambda: True  # as the leader's worker for the budget: only it writes
        task = asyncio.current_task()
        assert task is not None
        r.workers[KEY] = task
        for _ in statuses:
            await r._once(KEY, b, cycle.Runtime())
        r.workers.clear()

    asyncio.run(main())
    return r, kube


def test_a_probe_that_changes_nothing_else_is_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    # monotonic() is read once per skipped cycle and twice per written one (check, then record).
    _, kube = run_cycles(
        monkeypatch,
        [probed(NOW), probed(NOW + 10), probed(NOW + 20, 11), probed(NOW + 30, 11)],
        clock=[0.0, 10.0, 20.0, 20.0, 30.0],
    )
    assert [p["usage"]["connections"] for p in kube.patches] == [10, 11]
    assert [p["lastProbeTime"] for p in kube.patches] == [
        status.rfc3339(NOW),
        status.rfc3339(NOW + 20),
    ]


def test_the_probe_time_is_still_written_once_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    beat = STATUS_HEARTBEAT_SECONDS
    _, kube = run_cycles(
        monkeypatch,
        [probed(NOW), probed(NOW + 10), probed(NOW + beat)],
        clock=[0.0, 10.0, beat, beat],
    )
    assert [p["lastProbeTime"] for p in kube.patches] == [
        status.rfc3339(NOW),
        status.rfc3339(NOW + beat),
    ]


def test_a_busy_client_defers_heartbeats_but_not_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the token bucket below half, a status due only for its heartbeat is left for a
    quieter cycle; a status that changed, and the first of a process, are written anyway."""
    beat = STATUS_HEARTBEAT_SECONDS
    _, kube = run_cycles(
        monkeypatch,
        [probed(NOW), probed(NOW + beat), probed(NOW + beat + 10, 12)],
        clock=[0.0, 0.0, beat, beat + 10, beat + 10],
        busy=True,
    )
    assert [p["lastProbeTime"] for p in kube.patches] == [
        status.rfc3339(NOW),
        status.rfc3339(NOW + beat + 10),
    ]
    assert kube.patches[-1]["usage"]["connections"] == 12


def test_the_first_cycle_of_a_process_always_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the watch shows may be a previous operator's: the first status of this one is written,
    # so lastProbeTime tells that a new operator is probing.
    monkeypatch.setitem(BODY, "status", probed(NOW))
    _, kube = run_cycles(monkeypatch, [probed(NOW + 10)], clock=[0.0])
    assert len(kube.patches) == 1


def test_a_replica_that_stops_leading_forgets_what_it_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, _ = run_cycles(monkeypatch, [probed(NOW)], clock=[0.0])
    assert KEY in r.status.written
    asyncio.run(r.follow())
    # Another replica writes now: its status (from the watch) is what counts, not ours.
    assert KEY not in r.status.written
    assert KEY not in r.status.written_at
    asyncio.run(r.close())


def test_worth_writing_reads_a_merge_patch() -> None:
    old = {"phase": "WithinBudget", "lastProbeTime": "a", "cooldownUntil": None}

    def worth(new: dict[str, Any], since: float | None = 10.0) -> bool:
        return status.worth_writing(old, new, seconds_since_write=since, heartbeat=60.0)

    assert not worth({"phase": "WithinBudget", "lastProbeTime": "b"})
    # None deletes a field: the same as a field that is not there.
    assert not worth({"phase": "WithinBudget", "lastProbeTime": "b", "unattributed": None})
    assert worth({"cooldownUntil": "2027-01-15T08:00:00.000Z"})
    assert worth({"phase": "OverBudget"})
    # The heartbeat, and a first write, go out whatever they change.
    assert worth({"lastProbeTime": "b"}, since=60.0)
    assert worth({"lastProbeTime": "b"}, since=None)


def test_after_an_api_server_outage_the_next_probe_is_written_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by the fault run: with nothing else changed, a recovered operator showed a fresh
    # lastProbeTime only at the next heartbeat, up to a minute after the API server was back.
    kube = PatchRecorder()
    clock = [0.0]
    r = rec.Reconciler(
        kube=cast(Kube, kube), monitors=MonitorPool(), metrics=Metrics(), monotonic=lambda: clock[0]
    )
    script: list[dict[str, Any] | Exception] = [
        probed(NOW),
        KubeError(504, "no answer from the API server in time (ReadTimeoutError)"),
        probed(NOW + 2),
        probed(NOW + 3),
    ]

    done = asyncio.Event()

    async def scripted(**_: object) -> dict[str, Any] | None:
        clock[0] += 1.0
        step = script.pop(0) if script else None
        if not script:
            done.set()
        if isinstance(step, Exception):
            raise step
        return step

    monkeypatch.setattr(cycle, "run_cycle", scripted)
    monkeypatch.setattr(rec, "TICK_SECONDS", 0.01)
    monkeypatch.setattr(cycle, "seconds_to_next_cycle", lambda *_, **__: 0.01)

    async def play() -> None:
        await r.on_budget(None, BODY)
        r.lead()
        await asyncio.wait_for(done.wait(), timeout=5)
        await asyncio.sleep(0.05)
        await r.close()

    asyncio.run(play())
    # The first probe, and the first after the outage; not the one after it (nothing changed).
    assert [p["lastProbeTime"] for p in kube.patches] == [
        status.rfc3339(NOW),
        status.rfc3339(NOW + 2),
    ]
