"""Backends the monitoring role may not signal: left alone, said, and remembered (fakes, no I/O).

``pg_terminate_backend`` refuses a superuser's backend to a role that is not one (and another
role's backend to a role without ``pg_signal_backend``). The termination statement leaves those
alone and names them; act says how many in its Event, counts a batch of which none could be
signalled as a refused termination (``PermissionDenied``), and remembers them in
``Runtime.not_signalable`` so the plan does not choose them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from connbudget import cycle
from connbudget.cycle import act
from connbudget.cycle.deps import NOT_SIGNALABLE_KEPT
from connbudget.model.actions import IdleBackend, TerminateBackends, Termination
from connbudget.model.spec import parse_spec
from connbudget.policy import plan
from unit.builders import NOW
from unit.test_cycle import (
    DSN,
    OVER_STATUS,
    PASSWORD,
    SPEC,
    WEB1,
    WEB2,
    FakeKube,
    FakeMonitor,
    leaking,
    make_deps,
    run_cycle,
)


def chosen(n: int, pod: str = "web-2") -> tuple[IdleBackend, ...]:
    return tuple(
        IdleBackend(
            pid=100 + i,
            pod=pod,
            idle_seconds=30.0 + i,
            backend_start=NOW - 60.0 - i,
            state_change=NOW - 30.0 - i,
        )
        for i in range(n)
    )


def carry(
    monitor: FakeMonitor, backends: tuple[IdleBackend, ...], runtime: cycle.Runtime
) -> tuple[act.Done, list[tuple[str, str, str]]]:
    """Carry out a plan that terminates ``backends``, and take in what it did."""
    deps, events = make_deps(FakeKube(), monitor, [WEB1, WEB2])
    decision = plan.Decision(
        level=plan.Level.OVER,
        transition=None,
        actions=(TerminateBackends(backends=backends),),
        dry_run=False,
        memory=plan.Memory(),
        seconds_to_full=None,
        reasons=(),
        holds=(),
    )
    spec = parse_spec(SPEC)
    done = asyncio.run(act.carry_out(decision, spec, "shop", "web", monitor, deps, runtime, NOW))
    act.settle(done, decision, plan.Memory(), spec, "shop", runtime, deps)
    return done, events


def test_backends_the_role_may_not_signal_are_left_alone_and_the_rest_terminated() -> None:
    backends = chosen(3)
    monitor = FakeMonitor(leaking())
    monitor.not_permitted = {backends[1].pid}
    rt = cycle.Runtime()
    done, events = carry(monitor, backends, rt)
    assert monitor.terminated == [backends[0].pid, backends[2].pid]
    assert (done.terminated, done.denied, done.termination_denied) == (2, None, False)
    assert done.last is not None
    assert done.last.result == "Succeeded"
    ((kind, reason, message),) = events
    assert (kind, reason) == ("Normal", "IdleConnectionsTerminated")
    assert message.startswith("terminated 2 idle backends of web-2 (2)")
    assert message.endswith("(1 that the monitoring role may not signal, left alone)")
    assert rt.not_signalable == {(backends[1].pid, backends[1].backend_start)}
    assert not rt.termination_denied


def test_a_batch_the_role_may_signal_none_of_is_a_refused_termination() -> None:
    backends = chosen(3)
    monitor = FakeMonitor(leaking())
    monitor.not_permitted = {b.pid for b in backends}
    rt = cycle.Runtime()
    done, events = carry(monitor, backends, rt)
    assert monitor.terminated == []
    assert (done.terminated, done.termination_denied) == (0, True)
    assert done.last is not None
    assert done.last.result == "Failed"
    ((kind, reason, message),) = events
    assert (kind, reason) == ("Warning", "ActionFailed")
    assert done.denied == message
    assert "could not terminate 3 idle backends of web-2 (3)" in message
    assert "the monitoring role may not signal them;" in message
    assert "pg_signal_backend" in message
    assert PASSWORD not in message
    assert DSN not in message
    assert "SELECT" not in message
    assert rt.termination_denied
    assert rt.not_signalable == {(b.pid, b.backend_start) for b in backends}


def test_when_the_rest_were_no_longer_idle_the_refusal_says_how_many() -> None:
    backends = chosen(3)

    class Unchanged(FakeMonitor):
        """The last backend was used again since the probe: not in the statement's answer."""

        async def terminate(self, backends: Iterable[IdleBackend]) -> Termination:
            return Termination(not_permitted=(100, 101))

    done, events = carry(Unchanged(leaking()), backends, cycle.Runtime())
    assert done.termination_denied
    assert "may not signal 2 of them (1 no longer idle)" in events[0][2]


def test_the_backends_remembered_as_not_signalable_are_bounded() -> None:
    old = {(pid, NOW - 1000.0) for pid in range(NOT_SIGNALABLE_KEPT - 2)}
    backends = chosen(2)
    monitor = FakeMonitor(leaking())
    monitor.not_permitted = {b.pid for b in backends}
    rt = cycle.Runtime(not_signalable=set(old))
    carry(monitor, backends, rt)
    mine = {(b.pid, b.backend_start) for b in backends}
    assert rt.not_signalable == old | mine  # up to the cap, the old ones are kept
    more = chosen(3, pod="web-1")
    monitor.not_permitted = {b.pid for b in more}
    carry(monitor, more, rt)
    # Over the cap, only this pass's are kept (the plan asks about them again at worst).
    assert rt.not_signalable == {(b.pid, b.backend_start) for b in more}


def test_a_leak_the_role_may_not_signal_is_permission_denied_in_ready() -> None:
    kube, monitor = FakeKube(), FakeMonitor(leaking())
    monitor.not_permitted = {pid for g in leaking().groups for pid, _, _ in g.idle}
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])
    rt = cycle.Runtime()
    out = run_cycle(
        deps,
        spec={**SPEC, "remediation": {**SPEC["remediation"], "steps": ["TerminateIdle"]}},
        old_status=OVER_STATUS,
        runtime=rt,
    )
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PermissionDenied")
    assert "the monitoring role may not signal them" in ready["message"]
    assert out["lastAction"]["result"] == "Failed"
    assert monitor.terminated == []
    assert rt.termination_denied
    assert rt.not_signalable
    assert all(PASSWORD not in m for _, _, m in events)
