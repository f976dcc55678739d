"""Run the fault run on a sandbox: two operator replicas, leaky, pooled and steady workloads, faults
from a seeded RNG, evidence gathered from outside the operator, then judged by ``checks``.

Every loop is bounded in count and time; every fault is undone by the run itself; traffic goes to
loopback and the sandbox's pod network only. The evidence: PostgreSQL's log (connections,
disconnections and terminations, with pid, application_name and client address), a superuser
sampler of ``pg_stat_activity`` every 0.25 s, the API server's audit log (evictions, deletions,
Lease writes), the replicas' JSON logs, budget status every 0.5 s and each replica's RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import psycopg
from kubernetes.client.rest import ApiException
from psycopg import sql

from e2e.conftest import GROUP, PLURAL, VERSION, Budgets, Operator, start_operator
from e2e.reliability import restart_apiserver
from faults import checks
from sandbox import postgres, procs
from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads, eventually

LEASE_NAME = "connbudget-operator"
SAMPLE_SECONDS = 0.25  # the pg_stat_activity sampler's period
STATUS_SECONDS = 0.5  # the status poller's period
RSS_SECONDS = 5.0  # each replica's memory, sampled this often
NOTICE_WITHIN = 10.0  # the issue's bound: a fault shows in status within 10 s
RECOVER_WITHIN = 60.0  # a fault is recovered from within a minute of its end
# A dead or frozen leader's Lease expires 15 s after it was last renewed; the other replica then
# takes over within its 2 s retry, and its first cycle writes status.
LEADER_RECOVER_WITHIN = 45.0
# Another replica takes the Lease within its 15 s duration, a 2 s retry and slack for 2 busy cores.
# A killed leader's replacement starts 20-30 s after the kill, so it cannot mask a stuck survivor.
TAKEOVER_WITHIN = 25.0
MIN_IDLE_SECONDS = 3  # terminateIdle.minIdleSeconds of the leaky budget
COOLDOWN_SECONDS = 30  # remediation.cooldownSeconds of every budget
MAX_PODS_PER_CYCLE = 1
GAP_SECONDS = (3.0, 8.0)  # quiet time between two faults
SETTLE_TIMEOUT = 90.0  # the longest the run waits for a fault to be recovered from before the next
RUNNER_LOG_SETTINGS = {
    "log_connections": "on",
    "log_disconnections": "on",
    "log_line_prefix": checks.LOG_LINE_PREFIX,
    "log_timezone": "UTC",
    "log_min_messages": "warning",
}
KINDS = (
    "pg_restart",
    "pg_stall",
    "apiserver_restart",
    "leader_kill",
    "leader_freeze",
    "pgbouncer_kill",
    "pod_delete",
    "secret_rotate",
    "budget_edit",
    "budget_pause",
    "budget_delete",
)


def say(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


def leading(op: Operator) -> bool:
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=2) as r:
            return bool(json.loads(r.read()).get("leading"))
    except (OSError, ValueError):
        return False


@dataclass
class Evidence:
    """What the watchers gathered (shared with their threads; append-only)."""

    seen: dict[tuple[int, float], checks.BackendSeen] = field(default_factory=dict)
    status: list[checks.StatusSample] = field(default_factory=list)
    pods: dict[str, dict[str, str]] = field(default_factory=dict)  # ns/name -> labels
    pod_by_ip: dict[str, str] = field(default_factory=dict)
    rss: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    own_terminated: set[int] = field(default_factory=set)
    sampler_gaps: list[float] = field(default_factory=list)


class Watchers:
    """The sampler, pod lister, status poller and RSS sampler, each a bounded daemon thread."""

    def __init__(self, sb: Sandbox, namespace: str, deadline: float, ops: list[Operator]) -> None:
        self.sb = sb
        self.namespace = namespace
        self.deadline = deadline
        self.ops = ops
        self.ev = Evidence()
        self.stop = threading.Event()
        self.api = sb.api_client()
        self.threads = [
            threading.Thread(target=self._loop, args=(fn, period), daemon=True)
            for fn, period in (
                (self._sample, SAMPLE_SECONDS),
                (self._list_pods, 1.0),
                (self._poll_status, STATUS_SECONDS),
                (self._rss, RSS_SECONDS),
            )
        ]
        self._conn: psycopg.Connection[Any] | None = None
        self._last_sample = 0.0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=15)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    def _loop(self, fn: Callable[[], None], period: float) -> None:
        while not self.stop.is_set() and time.time() < self.deadline:
            with contextlib.suppress(Exception):
                fn()
            self.stop.wait(period)

    def _sample(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.sb.db.superuser_dsn, autocommit=True, connect_timeout=2
            )
        try:
            rows = self._conn.execute(
                "SELECT pid, extract(epoch FROM backend_start)::float8, coalesce(state, ''), "
                "host(client_addr), coalesce(application_name, '') FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
        except psycopg.Error:
            self._conn.close()
            raise
        now = time.time()
        if self._last_sample and now - self._last_sample > 2.0:
            self.ev.sampler_gaps.append(now - self._last_sample)
        self._last_sample = now
        for pid, start, state, addr, app in rows:
            pod = self.ev.pod_by_ip.get(addr or "")
            # Through the pooler, the pod is the client's: its application_name is its name.
            named = f"{self.namespace}/{app}"
            if (pod is None or pod.split("/", 1)[1].startswith("pgbouncer")) and (
                named in self.ev.pods
            ):
                pod = named
            key = (int(pid), float(start))
            self.ev.seen[key] = checks.BackendSeen(
                pid=int(pid), backend_start=float(start), t=now, state=state, pod=pod, app=app
            )

    def _list_pods(self) -> None:
        core = kubernetes.client.CoreV1Api(self.api)
        for p in core.list_namespaced_pod(self.namespace, _request_timeout=5).items:
            key = f"{self.namespace}/{p.metadata.name}"
            self.ev.pods[key] = dict(p.metadata.labels or {})
            if p.status.pod_ip and not p.metadata.deletion_timestamp:
                self.ev.pod_by_ip[p.status.pod_ip] = key

    def _poll_status(self) -> None:
        custom = kubernetes.client.CustomObjectsApi(self.api)
        items = custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, _request_timeout=5
        )["items"]
        now = time.time()
        for b in items:
            st = b.get("status") or {}
            ready = next((c for c in st.get("conditions", []) if c["type"] == "Ready"), None)
            probe = st.get("lastProbeTime")
            self.ev.status.append(
                checks.StatusSample(
                    t=now,
                    budget=b["metadata"]["name"],
                    ready=f"{ready['status']}:{ready['reason']}" if ready else None,
                    probe_time=checks.parse_time(probe) if probe else None,
                )
            )

    def _rss(self) -> None:
        for op in list(self.ops):
            if op.proc.poll() is None:
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{op.proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            mb = int(line.split()[1]) / 1024
                            self.ev.rss.setdefault(op.proc.pid, []).append((time.time(), mb))


def su(sb: Sandbox) -> psycopg.Connection[Any]:
    return psycopg.connect(sb.db.superuser_dsn, autocommit=True, connect_timeout=5)


def set_logging(sb: Sandbox, on: bool) -> None:
    """Turn on (or reset) the log settings the judge reads, as superuser, without a restart."""
    with su(sb) as conn:
        for name, value in RUNNER_LOG_SETTINGS.items():
            if on:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
            else:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        conn.execute("SELECT pg_reload_conf()")


def refresh_pids(sb: Sandbox) -> None:
    sb.state["pids"] = json.loads((sb.state_dir / "state.json").read_text())["pids"]


def server_pids(sb: Sandbox) -> list[int]:
    """The postmaster and its children (every backend and auxiliary process)."""
    refresh_pids(sb)
    root = int(sb.state["pids"]["postgres"])
    found = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == root:
                    found.append(int(entry.name))
    return found


def pgbouncer_pid(sb: Sandbox, pod: str) -> int | None:
    return procs.pgbouncer_pid(sb.tag, pod)


BUDGETS: dict[str, dict[str, Any]] = {
    "leaky": {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": 25},
        "selector": {"matchLabels": {"tier": "leaky"}},
        "pollSeconds": 1,
        "remediation": {
            "steps": ["TerminateIdle", "RestartPods"],
            "breachSeconds": 2,
            "cooldownSeconds": COOLDOWN_SECONDS,
            "terminateIdle": {"minIdleSeconds": MIN_IDLE_SECONDS},
            "restartPods": {"minPodAgeSeconds": 0, "maxPodsPerCycle": MAX_PODS_PER_CYCLE},
        },
    },
    "pooled": {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": 40},
        "selector": {"matchLabels": {"tier": "pooled"}},
        "pollSeconds": 1,
        "remediation": {
            "steps": ["TerminateIdle", "ScalePooler", "RestartPods"],
            "breachSeconds": 2,
            "cooldownSeconds": COOLDOWN_SECONDS,
            "terminateIdle": {"minIdleSeconds": MIN_IDLE_SECONDS},
            "restartPods": {"minPodAgeSeconds": 0, "maxPodsPerCycle": MAX_PODS_PER_CYCLE},
        },
        "pooler": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgbouncer"},
            "minReplicas": 1,
            "maxReplicas": 1,
            "serverConnectionsPerReplica": 30,
            "adminSecretRef": {"name": "pgbouncer-admin"},
        },
    },
}


@dataclass
class Run:
    """One fault run: its world, its faults and its bookkeeping."""

    sb: Sandbox
    namespace: str
    seed: int
    duration: float
    out_dir: Path
    real_apps: bool = False
    rng: random.Random = field(init=False)
    ops: list[Operator] = field(default_factory=list)
    faults: list[checks.Fault] = field(default_factory=list)
    alive: dict[str, list[list[float]]] = field(default_factory=dict)
    paused: dict[str, list[list[float]]] = field(default_factory=dict)
    monitor_password: str = ""
    replicas_started: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.api = self.sb.api_client()
        self.budgets = Budgets(self.api, self.namespace)
        self.workloads = Workloads(self.sb, self.api)
        self.monitor_password = self.sb.db.monitor_password

    # --- the world ------------------------------------------------------------------------

    def monitor_dsn(self) -> str:
        db = self.sb.db
        return db.dsn(postgres.MONITOR_ROLE, self.monitor_password, db.pg_port, postgres.APP_DB)

    def setup(self) -> None:
        from bench.common import Kube

        Kube(self.sb).install_crd()
        core = kubernetes.client.CoreV1Api(self.api)
        core.create_namespace({"metadata": {"name": self.namespace}})
        eventually(
            lambda: core.read_namespaced_service_account("default", self.namespace),
            timeout=30,
            what="default ServiceAccount",
        )
        db = self.sb.db
        self.budgets.secret("pg-monitor", self.monitor_dsn())
        self.budgets.secret(
            "pgbouncer-admin",
            db.dsn(postgres.BOUNCER_ADMIN, db.bouncer_admin_password, 6432, "pgbouncer"),
        )
        w, ns = self.workloads, self.namespace
        leak = {"LEAK_RATE": "2", "LEAK_MAX": "40"}
        w.deploy(ns, "leaky-idle", replicas=2, env=leak, labels={"tier": "leaky"}, wait=False)
        w.deploy(
            ns,
            "leaky-tx",
            env={"LEAK_RATE": "1", "LEAK_MAX": "20", "IN_TRANSACTION": "1"},
            labels={"tier": "leaky"},
            wait=False,
        )
        w.deploy(
            ns,
            "steady",
            image=STEADY_IMAGE,
            env={"POOL_SIZE": "3", "QUERY_INTERVAL": "0.5", "RECONNECT": "1"},
            wait=False,
        )
        (pooler_ip,) = w.deploy_pgbouncer(ns, pool_size=40)
        w.deploy(
            ns,
            "pooled",
            via_pooler=pooler_ip,
            env={"LEAK_RATE": "1", "LEAK_MAX": "50"},
            labels={"tier": "pooled"},
            wait=False,
        )
        if self.real_apps:
            from sandbox.apps.deploy import deploy_app, pool_settings

            deploy_app(
                w,
                ns,
                "psycopg-pool",
                kind="psycopg",
                driver_env=pool_settings(4, (1.0, 20.0), self.duration + 120),
                wait=False,
            )
        for name in ("leaky-idle", "leaky-tx", "steady", "pooled"):
            w.wait_available(ns, name, 2 if name == "leaky-idle" else 1, timeout=90)
        for name, spec in BUDGETS.items():
            self.create_budget(name, spec)
        for _ in range(2):
            self.start_replica()

    def create_budget(self, name: str, spec: dict[str, Any]) -> None:
        self.budgets.create(name, spec)
        self.alive.setdefault(name, []).append([time.time(), float("inf")])

    def start_replica(self) -> Operator:
        self.replicas_started += 1
        op = start_operator(
            self.sb,
            self.namespace,
            self.out_dir / f"replica-{self.replicas_started}.log",
            standalone=False,
        )
        self.ops.append(op)
        return op

    def identity_of(self, op: Operator) -> str | None:
        """A replica's Lease identity, from its log."""
        identity, _, _ = checks.parse_actions(op.logs().splitlines())
        return identity

    def live_ops(self) -> list[Operator]:
        return [op for op in self.ops if op.proc.poll() is None]

    def leader(self) -> Operator | None:
        return next((op for op in self.live_ops() if leading(op)), None)

    def acting_budgets(self) -> tuple[str, ...]:
        """Budgets alive and not paused now (the ones whose status should tell)."""
        return tuple(
            n
            for n, lives in self.alive.items()
            if lives[-1][1] == float("inf")
            and not any(b == float("inf") for _, b in self.paused.get(n, []))
        )

    # --- faults ---------------------------------------------------------------------------

    def inject(self, kind: str) -> checks.Fault:
        """Inject one fault of ``kind``, undo it, and return what it was."""
        rng = self.rng
        budgets = self.acting_budgets()
        start = time.time()
        notice: tuple[str, ...] = ()
        detail = ""
        holder: str | None = None
        if kind == "pg_restart":
            down = rng.uniform(3, 8)
            postgres.stop_postgres(self.sb.state_dir)
            time.sleep(down)
            postgres.start_postgres(self.sb.state_dir, self.sb.db)
            refresh_pids(self.sb)
            notice, detail = ("DatabaseUnreachable",), f"down {down:.1f}s"
        elif kind == "pg_stall":
            # The whole server frozen (a hung host): the postmaster and every backend stopped.
            frozen = rng.uniform(12, 18)
            pids = server_pids(self.sb)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(frozen)
            finally:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            notice, detail = ("DatabaseUnreachable",), f"{len(pids)} processes {frozen:.1f}s"
        elif kind == "apiserver_restart":
            down = rng.uniform(3, 6)
            restart_apiserver(self.sb, down)
            detail = f"down {down:.1f}s"
        elif kind in ("leader_kill", "leader_freeze"):
            leader = self.leader()
            holder = self.identity_of(leader) if leader is not None else None
            if leader is None:
                detail = "no leader to hit"
            elif kind == "leader_kill":
                leader.proc.send_signal(signal.SIGKILL)
                leader.proc.wait(timeout=10)
                later = rng.uniform(20, 30)
                time.sleep(later)
                self.start_replica()
                detail = f"pid {leader.proc.pid}; a new replica {later:.0f}s later"
            else:
                frozen = rng.uniform(20, 30)
                leader.proc.send_signal(signal.SIGSTOP)
                try:
                    time.sleep(frozen)
                finally:
                    leader.proc.send_signal(signal.SIGCONT)
                detail = f"pid {leader.proc.pid} frozen {frozen:.1f}s"
        elif kind == "pgbouncer_kill":
            pods = self.workloads.pods(self.namespace, "app=pgbouncer")
            bouncer = pgbouncer_pid(self.sb, pods[0].metadata.name) if pods else None
            if bouncer is not None:
                os.kill(bouncer, signal.SIGKILL)
                detail = f"pid {bouncer}"
            budgets = tuple(b for b in budgets if b == "pooled")
            notice = ("ProbeFailed",)
        elif kind == "pod_delete":
            pods = [
                p
                for p in self.workloads.pods(self.namespace, "app")
                if p.metadata.labels.get("app") != "pgbouncer"
            ]
            if pods:
                pod = rng.choice(sorted(pods, key=lambda p: p.metadata.name))
                core = kubernetes.client.CoreV1Api(self.api)
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(pod.metadata.name, self.namespace)
                detail = f"{pod.metadata.name} at {pod.status.pod_ip}"
        elif kind == "secret_rotate":
            self.monitor_password = "Rot-" + secrets.token_urlsafe(12)
            with su(self.sb) as conn:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(postgres.MONITOR_ROLE), sql.Literal(self.monitor_password)
                    )
                )
                # Any reconnect now fails with the old password: make them reconnect.
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'connbudget-probe'"
                ).fetchall()
                probes = [int(r[0]) for r in rows]
                self.watchers.ev.own_terminated.update(probes)
                conn.execute(
                    "SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) AS p", (probes,)
                )
            stale = rng.uniform(12, 18)
            time.sleep(stale)
            self.budgets.secret("pg-monitor", self.monitor_dsn())
            notice, detail = ("AuthenticationFailed",), f"Secret stale {stale:.1f}s"
        elif kind == "budget_edit":
            name = rng.choice(sorted(self.alive))
            if self.alive[name][-1][1] == float("inf"):
                n = rng.randint(15, 35)
                self.budgets.patch(name, {"spec": {"budget": {"maxConnections": n}}})
                detail = f"{name} maxConnections={n}"
            budgets = ()
        elif kind == "budget_pause":
            target = rng.choice(budgets) if budgets else None
            if target is not None:
                name = target
                held = rng.uniform(8, 15)
                key = "connbudget.io/paused"
                self.paused.setdefault(name, []).append([time.time(), float("inf")])
                self.budgets.patch(name, {"metadata": {"annotations": {key: "true"}}})
                time.sleep(held)
                self.budgets.patch(name, {"metadata": {"annotations": {key: None}}})
                self.paused[name][-1][1] = time.time()
                detail = f"{name} paused {held:.1f}s"
                budgets = (name,)
        elif kind == "budget_delete":
            target = rng.choice(budgets) if budgets else None
            if target is not None:
                name = target
                self.budgets.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name
                )

                def gone() -> bool:
                    try:
                        self.budgets.get(name)
                    except ApiException as e:
                        return bool(e.status == 404)
                    return False

                eventually(gone, timeout=30, what=f"budget {name} deleted")
                self.alive[name][-1][1] = time.time()
                time.sleep(rng.uniform(2, 5))
                self.create_budget(name, BUDGETS[name])
                detail = f"{name} deleted and recreated"
                budgets = (name,)
        else:
            raise ValueError(kind)
        fault = checks.Fault(
            kind=kind,
            start=start,
            end=time.time(),
            budgets=budgets,
            notice=notice,
            detail=detail,
            holder=holder,
        )
        self.faults.append(fault)
        say(f"{kind}: {detail} ({fault.end - fault.start:.1f}s)")
        return fault

    def settle(self, fault: checks.Fault, deadline: float) -> None:
        """Wait (bounded) until every budget the fault hit is Ready again with a fresh probe."""
        limit = min(deadline, time.time() + SETTLE_TIMEOUT)
        while time.time() < limit:
            samples = [s for s in self.watchers.ev.status[-400:] if s.t >= fault.start]
            fresh = {b for b in fault.budgets if checks.recovered_at(fault, samples, b) is not None}
            if set(fault.budgets) <= fresh and len(self.live_ops()) >= 2:
                return
            time.sleep(0.5)

    # --- the run --------------------------------------------------------------------------

    def go(self) -> dict[str, Any]:
        say(f"seed {self.seed} (replay with --seed {self.seed}), {self.duration:.0f}s")
        pg_log = self.sb.state_dir / "logs" / "postgres.log"
        audit_log = self.sb.state_dir / "logs" / "audit.log"
        pg_from = pg_log.stat().st_size
        audit_from = audit_log.stat().st_size if audit_log.exists() else 0
        set_logging(self.sb, on=True)
        t0 = time.time()
        self.watchers = Watchers(self.sb, self.namespace, t0 + self.duration + 600, self.ops)
        try:
            # Watching before anything runs: the first terminations come seconds after setup.
            self.watchers.start()
            self.setup()
            deadline = t0 + self.duration
            eventually(
                lambda: self.leader() is not None, timeout=60, what="a leader elected", interval=1
            )
            time.sleep(10)  # the leak builds up and the first actions are taken
            order: list[str] = []
            while time.time() < deadline - 20:
                if not order:
                    order = list(KINDS)
                    self.rng.shuffle(order)
                fault = self.inject(order.pop())
                self.settle(fault, deadline + 60)
                time.sleep(self.rng.uniform(*GAP_SECONDS))
            time.sleep(5)  # the last actions logged
        finally:
            ended_at = time.time()
            self.watchers.close()
            for op in self.ops:
                op.stop()
            with contextlib.suppress(Exception):
                self.restore()
        pg_lines = pg_log.read_bytes()[pg_from:].decode(errors="replace").splitlines()
        audit_lines = audit_log.read_bytes()[audit_from:].decode(errors="replace").splitlines()
        return self.judge(pg_lines, audit_lines, t0, ended_at)

    def restore(self) -> None:
        """Leave the shared sandbox as found: the monitoring password, the log settings."""
        with su(self.sb) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(postgres.MONITOR_ROLE), sql.Literal(self.sb.db.monitor_password)
                )
            )
        set_logging(self.sb, on=False)
        core = kubernetes.client.CoreV1Api(self.api)
        with contextlib.suppress(ApiException):
            core.delete_namespace(self.namespace)

    def selections(self) -> list[checks.Selection]:
        out = []
        for name, spec in BUDGETS.items():
            labels = spec["selector"]["matchLabels"]
            pods = frozenset(
                p
                for p, have in self.watchers.ev.pods.items()
                if all(have.get(k) == v for k, v in labels.items())
            )
            out.append(
                checks.Selection(
                    budget=name,
                    pods=pods,
                    alive=tuple((a, b) for a, b in self.alive.get(name, [])),
                    paused=tuple((a, b) for a, b in self.paused.get(name, [])),
                    max_pods_per_cycle=MAX_PODS_PER_CYCLE,
                    cooldown_seconds=COOLDOWN_SECONDS,
                )
            )
        return out

    def judge(
        self, pg_lines: list[str], audit_lines: list[str], t0: float, t1: float
    ) -> dict[str, Any]:
        ev = self.watchers.ev
        lines = checks.parse_pg_log(pg_lines)
        ended = checks.terminations(lines, end=t1)
        selections = self.selections()
        violations: list[checks.Violation] = []
        n_term, v = checks.judge_terminations(
            ended=ended,
            seen=ev.seen,
            selections=selections,
            own=ev.own_terminated,
            min_idle_seconds=MIN_IDLE_SECONDS,
        )
        violations += v
        audit = checks.parse_audit(audit_lines)
        n_evict, v = checks.judge_evictions(
            audit=audit, namespace=self.namespace, selections=selections
        )
        violations += v
        terms = checks.lease_terms(audit, namespace=self.namespace, name=LEASE_NAME)
        violations += checks.judge_terms(terms)
        acts: list[checks.Action] = []
        tracebacks: list[str] = []
        for op in self.ops:
            _, a, tb = checks.parse_actions(op.logs().splitlines())
            acts += a
            tracebacks += tb
        violations += [
            checks.Violation("an unhandled exception in an operator's log", t1, tb)
            for tb in tracebacks
        ]
        evictions = [
            e
            for e in audit
            if e.resource == "pods/eviction"
            and e.namespace == self.namespace
            and 200 <= e.code < 300
        ]
        ended_judged = [
            line
            for line in ended
            if line.pid not in ev.own_terminated and line.app != "connbudget-probe"
        ]
        n_acts, v = checks.judge_actions(
            actions=acts,
            terms=terms,
            evictions=evictions,
            ended=ended_judged,
            frozen=[
                (f.holder, f.start, f.end)
                for f in self.faults
                if f.kind == "leader_freeze" and f.holder is not None
            ],
        )
        violations += v
        outcomes = []
        for fault in self.faults:
            within = (
                LEADER_RECOVER_WITHIN
                if fault.kind in ("leader_kill", "leader_freeze")
                else RECOVER_WITHIN
            )
            out = checks.judge_fault(
                fault, ev.status, notice_within=NOTICE_WITHIN, recover_within=within
            )
            outcomes.append(out)
            violations += out.violations
        by_kind: dict[str, dict[str, Any]] = {}
        for out in outcomes:
            k = by_kind.setdefault(out.fault.kind, {"count": 0, "notice_s": [], "recover_s": []})
            k["count"] += 1
            if out.noticed_after is not None:
                k["notice_s"].append(round(out.noticed_after, 1))
            if out.recovered_after is not None:
                k["recover_s"].append(round(out.recovered_after, 1))
            if out.fault.kind in ("leader_kill", "leader_freeze") and out.fault.holder:
                # Recovered when another replica took the Lease (from the audit log).
                took, v = checks.judge_takeover(
                    killed_at=out.fault.start,
                    old_holder=out.fault.holder,
                    terms=terms,
                    within=TAKEOVER_WITHIN,
                )
                violations += v
                k.setdefault("takeover_s", []).append(None if took is None else round(took, 1))
        growth = {str(pid): checks.growth_mb(s, warmup=60.0) for pid, s in sorted(ev.rss.items())}
        return {
            "seed": self.seed,
            "duration_s": round(t1 - t0),
            "faults": {k: v["count"] for k, v in sorted(by_kind.items())},
            "faults_injected": len(self.faults),
            "time_to_notice_s": {k: v["notice_s"] for k, v in sorted(by_kind.items())},
            "time_to_recover_s": {k: v["recover_s"] for k, v in sorted(by_kind.items())},
            "leader_takeover_s": {
                k: v["takeover_s"] for k, v in sorted(by_kind.items()) if "takeover_s" in v
            },
            "checked": {
                "terminations": n_term,
                "evictions": n_evict,
                "lease_terms": len(terms),
                "actions_and_acts_judged_against_terms": n_acts,
                "operator_actions": len(acts),
                "backends_sampled": len(ev.seen),
                "status_samples": len(ev.status),
                "replicas_started": self.replicas_started,
            },
            "rss_growth_mb": growth,
            "rss_max_mb": {
                str(pid): round(max(mb for _, mb in s), 1) for pid, s in sorted(ev.rss.items())
            },
            "sampler_gaps_s": [round(g, 1) for g in ev.sampler_gaps],
            "violations": [asdict(v) for v in violations],
            "fault_log": [asdict(f) for f in self.faults],
        }


def run(
    sb: Sandbox,
    *,
    seed: int,
    duration: float,
    out_dir: Path,
    namespace: str = "faults",
    real_apps: bool = False,
) -> dict[str, Any]:
    """Run the fault run on ``sb`` and return its report (violations included)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r = Run(sb, namespace, seed, duration, out_dir, real_apps=real_apps)
    report = r.go()
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    summarize(report)
    return report


def summarize(report: dict[str, Any]) -> None:
    say(f"seed {report['seed']}, {report['duration_s']}s, {report['faults_injected']} faults")
    for kind, n in report["faults"].items():
        say(
            f"  {kind}: {n}; noticed after {report['time_to_notice_s'][kind]} s; "
            f"recovered after {report['time_to_recover_s'][kind]} s"
        )
    say(f"  Lease taken over after (s): {report['leader_takeover_s']}")
    say(f"  checked: {report['checked']}")
    say(f"  RSS growth (MB): {report['rss_growth_mb']}; max {report['rss_max_mb']}")
    say(f"  violations: {len(report['violations'])}")
    for v in report["violations"][:30]:
        say(f"    {v['invariant']}: {v['evidence'][:400]}")
