"""Helpers shared by the operator, reliability and security tests (budgets, backends, faults,
bad input, secrets, TLS)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import psycopg

from e2e.conftest import Budgets, Operator, all_text
from sandbox import postgres, tls
from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads, eventually
from sandbox.network import MAX_SLOTS
from sandbox.procs import TAG_VAR, free_port, run, spawn, stop_pid

FAST = {"pollSeconds": 1}  # every test polls each second to stay short
APISERVER_STOP_GRACE = 5.0  # seconds for a killed kube-apiserver to be gone
APISERVER_START_TIMEOUT = 60.0  # seconds; it starts in about 5 s on 2 cores


def budget_spec(app: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "database": {"secretRef": {"name": "pg-monitor"}},
        "budget": {"maxConnections": 20},
        "selector": {"matchLabels": {"app": app}},
        **FAST,
    }
    spec.update(overrides)
    return spec


def pod_names(workloads: Workloads, namespace: str, selector: str) -> set[str]:
    return {p.metadata.name for p in workloads.pods(namespace, selector)}


def deploy_steady(workloads: Workloads, namespace: str) -> set[str]:
    """A well-behaved app outside every selector: it must never be touched."""
    workloads.deploy(
        namespace,
        "steady",
        image=STEADY_IMAGE,
        replicas=1,
        env={"POOL_SIZE": "2", "QUERY_INTERVAL": "0.5", "RECONNECT": "1"},
    )
    return pod_names(workloads, namespace, "app=steady")


def backends(dsn: str, prefix: str) -> dict[str, int]:
    """application_name → client backends, for apps whose name starts with ``prefix``."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND application_name LIKE %s GROUP BY 1",
            (prefix + "%",),
        ).fetchall()
    return {a: int(n) for a, n in rows}


def ready(budgets: Budgets, name: str) -> str | None:
    """``status:reason`` of the Ready condition (None before the first status)."""
    c = budgets.condition(name, "Ready")
    return f"{c['status']}:{c['reason']}" if c else None


def actions(op: Operator) -> list[dict[str, Any]]:
    """The operator's ``action`` log records (JSON logs), in order."""
    out = []
    for line in op.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("message") == "action":
            out.append(rec)
    return out


def refresh_pids(sandbox: Sandbox) -> None:
    """Reload the pids of a server restarted by a test, so the session's teardown stops it."""
    sandbox.state["pids"] = json.loads((sandbox.state_dir / "state.json").read_text())["pids"]


def planted_secrets(sandbox: Sandbox) -> list[str]:
    """Every credential the sandbox planted: passwords, DSNs, the API server's admin token."""
    db = sandbox.db
    config = json.loads(Path(sandbox.kubeconfig).read_text())
    tokens = [u["user"]["token"] for u in config.get("users", []) if u["user"].get("token")]
    return [
        db.monitor_password,
        db.monitor_dsn,
        db.app_password,
        db.bouncer_admin_password,
        *tokens,
    ]


def assert_no_secret(budgets: Budgets, names: list[str], op: Operator, secrets: list[str]) -> None:
    """No planted secret in logs, Events, any budget's status or the metrics.

    A killed operator's metrics are gone with it: its log, the Events and status remain.
    """
    if op.proc.poll() is None:
        text = "\n".join(all_text(budgets, n, op) for n in names)
    else:
        events = "\n".join(f"{e.reason} {e.message}" for e in budgets.events())
        text = "\n".join([op.logs(), events, *(json.dumps(budgets.status(n)) for n in names)])
    for secret in secrets:
        assert secret not in text, "a secret leaked into the operator's output"


