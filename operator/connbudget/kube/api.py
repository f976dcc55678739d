"""Calls to the Kubernetes API: Secrets, evictions, deletions, rollout restarts and ``/scale``.

Uses the official (synchronous) client in a worker thread, so the operator's event loop never
blocks. ``ApiException`` never leaves this module: callers get ``KubeError`` with a status code and
a message, or a typed result.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import enum
import functools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from connbudget import __version__
from connbudget.kube.flow import DEFAULT_BURST, DEFAULT_QPS, TokenBucket
from connbudget.model.spec import GROUP, KIND, PLURAL, VERSION, ObjectRef, SecretRef

T = TypeVar("T")
RESTARTED_AT_ANNOTATION = "connbudget.io/restartedAt"
SECRET_TTL_SECONDS = 30.0  # how long a Secret's value is reused before it is read again
# Every API call's deadline: connecting, then waiting for the answer (seconds). Shorter than a
# Lease's renew deadline, so a hung renewal is known to have failed before the Lease runs out.
CONNECT_TIMEOUT_SECONDS = 3.0
REQUEST_TIMEOUT_SECONDS = 5.0
GATEWAY_TIMEOUT = 504  # the status a call past its deadline reports
HOSTNAME = os.environ.get("HOSTNAME") or socket.gethostname()
# Threads for the client's blocking calls (the default executor has min(32, cores + 4): 6 on two
# cores, where a few slow writes would hold every thread), and apart from them a few for Leases.
CALL_THREADS = 16
LEASE_THREADS = 4


@dataclass(frozen=True, kw_only=True)
class BudgetRef:
    namespace: str
    name: str
    uid: str


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SecretProblem(Exception):
    """The Secret or its key is missing, or unreadable (message says which, never the value)."""


class EvictionResult(enum.StrEnum):
    EVICTED = "Evicted"
    BLOCKED = "Blocked"  # a PodDisruptionBudget refused (HTTP 429)
    GONE = "Gone"  # the pod (with that UID) no longer exists


@dataclass(frozen=True, kw_only=True)
class Scale:
    replicas: int
    selector: str  # status.selector: the label selector of the target's pods


def _reason(e: ApiException) -> str:
    try:
        import json

        return str(json.loads(e.body).get("message", e.reason))
    except (ValueError, TypeError, AttributeError):
        return str(e.reason)


FIELD_MANAGER = "connbudget"
# Controllers that keep a workload as Git has it, whatever operation they write with.
GITOPS_MANAGERS = frozenset(
    {
        "kustomize-controller",
        "helm-controller",
        "argocd-controller",
        "argocd-application-controller",
    }
)


def replica_managers(managed_fields: list[Any]) -> list[str]:
    """Who else owns ``spec.replicas`` per ``managedFields``: a manager that applied it
    (server-side apply: a GitOps tool, or anyone declaring the count), or a known GitOps
    controller that wrote it. The operator's own entry, and plain updates (``kubectl scale``,
    an HPA through ``/scale``), are left out."""
    out = set()
    for entry in managed_fields:
        if not isinstance(entry, dict):
            continue
        manager = str(entry.get("manager") or "")
        spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if manager == FIELD_MANAGER or "f:replicas" not in spec:
            continue
        if entry.get("operation") == "Apply" or manager in GITOPS_MANAGERS:
            out.add(f"field manager {manager}")
    return sorted(out)


class Kube:
    """One API client, shared by every budget."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
    ) -> None:
        self.api = api
        # Leases go through a client of their own (its own connection pool and threads, outside
        # the token bucket): a renewal never waits behind status writes (``call_lease``).
        self.lease_api = kubernetes.client.ApiClient(api.configuration)
        self.lease_api.user_agent = api.user_agent
        self.flow = TokenBucket(qps, burst)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            CALL_THREADS, thread_name_prefix="kube-call"
        )
        self._lease_threads = concurrent.futures.ThreadPoolExecutor(
            LEASE_THREADS, thread_name_prefix="kube-lease"
        )
        self._secrets: dict[tuple[str, str, str], tuple[str, float]] = {}
        # One read per Secret key at a time, awaited by every budget that needs it meanwhile (the
        # budgets sharing a Secret find its cached value expired at the same slot), and how many
        # times each was forgotten (a read begun before is not cached).
        self._reading: dict[tuple[str, str, str], asyncio.Future[str]] = {}
        self._forgotten: dict[tuple[str, str, str], int] = {}
        # (namespace, name, uid, type, reason, series) -> (Event name, count)
        self._event_series: dict[tuple[str, str, str, str, str, str], tuple[str, int]] = {}
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self._plurals: dict[tuple[str, str], str] = {}

    @classmethod
    def from_environment(
        cls,
        kubeconfig: str | None = None,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
    ) -> Kube:
        """In a pod: its ServiceAccount; elsewhere: ``kubeconfig`` or ``$KUBECONFIG``; calls
        limited to ``qps`` a second after a ``burst`` (``kube.flow``)."""
        config = kubernetes.client.Configuration()
        # As many pooled connections as threads that may use them (urllib3 would otherwise open
        # and drop connections beyond its default of 5 x cores).
        config.connection_pool_maxsize = CALL_THREADS
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
        api = kubernetes.client.ApiClient(config)
        # The API server names the field manager of our writes after the user agent's product:
        # managedFields then show "connbudget" owning status and the pooler's replicas, which is
        # what GitOps users look for when they diff.
        api.user_agent = f"{FIELD_MANAGER}/{__version__}"
        return cls(api, qps=qps, burst=burst)

    def spare(self) -> bool:
        """Whether calls that can wait (a status's heartbeat) should go now (``kube.flow``)."""
        return self.flow.spare()

    async def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Call one method of the generated client in a thread, within a deadline, after waiting
        for the token bucket (``kube.flow``).

        Every call has a timeout (connect and read, and the same bound again around the thread):
        a hung API server must not hold a worker. A call past its deadline raises ``KubeError``
        504. The wait for a token is not part of the deadline: it is this process's own pacing.
        """
        await self.flow.take()
        return await self._run(self._threads, fn, *args, **kwargs)

    async def call_lease(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """A Lease call (``fn`` of an API built on ``lease_api``): its own threads and
        connections, no token bucket, the same deadline, so a hung renewal is known to have
        failed before the renew deadline, and a busy client never delays one."""
        return await self._run(self._lease_threads, fn, *args, **kwargs)

    async def _run(
        self,
        threads: concurrent.futures.Executor,
        fn: Callable[..., T],
        *args: object,
        **kwargs: object,
    ) -> T:
        kwargs.setdefault("_request_timeout", (CONNECT_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS))
        deadline = CONNECT_TIMEOUT_SECONDS + REQUEST_TIMEOUT_SECONDS + 1.0
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(threads, functools.partial(fn, *args, **kwargs)), deadline
            )
        except ApiException as e:
            raise KubeError(int(e.status or 0), _reason(e)) from None
        except (TimeoutError, urllib3.exceptions.HTTPError) as e:
            raise KubeError(
                GATEWAY_TIMEOUT, f"no answer from the API server in time ({type(e).__name__})"
            ) from None

    async def read_secret_value(self, namespace: str, ref: SecretRef) -> str:
        """Read one key of a Secret (kept in memory for ``SECRET_TTL_SECONDS``).

        Raises ``SecretProblem`` naming what is missing. Every budget polls, so reading the Secret
        at every poll would cost the API server one GET per budget and poll; a changed Secret is
        seen within the TTL, and at once after ``forget_secret`` (called when the DSN failed).
        """
        key = (namespace, ref.name, ref.key)
        cached = self._secrets.get(key)
        if cached is not None and time.monotonic() - cached[1] < SECRET_TTL_SECONDS:
            return cached[0]
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.ensure_future(self._read_and_keep(key, namespace, ref))
            self._reading[key] = reading

            def done(f: asyncio.Future[str], key: tuple[str, str, str] = key) -> None:
                if self._reading.get(key) is f:
                    del self._reading[key]

            reading.add_done_callback(done)
        # Shielded: a budget whose pass is cancelled must not cancel the read the others await.
        return await asyncio.shield(reading)

    async def _read_and_keep(
        self, key: tuple[str, str, str], namespace: str, ref: SecretRef
    ) -> str:
        forgotten = self._forgotten.get(key, 0)
        started = time.monotonic()
        value = await self._read_secret_value(namespace, ref)
        if self._forgotten.get(key, 0) == forgotten:
            self._secrets[key] = (value, started)
        return value

    def forget_secret(self, namespace: str, ref: SecretRef) -> None:
        """Drop a cached Secret value, so the next read asks the API server (a read already under
        way is neither cached nor handed to a later caller)."""
        key = (namespace, ref.name, ref.key)
        self._secrets.pop(key, None)
        self._reading.pop(key, None)
        self._forgotten[key] = self._forgotten.get(key, 0) + 1

    async def _read_secret_value(self, namespace: str, ref: SecretRef) -> str:
        try:
            secret = await self.call(self.core.read_namespaced_secret, ref.name, namespace)
        except KubeError as e:
            if e.status == 404:
                raise SecretProblem(f"Secret {namespace}/{ref.name} not found") from None
            if e.status == 403:
                raise SecretProblem(
                    f"not allowed to read Secret {namespace}/{ref.name}: grant the "
                    "operator get on secrets in this namespace"
                ) from None
            raise
        data = secret.data or {}
        if ref.key not in data:
            raise SecretProblem(f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
        try:
            return base64.b64decode(data[ref.key]).decode().strip()
        except (ValueError, UnicodeDecodeError):
            raise SecretProblem(
                f"key {ref.key!r} of Secret {namespace}/{ref.name} is not UTF-8 text"
            ) from None

    async def evict_pod(
        self, namespace: str, name: str, uid: str, *, dry_run: bool
    ) -> EvictionResult:
        """Evict through the Eviction API (PodDisruptionBudgets apply); only the pod ``uid``."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
            "deleteOptions": {
                "preconditions": {"uid": uid},
                **({"dryRun": ["All"]} if dry_run else {}),
            },
        }
        try:
            await self.call(
                self.core.create_namespaced_pod_eviction,
                name,
                namespace,
                body,
                **({"dry_run": "All"} if dry_run else {}),
            )
        except KubeError as e:
            if e.status == 429:
                return EvictionResult.BLOCKED
            if e.status in (404, 409):
                return EvictionResult.GONE
            raise
        return EvictionResult.EVICTED

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, dry_run: bool
    ) -> EvictionResult:
        body = {"preconditions": {"uid": uid}, **({"dryRun": ["All"]} if dry_run else {})}
        try:
            await self.call(
                self.core.delete_namespaced_pod,
                name,
                namespace,
                body=body,
                **({"dry_run": "All"} if dry_run else {}),
            )
        except KubeError as e:
            if e.status in (404, 409):
                return EvictionResult.GONE
            raise
        return EvictionResult.EVICTED

    async def rollout_restart(
        self, namespace: str, kind: str, name: str, *, now: float, dry_run: bool
    ) -> None:
        """Restart a Deployment, StatefulSet or DaemonSet as ``kubectl rollout restart`` does."""
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {
            "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: stamp}}}}
        }
        fn = {
            "Deployment": self.apps.patch_namespaced_deployment,
            "StatefulSet": self.apps.patch_namespaced_stateful_set,
            "DaemonSet": self.apps.patch_namespaced_daemon_set,
        }.get(kind)
        if fn is None:
            raise KubeError(422, f"{kind} cannot be rollout-restarted")
        await self.call(fn, name, namespace, patch, **({"dry_run": "All"} if dry_run else {}))

    async def patch_budget_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, object],
        *,
        resource_version: str | None = None,
    ) -> str | None:
        """Merge-patch a ConnectionBudget's status subresource (never its spec); return the
        object's new ``resourceVersion``.

        With ``resource_version`` the write is conditional: the API server refuses it (409,
        ``KubeError``) if the object changed since, so a replica with a stale view never
        overwrites another's status (its cooldown, say).
        """
        body: dict[str, object] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        written = await self.call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body,
        )
        meta = written.get("metadata") if isinstance(written, dict) else None
        return str(meta.get("resourceVersion")) if isinstance(meta, dict) else None

    async def read_budget(self, namespace: str, name: str) -> dict[str, Any]:
        """Read a ConnectionBudget (after a conflict: what the others wrote)."""
        got = await self.call(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )
        return dict(got)

    async def post_event(
        self,
        ref: BudgetRef,
        type_: str,
        reason: str,
        message: str,
        *,
        now: float,
        series: str | None = None,
    ) -> None:
        """Record a core/v1 Event about a ConnectionBudget.

        Events of one ``series`` (say, one episode) with the same reason are one Event, updated
        with a count, the latest message and ``lastTimestamp``, the way the kubelet's recorder
        aggregates repeats: a person reads one line per reason, not one per poll. If that Event
        is gone (expired), a new one starts.
        """
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = (ref.namespace, ref.name, ref.uid, type_, reason, series or "")
        previous = self._event_series.get(key) if series is not None else None
        if previous is not None:
            name, count = previous
            patch = {"message": message[:1024], "lastTimestamp": stamp, "count": count + 1}
            try:
                await self.call(self.core.patch_namespaced_event, name, ref.namespace, patch)
            except KubeError as e:
                if e.status != 404:
                    raise
            else:
                self._event_series[key] = (name, count + 1)
                return
        body = {
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "connbudget"},
            "reportingComponent": "connbudget.io/operator",
            "reportingInstance": HOSTNAME,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        created = await self.call(self.core.create_namespaced_event, ref.namespace, body)
        if series is not None:
            # This reason's series of other episodes of this budget are finished: forget them
            # (not other reasons': a LeakDetected Event, whose series is the workload, must not
            # end the episode's IdleConnectionsTerminated one). At most one per reason is kept.
            for k in [
                k
                for k in self._event_series
                if k[:3] == key[:3] and k[4] == key[4] and k[5] != key[5]
            ]:
                del self._event_series[k]
            self._event_series[key] = (str(created.metadata.name), 1)

    async def _plural(self, api_version: str, kind: str) -> str:
        """The resource name of ``kind`` in ``api_version`` (discovered once, then cached)."""
        key = (api_version, kind)
        if key not in self._plurals:
            group, _, version = api_version.rpartition("/")
            if not group:
                raise KubeError(
                    422,
                    f"{kind} in the core API group has no /scale subresource the operator can use",
                )
            listing = await self.call(self.custom.get_api_resources, group, version)
            for r in listing.resources or []:
                if r.kind == kind and "/" not in r.name:
                    self._plurals[key] = r.name
                    break
            else:
                raise KubeError(404, f"no resource of kind {kind} in {api_version}")
        return self._plurals[key]

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        """Every pod of ``namespace`` as the API server's watch cache has it (``resourceVersion``
        0: cheap), as plain dicts shaped like watch bodies."""
        listed = await self.call(self.core.list_namespaced_pod, namespace, resource_version="0")
        items = self.api.sanitize_for_serialization(listed.items or [])
        return [dict(i) for i in items]

    async def count_pods(self, namespace: str, label_selector: str) -> int:
        """Pods matching ``label_selector`` per the API server (at most 1 is asked for): the
        watch index's answer is confirmed this way before a selector is said to match nothing."""
        listed = await self.call(
            self.core.list_namespaced_pod, namespace, label_selector=label_selector, limit=1
        )
        return len(listed.items or [])

    async def read_scale(self, namespace: str, target: ObjectRef) -> Scale:
        """Read the target's ``/scale`` subresource."""
        group, _, version = target.api_version.rpartition("/")
        plural = await self._plural(target.api_version, target.kind)
        obj = await self.call(
            self.custom.get_namespaced_custom_object_scale,
            group,
            version,
            namespace,
            plural,
            target.name,
        )
        if not isinstance(obj, dict):
            obj = self.api.sanitize_for_serialization(obj)
        return Scale(
            replicas=int(
                (obj.get("status") or {}).get("replicas")
                or (obj.get("spec") or {}).get("replicas")
                or 0
            ),
            selector=str((obj.get("status") or {}).get("selector") or ""),
        )

    async def replica_managers(self, namespace: str, target: ObjectRef) -> list[str]:
        """Field managers other than the operator that set the target's ``spec.replicas`` by
        server-side apply, or known GitOps controllers (see ``replica_managers``)."""
        group, _, version = target.api_version.rpartition("/")
        plural = await self._plural(target.api_version, target.kind)
        obj = await self.call(
            self.custom.get_namespaced_custom_object, group, version, namespace, plural, target.name
        )
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        fields = meta.get("managedFields") if isinstance(meta, dict) else None
        return replica_managers(fields if isinstance(fields, list) else [])

    async def autoscalers_of(self, namespace: str, target: ObjectRef) -> list[str]:
        """Names of the HorizontalPodAutoscalers (KEDA's ScaledObjects make one each) whose
        ``scaleTargetRef`` is ``target``: they own its replica count, not the operator."""
        listed = await self.call(
            kubernetes.client.AutoscalingV2Api(self.api).list_namespaced_horizontal_pod_autoscaler,
            namespace,
        )
        group = target.api_version.rpartition("/")[0]
        out = []
        for hpa in listed.items or []:
            ref = hpa.spec.scale_target_ref
            if (
                ref.kind == target.kind
                and ref.name == target.name
                and (ref.api_version or "").rpartition("/")[0] == group
            ):
                out.append(f"HorizontalPodAutoscaler/{hpa.metadata.name}")
        return sorted(out)

    async def patch_scale(
        self, namespace: str, target: ObjectRef, replicas: int, *, dry_run: bool
    ) -> None:
        group, _, version = target.api_version.rpartition("/")
        plural = await self._plural(target.api_version, target.kind)
        await self.call(
            self.custom.patch_namespaced_custom_object_scale,
            group,
            version,
            namespace,
            plural,
            target.name,
            {"spec": {"replicas": replicas}},
            **({"dry_run": "All"} if dry_run else {}),
        )
