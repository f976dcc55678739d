"""Operator start-up and shut-down: kopf settings, shared clients, leader election, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from typing import Any

import kopf
import prometheus_client
from kopf._core.engines.peering import Identity  # kopf.run's parameter type, not re-exported

from connbudget.config import OperatorConfig
from connbudget.handlers import election as election_module
from connbudget.handlers.election import LEASE_NAME, Shards
from connbudget.handlers.reconciler import Reconciler
from connbudget.kube.api import Kube
from connbudget.kube.lease import LeaseElector
from connbudget.probe.postgres import MonitorPool
from connbudget.report.metrics import Metrics

log = logging.getLogger("connbudget.lifecycle")

# This process's name in the Lease: the pod name (HOSTNAME in a pod) and a random suffix.
IDENTITY = f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{secrets.token_hex(3)}"
# Set by run_operator before kopf starts.
CONFIG = OperatorConfig()


def run_operator(config: OperatorConfig) -> None:
    """Run the operator until it is stopped (SIGTERM, SIGINT)."""
    global CONFIG  # kopf's startup handler reads it; one operator per process
    CONFIG = config
    # kopf logs every successful handler call at INFO: once per watch event is noise.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf's own peering is off: leader election uses a Lease (see kube.lease), which needs no
    # extra CRDs.
    kopf.run(
        clusterwide=config.all_namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness,
        standalone=True,
        # kopf would derive an identity from the user name, and a container's numeric UID often
        # has no passwd entry (`runAsUser: 65532` in a slim image): that would crash at start.
        identity=Identity(IDENTITY),
    )


@kopf.on.startup()
async def operator_startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: object,
) -> None:
    # Our own Events only: kopf would otherwise post every handler log line as an Event.
    settings.posting.level = logging.CRITICAL + 10
    # Only event handlers (watches.py): nothing compares an object with its last-handled state,
    # so kopf need not deep-copy every object at every event to build one (57 % of kopf's own
    # time at 500 budgets, where each status write comes back as an event).
    settings.persistence.diffbase_storage = NoDiffBase()
    # Idle watches die silently behind some load balancers: re-establish them regularly.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    kube = Kube.from_environment(CONFIG.kubeconfig, qps=CONFIG.kube_qps, burst=CONFIG.kube_burst)
    metrics = Metrics()
    metrics.count_throttling(lambda: kube.flow.waited)
    reconciler = Reconciler(
        kube=kube,
        monitors=MonitorPool(),
        metrics=metrics,
        shards=CONFIG.shards,
        # Watching some namespaces, an address no watched pod has may be an unwatched pod's.
        all_namespaces=CONFIG.all_namespaces,
    )
    memo.reconciler = reconciler
    namespace = os.environ.get("POD_NAMESPACE") or (
        CONFIG.namespaces[0] if CONFIG.namespaces else "default"
    )
    if CONFIG.shards > 1:
        shards = Shards(kube, namespace=namespace, identity=IDENTITY, shards=CONFIG.shards)
        election = election_module.elect_shards(reconciler, shards)
    else:
        elector = None
        if not CONFIG.standalone:
            elector = LeaseElector(kube, namespace=namespace, name=LEASE_NAME, identity=IDENTITY)
            logger.info(
                "leader election",
                extra={"lease": f"{namespace}/{LEASE_NAME}", "identity": IDENTITY},
            )
        election = election_module.elect(reconciler, elector)
    memo.election = asyncio.create_task(election, name="leader election")
    if CONFIG.metrics_port:
        prometheus_client.start_http_server(CONFIG.metrics_port, registry=metrics.registry)
        logger.info("metrics served", extra={"port": CONFIG.metrics_port})


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base storage, building no essence: right only while no change handler
    (on.create, on.update, on.field, on.resume, on.delete) is registered; a test checks there
    is none."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()


@kopf.on.cleanup()
async def operator_cleanup(memo: kopf.Memo, **_: object) -> None:
    election: asyncio.Task[None] | None = memo.get("election")
    if election is not None:
        election.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await election
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        await reconciler.close()


@kopf.on.probe(id="leading")
async def operator_probe(memo: kopf.Memo, **_: object) -> bool:
    """Liveness detail: whether this replica leads (and so acts)."""
    reconciler: Reconciler | None = memo.get("reconciler")
    return bool(reconciler and reconciler.leading)
