"""The pod index: every pod of the watched namespaces, kept current by a watch (never a LIST
per poll), converted to ``PodInfo`` once per change."""

from __future__ import annotations

import kopf

from connbudget.kube.pods import pod_info_from_body
from connbudget.model.observations import PodInfo


@kopf.index("", "v1", "pods", id="pods")
def pods_by_namespace(body: kopf.Body, namespace: str | None, **_: object) -> dict[str, PodInfo]:
    return {namespace or "": pod_info_from_body(body)}
