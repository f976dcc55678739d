"""The pods the watch delivered, and the index attribution looks addresses up in.

One cache for every budget of a replica. The watch adds, changes and deletes pods (``on_event``);
an eviction answered 404 drops one at once (``forget``); and while the replica leads, a periodic
``resync`` drops the pods the API server no longer has but the watch never said were deleted
(a watch that expired, 410 Gone, is listed again by kopf, and a pod deleted meanwhile gets no
DELETED event): a ghost could suppress NoPodsSelected or be picked for a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from connbudget.kube.api import Kube
from connbudget.kube.pods import pod_info_from_body
from connbudget.model.observations import PodInfo
from connbudget.model.spec import LabelSelector
from connbudget.policy import attribution
from connbudget.policy.attribution import PodIndex
from connbudget.policy.usage import is_governed

log = logging.getLogger("connbudget.pods")
GOVERNED_CACHE_SIZE = 10_000  # selectors kept (one per budget, about)


class PodCache:
    def __init__(
        self,
        kube: Kube,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        all_namespaces: bool = True,
    ) -> None:
        self.kube = kube
        self.monotonic = monotonic
        # Whether the watch delivers every namespace's pods (``PodIndex.all_namespaces``).
        self.all_namespaces = all_namespaces
        self.pods: dict[str, dict[str, PodInfo]] = {}  # namespace -> uid -> pod
        self._seen_at: dict[str, float] = {}  # pod uid -> when (monotonic) the watch last told
        # Attribution looks addresses up among every pod seen: one index per change of the pods,
        # shared by every budget (the by-name part is per namespace).
        self._version = 0
        self._addresses: tuple[int, dict[str, list[PodInfo]], dict[str, list[PodInfo]]] = (
            -1,
            {},
            {},
        )
        self._indexes: dict[str, tuple[int, PodIndex]] = {}
        # (namespace, selector key) -> (version, the pods it matches): budgets pass every poll
        # and the pods rarely change, so a selector is matched once per change of the pods.
        self._governed: dict[tuple[str, Hashable], tuple[int, tuple[PodInfo, ...]]] = {}

    def on_event(self, event: str | None, body: Mapping[str, Any]) -> None:
        """A pod as the watch delivered it (``DELETED``, or anything else: added or changed)."""
        pod = pod_info_from_body(body)
        pods = self.pods.setdefault(pod.namespace, {})
        if event == "DELETED":
            pods.pop(pod.uid, None)
            self._seen_at.pop(pod.uid, None)
        else:
            pods[pod.uid] = pod
            self._seen_at[pod.uid] = self.monotonic()
        self._version += 1

    def forget(self, namespace: str, name: str) -> None:
        """Drop a pod the API server says is gone (an eviction answered 404)."""
        pods = self.pods.get(namespace, {})
        for uid in [uid for uid, p in pods.items() if p.name == name]:
            pods.pop(uid)
            self._seen_at.pop(uid, None)
            self._version += 1

    def governed(self, namespace: str, selector: LabelSelector) -> tuple[PodInfo, ...]:
        """The pods of ``namespace`` that ``selector`` matches (``policy.usage.is_governed``)."""
        key = (namespace, selector.key())
        cached = self._governed.get(key)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        if cached is None and len(self._governed) >= GOVERNED_CACHE_SIZE:
            self._governed.clear()  # selectors of budgets long gone: start again
        pods = tuple(
            p for p in self.pods.get(namespace, {}).values() if is_governed(p, selector, namespace)
        )
        self._governed[key] = (self._version, pods)
        return pods

    def of(self, namespace: str) -> list[PodInfo]:
        """The pods of ``namespace``."""
        return list(self.pods.get(namespace, {}).values())

    async def resync(self) -> list[str]:
        """Drop pods the API server no longer has; return them (``namespace/name``).

        Only pods the watch has not told of since the list began are dropped: one it delivered
        meanwhile may be newer than the list.
        """
        dropped: list[str] = []
        for namespace in list(self.pods):
            started = self.monotonic()
            listed = {
                str((b.get("metadata") or {}).get("uid"))
                for b in await self.kube.list_pods(namespace)
            }
            pods = self.pods.get(namespace, {})
            for uid in [u for u in pods if u not in listed and self._seen_at.get(u, 0.0) < started]:
                dropped.append(f"{namespace}/{pods.pop(uid).name}")
                self._seen_at.pop(uid, None)
        if dropped:
            self._version += 1
            log.warning("pods the watch missed deleting dropped", extra={"pods": dropped})
        return dropped

    def index(self, namespace: str) -> PodIndex:
        """Every pod seen, by address and node address, and the pods of ``namespace`` by name."""
        version = self._version
        cached = self._indexes.get(namespace)
        if cached is not None and cached[0] == version:
            return cached[1]
        if self._addresses[0] != version:
            by_ip, by_host = attribution.index_addresses(
                p for ns_pods in self.pods.values() for p in ns_pods.values()
            )
            self._addresses = (version, by_ip, by_host)
        index = PodIndex(
            namespace=namespace,
            by_ip=self._addresses[1],
            by_host=self._addresses[2],
            by_name={p.name: p for p in self.pods.get(namespace, {}).values()},
            all_namespaces=self.all_namespaces,
        )
        self._indexes[namespace] = (version, index)
        return index
