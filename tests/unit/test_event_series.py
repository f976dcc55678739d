"""Events of one series and reason are one Event, counted; another reason's series never ends it.

Found by reading the code: a LeakDetected Event (its series is the leaking workload) made the
episode's next IdleConnectionsTerminated a new Event instead of a count on the existing one.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import kubernetes

from connbudget.kube.api import BudgetRef, Kube

REF = BudgetRef(namespace="shop", name="web", uid="u1")


class FakeCore:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.patched: list[tuple[str, dict[str, Any]]] = []

    def create_namespaced_event(self, namespace: str, body: dict[str, Any], **_: object) -> Any:
        self.created.append(body)
        return SimpleNamespace(metadata=SimpleNamespace(name=f"web.{len(self.created)}"))

    def patch_namespaced_event(
        self, name: str, namespace: str, body: dict[str, Any], **_: object
    ) -> None:
        self.patched.append((name, body))


def post(kube: Kube, reason: str, series: str) -> None:
    asyncio.run(
        kube.post_event(REF, "Normal", reason, f"{reason} in {series}", now=0, series=series)
    )


def test_another_reasons_series_does_not_end_an_episodes_event() -> None:
    kube = Kube(kubernetes.client.ApiClient())
    core = FakeCore()
    kube.core = core
    post(kube, "IdleConnectionsTerminated", "episode-1")
    post(kube, "LeakDetected", "Deployment/web")
    post(kube, "IdleConnectionsTerminated", "episode-1")
    assert [b["reason"] for b in core.created] == ["IdleConnectionsTerminated", "LeakDetected"]
    assert core.patched == [("web.1", core.patched[0][1])]
    assert core.patched[0][1]["count"] == 2
    # A new episode starts a new Event for the reason, and forgets the old episode's.
    post(kube, "IdleConnectionsTerminated", "episode-2")
    post(kube, "IdleConnectionsTerminated", "episode-1")
    assert [b["reason"] for b in core.created][2:] == ["IdleConnectionsTerminated"] * 2
    assert len(kube._event_series) <= 2  # one per reason
