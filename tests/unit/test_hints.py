"""Hints: one actionable line, only where the evidence named in the table is there."""

from __future__ import annotations

from connbudget.model.observations import BackendGroup
from connbudget.policy.attribution import Attributed, Via
from connbudget.policy.culprits import LeakShape
from connbudget.policy.evidence import OwnerClass
from connbudget.policy.hints import HINTS, OwnerFacts, hint_for, hints_of, owner_facts
from unit.builders import NOW, pod, pooling


def shape(framework: str) -> LeakShape:
    return LeakShape(
        fingerprint="0123456789abcdef",
        statement='SELECT COUNT(*) AS "__count" FROM "auth_user"',
        tags={"framework": framework} if framework else {},
        count=10,
        share=1.0,
        first_seen=NOW,
        revision="",
    )


def test_the_django_asgi_leak_is_named_only_for_the_releases_it_is_known_in() -> None:
    for framework in ("django:5.0", "django:5.0.1"):
        f = OwnerFacts(owner="Deployment/web", cls=OwnerClass.LEAKING, shapes=[shape(framework)])
        assert "ticket #35059" in (hint_for(f) or "")
    for framework in ("django:5.0.2", "django:4.2.9", "flask:3.0", ""):
        f = OwnerFacts(owner="Deployment/web", cls=OwnerClass.LEAKING, shapes=[shape(framework)])
        assert hint_for(f) is None, framework
    # A Django 5.0.1 app that does not leak gets no leak hint.
    f = OwnerFacts(owner="Deployment/web", cls=OwnerClass.POOLING, shapes=[shape("django:5.0.1")])
    assert hint_for(f) is None


def test_a_pool_above_the_budget_and_connections_without_a_name() -> None:
    pooled = OwnerFacts(
        owner="Deployment/api", cls=OwnerClass.POOLING, pods=4, max_per_pod=10, budget=30
    )
    assert "10 connections per pod times 4 pods is 40, above the budget of 30" in (
        hint_for(pooled) or ""
    )
    within = OwnerFacts(
        owner="Deployment/api", cls=OwnerClass.POOLING, pods=3, max_per_pod=10, budget=30
    )
    assert hint_for(within) is None
    unnamed = OwnerFacts(owner="Deployment/api", cls=OwnerClass.STEADY, unnamed=3)
    assert "PGAPPNAME" in (hint_for(unnamed) or "")


def test_facts_come_from_direct_backends_of_judged_owners() -> None:
    a, b = pod("web-1", "10.0.0.1"), pod("web-2", "10.0.0.2")
    other = pod("batch-1", "10.0.0.9", owner="batch")

    def group(n: int, app: str) -> BackendGroup:
        return BackendGroup(
            database="app",
            user="app",
            application_name=app,
            client_addr=None,
            state="idle",
            count=n,
            max_idle_seconds=1.0,
            oldest_backend_start=NOW - 60,
        )

    attributed = [
        Attributed(group=group(6, "web-1"), pod=a, via=Via.CLIENT_ADDR),
        Attributed(group=group(2, ""), pod=a, via=Via.CLIENT_ADDR),
        Attributed(group=group(5, "web-2"), pod=b, via=Via.CLIENT_ADDR),
        Attributed(group=group(50, ""), pod=other, via=Via.CLIENT_ADDR),
        Attributed(group=group(40, "web-2"), pod=b, via=Via.POOLER),
    ]
    owners = {"Deployment/web": pooling("Deployment/web")}
    (facts,) = owner_facts(owners=owners, attributed=attributed, shapes={}, budget=12)
    assert (facts.pods, facts.max_per_pod, facts.unnamed) == (2, 8, 2)
    # Two kinds of evidence: the first hint of the table that applies is the one shown.
    assert hints_of([facts]) == {"Deployment/web": hint_for(facts)}
    assert "PGAPPNAME" in hints_of([facts])["Deployment/web"]


def test_every_hint_says_what_triggers_it() -> None:
    names = [h.name for h in HINTS]
    assert len(names) == len(set(names))
    assert all(h.evidence for h in HINTS)


def test_a_workload_that_dies_on_termination_is_told_the_librarys_fix() -> None:
    facts = OwnerFacts(owner="Deployment/web", cls=OwnerClass.LEAKING, dies_on_termination=True)
    hint = hint_for(facts)
    assert hint is not None
    assert "listen for 'error'" in hint
    assert hint_for(OwnerFacts(owner="Deployment/web", cls=OwnerClass.LEAKING)) is None
