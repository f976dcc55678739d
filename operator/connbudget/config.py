"""Operator settings, parsed once from the command line and the environment (``CONNBUDGET_*``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_METRICS_PORT = 9090
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
TICK_SECONDS = 1.0  # the timer's tick; each budget's pollSeconds decides when it probes


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty with all_namespaces: watch every namespace
    all_namespaces: bool = False
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 disables the metrics server
    liveness: str | None = DEFAULT_LIVENESS
    log_format: str = "json"  # json or text
    kubeconfig: str | None = None
    standalone: bool = False  # no peering (a single replica)

    @classmethod
    def from_env(cls) -> OperatorConfig:
        ns = tuple(n for n in os.environ.get("CONNBUDGET_NAMESPACES", "").split(",") if n)
        return cls(
            namespaces=ns,
            all_namespaces=not ns,
            metrics_port=int(os.environ.get("CONNBUDGET_METRICS_PORT", DEFAULT_METRICS_PORT)),
            liveness=os.environ.get("CONNBUDGET_LIVENESS", DEFAULT_LIVENESS) or None,
            log_format=os.environ.get("CONNBUDGET_LOG_FORMAT", "json"),
        )
