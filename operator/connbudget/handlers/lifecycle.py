"""Operator start-up and shut-down: kopf settings, shared clients, metrics server, liveness."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import prometheus_client

from connbudget.config import OperatorConfig
from connbudget.kube.api import Kube
from connbudget.probe.postgres import MonitorPool
from connbudget.report.metrics import Metrics

# Set by run_operator before kopf starts.
CONFIG = OperatorConfig()


def run_operator(config: OperatorConfig) -> None:
    """Run the operator until it is stopped (SIGTERM, SIGINT)."""
    global CONFIG  # kopf's startup handler reads it; one operator per process
    CONFIG = config
    # kopf logs every successful timer run at INFO: once a second per budget is noise.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=config.all_namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness,
        standalone=config.standalone,
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
    # The operator registers no create/update/delete handlers, so kopf puts no finalizer and no
    # progress or last-handled annotations on ConnectionBudgets: it writes only their status, so
    # GitOps tools see no drift and a deletion never waits for the operator.
    # Idle watches die silently behind some load balancers: re-establish them regularly.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.peering.standalone = CONFIG.standalone
    settings.peering.name = "connbudget"
    settings.peering.clusterwide = CONFIG.all_namespaces
    memo.config = CONFIG
    memo.kube = Kube.from_environment(CONFIG.kubeconfig)
    memo.monitors = MonitorPool()
    memo.metrics = Metrics()
    if CONFIG.metrics_port:
        prometheus_client.start_http_server(CONFIG.metrics_port, registry=memo.metrics.registry)
        logger.info("metrics served", extra={"port": CONFIG.metrics_port})


@kopf.on.cleanup()
async def operator_cleanup(memo: kopf.Memo, **_: object) -> None:
    monitors: MonitorPool | None = memo.get("monitors")
    if monitors is not None:
        await monitors.close()


@kopf.on.probe(id="monitorConnections")
async def operator_probe(memo: kopf.Memo, **_: object) -> int:
    """Liveness detail: how many monitoring connections are open."""
    monitors: MonitorPool | None = memo.get("monitors")
    return monitors.open_connections if monitors is not None else 0
