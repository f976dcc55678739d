"""The sandbox as one object: bring it up, describe it, tear it down.

A sandbox lives in a state folder ``$TMPDIR/connbudget-sandbox-XXXX`` whose ``state.json`` records
everything it made (pids, network, ports, credentials). Teardown works from that file and from the
``CONNBUDGET_SANDBOX`` tag on every process, so it also cleans up after a killed test run. A sandbox
made by a test session records that session's pid as its owner; the next ``up`` removes sandboxes
whose owner is gone. A sandbox made by ``sandbox up`` has no owner and lives until ``sandbox down``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes

from sandbox import controlplane, postgres
from sandbox import images as images_mod
from sandbox.network import PodNetwork, choose_mode
from sandbox.postgres import DatabaseInfo
from sandbox.procs import alive, kill_tagged, spawn, stop_pid, tagged_pids, wait_for

HERE = Path(__file__).resolve().parent
STATE_PREFIX = "connbudget-sandbox-"
NODE_READY_TIMEOUT = 60.0  # seconds for the kubelet's node and the default ServiceAccount
Progress = Callable[[str], None]


def cache_dir() -> Path:
    return Path(
        os.environ.get("CONNBUDGET_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "connbudget"
    )


def _pointer() -> Path:
    return cache_dir() / "sandbox-current"


def build_binaries(progress: Progress) -> Path:
    """Build (or find cached) control-plane binaries; return their folder."""
    probe = subprocess.run(
        [str(HERE / "build-k8s"), "--print-dir"], capture_output=True, text=True, check=False
    )
    if probe.returncode == 0:
        return Path(probe.stdout.strip())
    progress(
        "control-plane binaries are not built yet: building them (15-25 min on a cold machine)"
    )
    out = subprocess.run([str(HERE / "build-k8s")], stdout=subprocess.PIPE, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


class Sandbox:
    """A running sandbox, described by its state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state: dict[str, Any] = json.loads((state_dir / "state.json").read_text())

    # --- lifecycle --------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        *,
        max_connections: int = postgres.DEFAULT_MAX_CONNECTIONS,
        owner_pid: int = 0,
        network: str | None = None,
        progress: Progress = print,
    ) -> Sandbox:
        """Start a new sandbox; on any failure, remove what was made and re-raise."""
        t0 = time.monotonic()
        reap_orphans(progress)
        bin_dir = build_binaries(progress)
        state_dir = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
        state_dir.chmod(0o711)  # the postgres user must traverse it to reach its own folder
        (state_dir / "logs").mkdir()
        state: dict[str, Any] = {
            "tag": str(state_dir),
            "ownerPid": owner_pid,
            "created": time.time(),
            "binDir": str(bin_dir),
            "pids": {},
            "network": {"mode": "loopback", "index": -1},
        }
        _write_state(state_dir, state)
        try:
            mode = network or choose_mode()
            net = PodNetwork.create(mode)
            state["network"] = {"mode": net.mode, "index": net.index, "hostIP": net.host_ip}
            _write_state(state_dir, state)
            progress(f"network mode {net.mode}: services on {net.host_ip}")

            db, db_pids = postgres.start(
                state_dir, tag=str(state_dir), host_ip=net.host_ip, max_connections=max_connections
            )
            state["pids"].update({"postgres": db_pids[0], "pgbouncer": db_pids[1]})
            state["db"] = db.__dict__
            _write_state(state_dir, state)
            progress(
                f"PostgreSQL 15 on port {db.pg_port} (max_connections={max_connections}), "
                f"PgBouncer on port {db.bouncer_port}"
            )

            cp = controlplane.start(state_dir, bin_dir, tag=str(state_dir), host_ip=net.host_ip)
            state["pids"].update(
                zip(("etcd", "kube-apiserver", "kube-controller-manager"), cp.pids, strict=True)
            )
            state["kubeconfig"] = cp.kubeconfig
            state["apiServer"] = {
                "server": cp.server,
                "host": net.host_ip,
                "port": int(cp.server.rsplit(":", 1)[1]),
                "caFile": cp.ca_file,
            }
            state["images"] = images_mod.load_images()
            _write_state(state_dir, state)
            progress(f"kube-apiserver ready at {cp.server}")

            kubelet_log = state_dir / "logs" / "kubelet.log"
            env = dict(os.environ, PYTHONPATH=str(HERE.parent))
            kubelet = spawn(
                [sys.executable, "-m", "sandbox.kubelet", str(state_dir)],
                tag=str(state_dir),
                log=kubelet_log,
                env=env,
            )
            state["pids"]["kubelet"] = kubelet.pid
            _write_state(state_dir, state)
            sb = cls(state_dir)
            wait_for(
                "node and default ServiceAccount",
                sb._node_and_sa_ready,
                timeout=NODE_READY_TIMEOUT,
                interval=0.25,
                proc=kubelet,
                log=kubelet_log,
            )
        except BaseException:
            progress(f"sandbox failed to start; cleaning up (logs were in {state_dir / 'logs'})")
            with contextlib.suppress(Exception):
                _dump_logs(state_dir, progress)
            Sandbox(state_dir).down()
            raise
        progress(f"sandbox up in {time.monotonic() - t0:.1f}s: {state_dir}")
        return sb

    def _node_and_sa_ready(self) -> bool:
        core = kubernetes.client.CoreV1Api(self.api_client())
        node = core.read_node("sandbox-node")
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        core.read_namespaced_service_account("default", "default")
        return ready

    def down(self, progress: Progress = lambda _: None) -> list[str]:
        """Stop everything this sandbox made and remove its folder; return what had to be forced."""
        forced: list[str] = []
        pids: dict[str, int] = self.state.get("pids", {})
        # The kubelet first: it stops the pods' processes and removes their namespaces.
        order = [
            "kubelet",
            "kube-controller-manager",
            "kube-apiserver",
            "etcd",
            "pgbouncer",
            "postgres",
        ]
        for name in order:
            pid = pids.get(name)
            if pid and alive(pid):
                # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client.
                sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
                stop_pid(pid, grace=20.0 if name == "kubelet" else 10.0, sig=sig)
        left = kill_tagged(self.tag)
        if left:
            forced.append(f"{left} tagged processes")
        net = self.state.get("network", {})
        if net.get("mode") == "netns":
            pod_net = PodNetwork(mode="netns", index=net["index"])
            forced += [r for r in pod_net.destroy() if r != f"link/{pod_net.bridge}"]
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            if _pointer().read_text().strip() == str(self.state_dir):
                _pointer().unlink()
        if forced:
            progress(f"removed leftovers: {', '.join(forced)}")
        return forced

    def leftovers(self) -> list[str]:
        """Everything of this sandbox that still exists (empty after a clean ``down``)."""
        found = [f"process {pid}" for pid in tagged_pids(self.tag)]
        net = self.state.get("network", {})
        if net.get("mode") == "netns":
            found += PodNetwork(mode="netns", index=net["index"]).leftovers()
        if self.state_dir.exists():
            found.append(f"folder {self.state_dir}")
        return found

    # --- description ------------------------------------------------------------------------

    @property
    def tag(self) -> str:
        return str(self.state["tag"])

    @property
    def kubeconfig(self) -> str:
        return str(self.state["kubeconfig"])

    @property
    def network(self) -> PodNetwork:
        return PodNetwork(mode=self.state["network"]["mode"], index=self.state["network"]["index"])

    @property
    def db(self) -> DatabaseInfo:
        return DatabaseInfo(**self.state["db"])

    @property
    def bin_dir(self) -> Path:
        return Path(self.state["binDir"])

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's output so far (there is no ``kubectl logs``); empty if it never ran."""
        path = self.state_dir / "pods" / namespace / pod / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def processes(self) -> dict[int, str]:
        """PID → command line of every process of this sandbox (control plane, databases, pods)."""
        found: dict[int, str] = {}
        for pid in tagged_pids(self.tag):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        return found

    def api_client(self) -> kubernetes.client.ApiClient:
        """A Kubernetes client for the sandbox's admin (only ever this sandbox's kubeconfig)."""
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=self.kubeconfig, client_configuration=config)
        return kubernetes.client.ApiClient(config)

    def env(self) -> dict[str, str]:
        """Environment variables that point tools at this sandbox."""
        return {
            "KUBECONFIG": self.kubeconfig,
            # What ``connbudget probe`` reads (CONNBUDGET_PG_DSN: the same, by its older name).
            "CONNBUDGET_DSN": self.db.monitor_dsn,
            "CONNBUDGET_PG_DSN": self.db.monitor_dsn,
            "CONNBUDGET_PGBOUNCER_DSN": self.db.bouncer_admin_dsn,
            "CONNBUDGET_APP_DSN": self.db.app_dsn,
            "CONNBUDGET_APP_POOLER_DSN": self.db.app_pooler_dsn,
            "CONNBUDGET_SANDBOX_DIR": str(self.state_dir),
            "CONNBUDGET_SANDBOX_NETWORK": self.network.mode,
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}",
        }

    def status(self) -> dict[str, Any]:
        """What runs, where, and whether it is alive."""
        return {
            "stateDir": str(self.state_dir),
            "network": self.state["network"],
            "apiServer": self.state.get("apiServer", {}).get("server"),
            "postgres": {"port": self.db.pg_port, "maxConnections": self.db.max_connections},
            "pgbouncer": {"port": self.db.bouncer_port},
            "processes": {
                name: {"pid": pid, "alive": alive(pid)}
                for name, pid in self.state.get("pids", {}).items()
            },
        }

    def mark_current(self) -> None:
        _pointer().parent.mkdir(parents=True, exist_ok=True)
        _pointer().write_text(str(self.state_dir))

    @classmethod
    def current(cls) -> Sandbox | None:
        """The sandbox that ``sandbox up`` made last, if it still exists."""
        try:
            state_dir = Path(_pointer().read_text().strip())
        except FileNotFoundError:
            return None
        return cls(state_dir) if (state_dir / "state.json").exists() else None


