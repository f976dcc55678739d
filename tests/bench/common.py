"""What every benchmark shares: printing, statistics, extra PostgreSQL servers, the operator.

Every loop here is bounded in count and time, and every server or process a benchmark starts is
tagged with the sandbox's tag, so the sandbox's teardown removes it even after a crash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import psycopg
from kubernetes.client.rest import ApiException

from sandbox import postgres
from sandbox.core import Sandbox
from sandbox.postgres import DatabaseInfo
from sandbox.procs import alive, free_port, stop_pid

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "connbudget.io", "v1alpha1", "connectionbudgets"
REFUSALS = ("too many clients", "remaining connection slots are reserved")
BENCH_APP = "connbudget-bench"  # application_name of the benchmark's own connections


def say(message: str) -> None:
    print(message, flush=True)


# --- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """A median with the min and max over repeated runs."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        vs = sorted(values)
        if not vs:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vs), vs[0], vs[-1], len(vs))

    def show(self, fmt: str = "{:.1f}", unit: str = "") -> str:
        if self.n == 0 or math.isnan(self.median):
            return "n/a"
        med = fmt.format(self.median) + unit
        if self.n == 1 or self.low == self.high:
            return med
        return f"{med} ({fmt.format(self.low)}-{fmt.format(self.high)})"


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``."""
    vs = sorted(values)
    if not vs:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(vs)))
    return vs[rank - 1]


def parse_time(text: str) -> float:
    """Epoch seconds of an ISO 8601 time such as the JSON logs print."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log file, one per line; other lines are skipped."""
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def is_refusal(error: BaseException) -> bool:
    text = str(error)
    return any(r in text for r in REFUSALS)