class PartitionProxy:
    """A TCP proxy to PostgreSQL that can be cut off, as a network partition would.

    While cut off it neither reads nor writes: connections stay open, bytes wait in the kernel's
    buffers, new connections are accepted by the kernel but never answered (as a SYN lost would
    leave a client waiting); when healed, everything flows again, as TCP's retransmissions would
    make it. Runs its own event loop in a thread.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._open.wait()
                data = await src.read(65536)
                await self._open.wait()
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def close(self) -> None:
        async def stop() -> None:
            self._open.set()
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class StatusGate:
    """A validating admission webhook on ConnectionBudget status writes, run by the test.

    While armed, it holds the first status write whose ``lastAction`` matches, tells the test
    (``held``), waits for ``release()`` and then refuses it: the write is lost, as it is when the
    operator dies between acting and reporting. Everything else is allowed. Registered for one
    namespace, with ``failurePolicy: Ignore``, and removed by ``close()``.
    """

    HOLD_SECONDS = 30.0  # the longest a write is held (the webhook's timeout is longer)

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, folder: Path) -> None:
        self.api = api
        self.namespace = namespace
        self.name = f"connbudget-test-gate-{namespace}"
        self.seen = 0
        self.match: dict[str, str] | None = None
        self.held = threading.Event()
        self._release = threading.Event()
        ca = tls.make_ca(folder, "connbudget-test-webhook-ca", days=1)
        crt, key = tls.sign_server_cert(
            folder, "webhook", ca=ca, common_name="webhook", sans=["IP:127.0.0.1"], days=1
        )
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = review["request"]
                allowed = gate._judge(request.get("object") or {})
                body = json.dumps(
                    {
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": {
                            "uid": request["uid"],
                            "allowed": allowed,
                            **({} if allowed else {"status": {"message": "held by the test"}}),
                        },
                    }
                ).encode()
                # The API server may have given up the request (its client died): nobody listens.
                with contextlib.suppress(OSError):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(crt), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        port = self.server.server_address[1]
        admission = kubernetes.client.AdmissionregistrationV1Api(api)
        admission.create_validating_webhook_configuration(
            {
                "metadata": {"name": self.name},
                "webhooks": [
                    {
                        "name": "gate.test.connbudget.io",
                        "clientConfig": {
                            "url": f"https://127.0.0.1:{port}/validate",
                            "caBundle": base64.b64encode(ca[0].read_bytes()).decode(),
                        },
                        "rules": [
                            {
                                "apiGroups": ["connbudget.io"],
                                "apiVersions": ["v1alpha1"],
                                "operations": ["UPDATE"],
                                "resources": ["connectionbudgets/status"],
                                "scope": "Namespaced",
                            }
                        ],
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}
                        },
                        "failurePolicy": "Ignore",
                        "sideEffects": "None",
                        "admissionReviewVersions": ["v1"],
                        "timeoutSeconds": 30,
                    }
                ],
            }
        )

    def _judge(self, obj: dict[str, Any]) -> bool:
        self.seen += 1
        last = (obj.get("status") or {}).get("lastAction") or {}
        match = self.match
        if match is None or any(last.get(k) != v for k, v in match.items()):
            return True
        self.match = None  # only the first matching write
        self.held.set()
        self._release.wait(self.HOLD_SECONDS)
        return False

    def arm(self, **match: str) -> None:
        self.held.clear()
        self._release.clear()
        self.match = match

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        admission = kubernetes.client.AdmissionregistrationV1Api(self.api)
        try:
            admission.delete_validating_webhook_configuration(self.name)
        except kubernetes.client.rest.ApiException as e:
            if e.status != 404:
                raise
        self.server.shutdown()
        self.server.server_close()


def restart_apiserver(sandbox: Sandbox, down_seconds: float) -> None:
    """Kill the sandbox's kube-apiserver (a crash), wait, and start it again exactly as it ran.

    Its command line, environment and folder are read from ``/proc`` (the sandbox started it);
    its new pid goes into ``state.json``, so teardown still finds it.
    """
    state = json.loads((sandbox.state_dir / "state.json").read_text())
    pid = int(state["pids"]["kube-apiserver"])
    proc = Path(f"/proc/{pid}")
    argv = [a.decode() for a in proc.joinpath("cmdline").read_bytes().split(b"\0") if a]
    env = dict(
        item.decode().split("=", 1)
        for item in proc.joinpath("environ").read_bytes().split(b"\0")
        if b"=" in item
    )
    cwd = Path(os.readlink(proc / "cwd"))
    stop_pid(pid, grace=APISERVER_STOP_GRACE, sig=signal.SIGKILL)
    time.sleep(down_seconds)
    new = spawn(
        argv,
        tag=sandbox.tag,
        log=sandbox.state_dir / "logs" / "kube-apiserver.log",
        env=env,
        cwd=cwd,
    )
    postgres.record_pid(sandbox.state_dir, "kube-apiserver", new.pid)
    refresh_pids(sandbox)
    core = kubernetes.client.CoreV1Api(sandbox.api_client())
    eventually(
        lambda: core.list_namespace(limit=1),
        timeout=APISERVER_START_TIMEOUT,
        what="API server back",
    )


CLIENT_PORTS = "20000 20999"  # source ports of clients_at's connections

# Opens N idle connections with an application_name, prints their backend pids, then waits for
# stdin to close. Run inside a pod's network namespace, its backends have the pod's address.
_CLIENTS_SCRIPT = """
import json, sys, psycopg
dsn, n, app = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conns = [psycopg.connect(dsn, application_name=app, autocommit=True) for _ in range(n)]
print(json.dumps([c.info.backend_pid for c in conns]), flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def clients_at(sandbox: Sandbox, pod_ip: str, n: int, app: str) -> Iterator[list[int]]:
    """``n`` idle connections to the app database from ``pod_ip``, held by a process of the test.

    The process is not the pod's: it outlives the pod (the kubelet removes the pod's network
    namespace, and the connections stay open on the server, as a dead node's would). On exit the
    process is killed and its backends terminated.
    """
    slot = next(s for s in range(1, MAX_SLOTS + 1) if sandbox.network.pod_ip(s) == pod_ip)
    # Ports apart from the default ephemeral range: a new pod given this address later picks its
    # ports in a fresh namespace from the same sequence, and a SYN on a port still in use here
    # would make the server reset these connections (the server sees the same four-tuple).
    run(
        [
            *sandbox.network.exec_prefix(slot),
            "sysctl",
            "-qw",
            f"net.ipv4.ip_local_port_range={CLIENT_PORTS}",
        ]
    )
    proc = subprocess.Popen(
        [
            *sandbox.network.exec_prefix(slot),
            sys.executable,
            "-c",
            _CLIENTS_SCRIPT,
            sandbox.db.app_dsn,
            str(n),
            app,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, TAG_VAR: sandbox.tag},  # the sandbox's teardown finds it too
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in json.loads(proc.stdout.readline() or b"[]")]
        assert len(pids) == n, "the clients could not connect"
        yield pids
    finally:
        proc.kill()
        proc.wait(timeout=10)
        # Their process died in a namespace with no link left: the server never hears of it.
        with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
            su.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) AS p", (pids,))


def alive_backends(sandbox: Sandbox, pids: list[int]) -> int:
    with psycopg.connect(sandbox.db.superuser_dsn, autocommit=True) as su:
        row = su.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
    return int(row[0]) if row else 0
