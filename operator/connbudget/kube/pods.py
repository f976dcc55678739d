"""Turn a pod's raw body (as kopf or the API gives it) into a ``PodInfo``.

Pure conversion, no API calls: a ReplicaSet's Deployment is found from the pod-template-hash
label (the ReplicaSet is named ``<deployment>-<hash>``), so attribution needs no extra reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connbudget.model import timestamps
from connbudget.model.observations import PodInfo


def owner_of(meta: Mapping[str, Any]) -> tuple[str, str]:
    """The pod's workload as ``(kind, name)``: Deployment behind a ReplicaSet, else the owner."""
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if not refs:
        return "Pod", str(meta.get("name", ""))
    kind, name = str(refs[0].get("kind", "")), str(refs[0].get("name", ""))
    pod_hash = (meta.get("labels") or {}).get("pod-template-hash")
    if kind == "ReplicaSet" and pod_hash and name.endswith(f"-{pod_hash}"):
        return "Deployment", name[: -len(pod_hash) - 1]
    return kind, name


def _ips(status: Mapping[str, Any], one: str, many: str) -> tuple[str, ...]:
    """The addresses a status lists under ``many`` (``[{ip: ...}]``), else its ``one``."""
    listed = [
        str(entry["ip"])
        for entry in status.get(many) or []
        if isinstance(entry, Mapping) and entry.get("ip")
    ]
    single = status.get(one)
    if single and single not in listed:
        listed.insert(0, str(single))
    return tuple(listed)


def pod_info_from_body(body: Mapping[str, Any]) -> PodInfo:
    """The ``PodInfo`` of a pod's body, with every address its status gives (dual-stack too)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    kind, name = owner_of(meta)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        ip=status.get("podIP") or None,
        ips=_ips(status, "podIP", "podIPs"),
        host_ips=_ips(status, "hostIP", "hostIPs"),
        labels=dict(meta.get("labels") or {}),
        owner_kind=kind,
        owner_name=name,
        started_at=timestamps.parse_timestamp(status.get("startTime")),
        created_at=timestamps.parse_timestamp(meta.get("creationTimestamp")) or 0.0,
        phase=str(status.get("phase", "")),
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        restarts=sum(
            int(c.get("restartCount") or 0)
            for c in status.get("containerStatuses") or []
            if isinstance(c, Mapping)
        ),
    )
