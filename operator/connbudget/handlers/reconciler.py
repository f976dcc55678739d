"""The reconciler: one worker task per ConnectionBudget, running the cycle at the budget's cadence.

Why not a kopf timer: kopf puts a finalizer on every object that has a timer, so deleting a
ConnectionBudget would hang whenever the operator is not running (uninstalled, crash-looping).
The operator writes only status; a worker per budget, fed by watch events, does the same job with
no finalizer, and wakes at once when the budget's spec or annotations change.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connbudget import cycle
from connbudget.config import TICK_SECONDS
from connbudget.handlers.pod_cache import PodCache
from connbudget.handlers.status_writer import StatusConflict, StatusWriter
from connbudget.kube.api import BudgetRef, Kube, KubeError
from connbudget.model.observations import PoolerSample
from connbudget.policy import ledger
from connbudget.policy.shards import shard_of
from connbudget.probe.pgbouncer import sample_poolers
from connbudget.probe.postgres import MonitorPool
from connbudget.report.metrics import Metrics

log = logging.getLogger("connbudget.reconciler")
Key = tuple[str, str]  # (namespace, name)
STANDBY_CHECK_SECONDS = 10.0  # how often a replica that does not lead checks its connection
STOP_WAIT_SECONDS = 5.0  # how long stopping a worker waits for it to end
# How often the leader lists the pods it knows of, to drop the ones the watch never said were
# deleted (``PodCache.resync``).
POD_RESYNC_SECONDS = 120.0
# After the watch lists the pods again (it expired: 410 Gone), how long the leader waits for the
# rest of the listing before it lists them itself and drops the pods gone meanwhile. kopf hands a
# listing's pods on as fast as it reads its pages; half a second makes one LIST of a listing.
RELIST_SETTLE_SECONDS = 0.5


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


class Reconciler:
    """Keeps the budgets the watch delivers, and one worker per budget of the shards this replica
    leads (a standby task for the others); the pods (``PodCache``) and status writes
    (``StatusWriter``) are parts of their own, leadership is the election's (``election``)."""

    def __init__(
        self,
        *,
        kube: Kube,
        monitors: MonitorPool,
        metrics: Metrics,
        monotonic: Callable[[], float] = time.monotonic,
        shards: int = 1,
        all_namespaces: bool = True,
    ) -> None:
        self.kube = kube
        self.shards = shards
        self.monotonic = monotonic
        self.monitors = monitors
        self.metrics = metrics
        # all_namespaces: whether the pod watch covers every namespace (``PodIndex``).
        self.pods = PodCache(kube, monotonic=monotonic, all_namespaces=all_namespaces)
        self.resync: asyncio.Task[None] | None = None
        # The pod watch listed the pods again since the last resync (``on_pod``), and what wakes
        # the resync task for it (made in the task's own loop).
        self._relisted = False
        self._relist_wake: asyncio.Event | None = None
        self._api_errors: dict[Key, str] = {}  # the last API error said, per budget
        self.budgets: dict[Key, Budget] = {}
        self.status = StatusWriter(kube, self.budgets, monotonic=monotonic)
        self._made_deps: dict[Key, tuple[BudgetRef, cycle.Deps]] = {}
        self.runtimes: dict[Key, cycle.Runtime] = {}
        # A sample shared by budgets is attributed and counted once for those of one namespace.
        self.censuses = cycle.Censuses()
        # What every budget of this replica terminated and restarted lately (policy.ledger).
        self.ledger = ledger.Ledger()
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
        self.pods.on_event(event, body)
        if event is None:
            # kopf hands on the pods of a listing with no event type: the watch started again
            # from a LIST (at start, or after it expired), and a pod deleted meanwhile got no
            # DELETED event. The leader lists them itself at once (``_resync_forever``), not
            # at the next periodic resync.
            self._relisted = True
            if self._relist_wake is not None:
                self._relist_wake.set()

    async def _resync_forever(self) -> None:
        me = asyncio.current_task()
        wake = self._relist_wake = asyncio.Event()
        # Registered, or stopped (even if the cancellation was lost: see ``_stop``).
        while self.resync is me:
            if not self._relisted:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POD_RESYNC_SECONDS)
            if self._relisted:
                # Let the rest of the listing arrive: one LIST for it, not one per pod.
                await asyncio.sleep(RELIST_SETTLE_SECONDS)
            wake.clear()
            self._relisted = False
            if self.resync is not me:
                return
            try:
                await self.pods.resync()
            except KubeError as e:
                log.warning("listing pods failed; retrying later", extra={"error": str(e)})

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
            self.status.forget(key)
        if key not in self.standby and self._wants_standby(key):
            self._start_standby(key)

    def _forget(self, key: Key) -> None:
        self.status.forget(key)
        self.runtimes.pop(key, None)
        self._made_deps.pop(key, None)

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
            self.status.forget(key)
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
        # A context of its own: started from a kopf handler, the task would copy kopf's context
        # and keep that event's cause, body, patch and logger alive as long as it runs (11 KB
        # per budget, measured at 1,000 budgets).
        self.workers[key] = asyncio.create_task(
            self._work(key), name=f"budget {key[0]}/{key[1]}", context=contextvars.Context()
        )

    async def _stop_worker(self, key: Key) -> None:
        await self._stop(self.workers, key)

    def _start_standby(self, key: Key) -> None:
        self.standby[key] = asyncio.create_task(
            self._keep_connected(key),
            name=f"standby {key[0]}/{key[1]}",
            context=contextvars.Context(),
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
        """A budget's dependencies, made once per budget (and again if it was made anew)."""
        key = (ref.namespace, ref.name)
        made = self._made_deps.get(key)
        if made is None or made[0] != ref:
            made = self._made_deps[key] = (ref, self._make_deps(ref))
        return made[1]

    def _make_deps(self, ref: BudgetRef) -> cycle.Deps:
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

        async def bind(budget: str, dsn: str, ca_pem: str | None) -> cycle.MonitorLike:
            return await self.monitors.bind(budget, dsn, ca_pem)

        async def poolers(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
            return await sample_poolers(template, hosts, replicas=replicas)

        async def write_status(new_status: dict[str, Any]) -> None:
            key = (ref.namespace, ref.name)
            await self.status.write(key, self.status.current(key), new_status)

        return cycle.Deps(
            kube=self.kube,
            bind_monitor=bind,
            sample_poolers=poolers,
            pods=self.pods.of,
            post_event=post_event,
            metrics=self.metrics,
            now=time.time,
            write_status=write_status,
            pod_index=self.pods.index,
            governed=self.pods.governed,
            forget_pod=self.pods.forget,
            may_act=lambda: self._may_act((ref.namespace, ref.name)),
            census=self.censuses.take,
            ledger=self.ledger,
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
                self.status.rewrite_soon(key)
            except Exception:
                # A bug must not kill the budget's worker: log it and try again next tick.
                log.exception("reconcile failed", extra={"budget": f"{key[0]}/{key[1]}"})
                self.status.rewrite_soon(key)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    b.changed.wait(),
                    timeout=cycle.seconds_to_next_cycle(runtime, time.time(), tick=TICK_SECONDS),
                )
            if b.changed.is_set():
                # The spec or annotations changed: probe at once, and write what that probe saw
                # even if only lastProbeTime moved (whoever changed it looks at the status next).
                runtime.last_probe_at = None
                self.status.rewrite_soon(key)

    async def _once(self, key: Key, b: Budget, runtime: cycle.Runtime) -> None:
        old_status = self.status.current(key)
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
        if self.status.due(key, old_status, new_status):
            await self.status.write(key, old_status, new_status)

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
