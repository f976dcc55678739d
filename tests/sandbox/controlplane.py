"""etcd, kube-apiserver and kube-controller-manager on free ports, state in a temp folder.

What the API server is given, and why:
- its own CA and serving certificate (openssl), naming 127.0.0.1, localhost, the pod network's host
  address and the in-cluster names, so both the host and pods can verify it;
- ``--advertise-address``: without it the server looks for a default route, and this machine may
  have none ("Unable to find suitable network address");
- ``--token-auth-file`` with one admin token (group ``system:masters``) and
  ``--authorization-mode=RBAC``,
  so RBAC is enforced for everyone else;
- a service-account signing key and issuer, so ``kubectl create token`` (TokenRequest) works;
- ``--endpoint-reconciler-type=none``: the ``kubernetes`` Service gets no endpoints (pods get the
  API server's address directly), and a loopback advertise address would fail endpoint validation;
- an audit log (``logs/audit.log``, policy ``certs/audit-policy.yaml``) of the few writes the fault
  run judges an operator by: pod evictions and deletions and ConnectionBudget status patches
  (Metadata level), Lease writes (RequestResponse level, so the holder written is in the record).
  Everything else is left out (``level: None``), so the file stays small.

kube-controller-manager runs the controllers the sandbox needs and, on purpose, not the node
lifecycle and taint-eviction controllers: the sandbox's node never heartbeats, and those would mark
it unreachable and evict every pod after five minutes.
"""

from __future__ import annotations

import json
import secrets
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sandbox import tls
from sandbox.procs import free_port, run, spawn, wait_for

READY_TIMEOUT = 90.0  # seconds for /readyz; a 2-core machine needs about 10 s
CONTROLLERS = ",".join(
    [
        "deployment-controller",
        "replicaset-controller",
        "statefulset-controller",
        "garbage-collector-controller",
        "disruption-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "namespace-controller",
        "root-ca-certificate-publisher-controller",
        "clusterrole-aggregation-controller",
        "pod-garbage-collector-controller",
        "endpointslice-controller",
        "job-controller",
        "ttl-after-finished-controller",
        "resourcequota-controller",
    ]
)
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_NAME = "connbudget-sandbox"
AUDIT_LOG = "audit.log"  # under the state folder's logs/, one JSON event per line
AUDIT_LOG_MAX_MB = 200  # rotated past this size; a 30-minute fault run writes about 20 MB
# What the fault run (tests/faults) reads; the first matching rule wins.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: RequestResponse
    resources: [{group: coordination.k8s.io, resources: [leases]}]
    verbs: [create, update, patch]
  - level: Metadata
    resources: [{group: "", resources: [pods/eviction]}]
    verbs: [create]
  - level: Metadata
    resources: [{group: "", resources: [pods]}]
    verbs: [delete]
  - level: Metadata
    resources: [{group: connbudget.io, resources: [connectionbudgets/status]}]
    verbs: [patch, update]
  - level: None
"""


@dataclass(frozen=True)
class ControlPlane:
    """Addresses and credentials of a running control plane."""

    server: str
    kubeconfig: str
    ca_file: str
    pids: tuple[int, ...]


def make_certs(certs: Path, *, host_ip: str) -> None:
    """Write a CA and a serving certificate for the API server (valid 30 days)."""
    certs.mkdir(mode=0o700, exist_ok=True)
    ca = tls.make_ca(certs, "ca", days=30)
    sans = [
        "IP:127.0.0.1",
        "IP:10.96.0.1",
        "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ]
    if host_ip != "127.0.0.1":
        sans.append(f"IP:{host_ip}")
    tls.sign_server_cert(
        certs,
        "apiserver",
        ca=ca,
        common_name="kube-apiserver",
        sans=sans,
        days=30,
        extensions="basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n",
    )
    run(["openssl", "genrsa", "-out", str(certs / "sa.key"), "2048"])


def write_kubeconfig(
    path: Path, *, server: str, ca_file: Path, token: str, user: str, namespace: str = "default"
) -> None:
    """Write a kubeconfig with an embedded CA and a bearer token (JSON is valid YAML)."""
    import base64

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": CLUSTER_NAME,
                "context": {"cluster": CLUSTER_NAME, "user": user, "namespace": namespace},
            }
        ],
        "current-context": CLUSTER_NAME,
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


def start(state: Path, bin_dir: Path, *, tag: str, host_ip: str) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager; return once all three are ready."""
    certs = state / "certs"
    make_certs(certs, host_ip=host_ip)
    logs = state / "logs"
    etcd_port, etcd_peer, api_port, kcm_port = (free_port() for _ in range(4))

    etcd_log = logs / "etcd.log"
    etcd = spawn(
        [
            str(bin_dir / "etcd"),
            "--name=sandbox",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=sandbox=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
            "--quota-backend-bytes=1073741824",
        ],
        tag=tag,
        log=etcd_log,
    )
    wait_for(
        "etcd",
        lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"),
        timeout=30,
        proc=etcd,
        log=etcd_log,
    )

    admin_token = secrets.token_hex(32)
    tokens = certs / "tokens.csv"
    tokens.write_text(f'{admin_token},sandbox-admin,sandbox-admin,"system:masters"\n')
    tokens.chmod(0o600)
    api_log = logs / "kube-apiserver.log"
    policy = certs / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    api = spawn(
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={host_ip}",
            f"--secure-port={api_port}",
            f"--advertise-address={host_ip}",
            f"--cert-dir={certs}",
            f"--tls-cert-file={certs / 'apiserver.crt'}",
            f"--tls-private-key-file={certs / 'apiserver.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={certs / 'sa.key'}",
            f"--service-account-signing-key-file={certs / 'sa.key'}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--audit-policy-file={policy}",
            f"--audit-log-path={logs / AUDIT_LOG}",
            f"--audit-log-maxsize={AUDIT_LOG_MAX_MB}",
            "--audit-log-maxbackup=1",
            "--v=1",
        ],
        tag=tag,
        log=api_log,
    )
    server = f"https://{host_ip}:{api_port}"
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    wait_for(
        "kube-apiserver",
        lambda: _http_ok(f"{server}/readyz", ctx),
        timeout=READY_TIMEOUT,
        interval=0.25,
        proc=api,
        log=api_log,
    )

    kubeconfig = state / "admin.kubeconfig"
    write_kubeconfig(
        kubeconfig, server=server, ca_file=certs / "ca.crt", token=admin_token, user="sandbox-admin"
    )

    kcm_log = logs / "kube-controller-manager.log"
    kcm = spawn(
        [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={kcm_port}",
            f"--cert-dir={state / 'kcm'}",
            f"--service-account-private-key-file={certs / 'sa.key'}",
            f"--root-ca-file={certs / 'ca.crt'}",
            f"--controllers={CONTROLLERS}",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
            "--v=1",
        ],
        tag=tag,
        log=kcm_log,
    )
    return ControlPlane(
        server=server,
        kubeconfig=str(kubeconfig),
        ca_file=str(certs / "ca.crt"),
        pids=(etcd.pid, api.pid, kcm.pid),
    )


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:  # noqa: S310 (fixed local URL)
        return bool(resp.status == 200)
