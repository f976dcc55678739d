"""Operator settings: the environment (``CONNBUDGET_*``) first, then the command line over it.

``connbudget run`` starts from ``OperatorConfig.from_env()`` and replaces each setting its command
line gives (``cli.run_config``):

- ``CONNBUDGET_NAMESPACES`` (comma-separated) or ``--namespace NS`` (repeated): the namespaces
  watched; neither, or ``--all-namespaces`` (whatever the variable says): every namespace;
- ``CONNBUDGET_METRICS_PORT`` or ``--metrics-port``: 9090 by default, 0 disables;
- ``CONNBUDGET_LIVENESS`` or ``--liveness``: the liveness endpoint's URL, empty disables;
- ``CONNBUDGET_LOG_FORMAT`` or ``--log-format``: ``json`` (default) or ``text``;
- ``CONNBUDGET_STANDALONE=true`` or ``--standalone``: no leader election (a single replica);
- ``CONNBUDGET_SHARDS`` or ``--shards``: how many shards the budgets are split into, each held
  by one replica through its own Lease (1 by default: one replica acts for every budget);
- ``CONNBUDGET_KUBE_QPS`` and ``CONNBUDGET_KUBE_BURST``, or ``--kube-qps`` and ``--kube-burst``:
  the client's calls to the Kubernetes API a second after a burst (``kube.flow``; 50 after 100 by
  default, as busy as a controller should make an API server; a QPS of 0 lifts the limit).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from connbudget.kube.flow import DEFAULT_BURST, DEFAULT_QPS

DEFAULT_METRICS_PORT = 9090
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
LOG_FORMATS = ("json", "text")
TICK_SECONDS = 1.0  # the timer's tick; each budget's pollSeconds decides when it probes

ENV_NAMESPACES = "CONNBUDGET_NAMESPACES"
ENV_METRICS_PORT = "CONNBUDGET_METRICS_PORT"
ENV_LIVENESS = "CONNBUDGET_LIVENESS"
ENV_LOG_FORMAT = "CONNBUDGET_LOG_FORMAT"
ENV_STANDALONE = "CONNBUDGET_STANDALONE"
ENV_SHARDS = "CONNBUDGET_SHARDS"
ENV_KUBE_QPS = "CONNBUDGET_KUBE_QPS"
ENV_KUBE_BURST = "CONNBUDGET_KUBE_BURST"
MAX_SHARDS = 64

N = TypeVar("N", int, float)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable or flag."""


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty: watch every namespace
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 disables the metrics server
    liveness: str | None = DEFAULT_LIVENESS
    log_format: str = "json"  # json or text
    kubeconfig: str | None = None
    standalone: bool = False  # no leader election (a single replica)
    shards: int = 1  # budgets split into this many shards, each held by one replica
    kube_qps: float = DEFAULT_QPS  # API calls a second after a burst (0: no limit)
    kube_burst: int = DEFAULT_BURST

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"the metrics port must be 0-65535, not {self.metrics_port}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"the log format must be json or text, not {self.log_format!r}")
        if any(not n for n in self.namespaces):
            raise ConfigError("a namespace must not be empty")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ConfigError(f"the shards must be 1-{MAX_SHARDS}, not {self.shards}")
        if self.standalone and self.shards > 1:
            raise ConfigError("shards need leader election: drop --standalone, or use 1 shard")
        if not (self.kube_qps >= 0 and math.isfinite(self.kube_qps)):
            raise ConfigError(f"the API calls a second must be 0 or more, not {self.kube_qps}")
        if self.kube_burst < 1:
            raise ConfigError(f"the API call burst must be 1 or more, not {self.kube_burst}")

    @property
    def all_namespaces(self) -> bool:
        """Whether every namespace is watched (no namespace named)."""
        return not self.namespaces

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        """The settings the ``CONNBUDGET_*`` variables give; defaults for those not set."""
        env = os.environ if environ is None else environ
        namespaces = tuple(n.strip() for n in env.get(ENV_NAMESPACES, "").split(",") if n.strip())
        port_text = env.get(ENV_METRICS_PORT, "").strip()
        try:
            port = int(port_text) if port_text else DEFAULT_METRICS_PORT
        except ValueError:
            raise ConfigError(
                f"{ENV_METRICS_PORT} must be a port number, not {port_text!r}"
            ) from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{ENV_METRICS_PORT} must be 0-65535, not {port}")
        standalone_text = env.get(ENV_STANDALONE, "").strip().lower()
        if standalone_text not in _TRUE + _FALSE:
            raise ConfigError(f"{ENV_STANDALONE} must be true or false, not {standalone_text!r}")
        log_format = env.get(ENV_LOG_FORMAT, "").strip().lower() or "json"
        if log_format not in LOG_FORMATS:
            raise ConfigError(f"{ENV_LOG_FORMAT} must be json or text, not {log_format!r}")
        shards_text = env.get(ENV_SHARDS, "").strip()
        try:
            shards = int(shards_text) if shards_text else 1
        except ValueError:
            raise ConfigError(f"{ENV_SHARDS} must be a number, not {shards_text!r}") from None
        if not 1 <= shards <= MAX_SHARDS:
            raise ConfigError(f"{ENV_SHARDS} must be 1-{MAX_SHARDS}, not {shards}")
        kube_qps = _number(env, ENV_KUBE_QPS, float, DEFAULT_QPS)
        kube_burst = _number(env, ENV_KUBE_BURST, int, DEFAULT_BURST)
        if not (kube_qps >= 0 and math.isfinite(kube_qps)):
            raise ConfigError(f"{ENV_KUBE_QPS} must be 0 or more, not {kube_qps}")
        if kube_burst < 1:
            raise ConfigError(f"{ENV_KUBE_BURST} must be 1 or more, not {kube_burst}")
        return cls(
            shards=shards,
            kube_qps=kube_qps,
            kube_burst=kube_burst,
            namespaces=namespaces,
            metrics_port=port,
            liveness=env.get(ENV_LIVENESS, DEFAULT_LIVENESS).strip() or None,
            log_format=log_format,
            standalone=standalone_text in _TRUE,
        )


def _number(env: Mapping[str, str], name: str, kind: type[N], default: N) -> N:
    """The variable ``name`` as a ``kind``, ``default`` when unset or empty."""
    text = env.get(name, "").strip()
    try:
        return kind(text) if text else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {text!r}") from None
