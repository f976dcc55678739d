"""The reconciler: one worker task per ConnectionBudget, running the cycle at the budget's cadence.

Why not a kopf timer: kopf puts a finalizer on every object that has a timer, so deleting a
ConnectionBudget would hang whenever the operator is not running (uninstalled, crash-looping).
The operator writes only status; a worker per budget, fed by watch events, does the same job with
no finalizer, and wakes at once when the budget's spec or annotations change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connbudget import cycle
from connbudget.config import TICK_SECONDS
from connbudget.kube.api import BudgetRef, Kube, KubeError
from connbudget.kube.pods import pod_info_from_body
from connbudget.model.observations import PodInfo, PoolerSample
from connbudget.policy.attribution import PodIndex
from connbudget.policy.shards import shard_of
from connbudget.probe.pgbouncer import sample_poolers
from connbudget.probe.postgres import MonitorPool
from connbudget.report import status
from connbudget.report.metrics import Metrics

log = logging.getLogger("connbudget.reconciler")
Key = tuple[str, str]  # (namespace, name)
STANDBY_CHECK_SECONDS = 10.0  # how often a replica that does not lead checks its connection
STOP_WAIT_SECONDS = 5.0  # how long stopping a worker waits for it to end
# How often the leader lists the pods it knows of, to drop the ones the watch never said were
# deleted (a watch that expired, 410 Gone, is listed again by kopf, and a pod deleted meanwhile
# gets no DELETED event): a ghost could suppress NoPodsSelected or be picked for a restart.
POD_RESYNC_SECONDS = 120.0
# A status that would change only in lastProbeTime is written at most this often (a heartbeat:
# lastProbeTime is never older than this while probing works).
STATUS_HEARTBEAT_SECONDS = 60.0


@dataclass
class Budget:
    """The latest state of a ConnectionBudget, as the watch delivered it."""

    ref: BudgetRef
    generation: int
    spec: dict[str, Any]
    annotations: dict[str, str]
    status: dict[str, Any]
    resource_version: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def budget_from_body(body: Mapping[str, Any]) -> Budget:
    meta = body.get("metadata") or {}
    return Budget(
        ref=BudgetRef(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
        ),
        generation=int(meta.get("generation") or 0),
        spec=dict(body.get("spec") or {}),
        annotations=dict(meta.get("annotations") or {}),
        status=dict(body.get("status") or {}),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


class StatusConflict(Exception):
    """Another writer changed the budget since this replica read it: decide again."""


class Reconciler:
    """Keeps the pod and budget caches, and one worker per budget while this replica leads."""

    def __init__(
        self,
        *,
        kube: Kube,
        monitors: MonitorPool,
        metrics: Metrics,
        monotonic: Callable[[], float] = time.monotonic,
        shards: int = 1,
    ) -> None:
        self.kube = kube
        self.shards = shards
        self.monotonic = monotonic
        self.monitors = monitors
        self.metrics = metrics
        self.pods: dict[str, dict[str, PodInfo]] = {}
        # Attribution looks addresses up among every pod seen: one index per change of the pods,
        # shared by every budget (the by-name part is per namespace).
        self._pods_version = 0
        self._by_ip: tuple[int, dict[str, list[PodInfo]]] = (-1, {})
        self._indexes: dict[str, tuple[int, PodIndex]] = {}
        self._seen_at: dict[str, float] = {}  # pod uid -> when (monotonic) the watch last told
        self.resync: asyncio.Task[None] | None = None
        self._api_errors: dict[Key, str] = {}  # the last API error said, per budget
        self.budgets: dict[Key, Budget] = {}
        self.written: dict[Key, dict[str, Any]] = {}  # the status we wrote last (ahead of watch)
        self.written_at: dict[Key, float] = {}  # when (monotonic) this process last wrote it
        self.runtimes: dict[Key, cycle.Runtime] = {}
        # A sample shared by budgets is attributed and counted once for those of one namespace.
        self.censuses = cycle.Censuses()
        self.workers: dict[Key, asyncio.Task[None]] = {}
        self.standby: dict[Key, asyncio.Task[None]] = {}  # keep connections open, act on nothing
        # The shards this replica leads, each with whether it may act on it right now (the
        # election's word for that shard's Lease; always, when it runs alone): asked before every
        # action, not only when the election loop runs.
        self.held: dict[int, Callable[[], bool]] = {}
        # The shards whose budgets keep a standby connection here (None: every budget not led).
        self.standby_shards: frozenset[int] | None = None

    @property
    def leading(self) -> bool:
        """Whether this replica leads any shard (and so acts)."""
        return bool(self.held)

    def shard(self, key: Key) -> int:
        """The shard of a budget: by the database Secret it names (``policy.shards``)."""
        b = self.budgets.get(key)
        secret = ((b.spec.get("database") or {}).get("secretRef") or {}) if b else {}
        return shard_of(key[0], str(secret.get("name") or ""), self.shards)

    def _leads(self, key: Key) -> bool:
        return self.shard(key) in self.held

    def _may_act(self, key: Key) -> bool:
        act = self.held.get(self.shard(key))
        return act is not None and act()

    def _wants_standby(self, key: Key) -> bool:
        return self.standby_shards is None or self.shard(key) in self.standby_shards

    # --- watch events -------------------------------------------------------------------------

    def on_pod(self, event: str | None, body: Mapping[str, Any]) -> None:
        pod = pod_info_from_body(body)
        pods = self.pods.setdefault(pod.namespace, {})
        if event == "DELETED":
            pods.pop(pod.uid, None)
            self._seen_at.pop(pod.uid, None)
        else:
            pods[pod.uid] = pod
            self._seen_at[pod.uid] = self.monotonic()
        self._pods_version += 1

    def forget_pod(self, namespace: str, name: str) -> None:
        """Drop a pod the API server says is gone (an eviction answered 404)."""
        pods = self.pods.get(namespace, {})
        for uid in [uid for uid, p in pods.items() if p.name == name]:
            pods.pop(uid)
            self._seen_at.pop(uid, None)
            self._pods_version += 1

    async def resync_pods(self) -> list[str]:
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
            self._pods_version += 1
            log.warning("pods the watch missed deleting dropped", extra={"pods": dropped})
        return dropped

    async def _resync_forever(self) -> None:
        me = asyncio.current_task()
        # Registered, or stopped (even if the cancellation was lost: see ``_stop``).
        while self.resync is me:
            await asyncio.sleep(POD_RESYNC_SECONDS)
            if self.resync is not me:
                return
            try:
                await self.resync_pods()
            except KubeError as e:
                log.warning("listing pods failed; retrying later", extra={"error": str(e)})

    def pod_index(self, namespace: str) -> PodIndex:
        """Every pod seen, by address, and the pods of ``namespace`` by name."""
        version = self._pods_version
        cached = self._indexes.get(namespace)
        if cached is not None and cached[0] == version:
            return cached[1]
        if self._by_ip[0] != version:
            by_ip: dict[str, list[PodInfo]] = {}
            for ns_pods in self.pods.values():
                for p in ns_pods.values():
                    if p.ip:
                        by_ip.setdefault(p.ip, []).append(p)
            self._by_ip = (version, by_ip)
        index = PodIndex(
            namespace=namespace,
            by_ip=self._by_ip[1],
            by_name={p.name: p for p in self.pods.get(namespace, {}).values()},
        )
        self._indexes[namespace] = (version, index)
        return index

    async def on_budget(self, event: str | None, body: Mapping[str, Any]) -> None:
        b = budget_from_body(body)
        key = (b.ref.namespace, b.ref.name)
        if event == "DELETED":
            self.budgets.pop(key, None)
            await self._stop_worker(key)
            await self._stop(self.standby, key)
            await self.monitors.unbind(f"{key[0]}/{key[1]}")
            self.metrics.forget(*key)
            self._forget(key)
            return
        old = self.budgets.get(key)
        if old is not None:
            b.changed = old.changed
            if old.ref.uid != b.ref.uid:  # deleted and created again under the same name
                self._forget(key)
            if old.generation != b.generation or old.annotations != b.annotations:
                b.changed.set()
        self.budgets[key] = b
        if self._leads(key):
            if key not in self.workers:
                await self._stop(self.standby, key)
                self._start_worker(key)
            return
        if key in self.workers:  # its Secret changed, and with it its shard
            await self._stop_worker(key)
            self.written.pop(key, None)
            self.written_at.pop(key, None)
        if key not in self.standby and self._wants_standby(key):
            self._start_standby(key)

    def _forget(self, key: Key) -> None:
        self.written.pop(key, None)
        self.written_at.pop(key, None)
        self.runtimes.pop(key, None)

    # --- leadership ---------------------------------------------------------------------------

    def lead(self, shard: int | None = None, may_act: Callable[[], bool] | None = None) -> None:
        """Start acting on a shard's budgets (every shard when None): a worker for each.

        ``may_act`` is the election's word for the shard's Lease (None: always, running alone).
        """
        shards = range(self.shards) if shard is None else (shard,)
        new = [s for s in shards if s not in self.held]
        if new:
            log.info("leading: starting workers", extra={"shards": new})
        for s in shards:
            self.held[s] = may_act or (lambda: True)
        if self.resync is None:
            self.resync = asyncio.create_task(self._resync_forever(), name="pod resync")
        for key in list(self.budgets):
            if self._leads(key) and key not in self.workers:
                task = self.standby.pop(key, None)
                if task is not None:
                    # The monitoring connection it kept open stays in the pool, for the worker.
                    task.cancel()
                self._start_worker(key)

    async def follow(self, shard: int | None = None) -> None:
        """Stop acting on a shard's budgets (every shard when None): another replica leads it.

        Bounded: the leader election awaits it before it tries for the Lease again, so nothing
        here may wait on a task without a limit (found by the fault run: a pod resync that lost
        its cancellation held it forever; the replica kept its workers writing statuses from what
        it wrote itself, erasing the new leader's cooldown, and never tried for the Lease again).
        """
        shards = set(range(self.shards) if shard is None else (shard,))
        if shards & set(self.held):
            log.warning("no longer leading: stopping workers", extra={"shards": sorted(shards)})
        for s in shards:
            self.held.pop(s, None)
        keys = [k for k in list(self.budgets) + list(self.workers) if self.shard(k) in shards]
        # Another replica writes the status now: what this one wrote last is no longer the truth
        # (its cooldowns and episodes would be lost if this replica led again and read it back).
        for key in keys:
            self.written.pop(key, None)
            self.written_at.pop(key, None)
        if not self.held:
            await self._stop_resync()
        for key in keys:
            if key in self.workers:
                await self._stop_worker(key)
        self.stand_by(self.standby_shards)

    def stand_by(self, shards: frozenset[int] | None) -> None:
        """Keep standby connections for the budgets of ``shards`` this replica does not lead
        (None: for every budget it does not lead), and none for the others."""
        self.standby_shards = shards
        for key in list(self.budgets):
            if self._leads(key):
                continue
            if self._wants_standby(key):
                if key not in self.standby:
                    self._start_standby(key)
            else:
                task = self.standby.pop(key, None)
                if task is not None:
                    task.cancel()

    # --- workers ------------------------------------------------------------------------------

    def _start_worker(self, key: Key) -> None:
        self.workers[key] = asyncio.create_task(self._work(key), name=f"budget {key[0]}/{key[1]}")

    async def _stop_worker(self, key: Key) -> None:
        await self._stop(self.workers, key)

    def _start_standby(self, key: Key) -> None:
        self.standby[key] = asyncio.create_task(
            self._keep_connected(key), name=f"standby {key[0]}/{key[1]}"
        )

    async def _keep_connected(self, key: Key) -> None:
        me = asyncio.current_task()
        while key in self.budgets and not self._leads(key) and self.standby.get(key) is me:
            b = self.budgets[key]
            try:
                await cycle.keep_connected(
                    namespace=key[0],
                    name=key[1],
                    spec_raw=b.spec,
                    deps=self._deps(b.ref),
                    fresh_within=STANDBY_CHECK_SECONDS,
                )
            except Exception:
                log.exception("standby check failed", extra={"budget": f"{key[0]}/{key[1]}"})
            await asyncio.sleep(STANDBY_CHECK_SECONDS)

    @staticmethod
    async def _stop(tasks: dict[Key, asyncio.Task[None]], key: Key) -> None:
        """Cancel a worker and wait for it, a bounded time.

        On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives as its inner
        awaitable completes: a worker may then go on. It is no longer registered, so it leaves
        its loop at the next turn; the caller (the leader election, stepping down) never waits
        on it longer than ``STOP_WAIT_SECONDS``.
        """
        await _cancel_bounded(tasks.pop(key, None))

    def _deps(self, ref: BudgetRef) -> cycle.Deps:
        async def post_event(type_: str, reason: str, message: str, series: str | None) -> None:
            try:
                await self.kube.post_event(
                    ref, type_, reason, message, now=time.time(), series=series
                )
            except KubeError as e:
                log.warning(
                    "posting an Event failed",
                    extra={"budget": f"{ref.namespace}/{ref.name}", "error": str(e)},
                )

        def pods_of(namespace: str) -> Sequence[PodInfo]:
            return list(self.pods.get(namespace, {}).values())

        async def bind(budget: str, dsn: str, ca_pem: str | None) -> cycle.MonitorLike:
            return await self.monitors.bind(budget, dsn, ca_pem)

        async def poolers(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
            return await sample_poolers(template, hosts, replicas=replicas)

        async def write_status(new_status: dict[str, Any]) -> None:
            key = (ref.namespace, ref.name)
            old = self.written.get(key) or (self.budgets[key].status if key in self.budgets else {})
            await self._write(key, old, new_status)

        return cycle.Deps(
            kube=self.kube,
            bind_monitor=bind,
            sample_poolers=poolers,
            pods=pods_of,
            post_event=post_event,
            metrics=self.metrics,
            now=time.time,
            write_status=write_status,
            pod_index=self.pod_index,
            forget_pod=self.forget_pod,
            may_act=lambda: self._may_act((ref.namespace, ref.name)),
            census=self.censuses.take,
        )

    async def _work(self, key: Key) -> None:
        runtime = self.runtimes.setdefault(key, cycle.Runtime())
        me = asyncio.current_task()
        # Registered as the budget's worker, or stopped (even if the cancellation was lost).
        while key in self.budgets and self.workers.get(key) is me:
            b = self.budgets[key]
            b.changed.clear()
            try:
                await self._once(key, b, runtime)
                self._api_errors.pop(key, None)
            except asyncio.CancelledError:
                raise
            except StatusConflict as e:
                log.info("status changed meanwhile; deciding again", extra={"detail": str(e)})
                runtime.last_probe_at = None
            except KubeError as e:
                # The API server is away (restarted, partitioned) or refused: not a bug. Said
                # once per budget and kind of error, not at every tick, and tried again.
                said = f"{e.status}: {e}"
                if self._api_errors.get(key) != said:
                    log.warning(
                        "a Kubernetes API call failed; trying again",
                        extra={"budget": f"{key[0]}/{key[1]}", "status": e.status, "error": str(e)},
                    )
                self._api_errors[key] = said
                # Once the API server answers again, write the status at once (not at the next
                # heartbeat): its lastProbeTime shows the operator is back.
                self.written_at.pop(key, None)
            except Exception:
                # A bug must not kill the budget's worker: log it and try again next tick.
                log.exception("reconcile failed", extra={"budget": f"{key[0]}/{key[1]}"})
                self.written_at.pop(key, None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    b.changed.wait(),
                    timeout=cycle.seconds_to_next_cycle(runtime, time.time(), tick=TICK_SECONDS),
                )
            if b.changed.is_set():
                # The spec or annotations changed: probe at once, and write what that probe saw
                # even if only lastProbeTime moved (whoever changed it looks at the status next).
                runtime.last_probe_at = None
                self.written_at.pop(key, None)

    async def _once(self, key: Key, b: Budget, runtime: cycle.Runtime) -> None:
        old_status = self.written.get(key, b.status)
        new_status = await cycle.run_cycle(
            namespace=b.ref.namespace,
            name=b.ref.name,
            generation=b.generation,
            spec_raw=b.spec,
            annotations=b.annotations,
            old_status=old_status,
            runtime=runtime,
            deps=self._deps(b.ref),
        )
        if new_status is None:
            return
        if not self._leads(key) or self.workers.get(key) is not asyncio.current_task():
            return  # stepped down meanwhile: the leader writes the status now
        self.metrics.db_connections.set(self.monitors.open_connections)
        last = self.written_at.get(key)
        since = None if last is None else self.monotonic() - last
        if not status.worth_writing(
            old_status, new_status, seconds_since_write=since, heartbeat=STATUS_HEARTBEAT_SECONDS
        ):
            return  # only the probe time would move
        if (
            since is not None
            and not self.kube.spare()
            and not status.changes_more_than_probe_time(old_status, new_status)
        ):
            # Only the heartbeat is due: it waits for a quiet moment of the client's token
            # bucket (``kube.flow``), while statuses that changed go first.
            return
        await self._write(key, old_status, new_status)

    async def _write(
        self, key: Key, old_status: dict[str, Any], new_status: dict[str, Any]
    ) -> None:
        """Write a status, on the condition that nobody changed the budget since it was read.

        Raises ``StatusConflict`` (after reading the budget again) when someone did: what was
        decided rests on a stale status, so it is neither written nor acted on. A conflict with
        nothing changed but the version (the watch delivered an older echo of this replica's own
        write) is written again at once.
        """
        for attempt in range(2):
            b = self.budgets.get(key)
            try:
                version = await self.kube.patch_budget_status(
                    key[0], key[1], new_status, resource_version=b.resource_version if b else None
                )
            except KubeError as e:
                if e.status == 404:
                    return  # deleted meanwhile; the watch will tell
                if e.status != 409:
                    raise
                mine = self.written.get(key)
                fresh = await self._reread(key)
                if attempt == 0 and mine is not None and fresh == mine:
                    continue  # only the version was stale: the status is what this replica wrote
                raise StatusConflict(f"{key[0]}/{key[1]} changed meanwhile") from None
            if b is not None and version:
                b.resource_version = version
            merged = {**old_status, **new_status}
            self.written[key] = {k: v for k, v in merged.items() if v is not None}
            self.written_at[key] = self.monotonic()
            return

    async def _reread(self, key: Key) -> dict[str, Any]:
        """Take the budget as the API server has it now, and forget what this replica wrote;
        return its status."""
        self.written.pop(key, None)
        self.written_at.pop(key, None)
        fresh = budget_from_body(await self.kube.read_budget(*key))
        old = self.budgets.get(key)
        if old is not None:
            old.status, old.resource_version = fresh.status, fresh.resource_version
        return fresh.status

    async def _stop_resync(self) -> None:
        task, self.resync = self.resync, None
        await _cancel_bounded(task)  # it leaves its loop once no longer registered

    async def close(self) -> None:
        self.held.clear()
        await self._stop_resync()
        for tasks in (self.workers, self.standby):
            for key in list(tasks):
                await self._stop(tasks, key)
        await self.monitors.close()


async def _cancel_bounded(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it at most ``STOP_WAIT_SECONDS`` (it may have lost its
    cancellation: the loop it runs leaves once the task is no longer registered)."""
    if task is None or task.done():
        return
    task.cancel()
    if task.get_loop() is not asyncio.get_running_loop():
        return  # a task of a loop that has ended (tests run several): nothing to await
    done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_SECONDS)
    if not done:
        log.warning("a stopped task is still finishing", extra={"task": task.get_name()})