def is_sandbox_kubeconfig(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` is the admin kubeconfig of a live sandbox on this machine."""
    p = Path(path).resolve()
    state_file = p.parent / "state.json"
    if p.name != "admin.kubeconfig" or not p.parent.name.startswith(STATE_PREFIX):
        return False
    try:
        state = json.loads(state_file.read_text())
        config = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    server = config["clusters"][0]["cluster"]["server"]
    return bool(state.get("kubeconfig") == str(p) and server == state["apiServer"]["server"])


def all_sandboxes() -> list[Sandbox]:
    root = Path(tempfile.gettempdir())
    return [Sandbox(p.parent) for p in sorted(root.glob(f"{STATE_PREFIX}*/state.json"))]


def reap_orphans(progress: Progress = lambda _: None) -> None:
    """Remove sandboxes whose owning test session is gone (it was killed before its teardown)."""
    for sb in all_sandboxes():
        owner = int(sb.state.get("ownerPid") or 0)
        if owner and not alive(owner):
            progress(f"removing orphaned sandbox {sb.state_dir} (owner {owner} is gone)")
            sb.down(progress)


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)
    tmp.replace(state_dir / "state.json")


def _dump_logs(state_dir: Path, progress: Progress) -> None:
    for log in sorted((state_dir / "logs").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        progress(f"--- {log.name} (last lines)\n" + "\n".join(tail))
