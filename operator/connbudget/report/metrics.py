"""Prometheus metrics of the operator (``connbudget_`` prefix, base units, no pod-name labels)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from connbudget.policy.culprits import LeakShape
from connbudget.policy.evidence import OwnerEvidence
from connbudget.policy.usage import Usage

LABELS = ("namespace", "budget")


class Metrics:
    """Every metric, in one registry (a fresh one per operator, so tests can make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "connbudget_connections",
            "Client backends counted against the budget, by state.",
            [*LABELS, "state"],
            registry=r,
        )
        self.budget = Gauge(
            "connbudget_budget_connections", "The budget, in connections.", LABELS, registry=r
        )
        self.usage_ratio = Gauge(
            "connbudget_usage_ratio",
            "Counted connections divided by the budget.",
            LABELS,
            registry=r,
        )
        self.leaked = Gauge(
            "connbudget_leaked_connections",
            "Idle backends of governed pods idle longer than idleSeconds.",
            LABELS,
            registry=r,
        )
        self.unattributed = Gauge(
            "connbudget_unattributed_connections",
            "Counted backends attributed to no pod.",
            LABELS,
            registry=r,
        )
        self.server_max = Gauge(
            "connbudget_server_max_connections", "The server's max_connections.", LABELS, registry=r
        )
        self.seconds_to_full = Gauge(
            "connbudget_seconds_to_full",
            "Forecast seconds until the server is full (NaN: not growing).",
            LABELS,
            registry=r,
        )
        self.actions = Counter(
            "connbudget_actions_total",
            "Actions taken, by type and result.",
            [*LABELS, "action", "result"],
            registry=r,
        )
        self.probe_duration = Histogram(
            "connbudget_probe_duration_seconds",
            "Time to probe the database.",
            LABELS,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.probe_errors = Counter(
            "connbudget_probe_errors_total",
            "Failed probes, by reason.",
            [*LABELS, "reason"],
            registry=r,
        )
        self.leak_rate = Gauge(
            "connbudget_leak_rate_connections_per_second",
            "Abandoned connections a governed workload opens per second (0: not leaking).",
            [*LABELS, "owner"],
            registry=r,
        )
        self.leak_rate_by_fingerprint = Gauge(
            "connbudget_leak_fingerprint_rate_connections_per_second",
            "A leaking workload's leak rate times the share of its leaked connections that last "
            "ran the statement with this fingerprint (status.usage.byOwner[].leaks; never the "
            "statement's text in a label).",
            [*LABELS, "owner", "fingerprint"],
            registry=r,
        )
        self.abandoned = Gauge(
            "connbudget_abandoned_connections",
            "Open connections of a governed workload idle beyond its learned abandon age.",
            [*LABELS, "owner"],
            registry=r,
        )
        self.terminated = Counter(
            "connbudget_terminated_connections_total",
            "Backends terminated.",
            LABELS,
            registry=r,
        )
        self.db_connections = Gauge(
            "connbudget_monitor_connections",
            "Monitoring connections the operator holds open.",
            registry=r,
        )
        self._states: dict[tuple[str, str], set[str]] = {}
        self._budget_series: dict[tuple[str, str], _BudgetSeries] = {}
        self._actions: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._reasons: dict[tuple[str, str], set[str]] = {}
        self._owners: dict[tuple[str, str], set[str]] = {}
        self._fingerprints: dict[tuple[str, str], set[tuple[str, str]]] = {}

    def count_throttling(self, waited: Callable[[], float]) -> None:
        """``connbudget_kube_throttled_seconds_total``: the seconds API calls waited for the
        client's token bucket (``kube.flow``), read from ``waited`` at each scrape. Rising
        steadily: the operator makes more calls than ``--kube-qps`` allows."""
        self.registry.register(_Throttled(waited))

    def record_usage(
        self,
        namespace: str,
        budget: str,
        usage: Usage,
        seconds_to_full: float | None,
    ) -> None:
        key = (namespace, budget)
        series = self._series(namespace, budget)
        by_state = usage.by_state
        states = series.states
        for state in set(states) - set(by_state):
            states[state].set(0)
        for state, n in by_state.items():
            child = states.get(state)
            if child is None:
                child = states[state] = self.connections.labels(namespace, budget, state)
                self._states.setdefault(key, set()).add(state)
            child.set(n)
        series.budget.set(usage.budget)
        series.usage_ratio.set(usage.connections / usage.budget if usage.budget else 0.0)
        series.leaked.set(usage.leaked)
        series.unattributed.set(usage.unattributed)
        series.server_max.set(usage.server_max_connections)
        series.seconds_to_full.set(float("nan") if seconds_to_full is None else seconds_to_full)

    def _series(self, namespace: str, budget: str) -> _BudgetSeries:
        """A budget's own series, looked up once (``labels()`` takes a lock and builds a key at
        every call; a budget sets these at every poll)."""
        key = (namespace, budget)
        series = self._budget_series.get(key)
        if series is None:
            series = self._budget_series[key] = _BudgetSeries(
                budget=self.budget.labels(namespace, budget),
                usage_ratio=self.usage_ratio.labels(namespace, budget),
                leaked=self.leaked.labels(namespace, budget),
                unattributed=self.unattributed.labels(namespace, budget),
                server_max=self.server_max.labels(namespace, budget),
                seconds_to_full=self.seconds_to_full.labels(namespace, budget),
                probe_duration=self.probe_duration.labels(namespace, budget),
            )
        return series

    def record_owners(
        self,
        namespace: str,
        budget: str,
        owners: Iterable[OwnerEvidence],
        shapes: Mapping[str, Sequence[LeakShape]] | None = None,
    ) -> None:
        """Leak rate and abandoned connections per owning workload (``Kind/name``, never pods),
        and the leak rate per owner and statement fingerprint."""
        key = (namespace, budget)
        seen = set()
        prints: set[tuple[str, str]] = set()
        for ev in owners:
            seen.add(ev.owner)
            self.leak_rate.labels(namespace, budget, ev.owner).set(ev.leak_rate)
            self.abandoned.labels(namespace, budget, ev.owner).set(ev.abandoned)
            for shape in (shapes or {}).get(ev.owner, ()):
                prints.add((ev.owner, shape.fingerprint))
                self.leak_rate_by_fingerprint.labels(
                    namespace, budget, ev.owner, shape.fingerprint
                ).set(ev.leak_rate * shape.share)
        for owner in self._owners.get(key, set()) - seen:
            self._remove_owner(namespace, budget, owner)
        for owner, fp in self._fingerprints.get(key, set()) - prints:
            with contextlib.suppress(KeyError):
                self.leak_rate_by_fingerprint.remove(namespace, budget, owner, fp)
        self._owners[key] = seen
        self._fingerprints[key] = prints

    def _remove_owner(self, namespace: str, budget: str, owner: str) -> None:
        for g in (self.leak_rate, self.abandoned):
            with contextlib.suppress(KeyError):
                g.remove(namespace, budget, owner)

    def record_terminated(self, namespace: str, budget: str, n: int) -> None:
        self.terminated.labels(namespace, budget).inc(n)

    def record_probe(self, namespace: str, budget: str, seconds: float) -> None:
        self._series(namespace, budget).probe_duration.observe(seconds)

    def record_probe_error(self, namespace: str, budget: str, reason: str) -> None:
        self._reasons.setdefault((namespace, budget), set()).add(reason)
        self.probe_errors.labels(namespace, budget, reason).inc()

    def record_action(
        self, namespace: str, budget: str, action: str, result: str, n: int = 1
    ) -> None:
        self._actions.setdefault((namespace, budget), set()).add((action, result))
        self.actions.labels(namespace, budget, action, result).inc(n)

    def forget(self, namespace: str, budget: str) -> None:
        """Drop every series of a deleted budget."""
        key = (namespace, budget)
        self._budget_series.pop(key, None)
        for state in self._states.pop(key, set()):
            self.connections.remove(namespace, budget, state)
        for action, result in self._actions.pop(key, set()):
            self.actions.remove(namespace, budget, action, result)
        for reason in self._reasons.pop(key, set()):
            self.probe_errors.remove(namespace, budget, reason)
        for owner in self._owners.pop(key, set()):
            self._remove_owner(namespace, budget, owner)
        for owner, fp in self._fingerprints.pop(key, set()):
            with contextlib.suppress(KeyError):
                self.leak_rate_by_fingerprint.remove(namespace, budget, owner, fp)
        for g in (
            self.budget,
            self.usage_ratio,
            self.leaked,
            self.unattributed,
            self.server_max,
            self.seconds_to_full,
            self.probe_duration,
            self.terminated,
        ):
            with contextlib.suppress(KeyError):
                g.remove(namespace, budget)


@dataclass
class _BudgetSeries:
    """The children of one budget's series, as ``labels()`` returned them."""

    budget: Gauge
    usage_ratio: Gauge
    leaked: Gauge
    unattributed: Gauge
    server_max: Gauge
    seconds_to_full: Gauge
    probe_duration: Histogram
    states: dict[str, Gauge] = field(default_factory=dict)  # connbudget_connections{state}


class _Throttled(Collector):
    def __init__(self, waited: Callable[[], float]) -> None:
        self.waited = waited

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "connbudget_kube_throttled_seconds",
            "Seconds calls to the Kubernetes API waited for the client's token bucket.",
            value=self.waited(),
        )
