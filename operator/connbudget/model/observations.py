"""What the probes saw: PostgreSQL backends, PgBouncer pools and clients, and the governed pods.

Pure data. Times are seconds since the epoch (floats) as the source reported them; ages are
computed by the source (PostgreSQL's ``now()``), so the policy never reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# The application_name of the operator's own monitoring connections; they never count.
PROBE_APPLICATION_NAME = "connbudget-probe"


@dataclass(frozen=True, kw_only=True)
class BackendGroup:
    """Client backends that share database, user, application name, client address and state.

    ``backends`` lists ``(pid, seconds_in_state, backend_start)`` of every backend of the group,
    longest in its state first: the seconds since ``state_change`` tell, poll after poll, whether
    a backend was used again (``policy.evidence`` follows them). ``idle`` is the same list for an
    ``idle`` group (the candidates for termination), empty for any other state.
    """

    database: str | None
    user: str | None
    application_name: str
    client_addr: str | None
    state: str | None
    count: int
    max_idle_seconds: float
    oldest_backend_start: float
    backends: tuple[tuple[int, float, float], ...] = ()

    @property
    def idle(self) -> tuple[tuple[int, float, float], ...]:
        """``(pid, idle_seconds, backend_start)`` of the group's backends if they are idle."""
        return self.backends if self.state == "idle" else ()


@dataclass(frozen=True, kw_only=True)
class ServerSample:
    """One probe of a PostgreSQL server."""

    sampled_at: float  # the server's now(), epoch seconds
    database: str  # the DSN's database (scope Database counts this one)
    max_connections: int
    reserved: int  # superuser_reserved_connections (+ reserved_connections on PostgreSQL 16+)
    groups: tuple[BackendGroup, ...]
    # Backends of other roles whose state, address and statement the monitoring role may not read
    # (no pg_read_all_stats): counted, in groups of state None, never terminable.
    hidden: int = 0

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True, kw_only=True)
class LastStatement:
    """The last statement a backend ran, as ``pg_stat_activity`` shows it (raw: may hold
    literals; only ``policy.fingerprint`` reads ``query``, and only its result is ever shown)."""

    pid: int
    backend_start: float
    query_id: int | None  # None: not computed (compute_query_id off, or before PostgreSQL 14)
    query: str  # "<insufficient privilege>" without pg_read_all_stats


@dataclass(frozen=True, kw_only=True)
class PoolerClient:
    """One PgBouncer client (``SHOW CLIENTS``)."""

    addr: str | None
    user: str
    database: str
    state: str  # active (linked to a server, idle or not), waiting, ...
    application_name: str = ""
    idle_seconds: float = 0.0  # since the client's last request
    connected_at: float | None = None  # epoch seconds (None: not known)
    port: int | None = None  # the client's port: with addr and connected_at, its identity


@dataclass(frozen=True, kw_only=True)
class PoolerSample:
    """One probe of every pooler pod's admin console."""

    replicas: int
    clients: tuple[PoolerClient, ...] = ()
    clients_waiting: int = 0
    server_connections: int = 0
    errors: tuple[str, ...] = ()
    # What kind of failure the errors are, when one needs the user (a wrong admin password, a
    # malformed admin DSN: probe.errors.ProbeFailure values); None: waiting may cure them.
    failure: str | None = None


# Phases of a pod whose containers have all ended for good: it holds no connection any more,
# though its status keeps its podIP (a Job's pod, an evicted pod) until it is deleted.
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, kw_only=True)
class PodInfo:
    """What the pod index knows of a pod."""

    namespace: str
    name: str
    uid: str
    ip: str | None  # status.podIP
    ips: tuple[str, ...] = ()  # status.podIPs: every address (IPv4 and IPv6 on dual-stack)
    host_ips: tuple[str, ...] = ()  # status.hostIPs (else hostIP): its node's addresses
    labels: Mapping[str, str] = field(default_factory=dict)
    owner_kind: str = "Pod"  # Deployment, StatefulSet, ReplicaSet, DaemonSet, Job or Pod
    owner_name: str = ""
    started_at: float | None = None  # status.startTime, epoch seconds
    created_at: float = 0.0
    phase: str = "Running"
    ready: bool = True
    terminating: bool = False
    restarts: int = 0  # its containers' restartCount, summed

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of the pod: ``podIP`` first, then the rest of ``podIPs``."""
        if self.ip is None:
            return self.ips
        return (self.ip, *(a for a in self.ips if a != self.ip))

    @property
    def finished(self) -> bool:
        """Whether every container has ended for good (phase Succeeded or Failed)."""
        return self.phase in FINISHED_PHASES

    @property
    def owner(self) -> str:
        """``Kind/name`` of the workload that owns the pod (the pod itself if none)."""
        return f"{self.owner_kind}/{self.owner_name or self.name}"