# --- processes ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine() -> str:
    """The machine's size, for the report."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model or 'unknown model'}), {mem_kb / 1024 / 1024:.1f} GiB RAM"


class Ticker:
    """Calls ``fn`` every ``interval`` seconds in a thread, until stopped or ``limit`` seconds."""

    def __init__(self, fn: Callable[[], None], *, interval: float, limit: float) -> None:
        self._fn = fn
        self._interval = interval
        self._limit = limit
        self._stop = threading.Event()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        deadline = time.monotonic() + self._limit
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._fn()
            except Exception as e:  # a hiccup of one sample must not end the series
                self.errors.append(f"{type(e).__name__}: {e}")
            next_at += self._interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- PostgreSQL servers -------------------------------------------------------------------------


@dataclass
class Server:
    """An extra PostgreSQL 15 (and its PgBouncer) started inside a sandbox, tagged with it."""

    name: str
    info: DatabaseInfo
    pids: list[int]
    log: Path

    @classmethod
    def start(cls, sb: Sandbox, name: str, *, max_connections: int) -> Server:
        state = sb.state_dir / "bench" / name
        (state / "logs").mkdir(parents=True)
        for p in (state.parent, state):
            p.chmod(0o711)  # the postgres user must traverse it
        info, pids = postgres.start(
            state,
            tag=sb.tag,
            host_ip=sb.state["network"]["hostIP"],
            max_connections=max_connections,
        )
        return cls(name=name, info=info, pids=pids, log=state / "logs" / "postgres.log")

    def stop(self) -> None:
        pg, bouncer = self.pids
        if alive(bouncer):
            stop_pid(bouncer, grace=5.0)
        if alive(pg):
            stop_pid(pg, grace=10.0, sig=signal.SIGINT)

    def superuser(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A superuser connection (Unix socket; it uses a reserved slot, so it is never refused)."""
        return psycopg.connect(
            self.info.superuser_dsn,
            autocommit=True,
            application_name=BENCH_APP,
            options="-c idle_session_timeout=0",
        )

    def set_idle_session_timeout(self, seconds: int | None) -> None:
        """Set (or reset) the server-wide ``idle_session_timeout``; new sessions get it."""
        with self.superuser() as conn:
            if seconds is None:
                conn.execute("ALTER SYSTEM RESET idle_session_timeout")
            else:
                conn.execute(f"ALTER SYSTEM SET idle_session_timeout = '{int(seconds)}s'")
            conn.execute("SELECT pg_reload_conf()")

    def log_backends(self) -> None:
        """Prefix each line of the server's log with the backend's application_name, so a
        terminated or timed-out backend (always logged: FATAL) names its pod."""
        with self.superuser() as conn:
            conn.execute(f"ALTER SYSTEM SET log_line_prefix = '{LOG_LINE_PREFIX}'")
            conn.execute("ALTER SYSTEM SET log_timezone = 'UTC'")
            conn.execute("SELECT pg_reload_conf()")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def create_databases(self, names: Sequence[str]) -> None:
        with self.superuser() as conn:
            for n in names:
                conn.execute(f'CREATE DATABASE "{n}" OWNER {postgres.APP_ROLE}')

    def monitor_dsn(self, dbname: str = postgres.APP_DB) -> str:
        i = self.info
        return i.dsn(postgres.MONITOR_ROLE, i.monitor_password, i.pg_port, dbname)

    def app_dsn(self, dbname: str = postgres.APP_DB) -> str:
        i = self.info
        return i.dsn(postgres.APP_ROLE, i.app_password, i.pg_port, dbname)

    def client_backends(self, where: str = "true") -> int:
        with self.superuser() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                f"AND application_name <> '{BENCH_APP}' AND ({where})"
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_backends(self, where: str, *, at_most: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        n = self.client_backends(where)
        while n > at_most and time.monotonic() < deadline:
            time.sleep(0.5)
            n = self.client_backends(where)
        return n


# --- Kubernetes ---------------------------------------------------------------------------------


class Kube:
    """The few Kubernetes calls the benchmarks make, on the sandbox's admin client."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.api = sb.api_client()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def install_crd(self) -> None:
        import yaml

        ext = kubernetes.client.ApiextensionsV1Api(self.api)
        body = yaml.safe_load((ROOT / "crds" / "connectionbudgets.connbudget.io.yaml").read_text())
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as e:
            if e.status != 409:
                raise
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = ext.read_custom_resource_definition(body["metadata"]["name"])
            if any(
                c.type == "Established" and c.status == "True" for c in got.status.conditions or []
            ):
                return
            time.sleep(0.2)
        raise RuntimeError("the ConnectionBudget CRD did not become Established")

    def namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name}})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(ApiException):
                self.core.read_namespaced_service_account("default", name)
                return
            time.sleep(0.1)
        raise RuntimeError(f"namespace {name} has no default ServiceAccount")

    def delete_namespaces(self, names: Iterable[str], *, wait: float = 0.0) -> None:
        names = list(names)
        for n in names:
            with contextlib.suppress(ApiException):
                self.core.delete_namespace(n)
        deadline = time.monotonic() + wait
        while names and time.monotonic() < deadline:
            names = [n for n in names if self._exists(n)]
            time.sleep(0.5)

    def _exists(self, ns: str) -> bool:
        try:
            self.core.read_namespace(ns)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def secret(self, ns: str, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(ns, {"metadata": {"name": name}, "stringData": data})

    def budget(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ConnectionBudget",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def delete_budget(self, ns: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def budgets(self) -> list[dict[str, Any]]:
        got = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        return list(got.get("items") or [])

    def events(self, ns: str) -> list[Any]:
        return list(self.core.list_namespaced_event(ns).items)


# --- the operator -------------------------------------------------------------------------------


@dataclass
class Operator:
    """A ``connbudget run`` process watching the given namespaces (standalone, JSON logs)."""

    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int

    @classmethod
    def start(
        cls, sb: Sandbox, namespaces: Sequence[str], log: Path, *, shards: int | None = None
    ) -> Operator:
        """Start one; with ``shards``, a replica under sharded leader election, not standalone."""
        metrics_port, health_port = free_port(), free_port()
        argv = [sys.executable, "-m", "connbudget", "run"]
        argv += ["--standalone"] if shards is None else ["--shards", str(shards)]
        for ns in namespaces:
            argv += ["--namespace", ns]
        argv += [
            "--metrics-port",
            str(metrics_port),
            "--log-format",
            "json",
            "--liveness",
            f"http://127.0.0.1:{health_port}/healthz",
        ]
        env = {
            **os.environ,
            "KUBECONFIG": sb.kubeconfig,
            "PYTHONUNBUFFERED": "1",
            "CONNBUDGET_SANDBOX": sb.tag,  # the sandbox's teardown finds it if we die
        }
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        op = cls(proc=proc, log=log, metrics_port=metrics_port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError):
                op.metrics()
                return op
            time.sleep(0.2)
        op.stop()
        raise RuntimeError(f"the operator did not start within 60s; see {log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def records(self) -> list[dict[str, Any]]:
        return list(json_lines(self.log))

    def actions(self) -> list[dict[str, Any]]:
        """The operator's ``action`` log records (each remediation call, after it returned)."""
        return [r for r in self.records() if r.get("message") == "action"]

    def problems(self) -> list[dict[str, Any]]:
        """Log records at WARNING or above (errors, failed probes, degraded budgets)."""
        return [
            r
            for r in self.records()
            if str(r.get("level", "")).upper() in ("WARNING", "ERROR", "CRITICAL")
        ]


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric ``name`` in Prometheus text, with their labels."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        if "{" in head:
            for part in head[head.index("{") + 1 : head.rindex("}")].split('",'):
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        out.append((labels, float(value)))
    return out


def probe_counts(text: str) -> dict[str, tuple[float, float]]:
    """Per budget (``ns/name``): probes so far and their total seconds (from the histogram)."""
    counts = {
        f"{lb['namespace']}/{lb['budget']}": v
        for lb, v in metric_samples(text, "connbudget_probe_duration_seconds_count")
    }
    sums = {
        f"{lb['namespace']}/{lb['budget']}": v
        for lb, v in metric_samples(text, "connbudget_probe_duration_seconds_sum")
    }
    return {k: (n, sums.get(k, 0.0)) for k, n in counts.items()}


# --- PostgreSQL's log and the machine's CPU -----------------------------------------------------

# Set on a benchmark's server (``Server.log_backends``), so each line names the backend's
# application_name (the pod's name, for the sandbox's apps).
LOG_LINE_PREFIX = "%m [%p] app=%a "
_PG_FATAL = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+) \[\d+\] app=(?P<app>\S*) FATAL:  "
    r"terminating connection due to (?P<why>administrator command|idle-session timeout)"
)
TERMINATION_CAUSES = {"administrator command": "terminated", "idle-session timeout": "timeout"}


def parse_terminations(text: str) -> list[tuple[float, str, str]]:
    """``(time, application_name, cause)`` of each backend PostgreSQL's log says was ended.

    ``cause`` is ``terminated`` (``pg_terminate_backend``, the log's "administrator command") or
    ``timeout`` (``idle_session_timeout``). Lines need ``LOG_LINE_PREFIX``; others are skipped.
    """
    found = []
    for line in text.splitlines():
        m = _PG_FATAL.match(line)
        if m is None:
            continue
        when = dt.datetime.strptime(m["time"].rsplit(" ", 1)[0], "%Y-%m-%d %H:%M:%S.%f")
        found.append(
            (when.replace(tzinfo=dt.UTC).timestamp(), m["app"], TERMINATION_CAUSES[m["why"]])
        )
    return found


def workload_of(pod: str) -> str:
    """The Deployment a pod's name comes from (``leak-5d8f7c9b4-x2kq9`` → ``leak``)."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) > 2 else pod


def cpu_times() -> tuple[float, float]:
    """The machine's (busy, total) CPU seconds so far, all cores (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return (total - idle) / ticks, total / ticks


def busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of all cores busy between two ``cpu_times`` readings (0..1)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else math.nan
