"""Where a leak is: leaking owners' abandoned connections grouped by what they last ran."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

from connbudget.model.observations import LastStatement, PodInfo
from connbudget.policy.culprits import (
    MAX_ASKED_PER_POLL,
    TOP_SHAPES,
    Culprits,
    LeakShape,
    revision_of,
    with_rollouts,
)
from connbudget.policy.evidence import Evidence, OwnerEvidence
from connbudget.policy.fingerprint import HIDDEN
from connbudget.report.events import where_text
from unit.test_evidence import FLOOR, IDLE_SECONDS, T0, Conn, leak, pool

SECRET = "planted-S3cret-literal"
COUNT = (
    "SELECT COUNT(*) AS \"__count\" FROM \"auth_user\" /*framework='django%3A5.0.1',route='sync/'*/"
)
LOGIN = f"SELECT id FROM accounts WHERE password = '{SECRET}' AND id = 42"


def pods_of(conns: list[Conn], revision: str = "7457d5dc96") -> dict[str, PodInfo]:
    return {
        c.pod: PodInfo(
            namespace="shop",
            name=c.pod,
            uid=f"uid-{c.pod}",
            ip=None,
            labels={"pod-template-hash": revision},
            owner_kind="Deployment",
            owner_name=c.owner.split("/", 1)[1],
        )
        for c in conns
    }


class Server:
    """What pg_stat_activity says each connection last ran; counts what is asked of it."""

    def __init__(self, queries: dict[int, str]) -> None:
        self.queries = queries
        self.asked: list[int] = []

    def statements(self, backends: tuple[tuple[int, float], ...]) -> list[LastStatement]:
        self.asked += [pid for pid, _ in backends]
        return [
            LastStatement(pid=pid, backend_start=start, query_id=None, query=self.queries[pid])
            for pid, start in backends
        ]


def run(
    conns: list[Conn], server: Server, *, until: float, pods: dict[str, PodInfo] | None = None
) -> tuple[Culprits, dict[str, OwnerEvidence], dict[str, tuple[LeakShape, ...]]]:
    ev, culprits = Evidence(), Culprits()
    pods = pods if pods is not None else pods_of(conns)
    t = T0
    owners: dict[str, OwnerEvidence] = {}
    shapes: dict[str, tuple[LeakShape, ...]] = {}
    while t <= until:
        seen = [s for c in conns if (s := c.seen_at(t)) is not None]
        ev.observe(at=t, seen=seen, floor=FLOOR)
        # Under pressure: where a leak is, not how soon it is named, is what is tested here.
        owners = ev.judge(at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=True)
        ask = culprits.ask(owners, pods, at=t)
        culprits.record(at=t, ask=ask, found=server.statements(ask.backends))
        leaking = [o for o, e in owners.items() if e.cls.value == "Leaking"]
        shapes = dict(culprits.shapes(at=t, leaking=leaking))
        t += 1.0
    return culprits, owners, shapes


def test_a_leak_is_named_by_its_last_statement_and_tags_without_literals() -> None:
    web = leak(2.0, seconds=30, owner="Deployment/web")
    jobs = leak(1.0, seconds=30, owner="Deployment/jobs")
    for i, c in enumerate(jobs):
        c.pid, c.pod = 50_000 + i, "jobs-1"
    server = Server({c.pid: COUNT for c in web} | {c.pid: LOGIN for c in jobs})
    culprits, _, shapes = run(web + jobs, server, until=T0 + 30)
    (count,) = shapes["Deployment/web"]
    (login,) = shapes["Deployment/jobs"]
    assert count.statement == 'SELECT COUNT(*) AS "__count" FROM "auth_user"'
    assert count.tags == {"route": "sync/", "framework": "django:5.0.1"}
    assert count.share == 1.0
    assert count.revision == "web-7457d5dc96"
    assert count.count >= 40
    assert count.fingerprint != login.fingerprint
    assert SECRET not in json.dumps([asdict(s) for s in (count, login)], default=str)
    assert "42" not in login.statement
    assert culprits.visible is True
    # Each abandoned connection was asked about once, never again.
    assert len(server.asked) == len(set(server.asked))


def test_only_leaking_owners_are_asked_about() -> None:
    healthy = pool(4, gaps=(2.0, 5.0), seconds=40)
    server = Server({c.pid: "SELECT 1" for c in healthy})
    culprits, owners, shapes = run(healthy, server, until=T0 + 40)
    assert owners["Deployment/pool"].cls.value == "Pooling"
    assert server.asked == []
    assert shapes == {}
    assert culprits.visible is None  # nothing asked: nothing to say


def test_shapes_are_ranked_and_shared_and_at_most_three() -> None:
    web = leak(5.0, seconds=20)
    texts = [f"SELECT {i} FROM t{i}" for i in range(5)]
    # Statement i gets a share that falls with i.
    weights = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4]
    server = Server({c.pid: texts[weights[n % len(weights)]] for n, c in enumerate(web)})
    _, _, shapes = run(web, server, until=T0 + 20)
    ranked = shapes["Deployment/web"]
    assert len(ranked) == TOP_SHAPES
    counts = [s.count for s in ranked]
    assert counts == sorted(counts, reverse=True)
    assert ranked[0].statement == "SELECT ? FROM t0"
    assert 0 < sum(s.share for s in ranked) <= 1.0


def test_hidden_statements_count_but_are_not_shown() -> None:
    web = leak(2.0, seconds=20)
    server = Server({c.pid: HIDDEN for c in web})
    culprits, owners, shapes = run(web, server, until=T0 + 20)
    assert owners["Deployment/web"].cls.value == "Leaking"
    assert culprits.visible is False
    assert shapes == {}


def test_a_burst_is_asked_about_a_hundred_at_a_time() -> None:
    web = leak(400.0, seconds=6)
    server = Server({c.pid: "SELECT 1" for c in web})
    ev, culprits = Evidence(), Culprits()
    pods = pods_of(web)
    t = T0 + 10
    ev.observe(at=t, seen=[s for c in web if (s := c.seen_at(t)) is not None], floor=FLOOR)
    owners = ev.judge(at=t, floor=FLOOR, idle_seconds=IDLE_SECONDS, pressure=True)
    first = culprits.ask(owners, pods, at=t)
    assert len(first.backends) == MAX_ASKED_PER_POLL
    culprits.record(at=t, ask=first, found=server.statements(first.backends))
    second = culprits.ask(owners, pods, at=t)
    assert not set(first.backends) & set(second.backends)


def test_revisions_of_deployments_statefulsets_and_bare_pods() -> None:
    def info(kind: str, labels: dict[str, str]) -> PodInfo:
        return PodInfo(
            namespace="shop",
            name="p",
            uid="u",
            ip=None,
            labels=labels,
            owner_kind=kind,
            owner_name="web",
        )

    assert revision_of(info("Deployment", {"pod-template-hash": "abc12"})) == "web-abc12"
    assert revision_of(info("StatefulSet", {"controller-revision-hash": "web-5d4f"})) == "web-5d4f"
    assert revision_of(info("Pod", {})) == ""


def test_ended_connections_count_for_the_window_and_first_seen_is_kept_while_it_leaks() -> None:
    web = leak(2.0, seconds=120)
    for c in web:
        c.end = c.start + 10  # each terminated 10 s after it was opened
    _, _, early = run(web, Server({c.pid: COUNT for c in web}), until=T0 + 30)
    server = Server({c.pid: COUNT for c in web})
    _, _, late = run(web, server, until=T0 + 120)
    (e,) = early["Deployment/web"]
    (lt,) = late["Deployment/web"]
    assert lt.first_seen == e.first_seen
    # The open ones and those ended within the last minute count, not the ones before.
    assert 2.0 * 60 <= lt.count <= 2.0 * 70 + 5
    assert len(server.asked) == len(set(server.asked))


def test_a_leak_only_the_new_revision_has_came_with_a_rollout() -> None:
    web = leak(2.0, seconds=30)
    server = Server({c.pid: COUNT for c in web})
    _, _, shapes = run(web, server, until=T0 + 30, pods=pods_of(web, revision="new"))
    old = pods_of([Conn(pid=1, start=T0, pod="web-old")], revision="old")["web-old"]
    new = pods_of(web, revision="new")["web-1"]
    (during,) = with_rollouts(shapes, [old, new])["Deployment/web"]
    assert during.rollout
    assert during.revision == "web-new"
    assert "on revision web-new only: it came with a rollout" in where_text(during)
    # Once the rollout is done (no pod of another revision), or before it: no rollout to blame.
    (after,) = with_rollouts(shapes, [new])["Deployment/web"]
    assert not after.rollout
    gone = dataclasses.replace(old, terminating=True)
    (ending,) = with_rollouts(shapes, [gone, new])["Deployment/web"]
    assert not ending.rollout
