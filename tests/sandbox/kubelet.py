"""A process-backed kubelet: pods of the sandbox's node run as local processes.

Run as ``python -m sandbox.kubelet STATE_DIR``. It

- registers the node ``sandbox-node`` (Ready, no taints) and binds every unscheduled pod to it
  (there is no scheduler);
- starts each container's command as a local process, in the pod's own network namespace in netns
  mode (an image loaded into the sandbox's store with a root filesystem runs chrooted into it,
  see ``sandbox.container``; a mapped image runs on this machine's filesystem), with the pod's
  environment resolved (``value``, ``fieldRef``, ``secretKeyRef``,
  ``configMapKeyRef``, ``envFrom``, ``$(VAR)`` expansion, ``KUBERNETES_SERVICE_HOST/PORT``);
- reports ``Running`` and ``Ready`` with the pod IP, restarts exited containers per
  ``restartPolicy``;
- when a pod is deleted or evicted, sends SIGTERM, waits up to the grace period, sends SIGKILL,
  removes
  the pod's network namespace (so its TCP connections close, as in a real cluster) and finalizes the
  deletion with a zero grace period, guarded by the pod's UID.

Container output goes to ``STATE_DIR/pods/<namespace>/<pod>/<container>.log`` (there is no
``kubectl logs``). A pod annotated ``sandbox.connbudget.io/process: "false"`` gets an address and is
reported Running without any process (for load tests with hundreds of pods).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from sandbox import container as container_mod
from sandbox import images as images_mod
from sandbox.network import PodNetwork
from sandbox.procs import stop_pid

NODE_NAME = "sandbox-node"
NO_PROCESS_ANNOTATION = "sandbox.connbudget.io/process"
# Where a pod finds its ServiceAccount token, CA and namespace (the standard in-pod path).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SECRETS_MOUNT = "/run/secrets"  # /var/run is /run; this folder is bind-mounted per pod
TOKEN_SECONDS = 3600
MAX_GRACE_SECONDS = 30.0  # the Kubernetes default terminationGracePeriodSeconds
RESYNC_SECONDS = 10.0  # full re-list, in case a watch event was missed
WATCH_TIMEOUT_SECONDS = 60  # server-side watch timeout before re-watching
RESTART_BACKOFF_MAX = (
    10.0  # seconds between restarts of a crashing container (the kubelet's is 300)
)

log = logging.getLogger("sandbox.kubelet")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log_path: Path
    # Runs before argv, inside the pod's network namespace: the ServiceAccount mount and the user.
    wrapper: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: str = ""
    next_start: float = 0.0
    last_exit: int | None = None
    finished_at: str = ""


@dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    slot: int
    ip: str
    restart_policy: str
    containers: list[Container] = field(default_factory=list)
    start_time: str = ""
    terminating: bool = False
    phase: str = "Running"


class Kubelet:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state = json.loads((state_dir / "state.json").read_text())
        self.tag: str = state["tag"]
        self.net = PodNetwork(mode=state["network"]["mode"], index=state["network"]["index"])
        self.images: dict[str, images_mod.Image] = state["images"]
        self.api_host, self.api_port = state["apiServer"]["host"], state["apiServer"]["port"]
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file=state["kubeconfig"], client_configuration=config
        )
        self.api = kubernetes.client.ApiClient(config)
        self.ca_cert = Path(config.ssl_ca_cert).read_text() if config.ssl_ca_cert else ""
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.runtimes: dict[str, PodRuntime] = {}
        self.lock = threading.RLock()
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.stopping = threading.Event()
        self.terminations: dict[str, threading.Thread] = {}

    # --- node -------------------------------------------------------------------------------

    def register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": NODE_NAME,
                "labels": {
                    "kubernetes.io/hostname": NODE_NAME,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "sandbox.connbudget.io/network": self.net.mode,
                },
            },
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(node)
        self.core.patch_node(NODE_NAME, [{"op": "replace", "path": "/spec/taints", "value": []}])
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "100Gi"}
        status = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": t,
                        "status": s,
                        "reason": r,
                        "message": m,
                        "lastHeartbeatTime": now_iso(),
                        "lastTransitionTime": now_iso(),
                    }
                    for t, s, r, m in [
                        (
                            "Ready",
                            "True",
                            "KubeletReady",
                            "sandbox kubelet is posting ready status",
                        ),
                        ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
                        ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
                        ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
                    ]
                ],
                "addresses": [
                    {"type": "InternalIP", "address": self.net.host_ip},
                    {"type": "Hostname", "address": NODE_NAME},
                ],
                "nodeInfo": {
                    "machineID": "sandbox",
                    "systemUUID": "sandbox",
                    "bootID": self.tag[-12:],
                    "kernelVersion": os.uname().release,
                    "osImage": "connbudget sandbox",
                    "containerRuntimeVersion": "sandbox://processes",
                    "kubeletVersion": "v1.36.3",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }
        self.core.patch_node_status(NODE_NAME, status)
        log.info("node registered", extra={"node": NODE_NAME, "network": self.net.mode})

    # --- main loop --------------------------------------------------------------------------

    def run(self) -> None:
        self.register_node()
        threading.Thread(target=self._watch, name="watch", daemon=True).start()
        next_resync = 0.0
        while not self.stopping.is_set():
            if time.monotonic() >= next_resync:
                self._resync()
                next_resync = time.monotonic() + RESYNC_SECONDS
            try:
                kind, pod = self.events.get(timeout=0.2)
            except queue.Empty:
                pass
            else:
                self._handle(kind, pod)
            self._supervise()
        self.shutdown()

    def _resync(self) -> None:
        try:
            pods = self.api.sanitize_for_serialization(self.core.list_pod_for_all_namespaces())
        except Exception:
            log.exception("resync failed")
            return
        seen = set()
        for pod in pods.get("items", []):
            seen.add(pod["metadata"]["uid"])
            self._handle("SYNC", pod)
        with self.lock:
            gone = [uid for uid in self.runtimes if uid not in seen]
        for uid in gone:
            self._stop_runtime(uid, grace=0.0, reason="pod no longer exists")

    def _watch(self) -> None:
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    listed = self.core.list_pod_for_all_namespaces()
                    rv = listed.metadata.resource_version
                w = kubernetes.watch.Watch()
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=rv,
                    timeout_seconds=WATCH_TIMEOUT_SECONDS,
                    allow_watch_bookmarks=True,
                    _preload_content=False,
                ):
                    obj = ev["raw_object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.events.put((ev["type"], obj))
            except ApiException as e:
                if e.status == 410:
                    rv = ""
                    continue
                log.warning("pod watch failed, retrying", extra={"error": str(e)})
                time.sleep(1)
            except Exception as e:  # connection reset by a restarting API server, etc.
                log.warning("pod watch failed, retrying", extra={"error": repr(e)})
                rv = ""
                time.sleep(1)

    def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        uid = meta["uid"]
        node = spec.get("nodeName") or ""
        if kind == "DELETED":
            self._stop_runtime(uid, grace=0.0, reason="pod deleted")
            return
        if node and node != NODE_NAME:
            return
        if meta.get("deletionTimestamp"):
            if node:
                self._begin_termination(pod)
            return
        if not node:
            self._bind(meta["namespace"], meta["name"])
            return
        phase = pod.get("status", {}).get("phase")
        with self.lock:
            known = uid in self.runtimes
        if not known and phase not in ("Succeeded", "Failed"):
            self._start_pod(pod)

    def _bind(self, namespace: str, name: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
        }
        try:
            self.core.create_namespaced_binding(namespace, body, _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning(
                    "binding failed", extra={"pod": f"{namespace}/{name}", "error": e.reason}
                )

    # --- starting pods ----------------------------------------------------------------------

    def _free_slot(self) -> int:
        used = {rt.slot for rt in self.runtimes.values()}
        return next(s for s in range(1, 100_000) if s not in used)

    def _start_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        try:
            plans = [(c, self._resolve_image(c)) for c in spec.get("containers", [])]
        except LookupError as e:
            self._patch_status(
                ns,
                name,
                {
                    "status": {
                        "phase": "Pending",
                        "conditions": [
                            {
                                "type": "PodScheduled",
                                "status": "True",
                                "lastTransitionTime": now_iso(),
                            },
                            {
                                "type": "Ready",
                                "status": "False",
                                "reason": "ImageNotMapped",
                                "message": str(e),
                                "lastTransitionTime": now_iso(),
                            },
                        ],
                    }
                },
            )
            return
        with self.lock:
            slot = self._free_slot()
            rt = PodRuntime(
                uid=uid,
                namespace=ns,
                name=name,
                slot=slot,
                ip=self.net.pod_ip(slot),
                restart_policy=spec.get("restartPolicy", "Always"),
                start_time=now_iso(),
            )
            self.runtimes[uid] = rt
        no_process = meta.get("annotations", {}).get(NO_PROCESS_ANNOTATION) == "false"
        try:
            if not no_process:
                self.net.add_pod(slot)
            pod_dir = self.state_dir / "pods" / ns / name
            pod_dir.mkdir(parents=True, exist_ok=True)
            pod_binds: list[tuple[str, str]] = []
            if not no_process and _automounts_token(spec):
                pod_binds.append((self._write_service_account(pod, pod_dir), SECRETS_MOUNT))
            for c, image in plans:
                env = self._resolve_env(pod, c, rt.ip, image["env"])
                argv = [_expand(a, env) for a in (c.get("command") or image["entrypoint"])]
                argv += [_expand(a, env) for a in (c.get("args") if "args" in c else image["cmd"])]
                if "rootfs" in image:
                    wrapper = _in_rootfs(spec, c, image, pod_dir, rt.ip, pod_binds)
                    cwd = str(pod_dir)
                else:
                    wrapper = _mount_namespace(pod_binds + _empty_dirs(spec, c, pod_dir), c)
                    wrapper += _run_as(spec, c)
                    cwd = c.get("workingDir") or str(pod_dir)
                rt.containers.append(
                    Container(
                        name=c["name"],
                        image=c.get("image", ""),
                        argv=argv,
                        env=env,
                        cwd=cwd,
                        log_path=pod_dir / f"{c['name']}.log",
                        wrapper=wrapper,
                    )
                )
            if not no_process:
                for cont in rt.containers:
                    self._spawn(rt, cont)
        except Exception as e:
            log.exception("starting pod failed", extra={"pod": f"{ns}/{name}"})
            self._patch_status(
                ns,
                name,
                {
                    "status": {
                        "phase": "Pending",
                        "conditions": [
                            {
                                "type": "Ready",
                                "status": "False",
                                "reason": "SandboxStartFailed",
                                "message": str(e)[:500],
                                "lastTransitionTime": now_iso(),
                            }
                        ],
                    }
                },
            )
            self._stop_runtime(uid, grace=0.0, reason="start failed")
            return
        if no_process:
            for cont in rt.containers:
                cont.started_at = now_iso()
        self._report(rt)
        log.info(
            "pod started",
            extra={
                "pod": f"{ns}/{name}",
                "ip": rt.ip,
                "slot": slot,
                "processes": 0 if no_process else len(rt.containers),
            },
        )

    def _write_service_account(self, pod: dict[str, Any], pod_dir: Path) -> str:
        """Write the pod's ServiceAccount token, CA and namespace, as the kubelet projects them.

        The token comes from the TokenRequest API, bound to the pod (it stops working when the pod
        is deleted). Returns the folder to bind-mount at ``/run/secrets``, so that they appear at
        the standard path ``/var/run/secrets/kubernetes.io/serviceaccount``.
        """
        meta, spec = pod["metadata"], pod["spec"]
        account = spec.get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        token = self.core.create_namespaced_service_account_token(
            account, meta["namespace"], request
        ).status.token
        secrets = pod_dir / "secrets"
        folder = secrets / "kubernetes.io" / "serviceaccount"
        folder.mkdir(parents=True, exist_ok=True)
        for path in (secrets, secrets / "kubernetes.io", folder):
            path.chmod(0o755)
        for file, text in (
            ("token", token),
            ("ca.crt", self.ca_cert),
            ("namespace", meta["namespace"]),
        ):
            (folder / file).write_text(text)
            (folder / file).chmod(0o644)  # the projected volume's default mode
        Path(SECRETS_MOUNT).mkdir(exist_ok=True)
        return str(secrets)

    def _resolve_image(self, container: dict[str, Any]) -> images_mod.Image:
        key = images_mod.image_key(container.get("image", ""))
        # An image loaded into the store (a real root filesystem) wins over the mapping.
        loaded = images_mod.stored_image(self.state_dir, key)
        if loaded is not None:
            return loaded
        if key in self.images:
            return self.images[key]
        if container.get("command"):
            # An unmapped image with an explicit command runs the command as is.
            return images_mod.Image(entrypoint=[], cmd=[], env={})
        raise LookupError(
            f"image {container.get('image')!r} is not mapped to a local command "
            f"(known: {', '.join(sorted(self.images))})"
        )

    def _spawn(self, rt: PodRuntime, cont: Container) -> None:
        env = dict(cont.env)
        env["CONNBUDGET_SANDBOX"] = self.tag
        with cont.log_path.open("ab") as out:
            cont.proc = subprocess.Popen(
                self.net.exec_prefix(rt.slot) + cont.wrapper + cont.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cont.cwd,
                start_new_session=True,
            )
        cont.started_at = now_iso()
        cont.last_exit = None

    def _resolve_env(
        self, pod: dict[str, Any], c: dict[str, Any], ip: str, image_env: dict[str, str]
    ) -> dict[str, str]:
        meta = pod["metadata"]
        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/tmp",  # noqa: S108 (what many images set)
            "LANG": "C.UTF-8",
            "HOSTNAME": meta["name"],
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api_port),
        }
        env.update(image_env)
        ns = meta["namespace"]
        for src in c.get("envFrom", []) or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self._read_config_map(
                    ns,
                    src["configMapRef"]["name"],
                    optional=src["configMapRef"].get("optional", False),
                )
            else:
                data = self._read_secret(
                    ns, src["secretRef"]["name"], optional=src["secretRef"].get("optional", False)
                )
            env.update({prefix + k: v for k, v in data.items()})
        for item in c.get("env", []) or []:
            if "value" in item or "valueFrom" not in item:
                env[item["name"]] = _expand(item.get("value", ""), env)
                continue
            vf = item["valueFrom"]
            value: str | None
            if "fieldRef" in vf:
                value = _field_ref(pod, vf["fieldRef"]["fieldPath"], ip, self.net.host_ip)
            elif "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                value = self._read_secret(ns, ref["name"], optional=ref.get("optional", False)).get(
                    ref["key"]
                )
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                value = self._read_config_map(
                    ns, ref["name"], optional=ref.get("optional", False)
                ).get(ref["key"])
            else:
                raise ValueError(f"env {item['name']}: unsupported valueFrom {sorted(vf)}")
            if value is not None:
                env[item["name"]] = value
        return env

    def _read_secret(self, ns: str, name: str, *, optional: bool) -> dict[str, str]:
        try:
            secret = self.core.read_namespaced_secret(name, ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _read_config_map(self, ns: str, name: str, *, optional: bool) -> dict[str, str]:
        try:
            cm = self.core.read_namespaced_config_map(name, ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise
        return dict(cm.data or {})

    # --- supervising and reporting ----------------------------------------------------------

    def _supervise(self) -> None:
        with self.lock:
            runtimes = [rt for rt in self.runtimes.values() if not rt.terminating]
        for rt in runtimes:
            changed = False
            for cont in rt.containers:
                if cont.proc is not None and cont.proc.poll() is not None:
                    cont.last_exit = cont.proc.returncode
                    cont.finished_at = now_iso()
                    cont.proc = None
                    changed = True
                    log.info(
                        "container exited",
                        extra={
                            "pod": f"{rt.namespace}/{rt.name}",
                            "container": cont.name,
                            "code": cont.last_exit,
                        },
                    )
                    restart = rt.restart_policy == "Always" or (
                        rt.restart_policy == "OnFailure" and cont.last_exit != 0
                    )
                    if restart:
                        cont.next_start = time.monotonic() + min(
                            2.0**cont.restarts, RESTART_BACKOFF_MAX
                        )
                    else:
                        cont.next_start = float("inf")
                if (
                    cont.proc is None
                    and cont.last_exit is not None
                    and time.monotonic() >= cont.next_start
                ):
                    cont.restarts += 1
                    self._spawn(rt, cont)
                    changed = True
            if changed:
                if all(c.proc is None and c.next_start == float("inf") for c in rt.containers):
                    failed = any(c.last_exit for c in rt.containers)
                    rt.phase = "Failed" if failed else "Succeeded"
                self._report(rt)

    def _report(self, rt: PodRuntime) -> None:
        t = now_iso()
        statuses = []
        for cont in rt.containers:
            running = cont.proc is not None or (cont.started_at and cont.last_exit is None)
            st: dict[str, Any] = {
                "name": cont.name,
                "image": cont.image,
                "imageID": f"sandbox://{cont.image}",
                "containerID": f"sandbox://{rt.uid}/{cont.name}",
                "restartCount": cont.restarts,
                "ready": bool(running),
                "started": bool(running),
            }
            if running:
                st["state"] = {"running": {"startedAt": cont.started_at}}
            elif cont.next_start != float("inf"):
                st["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
            else:
                st["state"] = {
                    "terminated": {
                        "exitCode": cont.last_exit or 0,
                        "finishedAt": cont.finished_at,
                        "startedAt": cont.started_at,
                    }
                }
            statuses.append(st)
        ready = "True" if statuses and all(s["ready"] for s in statuses) else "False"
        body = {
            "status": {
                "phase": rt.phase,
                "hostIP": self.net.host_ip,
                "hostIPs": [{"ip": self.net.host_ip}],
                "podIP": rt.ip,
                "podIPs": [{"ip": rt.ip}],
                "startTime": rt.start_time,
                "conditions": [
                    {
                        "type": "PodReadyToStartContainers",
                        "status": "True",
                        "lastTransitionTime": t,
                    },
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                    {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                    {"type": "Ready", "status": ready, "lastTransitionTime": t},
                ],
                "containerStatuses": statuses,
            }
        }
        self._patch_status(rt.namespace, rt.name, body)

    def _patch_status(self, ns: str, name: str, body: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, ns, body)
        except ApiException as e:
            if e.status != 404:
                log.warning("status patch failed", extra={"pod": f"{ns}/{name}", "error": e.reason})

    # --- stopping pods ----------------------------------------------------------------------

    def _begin_termination(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.lock:
            if uid in self.terminations:
                return
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            t = threading.Thread(
                target=self._terminate,
                args=(meta["namespace"], meta["name"], uid, min(grace, MAX_GRACE_SECONDS)),
                name=f"terminate-{meta['name']}",
                daemon=True,
            )
            self.terminations[uid] = t
        t.start()

    def _terminate(self, ns: str, name: str, uid: str, grace: float) -> None:
        self._stop_runtime(uid, grace=grace, reason="pod terminating")
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.core.delete_namespaced_pod(name, ns, body=body, grace_period_seconds=0)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning(
                    "finalizing deletion failed", extra={"pod": f"{ns}/{name}", "error": e.reason}
                )
        log.info("pod deleted", extra={"pod": f"{ns}/{name}"})
        with self.lock:
            self.terminations.pop(uid, None)

    def _stop_runtime(self, uid: str, *, grace: float, reason: str) -> None:
        with self.lock:
            rt = self.runtimes.get(uid)
            if rt is None or rt.terminating:
                return
            rt.terminating = True
        procs = [c.proc for c in rt.containers if c.proc is not None]
        threads = [
            threading.Thread(target=stop_pid, args=(p.pid,), kwargs={"grace": grace}) for p in procs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=1)
        self.net.remove_pod(rt.slot)
        with self.lock:
            self.runtimes.pop(uid, None)
        log.info(
            "pod stopped",
            extra={"pod": f"{rt.namespace}/{rt.name}", "reason": reason, "processes": len(procs)},
        )

    def shutdown(self) -> None:
        with self.lock:
            uids = list(self.runtimes)
        threads = [
            threading.Thread(
                target=self._stop_runtime,
                args=(u,),
                kwargs={"grace": 5.0, "reason": "kubelet stopping"},
            )
            for u in uids
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def _automounts_token(spec: dict[str, Any]) -> bool:
    return spec.get("automountServiceAccountToken") is not False


def _empty_dirs(
    spec: dict[str, Any], container: dict[str, Any], pod_dir: Path
) -> list[tuple[str, str]]:
    """(folder, mountPath) for each of the container's mounts of an ``emptyDir`` volume (other
    volume types are not supported: their mounts are left out)."""
    empty = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
    binds = []
    for m in container.get("volumeMounts") or []:
        if m.get("name") in empty:
            folder = pod_dir / "volumes" / m["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o1777)  # as writable as a real emptyDir for any runAsUser
            binds.append((str(folder), str(m["mountPath"])))
    return binds


# What a pod's process needs of the host: the project (its sources and virtual environment).
KEEP_VISIBLE = sorted({str(images_mod.TESTS_DIR.parent), sys.prefix})


def _mount_namespace(binds: list[tuple[str, str]], container: dict[str, Any]) -> list[str]:
    """The prefix that gives the container its own mount namespace: the bind mounts, then a
    read-only root filesystem if its securityContext asks for one (the binds stay writable)."""
    read_only = bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
    if not binds and not read_only:
        return []
    q = shlex.quote
    steps = []
    for src, dst in binds:
        # The sandbox shares the host's filesystem: a volume mounted over, say, /tmp would hide
        # a checkout (and its virtual environment) that lives there. Keep those visible through
        # the volume, as an image would have them in its own root filesystem.
        for keep in KEEP_VISIBLE:
            rel = os.path.relpath(keep, dst)
            if rel != "." and not rel.startswith(".."):
                inner = os.path.join(src, rel)
                steps.append(f"mkdir -p {q(inner)} && mount --bind {q(keep)} {q(inner)}")
        steps.append(f"mkdir -p {q(dst)} && mount --rbind {q(src)} {q(dst)}")
    if read_only:
        steps.append("mount -o remount,bind,ro /")
    script = " && ".join([*steps, 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]


def _in_rootfs(
    spec: dict[str, Any],
    container: dict[str, Any],
    image: images_mod.Image,
    pod_dir: Path,
    ip: str,
    pod_binds: list[tuple[str, str]],
) -> list[str]:
    """The prefix that runs a container in its image's root filesystem: the ServiceAccount token
    (read-only, at the standard path), the ``emptyDir`` volumes, ``/etc/hosts`` and
    ``/etc/hostname`` as a kubelet writes them, as the securityContext's user (else the image's)."""
    rootfs = Path(image["rootfs"])
    binds = [
        (str(Path(src) / "kubernetes.io" / "serviceaccount"), SERVICE_ACCOUNT_DIR)
        for src, dst in pod_binds
        if dst == SECRETS_MOUNT
    ]
    binds += _empty_dirs(spec, container, pod_dir)
    name = pod_dir.name
    etc = pod_dir / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{name}\n"
    )
    (etc / "hostname").write_text(f"{name}\n")
    binds += [(str(etc / "hosts"), "/etc/hosts"), (str(etc / "hostname"), "/etc/hostname")]
    pod_ctx = spec.get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    uid, gid = container_mod.image_user(rootfs, image.get("user", ""))
    user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
    if user is not None:
        uid, gid = int(user), int(user)
    if group is not None:
        gid = int(group)
    return container_mod.rootfs_prefix(
        rootfs=rootfs,
        scratch=pod_dir / "containers" / container["name"],
        binds=binds,
        read_only=bool(ctx.get("readOnlyRootFilesystem")),
        user=None if uid == 0 and gid == 0 else (uid, gid),
        workdir=container.get("workingDir") or image.get("workdir") or "/",
        read_only_binds=frozenset({SERVICE_ACCOUNT_DIR}),
    )


def _run_as(spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """``setpriv`` to the securityContext's user and group (the container's wins over the pod's)."""
    pod_ctx = spec.get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", user))
    if user is None or int(user) == 0:
        return []
    group = user if group is None else group
    return ["setpriv", f"--reuid={int(user)}", f"--regid={int(group)}", "--clear-groups", "--"]


def _expand(text: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` as Kubernetes does: ``$$`` escapes, unknown references stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def _field_ref(pod: dict[str, Any], path: str, ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": ip,
        "status.podIPs": ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    raise ValueError(f"unsupported fieldRef {path!r}")


class _JsonFormatter(logging.Formatter):
    _skip = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": now_iso(), "level": record.levelname.lower(), "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def main() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    kubelet = Kubelet(Path(sys.argv[1]))

    def stop(signum: int, frame: object) -> None:
        kubelet.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    kubelet.run()


if __name__ == "__main__":
    main()
